"""The three stages as small runners: ``train_epoch`` / ``validate`` / ``finish`` / ``save``.

- :class:`SupernetRunner`: Stage I, sandwich rule + in-place (ensemble) bootstrapping.
- :class:`ResetBNRunner`: BN recalibration of every subnet (model and EMA copy).
- :class:`GateRunner`: Stage II, slimming head only: task + SGS + complexity losses.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnet.config import StageConfig
from dsnet.data.datasets import DataBundle
from dsnet.data.loader import build_loader, build_mixup, set_loader_epoch
from dsnet.eval.evaluate import (
    evaluate_dynamic,
    evaluate_routing,
    evaluate_subnet,
    evaluate_subnets,
    oracle_point,
)
from dsnet.models.checkpoint import save_checkpoint
from dsnet.models.madds import expected_madds, masked_expected_madds, routing_madds
from dsnet.models.masked import masked_train_forward
from dsnet.models.pretrained import load_pretrained
from dsnet.models.supernet import DynamicOutput
from dsnet.train.bn_calibration import recalibrate_bn
from dsnet.train.distributed import DistContext
from dsnet.train.ema import ModelEma
from dsnet.train.losses import (
    complexity_loss,
    expected_task_loss,
    label_smoothing_ce,
    sgs_loss,
    sgs_targets,
    soft_target_ce,
)
from dsnet.train.optim import LRSchedule, build_optimizer, build_schedule, current_lr
from dsnet.train.precision import Precision
from dsnet.train.rng import EpochSeededDataset, seed_epoch
from dsnet.train.sampling import sandwich_subnets


def loader_options(cfg: StageConfig, device: torch.device) -> dict[str, Any]:
    """DataLoader settings: ``pin_mem`` pins batches for copies to a GPU (pinned pages help
    nothing else), and loader processes persist across epochs instead of restarting."""
    return {"workers": cfg.workers, "pin_memory": cfg.pin_mem and device.type == "cuda",
            "persistent_workers": cfg.workers > 0}


class StageRunner:
    """Shared state and plumbing of a stage: loaders, EMA, optimizer, checkpoints."""

    stage = "base"

    def __init__(self, cfg: StageConfig, model: nn.Module, data: DataBundle,
                 dist: DistContext, init_ckpt: dict | None = None) -> None:
        self.cfg, self.model, self.data, self.dist = cfg, model, data, dist
        self.device = dist.device
        loader_kw = dict(rank=dist.rank, world_size=dist.world_size,
                         **loader_options(cfg, self.device))
        # Loader workers re-seed per epoch, as the main process does (dsnet.train.rng).
        self.train_set = EpochSeededDataset(data.train, cfg.seed, dist.rank)
        self.train_loader = build_loader(self.train_set, cfg.batch_size, train=True,
                                         seed=cfg.seed, **loader_kw)
        self.val_loader = build_loader(
            data.val, cfg.batch_size * cfg.validation_batch_size_multiplier, train=False,
            **loader_kw)
        dist.broadcast_(model.state_dict().values())  # identical start on every rank
        self.precision = Precision.from_config(cfg.amp, cfg.amp_dtype, self.device)
        self.scaler = self.precision.grad_scaler()
        self.ema: ModelEma | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: LRSchedule | None = None
        self.step = 0
        self.epochs = cfg.epochs
        self.log = lambda line: None  # set by the engine: progress lines every log_interval
        self.running_loss = float("nan")  # the epoch's mean loss so far, for those lines

    @property
    def updates_per_epoch(self) -> int:
        return max(1, len(self.train_loader) // self.cfg.optimizer_step)

    def _init_optimizer(self) -> None:
        """timm's optimizer over the trainable parameters, and its lr schedule."""
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.schedule = build_schedule(self.optimizer, self.cfg, self.updates_per_epoch)
        self.epochs = self.schedule.total_epochs

    def begin_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from what a resume from the checkpoint before it restores, so
        that a resumed epoch repeats the uninterrupted one (:mod:`dsnet.train.rng`).

        Every rank takes rank 0's buffers (BN statistics, model and EMA: with ``dist_bn``
        empty each rank's drift apart within an epoch, and the checkpoint holds rank 0's;
        weights agree already), and every generator of this process and of the loader
        workers is re-seeded from (seed, rank, epoch).
        """
        models = [self.model] + ([self.ema.module] if self.ema is not None else [])
        self.dist.broadcast_([b for m in models for b in m.buffers()])
        seed_epoch(self.cfg.seed, self.dist.rank, epoch)
        self.train_set.set_epoch(epoch)

    def batches(self, epoch: int):
        """Training batches of an epoch on this rank's device."""
        set_loader_epoch(self.train_loader, epoch)
        for x, y in self.train_loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_batches(self, epoch: int):
        """``(i, x, y)`` of an epoch, with the lr of the epoch set and progress logged."""
        if self.schedule is not None:
            self.schedule.start_epoch(epoch)
        n, t0 = len(self.train_loader), time.perf_counter()
        for i, (x, y) in enumerate(self.batches(epoch)):
            yield i, x, y
            if (i + 1) % self.cfg.log_interval == 0 and i + 1 < n:
                rate = (i + 1) * len(y) * self.dist.world_size / (time.perf_counter() - t0)
                self.log(f"[{self.stage}] epoch {epoch + 1}/{self.epochs} batch {i + 1}/{n} "
                         f"loss {self.running_loss:.4f} lr {self._lr_now():.3g} img/s {rate:.0f}")

    def _lr_now(self) -> float:
        return current_lr(self.optimizer) if self.optimizer is not None else 0.0

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a (possibly float16-scaled) loss; gradients accumulate."""
        self.scaler.scale(loss).backward()

    def save(self, path: Path, epoch: int, metrics: dict, config: dict) -> None:
        """The stage's checkpoint: model, EMA, optimizer, grad scaler and ``step`` (the
        random subnets, EMA warm-up and per-update lr follow from it), epoch, config and
        metrics. No RNG state: each epoch re-seeds from (seed, rank, epoch)."""
        ema = self.ema.module if self.ema is not None else None
        optimizer = self.optimizer.state_dict() if self.optimizer is not None else None
        save_checkpoint(path, self.model, stage=self.stage, epoch=epoch, config=config,
                        metrics=metrics, ema_model=ema, optimizer_state=optimizer,
                        extra=self.checkpoint_extra())

    def checkpoint_extra(self) -> dict[str, Any]:
        """The checkpoint's ``extra``: what a resume needs beyond weights and optimizer."""
        return {"step": self.step, "grad_scaler": self.scaler.state_dict()}

    def resume(self, ckpt: dict[str, Any], restore_optimizer: bool = True) -> int:
        """Restore from this stage's checkpoint; return the first epoch still to run."""
        self.model.load_state_dict(ckpt["state_dict"])
        if self.ema is not None and ckpt.get("state_dict_ema") is not None:
            self.ema.load_state_dict(ckpt["state_dict_ema"])
        extra = ckpt.get("extra") or {}
        if restore_optimizer and self.optimizer is not None and ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if restore_optimizer and extra.get("grad_scaler"):
            self.scaler.load_state_dict(extra["grad_scaler"])
        self.step = int(extra.get("step", 0))
        if self.ema is not None:
            self.ema.updates = self.step  # one EMA update per optimizer step
        return int(ckpt.get("epoch", -1)) + 1

    def skip_to(self, epoch: int) -> None:
        """Start at ``epoch`` (``start_epoch``): the schedule and sampling count from there."""
        self.step = epoch * self.updates_per_epoch
        if self.ema is not None:
            self.ema.updates = self.step

    def finish(self) -> tuple[list[dict] | None, dict | None]:
        return None, None

    def _optimizer_step(self, params: list[nn.Parameter]) -> float:
        """Average gradients across ranks, step with the scheduled lr, update the EMA."""
        self.dist.average_gradients(params)
        self.schedule.before_update(self.step)
        lr = current_lr(self.optimizer)
        self.scaler.step(self.optimizer)  # unscales float16 gradients; skips on inf
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return lr

    def sync_bn_statistics(self) -> None:
        """``dist_bn``: make the ranks' BN statistics agree after an epoch (as the release)."""
        if not self.dist.distributed or not self.cfg.dist_bn:
            return
        for model in [self.model] + ([self.ema.module] if self.ema is not None else []):
            stats = [b for name, b in model.named_buffers()
                     if name.endswith(("running_mean", "running_var"))]
            if self.cfg.dist_bn == "reduce":
                self.dist.all_reduce_mean_(stats)
            else:
                self.dist.broadcast_(stats)

    def _check_finite(self, loss: torch.Tensor, epoch: int, i: int) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{self.stage}] loss is {loss.item()} at epoch {epoch + 1} "
                                     f"batch {i}; the last good checkpoint is kept. Lower lr "
                                     "or check the data")


class SupernetRunner(StageRunner):
    """Stage I: sandwich rule (largest, ``num_random`` random, smallest) per step.

    ``slim_train: false`` trains the largest network alone (the release's plain mode).
    """

    stage = "supernet"

    def __init__(self, cfg: StageConfig, model: nn.Module, data: DataBundle,
                 dist: DistContext, init_ckpt: dict | None = None) -> None:
        if cfg.pretrained and init_ckpt is None:
            # Stage I's start: a plain network's weights (a checkpoint in resume: wins),
            # loaded before the EMA teacher copies the model and on every rank alike.
            load_pretrained(model, cfg.pretrained)
        super().__init__(cfg, model, data, dist, init_ckpt)
        self.model.gate_head.gate.requires_grad_(False)  # the slimming head is Stage II's
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._init_optimizer()
        # The authors' `inplace_bootstrap: false` switches distillation off altogether.
        self.distill = self.cfg.distill if self.cfg.inplace_bootstrap else "none"
        if not self.cfg.slim_train:
            self.distill = "none"
        if self.cfg.model_ema or self.distill == "ieb":
            self.ema = ModelEma(self.model, self.cfg.model_ema_decay, self.cfg.model_ema_warmup)
        cfg = self.cfg
        self.mixup = build_mixup(cfg.mixup, cfg.cutmix, cfg.cutmix_minmax, cfg.mixup_prob,
                                 cfg.mixup_switch_prob, cfg.mixup_mode, cfg.smoothing,
                                 self.data.num_classes)

    def _mix(self, x: torch.Tensor, y: torch.Tensor,
             epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix (timm's) until ``mixup_off_epoch``: y becomes (B, classes) soft."""
        off = self.cfg.mixup_off_epoch
        if self.mixup is None or (off and epoch >= off):
            return x, y
        return self.mixup(x, y)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        total, seen, t0, lr = 0.0, 0, time.perf_counter(), 0.0
        for i, x, y in self.train_batches(epoch):
            x, y = self._mix(x, y, epoch)
            if self.cfg.slim_train:
                loss = self.sandwich_step(x, y)
            else:
                loss = self._student_step(x, y, "largest", None)
            self._check_finite(loss, epoch, i)
            total, seen = total + loss.item() * len(y), seen + len(y)
            self.running_loss = total / seen
            if (i + 1) % self.cfg.optimizer_step == 0:
                lr = self._optimizer_step(self.params)
        self.sync_bn_statistics()
        return {"loss": total / max(seen, 1), "lr": lr,
                "img_per_s": seen * self.dist.world_size / (time.perf_counter() - t0)}

    def teacher_probs(self, x: torch.Tensor, largest_logits: torch.Tensor,
                      subnets: list[int]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Soft targets of the largest and of each random subnet (None: no distillation)."""
        mode = self.distill
        if mode == "none":
            return None, []
        if mode == "inplace":  # the live largest network's output, detached
            return largest_logits.detach().float().softmax(-1), []
        with torch.no_grad(), self.precision.autocast():
            # IEB: the EMA teacher on the *same* subnets as the student
            teacher = self.ema.module
            largest = teacher(x, subnet="largest").float().softmax(-1)
            randoms = [teacher(x, subnet=c).float().softmax(-1) for c in subnets] \
                if self.cfg.ensemble_ib else []
        return largest, randoms

    def sandwich_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward/backward the sandwich; gradients accumulate. Returns the summed loss.

        ``y`` is (B,) labels, or (B, classes) soft targets under mixup.
        """
        cfg = self.cfg
        subnets = sandwich_subnets(cfg.seed, self.step, self.model.num_subnets, cfg.num_random)
        with self.precision.autocast():
            out = self.model(x, subnet="largest")
            loss = self.task_loss(out, y)
        self.backward(loss / cfg.optimizer_step)
        teacher, teacher_randoms = self.teacher_probs(x, out, subnets)
        total = loss.detach().float()
        for c in subnets:
            total += self._student_step(x, y, c, teacher)
        smallest_target = teacher
        if cfg.ensemble_ib and teacher is not None and teacher_randoms:
            smallest_target = torch.stack([teacher, *teacher_randoms]).mean(0)
        return total + self._student_step(x, y, 0, smallest_target)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Label-smoothed CE on labels; soft-target CE on mixup's targets (smoothed there)."""
        if y.is_floating_point():
            return soft_target_ce(logits.float(), y)
        return label_smoothing_ce(logits.float(), y, self.cfg.smoothing)

    def _student_step(self, x: torch.Tensor, y: torch.Tensor, subnet: int | str,
                      target: torch.Tensor | None) -> torch.Tensor:
        with self.precision.autocast():
            out = self.model(x, subnet=subnet)
            loss = self.task_loss(out, y) if target is None \
                else soft_target_ce(out.float(), target)
        self.backward(loss / self.cfg.optimizer_step)
        return loss.detach().float()

    def validate(self) -> dict[str, float]:
        largest = evaluate_subnet(self.model, self.val_loader, "largest", self.dist,
                                  self.data.img_size)
        smallest = evaluate_subnet(self.model, self.val_loader, 0, self.dist, self.data.img_size)
        return {"top1": largest["top1"], "madds": largest["madds"],
                "top1_smallest": smallest["top1"]}


class ResetBNRunner(StageRunner):
    """Recalibrate every width's BN statistics (model and EMA copy); one pass."""

    stage = "reset_bn"

    def __init__(self, cfg: StageConfig, model: nn.Module, data: DataBundle,
                 dist: DistContext, init_ckpt: dict | None = None) -> None:
        super().__init__(cfg, model, data, dist, init_ckpt)
        self.epochs = 1  # calibration is one pass, whatever the authors' `epochs` says
        if init_ckpt is not None and init_ckpt.get("state_dict_ema") is not None:
            self.ema = ModelEma(model)
            self.ema.load_state_dict({k.removeprefix("module."): v
                                      for k, v in init_ckpt["state_dict_ema"].items()})
        self.table: list[dict] | None = None

    def subnets(self) -> list:
        # As the release: the uniform subnets, not the largest network, which shares the
        # widest statistics of the slimmable stages with the last uniform subnet.
        if self.cfg.reset_bn_subnets == "routing":
            return list(self.model.routing_space)
        return list(range(self.model.num_subnets))

    def _calibration_batches(self):
        n = 0
        while n < self.cfg.reset_bn_batches:  # cycle the loader if it is shorter
            for x, _ in self.batches(n):
                yield x
                n += 1
                if n >= self.cfg.reset_bn_batches:
                    return

    def train_epoch(self, epoch: int) -> dict[str, float]:
        t0 = time.perf_counter()
        # Statistics are always averaged over ranks (the release's `dist_bn: reduce`):
        # anything else would leave the ranks' copies of the model disagreeing.
        for model in [self.model] + ([self.ema.module] if self.ema is not None else []):
            with self.precision.autocast():
                n = recalibrate_bn(model, self._calibration_batches(), self.subnets(),
                                   self.dist)
        seen = n * self.cfg.batch_size * self.dist.world_size
        return {"batches": n,
                "img_per_s": seen / (time.perf_counter() - t0)}

    def validate(self) -> dict[str, float]:
        # The subnet table is evaluated here, before the checkpoint is written, so that the
        # checkpoint carries it (``extra["subnets"]``): a sweep given this checkpoint
        # compares its gates with these static subnets without evaluating them again.
        self.table = self.subnet_table()
        row = next((r for r in self.table if r["subnet"] == 0), None)
        if row is None:
            row = evaluate_subnet(self.model, self.val_loader, 0, self.dist, self.data.img_size)
        return {"top1": row["top1"], "madds": row["madds"]}

    def subnet_table(self) -> list[dict]:
        """``eval_subnets`` on the validation set: one row (subnet, MAdds, top-1/5) each."""
        return evaluate_subnets(self.model, self.val_loader, _eval_subnets(self.cfg, self.model),
                                self.dist, self.data.img_size)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {**super().checkpoint_extra(), "subnets": self.table}

    def finish(self) -> tuple[list[dict] | None, dict | None]:
        # A resumed stage whose one epoch was done already has no table yet.
        return (self.table if self.table is not None else self.subnet_table()), None


def _eval_subnets(cfg: StageConfig, model: nn.Module) -> list:
    if cfg.eval_subnets == "all":  # the uniform subnets (the release's table)
        return list(range(model.num_subnets))
    return list(cfg.eval_subnets)


# The config keys that decide what a subnet table measures on given weights: which
# validation images (data set, folder, size, subset) and at what precision.
_TABLE_KEYS = ("dataset", "data", "img_size", "num_val", "seed", "corrupt_images",
               "synthetic_size", "num_classes", "amp", "amp_dtype", "device")


def recorded_subnet_table(ckpt: dict | None, cfg: StageConfig,
                          subnets: list | None = None) -> list[dict] | None:
    """The subnet table a reset_bn checkpoint recorded, if it measured what ``cfg`` would
    on those weights (same :data:`_TABLE_KEYS` in its recorded config and, if given,
    exactly ``subnets``), else None.

    The gate stage freezes the supernet and its BN statistics, so its uniform subnets are
    the recalibrated ones: evaluating them again repeats reset_bn's pass image for image;
    and a sweep over gates of that supernet compares them with this table.
    """
    if ckpt is None or ckpt.get("stage") != "reset_bn":
        return None
    table = (ckpt.get("extra") or {}).get("subnets")
    recorded = ckpt.get("config") or {}
    if not table or (subnets is not None and [row["subnet"] for row in table] != subnets):
        return None
    if any(recorded.get(key) != getattr(cfg, key) for key in _TABLE_KEYS):
        return None
    return [dict(row) for row in table]


def routing_space_for(cfg: StageConfig, num_subnets: int) -> tuple[int, ...]:
    """The gate's routing space from ``routing_space`` or (``start_chn_idx``, ``num_choice``)."""
    if cfg.routing_space:
        space = tuple(cfg.routing_space)
    else:
        space = tuple(range(cfg.start_chn_idx, cfg.start_chn_idx + cfg.num_choice))
    if space[-1] >= num_subnets:
        raise ValueError(f"routing space {space} (start_chn_idx {cfg.start_chn_idx}, num_choice "
                         f"{cfg.num_choice}) exceeds the model's {num_subnets} subnets; lower "
                         "start_chn_idx or num_choice")
    return space


class GateRunner(StageRunner):
    """Stage II: only the slimming head learns; supernet weights and BN stay frozen."""

    stage = "gate"

    def __init__(self, cfg: StageConfig, model: nn.Module, data: DataBundle,
                 dist: DistContext, init_ckpt: dict | None = None) -> None:
        super().__init__(cfg, model, data, dist, init_ckpt)
        space = routing_space_for(self.cfg, self.model.num_subnets)
        if space != self.model.routing_space:
            self.model.routing_space = space  # a new head: start every rank from rank 0's
        self.model.to(self.device)
        self.dist.broadcast_(self.model.gate_parameters())
        self.model.requires_grad_(False)
        self.params = self.model.gate_parameters()
        for p in self.params:
            p.requires_grad_(True)
        self._init_optimizer()
        if self.cfg.gate_ema:
            self.ema = ModelEma(self.model, self.cfg.model_ema_decay)
        self.per_choice = routing_madds(self.model, self.data.img_size).to(self.device)
        self.last_dynamic: dict[str, Any] | None = None
        # reset_bn's table of these frozen weights, when it measured what finish() would.
        self.recorded_table = recorded_subnet_table(init_ckpt, self.cfg,
                                                    _eval_subnets(self.cfg, self.model))

    def train_mode(self) -> None:
        """BN frozen (eval), the slimming head sampling (train)."""
        self.model.eval()
        self.model.gate_head.train()

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.train_mode()
        sums, seen, t0, lr = torch.zeros(3), 0, time.perf_counter(), 0.0
        for i, x, y in self.train_batches(epoch):
            loss, parts = self.gate_step(x, y)
            self._check_finite(loss, epoch, i)
            sums += torch.tensor(parts) * len(y)
            seen += len(y)
            self.running_loss = sums[0].item() / seen
            if (i + 1) % self.cfg.optimizer_step == 0:
                lr = self._optimizer_step(self.params)
        self.sync_bn_statistics()
        task, sgs, madds = (sums / max(seen, 1)).tolist()
        return {"loss": task, "sgs_loss": sgs, "train_madds": madds, "lr": lr,
                "img_per_s": seen * self.dist.world_size / (time.perf_counter() - t0)}

    def dynamic_forward(self, x: torch.Tensor) -> DynamicOutput:
        """The straight-through dynamic forward of ``estimator``.

        ``tails``: every routed tail on the whole batch, logits mixed by the one-hot; the
        MAdds linear in it. ``masked`` (the release's): the widest routed width once, a
        one-hot channel mask after every sliced layer; MAdds from the one-hot-weighted
        running widths (quadratic in it).
        """
        if self.cfg.estimator == "masked":
            return masked_train_forward(self.model, x, self.cfg.gumbel_tau)
        return self.model.forward_dynamic(x, self.cfg.gumbel_tau)  # tails, expected

    def dynamic_madds(self, gate_weights: torch.Tensor) -> torch.Tensor:
        """(B,) MAdds of the routed samples, in float32 (outside autocast: exact counts)."""
        weights = gate_weights.float()
        if self.cfg.estimator == "masked":
            return masked_expected_madds(self.model, weights, self.data.img_size).float()
        return expected_madds(weights, self.per_choice)

    def gate_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Task loss on the dynamic output + SGS + complexity; gradients accumulate."""
        cfg = self.cfg
        with self.precision.autocast():
            out = self.dynamic_forward(x)
        if cfg.estimator == "expected":
            task, madds = self.expected_task_and_madds(out, y)
        else:
            madds = self.dynamic_madds(out.gate_weights)
            task = label_smoothing_ce(out.logits.float(), y, cfg.smoothing)
        slimmest_correct = out.tail_logits[:, 0].argmax(1) == y
        targets = sgs_targets(slimmest_correct, len(self.model.routing_space))
        soft = out.gate_soft.float() if cfg.sgs_on_probs else None
        sgs = sgs_loss(out.gate_logits.float(), targets, soft, cfg.smoothing)
        penalty = complexity_loss(madds, cfg.complexity_weight, cfg.complexity_form,
                                  cfg.target_madds, cfg.madds_unit)
        loss = task + cfg.sgs_weight * sgs + penalty
        self.backward(loss / cfg.optimizer_step)
        return loss.detach(), [task.item(), sgs.item(), madds.mean().item()]

    def expected_task_and_madds(self, out: DynamicOutput, y: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``expected`` estimator: with the supernet frozen, every routed tail's loss on
        every sample is known (the tails forward ran them all), so the head can minimise
        the exact expectation over its softmax p (B, K) of the per-choice task loss and of
        the MAdds, instead of a straight-through Gumbel sample's. Per sample the objective
        is linear in p, so its optimum is the one-hot of the cheapest-for-its-loss choice,
        which is what the eval-mode argmax routes; no sampling noise, no biased gradient.
        Returns (task loss, (B,) expected MAdds)."""
        probs = out.gate_logits.float().softmax(1)                      # (B, K)
        task = expected_task_loss(probs, out.tail_logits.float(), y, self.cfg.smoothing)
        return task, expected_madds(probs, self.per_choice)

    def validate(self) -> dict[str, float]:
        self.last_dynamic = evaluate_dynamic(self.model, self.val_loader, self.dist,
                                             self.data.img_size)
        return {"top1": self.last_dynamic["top1"], "madds": self.last_dynamic["madds"]}

    def finish(self) -> tuple[list[dict] | None, dict | None]:
        # The raw weights (what load_checkpoint loads by default); the EMA head is saved too.
        subnets = _eval_subnets(self.cfg, self.model)
        rows = self.recorded_table or evaluate_subnets(self.model, self.val_loader, subnets,
                                                       self.dist, self.data.img_size)
        # The last epoch's validation evaluated these very weights (nothing trains after
        # it); a resume that found every epoch done has not validated yet.
        dynamic = self.last_dynamic or evaluate_dynamic(self.model, self.val_loader, self.dist,
                                                        self.data.img_size)
        routing = evaluate_routing(self.model, self.val_loader, self.data.num_classes,
                                   self.dist, self.data.img_size)
        routing["classes"] = list(self.data.classes) if self.data.classes else None
        return rows, {**dynamic, "routing": routing, "oracle": oracle_point(routing)}


RUNNERS = {"supernet": SupernetRunner, "reset_bn": ResetBNRunner, "gate": GateRunner}


def make_runner(cfg: StageConfig, model: nn.Module, data: DataBundle, dist: DistContext,
                init_ckpt: dict | None) -> StageRunner:
    """The runner of ``cfg.stage``."""
    return RUNNERS[cfg.stage](cfg, model, data, dist, init_ckpt)
