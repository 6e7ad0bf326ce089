"""The training recipe is timm's (parity tests against timm itself), and every config key
either changes behaviour or is refused."""

from __future__ import annotations

import math

import pytest
import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from dsnet.config import ConfigError, load_stage_config, stage_config_from_dict
from dsnet.configs import CONFIG_DIR
from dsnet.train.distributed import DistContext
from dsnet.train.engine import Hook, run_stage
from dsnet.train.optim import build_optimizer, build_schedule, current_lr
from dsnet.train.precision import Precision
from dsnet.train.stages import loader_options, make_runner
from tests.helpers import small_model, stage_cfg, toy_bundle

CONFIGS = CONFIG_DIR


# ----------------------------------------------------------------- optimizer and schedule

@pytest.mark.parametrize("stage", ["supernet", "gate"])
def test_parameter_groups_equal_timms(stage):
    model = small_model()
    runner = make_runner(stage_cfg(stage, weight_decay=1e-4), model, toy_bundle(), DistContext(),
                         None)
    # timm's grouping of whatever the stage trains (supernet: all but the slimming head;
    # gate: the slimming head only)
    expected = param_groups_weight_decay(model, 1e-4)
    got = runner.optimizer.param_groups
    assert [{id(p) for p in g["params"]} for g in got] == \
        [{id(p) for p in g["params"]} for g in expected]
    assert [g["weight_decay"] for g in got] == [g["weight_decay"] for g in expected]
    if stage == "supernet":
        no_decay = next(g for g in got if g["weight_decay"] == 0.0)["params"]
        assert no_decay and all(p.ndim <= 1 for p in no_decay)  # BN weights and biases
    else:  # the slimming head: a bias-free 1x1 conv, all decayed
        assert {id(p) for g in got for p in g["params"]} == \
            {id(p) for p in model.gate_parameters()}


def _release_lr(epoch: int, base: float, epochs: int, warmup: int, warmup_lr: float,
                min_lr: float) -> float:
    """timm 0.3.2's cosine schedule as the release stepped it (per epoch, no warm-up prefix)."""
    if epoch < warmup:
        return warmup_lr + epoch * (base - warmup_lr) / warmup
    if epoch >= epochs:
        return min_lr  # cooldown
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


@pytest.mark.parametrize("name,total,epochs", [
    ("mobilenetv1_bn_uniform.yml", 160, [0, 1, 4, 5, 6, 75, 149, 150, 159]),
    ("mobilenetv1_bn_uniform_gate.yml", 40, [0, 1, 15, 29, 30, 39]),
])
def test_lr_schedule_equals_timms_for_the_authors_yamls(name, total, epochs):
    cfg = load_stage_config(CONFIGS / name)
    assert cfg.total_epochs == total  # epochs + 10 cooldown epochs at min_lr
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    ours = torch.optim.SGD(params, lr=cfg.lr)
    schedule = build_schedule(ours, cfg, updates_per_epoch=100)
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, 2))], lr=cfg.lr)
    timm_sched = CosineLRScheduler(theirs, t_initial=cfg.epochs, lr_min=cfg.min_lr,
                                   warmup_t=cfg.warmup_epochs, warmup_lr_init=cfg.warmup_lr)
    for epoch in epochs:
        schedule.start_epoch(epoch)
        schedule.before_update(epoch * 100 + 7)  # per-epoch: updates leave the lr alone
        timm_sched.step(epoch)
        assert current_lr(ours) == pytest.approx(current_lr(theirs), rel=1e-12)
        assert current_lr(ours) == pytest.approx(
            _release_lr(epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr,
                        cfg.min_lr), rel=1e-9)


def test_lr_schedule_on_updates_moves_within_an_epoch():
    cfg = stage_cfg(epochs=2, sched_on_updates=True, min_lr=0.0)
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=cfg.lr)
    schedule = build_schedule(opt, cfg, updates_per_epoch=10)
    lrs = []
    for step in range(20):
        schedule.before_update(step)
        lrs.append(current_lr(opt))
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly down, update by update


def test_step_and_constant_schedules():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=1.0)
    step = build_schedule(opt, stage_cfg(epochs=9, sched="step", decay_epochs=3,
                                         decay_rate=0.5), 1)
    got = []
    for e in (0, 2, 3, 6):
        step.start_epoch(e)
        got.append(current_lr(opt))
    assert got == pytest.approx([1.0, 1.0, 0.5, 0.25])
    const = build_schedule(opt, stage_cfg(epochs=9, sched="constant", lr=1.0), 1)
    const.start_epoch(8)
    assert current_lr(opt) == pytest.approx(1.0)


def test_optimizer_is_timms_nesterov_sgd_and_adamw():
    model = small_model()
    sgd = build_optimizer(model, stage_cfg())
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    assert sgd.defaults["momentum"] == 0.9
    assert isinstance(build_optimizer(model, stage_cfg(opt="adamw")), torch.optim.AdamW)


# ----------------------------------------------------------------- keys refused

@pytest.mark.parametrize("kw,match", [
    ({"sync_bn": True}, "sync_bn"),
    ({"drop_path": 0.1}, "stochastic depth"),
    ({"pretrained": True}, "downloads no weights"),
    ({"train_mode": "gate"}, "train_mode"),
    ({"stage": "gate", "train_mode": "all"}, "train_mode"),
    ({"stage": "gate", "mixup": 0.2}, "supernet training only"),
    ({"stage": "reset_bn", "cutmix": 1.0}, "supernet training only"),
    ({"stage": "gate", "slim_train": False}, "supernet training only"),
    ({"stage": "reset_bn", "dist_bn": "broadcast"}, "averages"),
    ({"cutmix_minmax": [0.8, 0.2]}, "cutmix_minmax"),
    ({"mixup": 0.2, "batch_size": 15}, "batch_size must be even"),
    ({"amp_dtype": "fp8"}, "amp_dtype"),
    ({"estimator": "mixed"}, "estimator"),
    ({"min_lr": -1e-5}, "'min_lr' must be >= 0"),
    ({"cooldown_epochs": -1}, "'cooldown_epochs' must be >= 0"),
    ({"decay_epochs": 0}, "'decay_epochs' must be > 0"),
    ({"decay_rate": -0.1}, "'decay_rate' must be >= 0"),
    ({"cutmix": -1.0}, "'cutmix' must be >= 0"),
    ({"mixup_prob": 1.5}, "'mixup_prob' must be in"),
    ({"mixup_switch_prob": -0.1}, "'mixup_switch_prob' must be in"),
    ({"mixup_mode": "rows"}, "mixup_mode"),
    ({"mixup_off_epoch": -1}, "'mixup_off_epoch' must be >= 0"),
    ({"sched_on_updates": "yes"}, "'sched_on_updates': expected bool"),
    ({"train_interpolation": "lanczos"}, "train_interpolation"),
])
def test_keys_dsnet_cannot_honour_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        stage_cfg(**kw)


def test_ieb_is_ensemble_ib():
    assert stage_config_from_dict({"ieb": True}).ensemble_ib is True
    assert load_stage_config(CONFIGS / "mobilenetv1_bn_uniform_gate.yml").ensemble_ib is True
    with pytest.raises(ConfigError, match="given twice"):
        stage_config_from_dict({"ieb": True, "ensemble_ib": False})


# ----------------------------------------------------------------- keys honoured

def test_pin_mem_pins_for_cuda_only_and_workers_persist():
    cfg = stage_cfg(workers=2, pin_mem=True)
    assert loader_options(cfg, torch.device("cuda"))["pin_memory"] is True
    assert loader_options(cfg, torch.device("cpu"))["pin_memory"] is False
    assert loader_options(stage_cfg(pin_mem=False), torch.device("cuda"))["pin_memory"] is False
    assert loader_options(cfg, torch.device("cpu"))["persistent_workers"] is True
    assert loader_options(stage_cfg(workers=0), torch.device("cpu"))["persistent_workers"] is False


def _recorded_subnets(monkeypatch, model, cfg) -> list:
    calls = []
    forward = type(model).forward

    def spy(self, x, subnet="largest", **kw):
        calls.append(subnet)
        return forward(self, x, subnet=subnet, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    runner = make_runner(cfg, model, toy_bundle(32), DistContext(), None)
    runner.train_epoch(0)
    return calls


def test_slim_train_false_trains_the_largest_network_alone(monkeypatch):
    calls = _recorded_subnets(monkeypatch, small_model(),
                              stage_cfg(slim_train=False, model_ema=False))
    assert calls == ["largest", "largest"]  # 2 batches, nothing else (no EMA teacher either)
    calls = _recorded_subnets(monkeypatch, small_model(), stage_cfg(model_ema=False,
                                                                    distill="inplace"))
    assert calls[:3] == ["largest", calls[1], 0] and 1 <= calls[1] <= 13


def test_mixup_mixes_targets_until_mixup_off_epoch():
    cfg = stage_cfg(mixup=0.8, mixup_off_epoch=2)
    runner = make_runner(cfg, small_model(), toy_bundle(32), DistContext(), None)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    original = x.clone()
    xm, ym = runner._mix(x.clone(), y, epoch=1)  # timm mixes in place
    assert ym.shape == (16, 10) and torch.allclose(ym.sum(1), torch.ones(16))
    assert not torch.equal(xm, original)
    x2, y2 = runner._mix(x, y, epoch=2)
    assert x2 is x and y2 is y
    assert torch.isfinite(runner.sandwich_step(xm, ym))
    assert make_runner(stage_cfg(), small_model(), toy_bundle(32), DistContext(),
                       None).mixup is None


class LogRecorder(Hook):
    def __init__(self):
        self.lines = []

    def on_log(self, line):
        self.lines.append(line)


def test_log_interval_prints_progress_within_an_epoch(tmp_path):
    rec = LogRecorder()
    cfg = stage_cfg(dataset="synthetic", synthetic_size=160, num_classes=10, img_size=28,
                    model="ds_mbnet_small", log_interval=2, model_ema=False)
    run_stage(cfg, hooks=[rec])
    # 160 images / 16 = 10 batches: lines after batches 2, 4, 6, 8 (not the last)
    assert [line.split(" batch ")[1].split()[0] for line in rec.lines] == \
        ["2/10", "4/10", "6/10", "8/10"]
    assert all("loss" in line and "lr" in line for line in rec.lines)


def test_start_epoch_and_no_resume_opt(tmp_path):
    from dsnet.train.engine import CheckpointHook
    base = dict(dataset="synthetic", synthetic_size=64, num_classes=10, img_size=28,
                model="ds_mbnet_small", model_ema=False, epochs=3)
    first = run_stage(stage_cfg(**base, start_epoch=2), hooks=[CheckpointHook(tmp_path)])
    assert first.epochs_run == [2]  # started at epoch 2 of 3
    ckpt = tmp_path / "checkpoint.pt"
    # resume: a same-stage checkpoint continues after its epoch, as the release's --resume
    again = run_stage(stage_cfg(**{**base, "epochs": 4}, resume=str(ckpt)))
    assert again.epochs_run == [3]
    for no_resume_opt in (False, True):
        cfg = stage_cfg(**{**base, "epochs": 4}, resume=str(ckpt), no_resume_opt=no_resume_opt)
        runner = _resumed_runner(cfg)
        has_momentum = bool(runner.optimizer.state)
        assert has_momentum is (not no_resume_opt)


def _resumed_runner(cfg):
    from dsnet.train import engine
    captured = {}
    real = engine._epoch_loop

    def capture(cfg_, runner, hooks, start):
        captured["runner"] = runner
        return real(cfg_, runner, hooks, runner.epochs)  # run nothing

    engine._epoch_loop = capture
    try:
        engine.run_stage(cfg)
    finally:
        engine._epoch_loop = real
    return captured["runner"]


class RecordingDist(DistContext):
    """Two pretend ranks: records what would be reduced or broadcast."""

    def __init__(self):
        super().__init__(0, 2, torch.device("cpu"))
        self.calls = []

    def _all_reduce_(self, tensors, average):
        self.calls.append(("reduce", len(list(tensors))))

    def broadcast_(self, tensors):
        self.calls.append(("broadcast", len(list(tensors))))


@pytest.mark.parametrize("mode", ["", "reduce", "broadcast"])
def test_dist_bn_syncs_bn_statistics_after_an_epoch(mode):
    dist = RecordingDist()
    runner = make_runner(stage_cfg(dist_bn=mode, model_ema=False, distill="none"), small_model(),
                         toy_bundle(32),
                         dist, None)
    dist.calls.clear()
    runner.sync_bn_statistics()
    n_stats = sum(1 for n, _ in runner.model.named_buffers()
                  if n.endswith(("running_mean", "running_var")))
    assert dist.calls == ([] if not mode else [(mode, n_stats)])


def test_precision_from_config():
    assert Precision.from_config(False, "auto", torch.device("cpu")).enabled is False
    cpu = Precision.from_config(True, "auto", torch.device("cpu"))
    assert cpu.dtype == torch.bfloat16 and not cpu.grad_scaler().is_enabled()
    cuda = Precision.from_config(True, "auto", torch.device("cuda"))
    assert cuda.dtype == torch.float16 and cuda.device_type == "cuda"


def test_amp_bf16_on_cpu_trains_and_evaluates_in_bfloat16(monkeypatch):
    runner = make_runner(stage_cfg(amp=True, model_ema=False), small_model(), toy_bundle(32),
                         DistContext(), None)
    seen = []
    forward = type(runner.model).forward_head

    def spy(self, x, dropout=False):
        out = forward(self, x, dropout)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(type(runner.model), "forward_head", spy)
    metrics = runner.train_epoch(0)
    assert math.isfinite(metrics["loss"])
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in runner.model.parameters())


@pytest.mark.parametrize("estimator", ["tails", "masked", "expected"])
@pytest.mark.parametrize("sgs_on_probs", [False, True])
def test_gate_estimators_train_only_the_slimming_head(estimator, sgs_on_probs):
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = stage_cfg("gate", estimator=estimator, sgs_on_probs=sgs_on_probs, lr=0.5,
                    complexity_weight=0.5, weight_decay=0.0)
    runner = make_runner(cfg, model, toy_bundle(32), DistContext(), None)
    metrics = runner.train_epoch(0)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["sgs_loss"])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed == ["blocks.3.first_block.gate.gate.0.weight"]
