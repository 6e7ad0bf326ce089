"""Run one training stage (supernet, reset_bn, gate) in this process.

``run_stage(cfg, dist=..., hooks=...)`` is the single entry point that both the in-process
chainer (``pipelines.full --num-workers 0``) and the Ray Train workers (``pipelines``) call:
it builds data and model from a :class:`~dsnet.config.StageConfig`, restores a checkpoint
if asked, runs the stage's epochs (a :class:`~dsnet.train.stages.StageRunner`), calls the
hooks after every epoch (progress, checkpoints, Ray reports) and returns the final
evaluation. A stage resumed from its checkpoint after epoch k repeats the uninterrupted
run's epochs k+1.. bit for bit (on CPU with fixed threads): the checkpoint holds the
state, and every epoch re-seeds its generators (:mod:`dsnet.train.rng`).
"""

from __future__ import annotations

import functools
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsnet.config import STAGES, StageConfig, config_to_dict
from dsnet.data.datasets import DataBundle, DataError, build_datasets, check_num_classes
from dsnet.models.checkpoint import (
    CheckpointError,
    extract_state_dict,
    load_state_dict_checked,
    read_checkpoint,
    rotate_save,
)
from dsnet.models.registry import create_model
from dsnet.train.distributed import DistContext
from dsnet.train.stages import StageRunner, make_runner


@dataclass
class EpochReport:
    """What one finished epoch measured (``epoch`` is 0-based)."""

    stage: str
    epoch: int
    epochs: int
    metrics: dict[str, float]


class Hook:
    """Called by :func:`run_stage` on every rank after every epoch; override what you need."""

    def on_epoch_end(self, report: EpochReport, save: Callable[[Path], None]) -> None:
        """``save(path)`` writes the stage's full checkpoint; call it on rank 0 only."""

    def on_log(self, line: str) -> None:
        """A progress line within an epoch (every ``log_interval`` batches), every rank."""


@dataclass
class StageResult:
    """The outcome of a stage (JSON-able except ``checkpoint``)."""

    stage: str
    metrics: dict[str, float]
    checkpoint: dict | None = None
    subnets: list[dict] | None = None
    dynamic: dict | None = None
    epochs_run: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the checkpoint payload."""
        d = asdict(self)
        d.pop("checkpoint")
        return d


def format_report(report: EpochReport) -> str:
    """One progress line: stage, epoch, loss, top-1, MAdds, throughput, ETA."""
    m = report.metrics
    eta = int(m.get("eta_s", 0))
    loss = f"loss {m['loss']:.4f} " if "loss" in m else ""  # reset_bn has no loss
    return (f"[{report.stage}] epoch {report.epoch + 1}/{report.epochs} "
            f"{loss}top1 {m.get('top1', float('nan')):.2f} "
            f"madds {m.get('madds', 0) / 1e6:.2f}M img/s {m.get('img_per_s', 0):.0f} "
            f"eta {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}")


class ConsoleHook(Hook):
    """Prints :func:`format_report` on rank 0."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank

    def on_epoch_end(self, report: EpochReport, save: Callable[[Path], None]) -> None:
        if self.rank == 0:
            print(format_report(report), flush=True)

    def on_log(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)


class CheckpointHook(Hook):
    """Writes ``<folder>/checkpoint.pt`` (latest epoch) on rank 0, atomically.

    With ``keep_previous`` the epoch before stays as ``checkpoint.prev.pt``
    (:func:`~dsnet.models.checkpoint.rotate_save`): something to resume from should the latest
    file be damaged.
    """

    def __init__(self, folder: str | Path, rank: int = 0, keep_previous: bool = True) -> None:
        self.path = Path(folder) / "checkpoint.pt"
        self.rank = rank
        self.keep_previous = keep_previous

    def on_epoch_end(self, report: EpochReport, save: Callable[[Path], None]) -> None:
        if self.rank != 0:
            return
        if self.keep_previous:
            rotate_save(save, self.path)
        else:
            save(self.path)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)


def build_data(cfg: StageConfig) -> DataBundle:
    """The stage's data sets, from the config."""
    return build_datasets(
        cfg.dataset, cfg.data, img_size=cfg.img_size, download=cfg.download,
        num_val=cfg.num_val, seed=cfg.seed, aa=cfg.aa or "", reprob=cfg.reprob,
        remode=cfg.remode, color_jitter=cfg.color_jitter, corrupt_images=cfg.corrupt_images,
        synthetic_size=cfg.synthetic_size, random_shift=cfg.random_shift, hflip=cfg.hflip,
        train_interpolation=cfg.train_interpolation,
        num_classes=cfg.num_classes if cfg.dataset == "synthetic" else None)


def validation_images(cfg: StageConfig) -> Callable[[Sequence[int]], torch.Tensor] | None:
    """Validation images (N, C, H, W) by dataset index, as the stage evaluated them, for
    result pictures; None (with a note on stderr) where this process cannot read the data
    (say, a driver without the workers' data folder)."""
    try:
        val = build_data(cfg).val
    except (DataError, OSError) as exc:
        print(f"note: no example images in the results ({exc})", file=sys.stderr)
        return None
    return lambda indices: torch.stack([val[i][0] for i in indices])


def build_model(cfg: StageConfig, data: DataBundle) -> torch.nn.Module:
    """A freshly initialised supernet for the config and data (seeded: same on every rank).

    Raises:
        DataError: ``num_classes`` is smaller than the data's number of classes (labels
            would be out of range for the head, failing deep in the loss mid-epoch).
    """
    check_num_classes(cfg.num_classes, cfg.dataset, data.num_classes)
    torch.manual_seed(cfg.seed)
    return create_model(cfg.model, num_classes=cfg.num_classes or data.num_classes,
                        in_chans=cfg.in_chans or data.in_chans, drop_rate=cfg.drop)


def load_weights(model: torch.nn.Module, path: str | Path,
                 use_ema: bool = False) -> dict[str, Any]:
    """Initialise ``model`` from a previous stage's (or the release's) checkpoint."""
    ckpt = read_checkpoint(path)
    if ckpt.get("routing_space"):
        model.routing_space = tuple(ckpt["routing_space"])
    else:
        _match_head_size(model, ckpt)
    load_state_dict_checked(model, extract_state_dict(ckpt, use_ema, str(path)), True, str(path))
    return ckpt


def _match_head_size(model: torch.nn.Module, ckpt: dict[str, Any]) -> None:
    """The release records no routing space: size the head like its stored weight."""
    state = ckpt.get("state_dict", ckpt)
    heads = sorted((k for k in state if re.search(r"\.gate\.gate\.\d+\.weight$", k)),
                   key=lambda k: int(k.rsplit(".", 2)[1]))
    key = heads[-1] if heads else None   # the last conv gives the logits
    if key is not None and hasattr(model, "routing_space"):
        k = state[key].shape[0]
        if k != len(model.routing_space) and k <= model.num_subnets:
            model.routing_space = tuple(range(k))


def run_stage(cfg: StageConfig, *, dist: DistContext | None = None, hooks: Sequence[Hook] = (),
              resume_from: str | Path | None = None,
              init_from: str | Path | None = None) -> StageResult:
    """Run the stage named by ``cfg.stage``.

    Args:
        cfg: the resolved stage config.
        dist: rank/world/device (default: from ``torch.distributed``, device from config).
        hooks: called after every epoch on every rank.
        resume_from: a checkpoint written by this stage's ``save``: continue after its epoch.
        init_from: the previous stage's checkpoint (weights); default ``cfg.resume``.

    Returns:
        The stage's final metrics (and, for reset_bn/gate, the subnet and dynamic tables).
    """
    if cfg.threads > 0:  # oversubscribed cores make torch's spinning threads crawl
        torch.set_num_threads(cfg.threads)
    dist = dist or DistContext.from_environment(resolve_device(cfg.device))
    data = build_data(cfg)
    model = build_model(cfg, data)
    init = init_from or cfg.resume or None
    if cfg.stage != "supernet" and not init and not resume_from:
        raise CheckpointError(f"the {cfg.stage} stage needs the previous stage's checkpoint: "
                              "set resume: in the config or pass --resume CHECKPOINT")
    init_ckpt = load_weights(model, init) if init else None
    check_stage_order(cfg.stage, init_ckpt, init)
    runner = make_runner(cfg, model.to(dist.device), data, dist, init_ckpt)
    runner.log = lambda line: [hook.on_log(line) for hook in hooks]
    return _epoch_loop(cfg, runner, hooks, _first_epoch(cfg, runner, resume_from, init_ckpt))


def _first_epoch(cfg: StageConfig, runner: StageRunner, resume_from: str | Path | None,
                 init_ckpt: dict | None) -> int:
    """Where the epoch loop starts, restoring what it continues from.

    ``resume_from`` (a restart after a failure) restores everything and wins. A
    ``resume:`` checkpoint of this same stage continues it as the release's ``--resume``
    does: its epoch, EMA and, unless ``no_resume_opt``, optimizer state. Otherwise
    ``start_epoch`` (if set) says where to start, in the schedule and the sampling too.
    No RNG state to restore: :func:`_epoch_loop` re-seeds every epoch.
    """
    start = 0
    if resume_from:
        start = runner.resume(read_checkpoint(resume_from))
    elif init_ckpt is not None and init_ckpt.get("stage") == cfg.stage \
            and "epoch" in init_ckpt:
        start = runner.resume(init_ckpt, restore_optimizer=not cfg.no_resume_opt)
    if cfg.start_epoch is not None and not resume_from:
        start = cfg.start_epoch
        runner.skip_to(start)
    return start


def check_stage_order(stage: str, ckpt: dict | None, path: Any) -> None:
    """Refuse a checkpoint from a later stage given to an earlier one."""
    done = (ckpt or {}).get("stage")
    if done in STAGES and STAGES.index(done) > STAGES.index(stage):
        raise CheckpointError(f"{path} comes from the {done} stage, which runs after {stage}; "
                              f"give the {stage} stage a checkpoint of an earlier stage")


def _epoch_loop(cfg: StageConfig, runner: StageRunner, hooks: Sequence[Hook],
                start: int) -> StageResult:
    """Epochs ``start..`` with the hooks after each, then the stage's final evaluation.

    Every epoch starts from what a resume would restore (rank 0's state on every rank,
    generators re-seeded from (seed, rank, epoch): :meth:`StageRunner.begin_epoch`), so
    that an epoch run after a resume repeats it exactly.
    """
    epochs, started, metrics, done = runner.epochs, time.perf_counter(), {}, []
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        runner.begin_epoch(epoch)
        metrics = runner.train_epoch(epoch)
        with runner.precision.autocast():
            metrics.update(runner.validate())
        elapsed = time.perf_counter() - started
        metrics["epoch_s"] = time.perf_counter() - t0
        metrics["eta_s"] = elapsed / (epoch + 1 - start) * (epochs - epoch - 1)
        metrics["epoch"] = epoch
        report = EpochReport(cfg.stage, epoch, epochs, metrics)
        done.append(epoch)
        save = functools.partial(runner.save, epoch=epoch, metrics=dict(metrics),
                                 config=config_to_dict(cfg))
        for hook in hooks:
            hook.on_epoch_end(report, save)
    with runner.precision.autocast():
        subnets, dynamic = runner.finish()
    return StageResult(cfg.stage, metrics, None, subnets, dynamic, done)
