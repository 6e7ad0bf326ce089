"""A real two-node Ray cluster on this machine (a head and a worker node, 1 CPU each, on
loopback, started and stopped by PID): the tiny pipeline submitted with ``ray job submit``
and a ``runtime_env``, its 2 workers spread over both nodes; the worker node is killed in
the middle of the supernet stage and a replacement started. The stage resumes from its
last checkpoint and finishes, with no checkpointed epoch run again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pipelines.runtime import REPO_ROOT
from tests.conftest import FAST_OVERRIDES
from tests.procs import BIN, RayCluster, ray_env

EPOCHS = 30  # supernet epochs: enough that the kill lands mid-stage
KILL_AFTER = 2  # kill once the checkpoint of this many epochs is on disk
# What the README's cluster command passes; pip is left out here (a virtualenv per job
# costs ~80 s on 2 cores; its use is measured by hand, see README).
RUNTIME_ENV = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}}


def _collect(stream, lines: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: lines.extend(stream), daemon=True)
    thread.start()
    return thread


def _wait_for_checkpoint(folder: Path, epochs: int, job: subprocess.Popen,
                         timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not list(folder.glob(f"checkpoint_epoch{epochs:03d}_*/checkpoint.pt")):
        if job.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no epoch-{epochs} checkpoint in {folder} (job rc "
                                 f"{job.returncode})")
        time.sleep(0.05)


@pytest.mark.ray
def test_job_on_two_nodes_survives_losing_one(tmp_path: Path) -> None:
    cluster = RayCluster("mn")
    lines: list[str] = []
    job = None
    try:
        cluster.add_node()
        out = tmp_path / "runs"
        job = subprocess.Popen(
            [str(BIN / "ray"), "job", "submit", "--address", cluster.url, "--working-dir", ".",
             "--runtime-env-json", json.dumps(RUNTIME_ENV), "--",
             "python", "-m", "pipelines.full", "-c", "dsnet/configs/tiny.yml", "--output", str(out),
             "--name", "mn", "--set", "ray.placement_strategy=STRICT_SPREAD",
             "--set", "ray.max_failures=3", "--set", f"supernet.epochs={EPOCHS}",
             *FAST_OVERRIDES],
            cwd=REPO_ROOT, env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        reader = _collect(job.stdout, lines)
        _wait_for_checkpoint(out / "mn" / "supernet", KILL_AFTER, job, timeout=300)
        time.sleep(0.3)  # the Train controller registers it at its next 0.1 s poll
        os.kill(cluster.raylet_pid(1), signal.SIGKILL)
        cluster.add_node()  # the replacement: STRICT_SPREAD needs two nodes again
        rc = job.wait(timeout=500)
        reader.join(timeout=10)
        log = "".join(lines)
        assert rc == 0, log[-5000:]
    finally:
        if job is not None and job.poll() is None:
            job.kill()
        cluster.stop()
    rec = json.loads((out / "mn" / "run.json").read_text())
    assert all(rec["stages"][s]["status"] == "done" for s in ("supernet", "reset_bn", "gate"))
    sup = rec["stages"]["supernet"]
    assert sup["attempts"] == 1  # Ray restarted the worker group; the job never failed
    resumed = int(re.search(r"checkpoint_epoch(\d+)_", sup["resumed_from"] or "").group(1))
    assert resumed >= KILL_AFTER
    assert sup["epochs_run"] == list(range(resumed, EPOCHS))  # no checkpointed epoch again
    assert "runtime_resources" in rec["versions"]["dsnet_source"]  # the job's working_dir
    assert (out / "mn" / "results" / "dsnet_final.pt").is_file()
    assert log.count(f"[supernet] epoch {EPOCHS}/{EPOCHS}") == 1
