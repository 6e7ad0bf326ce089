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

from dsnet.bn_calibration import recalibrate_bn
from dsnet.config import StageConfig
from dsnet.data import DataBundle, build_loader, set_loader_epoch
from dsnet.distributed import DistContext
from dsnet.ema import ModelEma
from dsnet.engine import save_stage_checkpoint
from dsnet.evaluate import (
    evaluate_dynamic,
    evaluate_routing,
    evaluate_subnet,
    evaluate_subnets,
    oracle_point,
)
from dsnet.losses import (
    complexity_loss,
    label_smoothing_ce,
    sgs_loss,
    sgs_targets,
    soft_target_ce,
)
from dsnet.madds import expected_madds, routing_madds
from dsnet.optim import build_optimizer, lr_at, set_lr
from dsnet.sampling import sandwich_subnets


class StageRunner:
    """Shared state and plumbing of a stage: loaders, EMA, optimizer, checkpoints."""

    stage = "base"

    def __init__(self, cfg: StageConfig, model: nn.Module, data: DataBundle,
                 dist: DistContext, init_ckpt: dict | None = None) -> None:
        self.cfg, self.model, self.data, self.dist = cfg, model, data, dist
        self.device = dist.device
        self.train_loader = build_loader(data.train, cfg.batch_size, train=True,
                                         rank=dist.rank, world_size=dist.world_size,
                                         seed=cfg.seed, workers=cfg.workers)
        self.val_loader = build_loader(
            data.val, cfg.batch_size * cfg.validation_batch_size_multiplier, train=False,
            rank=dist.rank, world_size=dist.world_size, workers=cfg.workers)
        dist.broadcast_(model.state_dict().values())  # identical start on every rank
        self.ema: ModelEma | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.step = 0
        self.epochs = cfg.epochs

    def batches(self, epoch: int):
        """Training batches of an epoch on this rank's device."""
        set_loader_epoch(self.train_loader, epoch)
        for x, y in self.train_loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def save(self, path: Path, epoch: int, metrics: dict, config: dict) -> None:
        save_stage_checkpoint(path, self.stage, self.model, epoch, metrics, config, self.ema,
                              self.optimizer, extra={"step": self.step})

    def resume(self, ckpt: dict[str, Any]) -> int:
        """Restore from this stage's checkpoint; return the first epoch still to run."""
        self.model.load_state_dict(ckpt["state_dict"])
        if self.ema is not None and ckpt.get("state_dict_ema") is not None:
            self.ema.load_state_dict(ckpt["state_dict_ema"])
        if self.optimizer is not None and ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int((ckpt.get("extra") or {}).get("step", 0))
        if self.ema is not None:
            self.ema.updates = self.step  # one EMA update per optimizer step
        return int(ckpt.get("epoch", -1)) + 1

    def finish(self) -> tuple[list[dict] | None, dict | None]:
        return None, None

    def _lr(self) -> float:
        cfg = self.cfg
        per_epoch = max(1, len(self.train_loader) // cfg.optimizer_step)
        return lr_at(self.step, per_epoch * cfg.epochs, per_epoch * cfg.warmup_epochs,
                     cfg.lr, cfg.warmup_lr, cfg.sched)

    def _optimizer_step(self, params: list[nn.Parameter]) -> float:
        """Average gradients across ranks, step with the scheduled lr, update the EMA."""
        self.dist.average_gradients(params)
        lr = self._lr()
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return lr

    def _check_finite(self, loss: torch.Tensor, epoch: int, i: int) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{self.stage}] loss is {loss.item()} at epoch {epoch + 1} "
                                     f"batch {i}; the last good checkpoint is kept. Lower lr "
                                     "or check the data")


class SupernetRunner(StageRunner):
    """Stage I: sandwich rule (largest, ``num_random`` random, smallest) per step."""

    stage = "supernet"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.model.gate_head.gate.requires_grad_(False)  # the slimming head is Stage II's
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, self.cfg.opt, self.cfg.lr,
                                         self.cfg.weight_decay)
        # The authors' `inplace_bootstrap: false` switches distillation off altogether.
        self.distill = self.cfg.distill if self.cfg.inplace_bootstrap else "none"
        if self.cfg.model_ema or self.distill == "ieb":
            self.ema = ModelEma(self.model, self.cfg.model_ema_decay, self.cfg.model_ema_warmup)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        total, seen, t0, lr = 0.0, 0, time.perf_counter(), 0.0
        for i, (x, y) in enumerate(self.batches(epoch)):
            loss = self.sandwich_step(x, y)
            self._check_finite(loss, epoch, i)
            total, seen = total + loss.item() * len(y), seen + len(y)
            if (i + 1) % self.cfg.optimizer_step == 0:
                lr = self._optimizer_step(self.params)
        return {"loss": total / max(seen, 1), "lr": lr,
                "img_per_s": seen * self.dist.world_size / (time.perf_counter() - t0)}

    def teacher_probs(self, x: torch.Tensor, largest_logits: torch.Tensor,
                      subnets: list[int]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Soft targets of the largest and of each random subnet (None: no distillation)."""
        mode = self.distill
        if mode == "none":
            return None, []
        if mode == "inplace":  # the live largest network's output, detached
            return largest_logits.detach().softmax(-1), []
        with torch.no_grad():  # IEB: the EMA teacher on the *same* subnets as the student
            teacher = self.ema.module
            largest = teacher(x, subnet="largest").softmax(-1)
            randoms = [teacher(x, subnet=c).softmax(-1) for c in subnets] \
                if self.cfg.ensemble_ib else []
        return largest, randoms

    def sandwich_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward/backward the sandwich; gradients accumulate. Returns the summed loss."""
        cfg, scale = self.cfg, 1.0 / self.cfg.optimizer_step
        subnets = sandwich_subnets(cfg.seed, self.step, self.model.num_subnets, cfg.num_random)
        out = self.model(x, subnet="largest")
        loss = label_smoothing_ce(out, y, cfg.smoothing)
        (loss * scale).backward()
        teacher, teacher_randoms = self.teacher_probs(x, out, subnets)
        total = loss.detach()
        for c in subnets:
            total += self._student_step(x, y, c, teacher, scale)
        smallest_target = teacher
        if cfg.ensemble_ib and teacher is not None and teacher_randoms:
            smallest_target = torch.stack([teacher, *teacher_randoms]).mean(0)
        return total + self._student_step(x, y, 0, smallest_target, scale)

    def _student_step(self, x: torch.Tensor, y: torch.Tensor, subnet: int,
                      target: torch.Tensor | None, scale: float) -> torch.Tensor:
        out = self.model(x, subnet=subnet)
        if target is None:
            loss = label_smoothing_ce(out, y, self.cfg.smoothing)
        else:
            loss = soft_target_ce(out, target)
        (loss * scale).backward()
        return loss.detach()

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
            n = recalibrate_bn(model, self._calibration_batches(), self.subnets(), self.dist)
        seen = n * self.cfg.batch_size * self.dist.world_size
        return {"batches": n,
                "img_per_s": seen / (time.perf_counter() - t0)}

    def validate(self) -> dict[str, float]:
        row = evaluate_subnet(self.model, self.val_loader, 0, self.dist, self.data.img_size)
        return {"top1": row["top1"], "madds": row["madds"]}

    def finish(self) -> tuple[list[dict] | None, dict | None]:
        rows = evaluate_subnets(self.model, self.val_loader, _eval_subnets(self.cfg, self.model),
                                self.dist, self.data.img_size)
        return rows, None


def _eval_subnets(cfg: StageConfig, model: nn.Module) -> list:
    if cfg.eval_subnets == "all":  # the uniform subnets (the release's table)
        return list(range(model.num_subnets))
    return list(cfg.eval_subnets)


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

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        space = routing_space_for(self.cfg, self.model.num_subnets)
        if space != self.model.routing_space:
            self.model.routing_space = space  # a new head: start every rank from rank 0's
        self.model.to(self.device)
        self.dist.broadcast_(self.model.gate_parameters())
        self.model.requires_grad_(False)
        self.params = self.model.gate_parameters()
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = build_optimizer(self.params, self.cfg.opt, self.cfg.lr,
                                         self.cfg.weight_decay)
        if self.cfg.gate_ema:
            self.ema = ModelEma(self.model, self.cfg.model_ema_decay)
        self.per_choice = routing_madds(self.model, self.data.img_size).to(self.device)

    def train_mode(self) -> None:
        """BN frozen (eval), the slimming head sampling (train)."""
        self.model.eval()
        self.model.gate_head.train()

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.train_mode()
        sums, seen, t0, lr = torch.zeros(3), 0, time.perf_counter(), 0.0
        for i, (x, y) in enumerate(self.batches(epoch)):
            loss, parts = self.gate_step(x, y)
            self._check_finite(loss, epoch, i)
            sums += torch.tensor(parts) * len(y)
            seen += len(y)
            if (i + 1) % self.cfg.optimizer_step == 0:
                lr = self._optimizer_step(self.params)
        task, sgs, madds = (sums / max(seen, 1)).tolist()
        return {"loss": task, "sgs_loss": sgs, "train_madds": madds, "lr": lr,
                "img_per_s": seen * self.dist.world_size / (time.perf_counter() - t0)}

    def gate_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Task loss on the dynamic output + SGS + complexity; gradients accumulate."""
        cfg = self.cfg
        out = self.model.forward_dynamic(x, cfg.gumbel_tau)
        task = label_smoothing_ce(out.logits, y, cfg.smoothing)
        slimmest_correct = out.tail_logits[:, 0].argmax(1) == y
        targets = sgs_targets(slimmest_correct, len(self.model.routing_space))
        sgs = sgs_loss(out.gate_logits, targets, cfg.sgs_on_probs)
        madds = expected_madds(out.gate_weights, self.per_choice)
        penalty = complexity_loss(madds, cfg.complexity_weight, cfg.complexity_form,
                                  cfg.target_madds, cfg.madds_unit)
        loss = task + cfg.sgs_weight * sgs + penalty
        (loss / cfg.optimizer_step).backward()
        return loss.detach(), [task.item(), sgs.item(), madds.mean().item()]

    def validate(self) -> dict[str, float]:
        row = evaluate_dynamic(self.model, self.val_loader, self.dist, self.data.img_size)
        return {"top1": row["top1"], "madds": row["madds"]}

    def finish(self) -> tuple[list[dict] | None, dict | None]:
        # The raw weights (what load_checkpoint loads by default); the EMA head is saved too.
        rows = evaluate_subnets(self.model, self.val_loader, _eval_subnets(self.cfg, self.model),
                                self.dist, self.data.img_size)
        dynamic = evaluate_dynamic(self.model, self.val_loader, self.dist, self.data.img_size)
        routing = evaluate_routing(self.model, self.val_loader, self.data.num_classes,
                                   self.dist, self.data.img_size)
        routing["classes"] = list(self.data.classes) if self.data.classes else None
        return rows, {**dynamic, "routing": routing, "oracle": oracle_point(routing)}


RUNNERS = {"supernet": SupernetRunner, "reset_bn": ResetBNRunner, "gate": GateRunner}


def make_runner(cfg: StageConfig, model: nn.Module, data: DataBundle, dist: DistContext,
                init_ckpt: dict | None) -> StageRunner:
    """The runner of ``cfg.stage``."""
    return RUNNERS[cfg.stage](cfg, model, data, dist, init_ckpt)
