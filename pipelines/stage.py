"""One DS-Net stage on Ray Train, and the supernet -> reset_bn -> gate sequence.

A stage is a Ray task (``num_cpus=0``: it only waits) that builds and fits a
``TorchTrainer``; every Train worker calls :func:`dsnet.train.engine.run_stage` with a
:class:`RayReportHook` that reports metrics and rank 0's checkpoint after every epoch.
A restarted worker group (``FailureConfig.max_failures``) or a re-run with the same run
folder finds the latest checkpoint with ``ray.train.get_checkpoint()`` and resumes.

``ray.num_workers: 0`` runs :func:`dsnet.train.engine.run_stage` in the driver instead (no Ray),
with the latest checkpoint at ``<run>/<stage>/local/checkpoint.pt`` and the one before it
at ``checkpoint.prev.pt``.

A latest checkpoint that cannot be read on resume (truncated, corrupt), or a finished
stage's final one whose size or SHA-256 no longer match ``run.json``, is skipped with a
warning for the newest older one that is intact (Ray's run folder keeps
``ray.num_to_keep``); the stage's ``run.json`` entry lists it under ``corrupt_checkpoints``.

Fault injection for tests is in :mod:`pipelines.faults`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch.distributed
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dsnet.config import StageConfig, config_to_dict, stage_config_from_dict
from dsnet.models.checkpoint import CheckpointError, first_readable, rotation_candidates
from dsnet.train.distributed import DistContext
from dsnet.train.engine import (
    CheckpointHook,
    ConsoleHook,
    EpochReport,
    Hook,
    format_report,
    run_stage,
)
from dsnet.utils.provenance import now, to_builtins
from pipelines.command import one_line
from pipelines.config import RayConfig
from pipelines.faults import FaultHook, fault_from_env
from pipelines.run_record import RunRecord, checkpoint_fields
from pipelines.runtime import RaySession, worker_cpus, worker_gpus
from pipelines.storage import RunStorage, as_storage

CKPT_FILE = "checkpoint.pt"
DAMAGED = "has another size or SHA-256 than run.json recorded"


class StageFailed(RuntimeError):
    """A stage's training failed (after Ray's retries); the message summarises why."""


# ----------------------------------------------------------------------------- hooks


class RayReportHook(Hook):
    """Reports every epoch to Ray Train, with rank 0's checkpoint; rank 0 prints progress."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_epoch_end(self, report: EpochReport, save: Callable[[Path], None]) -> None:
        metrics = {**report.metrics, "epoch": report.epoch, "epochs": report.epochs}
        if self.rank != 0:
            # report() is a barrier: every rank calls it once per epoch, without a checkpoint.
            ray.train.report(metrics, checkpoint=None)
            return
        # Workers' stdout reaches the driver (prefixed with the worker's pid). Not print():
        # Ray Train patches it into a logger that also tees to stdout (two copies).
        sys.stdout.write(format_report(report) + "\n")
        sys.stdout.flush()
        with tempfile.TemporaryDirectory(prefix="dsnet-ckpt-") as tmp:
            save(Path(tmp) / CKPT_FILE)
            # Uploads synchronously to the run's storage before returning.
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(report.epoch))

    def on_log(self, line: str) -> None:
        if self.rank == 0:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


class StorageCheckpointHook(Hook):
    """For a stage run after another in the same worker group (:func:`_run_chained`):
    rank 0 prints progress and writes each epoch's checkpoint straight to
    ``<run>/<stage>/checkpoint_epoch<N>_<time>/`` in the run's storage (not through
    ``ray.train.report``, which would make it the first stage's latest checkpoint)."""

    def __init__(self, rank: int, storage: RunStorage, stage: str) -> None:
        self.rank, self.storage, self.stage = rank, storage, stage
        self.ref: str | None = None

    def on_epoch_end(self, report: EpochReport, save: Callable[[Path], None]) -> None:
        if self.rank != 0:
            return
        sys.stdout.write(format_report(report) + "\n")
        sys.stdout.flush()
        folder = self.storage.path(self.stage, checkpoint_dir_name(report.epoch))
        with tempfile.TemporaryDirectory(prefix="dsnet-ckpt-") as tmp:
            save(Path(tmp) / CKPT_FILE)
            self.storage.upload_dir(tmp, folder)
        self.ref = self.storage.ref(posixpath.join(folder, CKPT_FILE))


def checkpoint_dir_name(epoch: int) -> str:
    """The run folder's name for the checkpoint after ``epoch`` (0-based):
    ``checkpoint_epoch<N>_<local time to the microsecond>``, N the epochs done.

    The time keeps names unique when an epoch runs again (a restarted worker group, a
    fallback past a damaged checkpoint): Ray deletes a folder when it drops the registered
    entry pointing at it, so a reused name would lose the new checkpoint with the old one.
    """
    return f"checkpoint_epoch{epoch + 1:03d}_{datetime.now():%Y-%m-%d_%H-%M-%S.%f}"


def reports_collected_barrier(timeout_s: float = 60.0) -> None:
    """Every rank: wait until the Train controller has collected this rank's reports, then
    meet the other ranks. Past it, the controller holds every rank's report of the epoch,
    so the epoch's checkpoint is registered.

    ``ray.train.report()`` returns once the report is queued in the worker; a worker that
    dies before the controller's next poll (or while rank 0 still uploads) loses the
    epoch's checkpoint, and the restarted group repeats that epoch.
    """
    # COMMITTED: blocks until the controller has registered every report this rank made
    # (no validation to wait for); on timeout it returns anyway, as the old poll did.
    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=timeout_s)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ----------------------------------------------------------------------------- resuming


def _stderr_line(message: str) -> None:
    """One line on stderr (a Ray worker's reaches the driver's terminal)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def pick_resume_checkpoint(candidates: Sequence[Path], stage: str,
                           log: Callable[[str], None] | None = _stderr_line,
                           distrust: Collection[str] = ()
                           ) -> tuple[Path | None, list[dict[str, str]]]:
    """The newest readable checkpoint to resume ``stage`` from; damaged ones are skipped.

    Args:
        candidates: checkpoint files, newest first.
        stage: the stage's name, for messages.
        log: where the warning about skipped files goes (None: nowhere, e.g. ranks > 0).
        distrust: files known to be damaged although readable (their size or SHA-256 no
            longer match ``run.json``'s record).

    Returns:
        The file (None when there are no candidates: a fresh start), and the skipped
        files as ``{"path", "error"}`` (for ``run.json``).

    Raises:
        CheckpointError: there are checkpoints but none can be read.
    """
    if not candidates:
        return None, []
    bad = {os.path.realpath(p) for p in distrust}
    changed = [(c, DAMAGED) for c in candidates if os.path.realpath(c) in bad]
    path, ckpt, skipped = first_readable(c for c in candidates if os.path.realpath(c) not in bad)
    skipped = changed + skipped
    corrupt = [{"path": str(p), "error": why} for p, why in skipped]
    if path is None:
        raise CheckpointError(f"no readable checkpoint to resume the {stage} stage from "
                              f"({corrupt[0]['error']}); delete {candidates[0].parent} to "
                              "start the stage over")
    if skipped and log is not None:
        epoch = int((ckpt or {}).get("epoch", -1)) + 1
        bad_path, why = skipped[0]
        log(f"warning: [{stage}] checkpoint {bad_path} {why.removeprefix(f'{bad_path} ')}; "
            f"resuming from the previous one instead, {path} (epoch {epoch})")
    return path, corrupt


def ray_resume_candidates(latest: Path, reported: Sequence[Path]) -> list[Path]:
    """``latest`` (the file of the checkpoint Ray resumes with), then the files of the
    run's checkpoints registered before it that are still there, newest first.

    Args:
        latest: from ``ray.train.get_checkpoint()``.
        reported: the run's registered checkpoint files, oldest first
            (:func:`reported_checkpoint_files`). A folder Ray never registered (an upload
            cut short by a crash) is not among them, so it is never resumed from.
    """
    older = list(reported)
    if latest in older:  # newer entries cannot exist: latest is Ray's newest
        older = older[:older.index(latest)]
    return [latest, *(p for p in reversed(older) if p != latest and p.is_file())]


def reported_checkpoint_files() -> list[Path]:
    """This Train run's registered checkpoint files, oldest first (no score attribute in
    ``CheckpointConfig``: report order). Ray keeps the list with the run, so it covers
    earlier worker groups and earlier fits of the same run folder."""
    reported = ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    return [Path(r.checkpoint.path) / CKPT_FILE for r in reported]


# ----------------------------------------------------------------------------- workers


@contextlib.contextmanager
def _latest_checkpoint(stage: str, log: Callable[[str], None] | None, distrust: Collection[str],
                       storage: RunStorage) -> Iterator[tuple[Path | None, str | None,
                                                              list[dict[str, str]]]]:
    """The checkpoint file to resume from (a restarted or re-run fit), else None; its ref
    in ``storage``; and the unreadable ones skipped (see :func:`pick_resume_checkpoint`)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield None, None, []
        return
    ref = storage.ref(posixpath.join(ckpt.path, CKPT_FILE))
    with ckpt.as_directory() as folder:  # no copy on local storage
        latest = Path(folder) / CKPT_FILE
        # Older checkpoints are read in place only where the run folder is a local (or
        # mounted) one; a download from cloud storage is a lone temporary folder.
        local = Path(folder) == Path(ckpt.path)
        if local:
            candidates = ray_resume_candidates(latest, reported_checkpoint_files())
        else:
            candidates, distrust = [latest], [str(latest)] if ref in distrust else []
        path, corrupt = pick_resume_checkpoint(candidates, stage, log, distrust)
        yield path, (str(path) if local else ref) if path else None, corrupt


def quiet_report_log() -> None:
    """Silence Ray Train V2's INFO line per ``report()`` ("Reporting training result ...",
    a full metrics dict per rank and epoch) in this worker: our hook prints one progress
    line per epoch.

    Its logger is named after its source file, which no public API names, and
    ``LoggingConfig`` only filters ``ray.train.*`` loggers: so every logger named after a
    file of the Ray package (2.60: that one and Train's collectives) goes to WARNING.
    """
    ray_dir = os.path.dirname(ray.__file__) + os.sep
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(ray_dir):
            logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The function every Ray Train worker runs: one stage of the library.

    Args:
        config: ``stage_config`` (a StageConfig as a dict), ``storage`` (the run folder's
            :class:`RunStorage`), ``init_from`` (the previous stage's checkpoint ref or
            None), ``distrust`` (damaged checkpoint refs not to resume from) and ``fault``
            (tests only).

    Returns:
        On rank 0, the stage's result as builtins (``Result.return_value``); else None.
    """
    entered = time.time()  # wall clock: the driver compares it with fit()'s start
    quiet_report_log()
    cfg = stage_config_from_dict(config["stage_config"])
    dist = DistContext.from_environment(ray.train.torch.get_device())
    hooks = [RayReportHook(dist.rank),
             FaultHook(dist.rank, config.get("fault"), sync=reports_collected_barrier)]
    log = _stderr_line if dist.rank == 0 else None
    distrust = config.get("distrust") or ()
    storage: RunStorage = config["storage"]
    with _latest_checkpoint(cfg.stage, log, distrust, storage) as (resume_from, ref, corrupt), \
            _local_input(storage, config.get("init_from")) as init_from:
        result = run_stage(cfg, dist=dist, hooks=hooks, resume_from=resume_from,
                           init_from=init_from)
    loop_s = time.time() - entered
    chained = [_run_chained(stage_config_from_dict(c), dist, storage)
               for c in config.get("chain") or ()]
    if dist.rank != 0:
        return None
    out = to_builtins(result.to_dict())
    out["resumed_from"] = ref
    out["corrupt_checkpoints"] = corrupt
    out["timing"] = {"entered": entered, "loop_s": loop_s}
    out["chained"] = chained
    return out


def _run_chained(cfg: StageConfig, dist: DistContext, storage: RunStorage) -> dict[str, Any]:
    """Run the next stage in this worker group, from this Train run's last checkpoint (a
    worker group less to start: ~10-20 s of Ray start-up on a small machine).

    Only for a stage of one epoch (``reset_bn``): a restarted group repeats it whole.

    Returns:
        On rank 0: ``checkpoint`` (ref), ``init_from`` (ref) and ``result``; else {}.
    """
    t0 = time.time()
    reported = ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    init_ref = storage.ref(posixpath.join(reported[-1].checkpoint.path, CKPT_FILE))
    hook = StorageCheckpointHook(dist.rank, storage, cfg.stage)
    with _local_input(storage, init_ref) as init_from:
        result = run_stage(cfg, dist=dist, hooks=[hook], init_from=init_from)
    if dist.rank != 0:
        return {}
    return {"stage": cfg.stage, "checkpoint": hook.ref, "init_from": init_ref,
            "result": to_builtins(result.to_dict()), "wall_s": time.time() - t0}


@contextlib.contextmanager
def _local_input(storage: RunStorage, ref: str | None) -> Iterator[str | None]:
    """The previous stage's checkpoint as a local file (downloaded from remote storage)."""
    if ref is None:
        yield None
        return
    with storage.holder(ref).local_copy(ref) as path:
        yield str(path)


# ----------------------------------------------------------------------------- one stage


def scaling_config(ray_cfg: RayConfig, cfg: StageConfig | None = None) -> ScalingConfig:
    """Workers and their resources (the process group's backend: :func:`torch_config`).

    Each worker's bundle holds its DataLoader processes too (:func:`worker_cpus`), so Ray
    never packs more busy processes on a node than it has CPUs.
    """
    resources = {"CPU": worker_cpus(ray_cfg, cfg.workers if cfg is not None else 0)}
    if ray_cfg.use_gpu:
        resources["GPU"] = worker_gpus(ray_cfg)
    return ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                         resources_per_worker=resources,
                         placement_strategy=ray_cfg.placement_strategy)


def torch_config(ray_cfg: RayConfig) -> TorchConfig:
    """The process group: gloo on CPU; with GPUs NCCL for CUDA tensors *and* gloo for CPU
    ones. Ray's default there is NCCL alone, which has no CPU collectives, so one CPU
    tensor handed to a collective would kill the run."""
    return TorchConfig(backend="cpu:gloo,cuda:nccl" if ray_cfg.use_gpu else "gloo")


def fit_stage(cfg: StageConfig, ray_cfg: RayConfig, run_dir: RunStorage | str,
              init_from: str | None, fault: dict[str, Any] | None = None,
              distrust: Sequence[str] = (),
              callbacks: Sequence[ray.train.UserCallback] = (),
              chain: Sequence[StageConfig] = ()) -> dict[str, Any]:
    """Fit one stage with a TorchTrainer whose run folder is ``<run_dir>/<stage>``
    (``run_dir``: local or remote, see :mod:`pipelines.storage`).

    A folder that already holds checkpoints of this stage is resumed from the latest.
    ``callbacks`` go to ``RunConfig(callbacks=...)`` (the sweep forwards reports to Tune).
    ``chain``: one-epoch stages the same workers run next (:func:`_run_chained`).

    Returns:
        ``checkpoint`` (the final checkpoint's ref), ``result`` (rank 0's return value)
        and ``chained`` (each chained stage's checkpoint, input and result).

    Raises:
        ray.train.TrainingFailedError: a worker failed more than ``max_failures`` times.
        CheckpointError: the stage reported no checkpoint.
    """
    storage = as_storage(run_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage_config": config_to_dict(cfg), "init_from": init_from,
                           "fault": fault, "distrust": list(distrust), "storage": storage,
                           "chain": [config_to_dict(c) for c in chain]},
        scaling_config=scaling_config(ray_cfg, cfg),
        torch_config=torch_config(ray_cfg),
        run_config=RunConfig(
            name=cfg.stage, **storage.run_config_kwargs(),
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ray_cfg.num_to_keep),
            # Ray Train's per-report INFO lines would drown the one progress line per epoch.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks)))
    started = time.time()
    result = trainer.fit()
    if result.checkpoint is None:
        raise CheckpointError(f"the {cfg.stage} stage finished without reporting a checkpoint")
    out = dict(result.return_value or {})
    timing = out.get("timing")
    if timing:  # where Ray's time went: worker group start-up, the stage, tear-down
        chained_s = sum(c["wall_s"] for c in out.get("chained") or [])
        timing["ray_startup_s"] = timing["entered"] - started
        timing["ray_teardown_s"] = (time.time() - timing["entered"] - timing["loop_s"]
                                    - chained_s)
    ckpt = storage.ref(posixpath.join(result.checkpoint.path, CKPT_FILE))
    return {"checkpoint": ckpt, "result": out, "chained": out.pop("chained", [])}


# The stage's driver-side half runs as a task so that a submitted job's entrypoint (and
# a notebook) only waits; num_cpus=0 leaves every CPU to the Train workers.
_fit_stage_task = ray.remote(num_cpus=0, max_retries=0)(fit_stage)


def fit_stage_on_ray(cfg: StageConfig, ray_cfg: RayConfig, storage: RunStorage,
                     init_from: str | None, distrust: Sequence[str] = (),
                     chain: Sequence[StageConfig] = ()) -> dict[str, Any]:
    """Run :func:`fit_stage` as a Ray task and wait; Ctrl-C cancels it and its workers.

    The task (and so Train's controller, which stays with its caller) runs on the driver's
    node: losing a worker node then costs a worker-group restart, never the stage.
    """
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ref = _fit_stage_task.options(scheduling_strategy=here).remote(
        cfg, ray_cfg, storage, init_from, fault_from_env(), distrust, chain=chain)
    try:
        return ray.get(ref)
    except KeyboardInterrupt:
        # Killing the task kills the Train controller it owns, and with it the workers.
        ray.cancel(ref, force=True)
        raise
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from e
        raise


def fit_stage_locally(cfg: StageConfig, run_dir: Path, init_from: str | None,
                      distrust: Sequence[str] = ()) -> dict[str, Any]:
    """Run the stage in this process (``ray.num_workers: 0``), resuming its newest intact
    checkpoint (``checkpoint.pt``, else ``checkpoint.prev.pt``)."""
    folder = run_dir / cfg.stage / "local"
    ckpt = folder / CKPT_FILE
    resume_from, corrupt = pick_resume_checkpoint(rotation_candidates(ckpt), cfg.stage,
                                                  distrust=distrust)
    for item in corrupt:  # set aside, so that the next rotation cannot make it ".prev"
        aside = Path(item["path"] + ".corrupt")
        os.replace(item["path"], aside)
        item["kept_as"] = str(aside)
    hooks = [ConsoleHook(), CheckpointHook(folder), FaultHook(0, fault_from_env())]
    result = run_stage(cfg, hooks=hooks, resume_from=resume_from, init_from=init_from)
    if not ckpt.is_file():
        raise CheckpointError(f"the {cfg.stage} stage finished without writing {ckpt}")
    out = to_builtins(result.to_dict())
    out["resumed_from"] = str(resume_from) if resume_from else None
    out["corrupt_checkpoints"] = corrupt
    return {"checkpoint": str(ckpt), "result": out}


# ----------------------------------------------------------------------------- sequence


def _sha_or_none(storage: RunStorage, ref: str | None) -> str | None:
    if not ref:
        return None
    holder = storage.holder(ref)
    return holder.sha256(ref) if holder.is_file(ref) else None


def _damaged_final(record: RunRecord, name: str) -> str | None:
    """A done stage's final checkpoint if it is still there but no longer has the recorded
    SHA-256 (disk or copy damage, even where it still loads), else None."""
    rec = record.stage(name)
    ckpt = rec.get("checkpoint")
    if rec.get("status") != "done" or not ckpt or not record.storage.is_file(ckpt):
        return None
    return ckpt if record.done_checkpoint(name) is None else None


def _distrusted(rec: Mapping[str, Any], damaged: str | None) -> list[str]:
    """Checkpoints of a stage never to resume from: its ``damaged`` final one
    (:func:`_damaged_final`), and those found damaged before (kept in ``run.json``: Ray may
    still call one its latest)."""
    return sorted({*rec.get("distrust", []), *([damaged] if damaged else [])})


def _needs_fresh_start(rec: Mapping[str, Any], init_sha: str | None,
                       damaged: str | None) -> bool:
    """Whether a stage's old run folder is stale: it had another input, or it finished and
    runs again because an earlier stage re-ran or its checkpoint is gone. A ``damaged``
    final checkpoint is not: the stage resumes from the one before."""
    if "init_from_sha256" in rec and rec["init_from_sha256"] != init_sha:
        return True
    return rec.get("status") == "done" and damaged is None


def run_one_stage(record: RunRecord, cfg: StageConfig, ray_cfg: RayConfig,
                  session: RaySession, init_from: str | None,
                  chain: Sequence[StageConfig] = ()) -> str:
    """Run (or resume) one stage, keeping its ``run.json`` entry up to date; then the
    ``chain`` stages in the same worker group (see :func:`chain_after`), each recorded as
    a stage of its own.

    Returns:
        The final checkpoint of the last stage run (its ref: a path, or a URI on remote
        storage).

    Raises:
        StageFailed: the stage's training failed (the message summarises the workers' errors).
        KeyboardInterrupt: Ctrl-C or SIGTERM; the stage is recorded as failed ("interrupted").
    """
    name, storage = cfg.stage, record.storage
    if ray_cfg.num_workers > 0:
        session.ensure()  # before "running": a ResourceError is not a failed stage
    init_sha = _sha_or_none(storage, init_from)
    damaged = _damaged_final(record, name)  # hashes the final checkpoint: once
    distrust = _distrusted(record.stage(name), damaged)
    if _needs_fresh_start(record.stage(name), init_sha, damaged):
        storage.delete_dir(storage.path(name))
        distrust = []
    record.update(name, status="running", started=now(), init_from=init_from,
                  init_from_sha256=init_sha, error=None, distrust=distrust,
                  attempts=record.stage(name).get("attempts", 0) + 1)
    for follow in chain:  # their old outputs came from the old input: start them over
        storage.delete_dir(storage.path(follow.stage))
        record.update(follow.stage, status="pending", error=None)
    t0 = time.perf_counter()
    try:
        out = (fit_stage_locally(cfg, record.run_dir, init_from, distrust)
               if ray_cfg.num_workers == 0
               else fit_stage_on_ray(cfg, ray_cfg, storage, init_from, distrust, chain))
    except BaseException as e:
        error = ("interrupted" if isinstance(e, KeyboardInterrupt)
                 else f"{type(e).__name__}: {error_summary(e)}")
        record.update(name, status="failed", error=error,
                      wall_s=round(time.perf_counter() - t0, 3))
        if isinstance(e, Exception):
            raise StageFailed(f"the {name} stage failed: {error}\n(details in {record.path}; "
                              "the same command resumes from the last checkpoint)") from e
        raise
    chained = out.get("chained") or []
    _record_done(record, name, out,
                 time.perf_counter() - t0 - sum(c["wall_s"] for c in chained))
    for item in chained:
        _record_chained(record, name, item)
    return chained[-1]["checkpoint"] if chained else out["checkpoint"]


def chain_after(stages: Mapping[str, StageConfig], name: str,
                ray_cfg: RayConfig) -> list[StageConfig]:
    """The stages that run in the worker group of ``name``: ``reset_bn`` after the
    supernet on Ray (one epoch of forward passes, so a restarted group simply repeats it),
    which saves a worker group's start-up. It keeps its own checkpoint folder and
    ``run.json`` entry; run alone (the supernet already done) it gets its own fit."""
    names = list(stages)
    after = names[names.index(name) + 1:names.index(name) + 2]
    if ray_cfg.num_workers > 0 and name == "supernet" and after == ["reset_bn"]:
        return [stages["reset_bn"]]
    return []


def _record_chained(record: RunRecord, after: str, item: Mapping[str, Any]) -> None:
    """Record a stage that ran in ``after``'s worker group (:func:`chain_after`) as done.
    Its input is ``after``'s final checkpoint, whose SHA-256 is recorded already: a remote
    checkpoint is not streamed a second time to hash it."""
    name, prev, wall = item["stage"], record.stage(after), item["wall_s"]
    init_sha = (prev.get("checkpoint_sha256") if item["init_from"] == prev.get("checkpoint")
                else _sha_or_none(record.storage, item["init_from"]))
    result = {**(item["result"] or {}), "resumed_from": None, "corrupt_checkpoints": [],
              "timing": {"ray_startup_s": 0.0, "loop_s": wall, "ray_teardown_s": 0.0}}
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - wall))
    _record_done(record, name, {"checkpoint": item["checkpoint"], "result": result}, wall,
                 started=started, error=None, init_from=item["init_from"],
                 init_from_sha256=init_sha, distrust=[], chained_after=after,
                 attempts=record.stage(name).get("attempts", 0) + 1)


def _record_done(record: RunRecord, name: str, out: Mapping[str, Any], wall_s: float,
                 **fields: Any) -> None:
    """Record a finished stage: checkpoint (size, SHA-256), metrics, result, timing and any
    other ``fields``, in one write of ``run.json``."""
    result = dict(out["result"] or {})
    timing = result.pop("timing", None)
    record.update(name, status="done", wall_s=round(wall_s, 3), finished=now(),
                  metrics=result.get("metrics"), result=result,
                  epochs_run=result.get("epochs_run"), resumed_from=result.get("resumed_from"),
                  corrupt_checkpoints=result.get("corrupt_checkpoints") or [],
                  timing=timing, **checkpoint_fields(record.storage, out["checkpoint"]),
                  **fields)


def run_stages(record: RunRecord, stages: Mapping[str, StageConfig], ray_cfg: RayConfig,
               session: RaySession, log: Callable[[str], None] = print) -> str:
    """Run the stages in order, each from the previous one's checkpoint; skip finished ones.

    A stage is skipped when ``run.json`` says it is done and its checkpoint still has the
    recorded SHA-256; once one stage runs, every later stage runs again on its output.

    Returns:
        The last stage's final checkpoint (its ref).
    """
    prev: str | None = None
    rerun, chained = False, set()
    for name, cfg in stages.items():
        done = None if rerun else record.done_checkpoint(name)
        if done is not None:
            log(f"[{name}] already done ({done}); skipping")
            prev = done
            continue
        if name in chained:  # ran in the previous stage's worker group
            continue
        rerun = True
        init = prev if prev is not None else (cfg.resume or None)
        chain = chain_after(stages, name, ray_cfg)
        chained.update(c.stage for c in chain)
        prev = run_one_stage(record, cfg, ray_cfg, session, init, chain)
    assert prev is not None, "no stages to run"
    return prev


def error_summary(exc: BaseException, limit: int = 500) -> str:
    """One line: per failed worker ``rank N: Type: message``, or the exception's message."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        return "; ".join(f"rank {rank}: {_describe(err, limit)}"
                         for rank, err in sorted(failures.items()))
    cause = getattr(exc, "controller_failure", None)
    if cause is not None:
        return _describe(cause, limit)
    return one_line(exc, limit)


def _describe(err: BaseException, limit: int) -> str:
    """``Type: message`` of a worker's error (Ray wraps it with the traceback text)."""
    base = getattr(err, "_base_exc", err)  # ray.train's UserExceptionWithTraceback
    message = " ".join(str(base).split())
    return f"{type(base).__name__}: {message}"[:limit]
