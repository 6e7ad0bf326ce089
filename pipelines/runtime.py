"""Start or attach to Ray, and check that the cluster can ever hold a stage's workers.

A resource request that can never be met does not fail in Ray Train: the worker group's
start-up times out and is retried forever, which looks like a hang. :func:`check_resources`
compares the request with the cluster's total resources first and fails with a message.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import ray

from dsnet.config import RayConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
_EPS = 1e-9


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
        ray_cfg: its ``health_check_interval_s`` is exported before a local start so the
            Train controller polls workers that often (0.1 s cuts a 2-worker start-up);
            an attached cluster keeps the value its processes were started with.

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
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Workers inherit this process's environment (PYTHONPATH, the health-check interval)
    # and get its working directory on sys.path, so they import the same dsnet/pipelines.
    ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=True)
    return True


def worker_gpus(ray_cfg: RayConfig) -> float:
    """GPUs each worker reserves: ``gpus_per_worker``, or one when only ``use_gpu`` is set."""
    if not ray_cfg.use_gpu:
        return 0.0
    return ray_cfg.gpus_per_worker or 1.0


def check_resources(ray_cfg: RayConfig) -> None:
    """Raise :class:`ResourceError` if the cluster can never hold the stage's workers.

    Compares ``num_workers`` x per-worker CPUs (and GPUs with ``use_gpu``) with the
    cluster's total resources; Ray itself would wait forever.
    """
    n = ray_cfg.num_workers
    if n == 0:
        return
    total = ray.cluster_resources()
    _check_cpus(ray_cfg, total.get("CPU", 0.0), "the cluster has")
    gpus = n * worker_gpus(ray_cfg)
    have_gpu = total.get("GPU", 0.0)
    if gpus > have_gpu + _EPS:
        raise ResourceError(
            f"needs {gpus:g} GPUs for {n} workers x {worker_gpus(ray_cfg):g} GPU but the "
            f"cluster has {have_gpu:g}; drop --use-gpu or lower --num-workers or "
            f"ray.gpus_per_worker")


def _check_cpus(ray_cfg: RayConfig, have: float, where: str) -> None:
    cpus = ray_cfg.num_workers * ray_cfg.cpus_per_worker
    if cpus > have + _EPS:
        raise ResourceError(
            f"needs {cpus:g} CPUs for {ray_cfg.num_workers} workers x "
            f"{ray_cfg.cpus_per_worker:g} CPU but {where} {have:g}; lower --num-workers or "
            "ray.cpus_per_worker")


def check_local_cpus(ray_cfg: RayConfig, address: str | None) -> None:
    """The CPU part of :func:`check_resources` for a Ray this command would start on this
    machine (``num_cpus=os.cpu_count()``): found before Ray's seconds of start-up."""
    if ray_cfg.num_workers > 0 and not attaching(address):
        _check_cpus(ray_cfg, float(os.cpu_count() or 1), "this machine has")


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


class RaySession:
    """Ray for one command: connected lazily (only if a stage must run on Ray), checked, and
    shut down at the end if this command connected it.

    Use as a context manager; :meth:`ensure` before submitting a stage.
    """

    def __init__(self, ray_cfg: RayConfig, address: str | None = None) -> None:
        self.ray_cfg = ray_cfg
        self.address = address or ray_cfg.address
        self.connected = False
        self.ready = False

    def ensure(self) -> None:
        """Connect (see :func:`init_ray`) and :func:`check_resources`, once."""
        if self.ready:
            return
        self.connected = init_ray(self.address, self.ray_cfg)
        if self.connected:
            trap_sigterm()  # ray.init installed its own SIGTERM handler, which just exits
        check_resources(self.ray_cfg)
        self.ready = True

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.connected:
            ray.shutdown()
        self.connected = self.ready = False


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def trap_sigterm() -> Any:
    """Make SIGTERM (``ray job stop``, a scheduler) raise KeyboardInterrupt, like Ctrl-C, so
    the command cancels its stage and records it; returns the previous handler.

    Does nothing (returns None) outside the main thread, where signals cannot be handled.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)
