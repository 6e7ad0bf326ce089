"""Start or attach to Ray, and check that the cluster can ever hold a stage's workers.

A resource request that can never be met does not fail in Ray Train: the worker group's
start-up times out and is retried forever, which looks like a hang. :func:`check_resources`
compares the request with the cluster's resources first and fails with a message.

A cluster whose autoscaler can add nodes is the exception: there the request may fit once
the nodes come. Ray 2.60 has no public API that says whether an autoscaler runs (Train and
Tune read Ray-internal state or a cluster-launcher file), so the user says so:
``--autoscaling`` or ``DSNET_AUTOSCALING=1`` turns the refusal into a warning.

Each worker reserves ``max(ray.cpus_per_worker, 1 + workers)`` CPUs (:func:`worker_cpus`):
its training process plus one CPU per DataLoader process of the stage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dsnet.config import StageConfig
from pipelines.command import trap_sigterm
from pipelines.config import RayConfig
from pipelines.storage import RunStorage, StorageError

REPO_ROOT = Path(__file__).resolve().parent.parent
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
AUTOSCALING_ENV = "DSNET_AUTOSCALING"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
_LOCALHOST = "127.0.0.1"
_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"
_EPS = 1e-9
_TRUE = ("1", "true", "yes", "on")


class ResourceError(RuntimeError):
    """The Ray cluster (or this machine) can never provide what a stage asks for."""


def attaching(address: str | None) -> bool:
    """Whether :func:`init_ray` would join an existing cluster rather than start one."""
    return bool(address or os.environ.get("RAY_ADDRESS")) or ray.is_initialized()


def init_ray(address: str | None = None, ray_cfg: RayConfig | None = None) -> bool:
    """Connect to Ray: reuse this process's session, attach to a cluster, or start one.

    Args:
        address: a cluster address (``auto``, ``HOST:PORT``, ``ray://...``); ``RAY_ADDRESS``
            (set inside ``ray job submit`` jobs) is used when this is None.
        ray_cfg: its ``health_check_interval_s`` is exported to this process's
            environment, so that the Train controller polls workers that often: a Ray
            started here inherits it, and Train hands it from the driver to the controller
            of an attached cluster (0.1 s cuts each worker group's start-up).

    Returns:
        True when this call connected (the caller should ``ray.shutdown()``), False when
        Ray was already initialised in this process (a test fixture, a notebook).
    """
    if ray.is_initialized():
        return False
    if ray_cfg is not None:
        os.environ[HEALTH_CHECK_ENV] = str(ray_cfg.health_check_interval_s)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Attaching: the cluster owns the CPU count; passing num_cpus here raises.
        ray.init(address=address, log_to_driver=True)
        return True
    # Workers inherit this process's environment (PYTHONPATH, the health-check interval,
    # the settings below) and get its working directory on sys.path, so they import the
    # same dsnet/pipelines.
    port = _free_port()
    os.environ.update(local_ray_env(port))
    with _quiet_auth_notice():
        ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=True,
                 dashboard_host=_LOCALHOST, dashboard_port=port)
    return True


def local_ray_env(dashboard_port: int) -> dict[str, str]:
    """Environment for a Ray this command starts on this machine (never an attached
    cluster's), each a public Ray setting; a value the user set wins, except the State
    API address, which must be this Ray's.

    * ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``: the watcher polls for nodes being
      drained (spot preemption) and is created with restarts and its arguments in the
      object store, which Ray logs as an error at every stage start; one machine has no
      other node to drain, so it has nothing to watch.
    * ``RAY_API_SERVER_ADDRESS``: Train's placement-group cleaner (and Tune) look the
      cluster up through the State API; without an address they search the machine and
      fail ("Found multiple active Ray instances", a traceback per stage), or pick
      another user's cluster, when a second Ray runs here.

    ``RAY_AUTH_MODE`` is left alone: Ray turns token authentication on for a new local
    cluster, and setting the mode after ``import ray`` desynchronises this process from
    the Ray it starts (measured: the GCS refuses the driver).
    """
    return {
        "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
        PREEMPTION_WATCHER_ENV: os.environ.get(PREEMPTION_WATCHER_ENV, "0"),
        "RAY_API_SERVER_ADDRESS": f"http://{_LOCALHOST}:{dashboard_port}",
    }


class _DropAuthNotice(logging.Filter):
    """Drops Ray's "Token authentication is enabled for this Ray cluster" notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_AUTH_NOTICE)


@contextlib.contextmanager
def _quiet_auth_notice() -> Iterator[None]:
    """While a local Ray starts, hide the notice that Ray enabled token authentication
    (it stays enabled; the notice only says how to turn it off). A filter on the public
    ``ray`` logger's handlers, not a lower level: Ray's other start-up warnings (a small
    /dev/shm, ports) still show. Removed again, so an attached cluster's notices show."""
    handlers = list(logging.getLogger("ray").handlers)
    notice = _DropAuthNotice()
    for handler in handlers:
        handler.addFilter(notice)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(notice)


def _free_port() -> int:
    """A TCP port free now on this machine, for the dashboard (and so the State API
    address is known before Ray starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOCALHOST, 0))
        return int(sock.getsockname()[1])


def worker_gpus(ray_cfg: RayConfig) -> float:
    """GPUs each worker reserves: ``gpus_per_worker``, or one when only ``use_gpu`` is set."""
    if not ray_cfg.use_gpu:
        return 0.0
    return ray_cfg.gpus_per_worker or 1.0


def worker_cpus(ray_cfg: RayConfig, loaders: int = 0) -> float:
    """CPUs each worker of a stage with ``loaders`` DataLoader processes reserves.

    ``max(cpus_per_worker, 1 + loaders)``: one for the training process and one per loader
    process. A smaller bundle would let Ray pack more work on a node than it has cores
    (the ImageNet stages run 10 loaders per worker), and the stage crawls.
    """
    return max(ray_cfg.cpus_per_worker, 1.0 + loaders)


def cpu_request(ray_cfg: RayConfig, stages: Mapping[str, StageConfig] | None = None
                ) -> tuple[float, str, str]:
    """The largest per-worker CPU bundle over ``stages`` (they run one after another, so
    the largest is what the cluster must hold), why it is that large, and what lowers it."""
    per, why, lower = ray_cfg.cpus_per_worker, "", "ray.cpus_per_worker"
    for name, cfg in (stages or {}).items():
        need = worker_cpus(ray_cfg, cfg.workers)
        if need > per + _EPS:
            per, lower = need, f"the {name} stage's workers (DataLoader processes)"
            why = f" (1 + {cfg.workers} DataLoader processes of the {name} stage)"
    return per, why, lower


def autoscaling_from_env() -> bool:
    """Whether ``DSNET_AUTOSCALING`` says the cluster's autoscaler can add nodes."""
    return os.environ.get(AUTOSCALING_ENV, "").strip().lower() in _TRUE


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of each alive node (``ray.nodes()``); tests replace this function."""
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def resource_shortfalls(ray_cfg: RayConfig, nodes: list[dict[str, float]],
                        stages: Mapping[str, StageConfig] | None = None) -> list[str]:
    """What the ``nodes`` can never give the stages' workers, one sentence each (empty:
    it fits). Checks the totals and that one worker's bundle fits on some node: Ray
    places a bundle on a single node, so 8 x 11 CPUs over 8-CPU nodes never starts."""
    n = ray_cfg.num_workers
    if n == 0:
        return []
    out = []
    per = cpu_request(ray_cfg, stages)[0]
    largest = max((x.get("CPU", 0.0) for x in nodes), default=0.0)
    cpu = _cpu_shortfall(ray_cfg, sum(x.get("CPU", 0.0) for x in nodes), "the cluster has",
                         stages)
    if cpu:
        out.append(cpu)
    elif per > largest + _EPS:
        out.append(f"one worker needs {per:g} CPUs but the largest node has {largest:g}; "
                   "lower ray.cpus_per_worker or the stages' workers (DataLoader processes)")
    gpus, have_gpu = n * worker_gpus(ray_cfg), sum(x.get("GPU", 0.0) for x in nodes)
    if gpus > have_gpu + _EPS:
        out.append(f"needs {gpus:g} GPUs for {n} workers x {worker_gpus(ray_cfg):g} GPU but "
                   f"the cluster has {have_gpu:g}; drop --use-gpu or lower --num-workers or "
                   "ray.gpus_per_worker")
    return out


def check_resources(ray_cfg: RayConfig, stages: Mapping[str, StageConfig] | None = None,
                    autoscaling: bool | None = None) -> None:
    """Raise :class:`ResourceError` if the cluster can never hold the stages' workers.

    Compares ``num_workers`` x per-worker CPUs (:func:`cpu_request`; GPUs with
    ``use_gpu``) with the alive nodes' resources; Ray itself would wait forever.

    Args:
        stages: the stages to run, for their DataLoader processes; None counts
            ``cpus_per_worker`` alone.
        autoscaling: the cluster's autoscaler can add nodes, so a shortfall is printed as
            a warning and the stage waits for them; None reads ``DSNET_AUTOSCALING``.
    """
    problems = resource_shortfalls(ray_cfg, cluster_nodes(), stages)
    if not problems:
        return
    if autoscaling is None:
        autoscaling = autoscaling_from_env()
    if autoscaling:
        for problem in problems:
            print(f"warning: {problem}; starting anyway: the autoscaler may add nodes "
                  "(--autoscaling / DSNET_AUTOSCALING) and the stage waits until they join",
                  file=sys.stderr, flush=True)
        return
    raise ResourceError(f"{problems[0]} (if the cluster's autoscaler can add nodes, pass "
                        "--autoscaling or set DSNET_AUTOSCALING=1)")


def _cpu_shortfall(ray_cfg: RayConfig, have: float, where: str,
                   stages: Mapping[str, StageConfig] | None) -> str | None:
    """The CPU sentence of :func:`resource_shortfalls`, or None when ``have`` is enough."""
    per, why, lower = cpu_request(ray_cfg, stages)
    cpus = ray_cfg.num_workers * per
    if cpus <= have + _EPS:
        return None
    return (f"needs {cpus:g} CPUs for {ray_cfg.num_workers} workers x {per:g} CPU{why} but "
            f"{where} {have:g}; lower --num-workers or {lower}")


def check_local_cpus(ray_cfg: RayConfig, address: str | None,
                     stages: Mapping[str, StageConfig] | None = None) -> None:
    """The CPU part of :func:`check_resources` for a Ray this command would start on this
    machine (``num_cpus=os.cpu_count()``): found before Ray's seconds of start-up. No
    autoscaler ever adds nodes to it, so a shortfall is always an error."""
    if ray_cfg.num_workers > 0 and not attaching(address):
        problem = _cpu_shortfall(ray_cfg, float(os.cpu_count() or 1), "this machine has",
                                 stages)
        if problem:
            raise ResourceError(problem)


def check_local_gpu(ray_cfg: RayConfig, address: str | None) -> None:
    """Fail before starting anything when ``use_gpu`` is asked of a machine without CUDA.

    Only for runs on this machine (in-process, or a local Ray we start); a cluster's
    GPUs are checked by :func:`check_resources` once attached.
    """
    if not ray_cfg.use_gpu or (ray_cfg.num_workers > 0 and attaching(address)):
        return
    import torch

    if not torch.cuda.is_available():
        raise ResourceError("--use-gpu (ray.use_gpu) was given but this machine has no CUDA "
                            "GPU; drop it or submit to a cluster with GPUs")


def check_output_dir(run_dir: Path, min_free_mb: float) -> None:
    """Fail before any work when the run folder cannot be written or its disk is nearly full.

    Creates ``run_dir`` (and parents), writes and deletes a probe file in it, and checks
    ``shutil.disk_usage``: otherwise a read-only or full disk surfaces only when the first
    checkpoint is saved, an epoch (or a day) into the run.

    Raises:
        ResourceError: the folder cannot be created or written, or less than
            ``min_free_mb`` MiB are free on its disk.
    """
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ResourceError(f"cannot create the output folder {run_dir}: {blocker} is a file, "
                            "not a folder; pass --output DIR")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dsnet-write-probe-", dir=run_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(b"probe")
        os.unlink(probe)
    except OSError as e:
        raise ResourceError(f"cannot write the output folder {run_dir}: {e.strerror or e}; "
                            "pass --output DIR on a writable disk") from None
    free_mb = shutil.disk_usage(run_dir).free / 2**20
    if free_mb < min_free_mb:
        raise ResourceError(f"only {free_mb:.0f} MB free on the disk of {run_dir}, below "
                            f"ray.min_free_mb ({min_free_mb:.0f} MB); free space, pass --output "
                            "DIR on another disk, or lower it with --set ray.min_free_mb=N")


def _probe_node(storage: RunStorage, token_path: str, token: str) -> str | None:
    """On one node: the driver's token file is visible (the same storage) and the run
    folder is writable; the problem as a sentence, or None."""
    where = f"node {ray.util.get_node_ip_address()}"
    try:
        seen = storage.read_text(token_path)
    except Exception as e:  # noqa: BLE001 - any filesystem error is the answer
        return f"cannot read the run folder {storage} from {where}: {' '.join(str(e).split())}"
    if seen != token:
        return (f"the run folder {storage} on {where} is not the driver's (a node-local path?); "
                "use storage every node shares: a network file system or s3://... / gs://...")
    try:
        storage.check_writable(where)
    except StorageError as e:
        return str(e)
    return None


_probe_task = ray.remote(num_cpus=0, max_retries=0)(_probe_node)


def probe_storage(storage: RunStorage, timeout_s: float = 120.0) -> None:
    """Before training: every alive node that can host a worker reaches and writes the run
    folder, and sees the driver's files in it. Skipped for one node and a local folder (the
    driver's own check covered that disk).

    Raises:
        StorageError: naming the first node that cannot, and why.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive") and (n.get("Resources") or {}).get("CPU")]
    if len(nodes) <= 1 and storage.is_local:
        return
    token = os.urandom(8).hex()
    token_path = storage.path(f".dsnet-probe-{token}")
    storage.write_text(token_path, token)
    try:
        refs = [_probe_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(storage, token_path, token) for n in nodes]
        problems = [p for p in ray.get(refs, timeout=timeout_s) if p]
    finally:
        storage.fs.delete_file(token_path)
    if problems:
        raise StorageError(problems[0])


class RaySession:
    """Ray for one command: connected lazily (only if a stage must run on Ray), checked, and
    shut down at the end if this command connected it.

    Use as a context manager; :meth:`ensure` before submitting a stage.

    Args:
        stages: the stages it will run, so the check counts their DataLoader processes.
        autoscaling: see :func:`check_resources`; ignored for a Ray this command starts
            itself, which no autoscaler grows.
        storage: the run folder, probed from every node (:func:`probe_storage`).
    """

    def __init__(self, ray_cfg: RayConfig, address: str | None = None,
                 stages: Mapping[str, StageConfig] | None = None,
                 autoscaling: bool | None = None, storage: RunStorage | None = None) -> None:
        self.ray_cfg = ray_cfg
        self.storage = storage
        self.address = address or ray_cfg.address
        self.stages = stages
        self.autoscaling = autoscaling
        self.connected = False
        self.ready = False

    def ensure(self) -> None:
        """Connect (see :func:`init_ray`), :func:`check_resources` and (given a run
        folder) :func:`probe_storage`, once."""
        if self.ready:
            return
        attached = attaching(self.address)
        self.connected = init_ray(self.address, self.ray_cfg)
        if self.connected:
            trap_sigterm()  # ray.init installed its own SIGTERM handler, which just exits
        check_resources(self.ray_cfg, self.stages, self.autoscaling if attached else False)
        if self.storage is not None:
            probe_storage(self.storage)
        self.ready = True

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.connected:
            ray.shutdown()
        self.connected = self.ready = False
