"""Servers the tests start and stop themselves, on loopback, by PID: Ray nodes started with
``ray start --block`` (never ``ray stop``: it would kill every Ray on the machine) and
HTTP services (the S3 server)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import RAY_TEST_ENV

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_http(url: str, timeout: float) -> bytes:
    """GET ``url`` until it answers (its body), or raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session=True`` and its whole group.

    A ``ray start --block`` takes 30-60 s to leave on SIGTERM; its group holds only that
    node's processes (GCS, raylet, dashboard, workers), so SIGKILL after a grace is safe.
    """
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def ray_env() -> dict[str, str]:
    """The environment of every Ray process a test starts (auth agreed, no RAY_ADDRESS)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TEST_ENV, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


class RayCluster:
    """A head and worker nodes on this machine, 1 CPU each, each with its own temp dir."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.port, self.dashboard, client, agent = free_ports(4)
        self.nodes: list[subprocess.Popen] = []
        self.temps: list[str] = []
        self._start(["--head", f"--port={self.port}", f"--dashboard-port={self.dashboard}",
                     f"--ray-client-server-port={client}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-agent-listen-port={agent}"])
        wait_http(f"{self.url}/api/version", timeout=90)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def _start(self, args: list[str]) -> subprocess.Popen:
        temp = f"/tmp/r{self.tag}{len(self.nodes)}_{os.getpid()}"
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--num-cpus=1",
             "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", *args],
            env=ray_env(), start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        self.nodes.append(proc)
        self.temps.append(temp)
        return proc

    def add_node(self, timeout: float = 90) -> subprocess.Popen:
        """Start a worker node and wait until the cluster counts it alive."""
        want = self.alive() + 1
        agent, = free_ports(1)
        proc = self._start([f"--address=127.0.0.1:{self.port}",
                            f"--dashboard-agent-listen-port={agent}"])
        deadline = time.monotonic() + timeout
        while self.alive() < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {len(self.nodes) - 1} did not join in {timeout} s")
            time.sleep(0.5)
        return proc

    def alive(self) -> int:
        """Alive nodes, from the State API."""
        body = wait_http(f"{self.url}/api/v0/nodes?limit=100", timeout=30)
        nodes = json.loads(body)["data"]["result"]["result"]
        return sum(n["state"] == "ALIVE" for n in nodes)

    def raylet_pid(self, index: int) -> int:
        """The raylet process of node ``index`` (found by its temp dir in /proc)."""
        temp = self.temps[index]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"/raylet") and any(temp.encode() in c for c in cmd):
                return int(entry.name)
        raise LookupError(f"no raylet for node {index} ({temp})")

    def stop(self) -> None:
        """Stop every node this cluster started (by process group) and remove temp dirs."""
        import shutil

        for proc in reversed(self.nodes):
            stop_group(proc)
        for temp in self.temps:
            shutil.rmtree(temp, ignore_errors=True)
