"""Training algorithms: sampler, losses, EMA, BN recalibration, gate training, engine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import dsnet
from dsnet.config import stage_config_from_dict
from dsnet.data.datasets import DataBundle
from dsnet.train.bn_calibration import recalibrate_bn
from dsnet.train.distributed import DistContext
from dsnet.train.ema import ModelEma
from dsnet.train.engine import CheckpointHook, Hook, run_stage
from dsnet.train.losses import (
    complexity_loss,
    expected_task_loss,
    label_smoothing_ce,
    sgs_loss,
    sgs_targets,
    soft_target_ce,
)
from dsnet.train.sampling import sandwich_subnets
from dsnet.train.stages import make_runner, routing_space_for
from tests.helpers import small_model


def test_sandwich_sampler_is_identical_across_ranks_and_varies_by_step():
    # Two "ranks" draw independently from (seed, step): identical without communication.
    rank0 = [sandwich_subnets(7, s, 14, 2) for s in range(50)]
    rank1 = [sandwich_subnets(7, s, 14, 2) for s in range(50)]
    assert rank0 == rank1
    assert len({tuple(x) for x in rank0}) > 20
    # as the release: 1..13, never subnet 0 (every step trains it as the smallest anyway)
    assert {c for pair in rank0 for c in pair} == set(range(1, 14))
    state = torch.random.get_rng_state()
    sandwich_subnets(7, 3, 14, 2)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_label_smoothing_ce_hand_computed():
    logits = torch.tensor([[2.0, 0.0]])
    logp = F.log_softmax(logits, 1)[0]
    expected = -(0.95 * logp[0] + 0.05 * logp[1])  # 0.1 smoothing over 2 classes
    assert label_smoothing_ce(logits, torch.tensor([0]), 0.1).item() == pytest.approx(
        expected.item(), rel=1e-6)


def test_soft_target_ce_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = (0.25, 0.75)
    target = torch.tensor([[0.5, 0.5]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_target_ce(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_sgs_targets_and_loss():
    targets = sgs_targets(torch.tensor([True, False, True]), 4)
    assert targets.tolist() == [0, 3, 0]
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    on_logits = sgs_loss(logits, torch.tensor([0]))
    assert on_logits.item() == pytest.approx(-math.log(math.exp(3) / (math.exp(3) + 3)), rel=1e-6)
    # The release's form: label-smoothed CE applied to the Gumbel-softmax *probabilities*
    # (a softmax twice), far flatter; the gate logits themselves are not used.
    soft = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    logp = F.log_softmax(soft, 1)[0]
    expected = -(0.9 * logp[0] + 0.1 * logp.mean()).item()
    released = sgs_loss(logits, torch.tensor([0]), gumbel_soft=soft, smoothing=0.1)
    assert released.item() == pytest.approx(expected, rel=1e-6)
    assert released > on_logits


def test_complexity_loss_forms():
    madds = torch.tensor([2e8, 4e8])
    assert complexity_loss(madds, 0.5).item() == pytest.approx(0.5 * 0.3 ** 2)
    assert complexity_loss(madds, 2.0, "target", 2e8).item() == pytest.approx(2.0 * 0.1 ** 2)
    with pytest.raises(ValueError, match="target_madds"):
        complexity_loss(madds, 1.0, "target", None)


def test_expected_task_loss_weights_each_choice_loss():
    """One-hot probabilities give that choice's smoothed cross entropy; mixed ones the
    probability-weighted mean, with the gradient d/dp = each choice's loss."""
    torch.manual_seed(0)
    tails, y = torch.randn(3, 2, 10), torch.tensor([1, 4, 7])     # (B, K, classes)
    for k in range(2):
        onehot = F.one_hot(torch.full((3,), k), 2).float()
        expected = label_smoothing_ce(tails[:, k], y, 0.1)
        assert expected_task_loss(onehot, tails, y, 0.1).item() == pytest.approx(expected.item())
    probs = torch.tensor([[0.25, 0.75]] * 3, requires_grad=True)
    expected_task_loss(probs, tails, y, 0.0).backward()
    per_choice = torch.stack([F.cross_entropy(tails[:, k], y, reduction="none")
                              for k in range(2)], 1)
    assert torch.allclose(probs.grad, per_choice / 3)


def test_expected_madds_is_differentiable_through_one_hot():
    per_choice = torch.tensor([1e6, 2e6, 4e6], dtype=torch.float64)
    weights = torch.tensor([[0.2, 0.3, 0.5]], requires_grad=True)
    madds = dsnet.expected_madds(weights, per_choice)
    madds.sum().backward()
    assert madds.item() == pytest.approx(0.2e6 + 0.6e6 + 2e6)
    assert torch.allclose(weights.grad, per_choice.float().unsqueeze(0))


def test_ema_update_hand_computed():
    model = torch.nn.Linear(2, 1)
    ema = ModelEma(model, decay=0.9)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * model.weight)
    assert not ema.module.weight.requires_grad


def test_bn_recalibration_matches_direct_statistics():
    model = small_model()
    model.train()
    batches = [torch.randn(16, 1, 28, 28) for _ in range(3)]
    recalibrate_bn(model, batches, subnets=[0])
    # The stem's narrow BN sees conv_stem(x)[:, :8]: its statistics must be the mean over
    # batches of each batch's channel mean / unbiased variance.
    with torch.no_grad():
        outs = [model.conv_stem(x, 8) for x in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).reshape(8, -1).var(1, unbiased=True)
                       for o in outs]).mean(0)
    stats = model.bn1.aux_bn[0]
    torch.testing.assert_close(stats.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.running_var, var, rtol=1e-4, atol=1e-5)
    # What it touched is restored: train flags and momentum.
    assert model.training and model.bn1.aux_bn[-1].momentum == 0.1
    model.eval()
    recalibrate_bn(model, batches[:1], subnets=[0])
    assert not model.training and not model.bn1.training


def test_bn_recalibration_gives_shared_statistics_to_one_owner():
    """Largest and uniform 13 share the widest stage-3/4 statistics but feed them different
    inputs: the later subnet in the list owns them, the earlier one its own statistics only."""
    batches = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    both, alone = small_model(), small_model()
    untouched = both.blocks[4].first_block.bn2.aux_bn[5].running_mean.clone()
    recalibrate_bn(both, batches, subnets=["largest", 13])
    recalibrate_bn(alone, batches, subnets=[13])
    shared = "blocks.3.residual_blocks.0.bn2.aux_bn.13.running_var"
    torch.testing.assert_close(both.state_dict()[shared], alone.state_dict()[shared])
    # The largest's own wide-stem statistics were estimated (not left at their reset value).
    assert not torch.equal(both.bn1.aux_bn[1].running_var, torch.ones(16))
    assert not torch.equal(both.bn1.aux_bn[1].running_var, alone.bn1.aux_bn[1].running_var)
    # Statistics no listed subnet reads are left alone.
    torch.testing.assert_close(both.blocks[4].first_block.bn2.aux_bn[5].running_mean, untouched)


def toy_bundle(x: torch.Tensor, y: torch.Tensor) -> DataBundle:
    ds = TensorDataset(x, y)
    return DataBundle(train=ds, val=ds, num_classes=10, in_chans=1, img_size=28, name="toy")


def gate_cfg(**kw):
    base = {"stage": "gate", "dataset": "synthetic", "epochs": 1, "batch_size": 32,
            "lr": 0.2, "warmup_epochs": 0, "weight_decay": 0.0, "workers": 0,
            "num_choice": 4, "complexity_weight": 0.0, "smoothing": 0.0, "seed": 0,
            "validation_batch_size_multiplier": 1, "cooldown_epochs": 0}
    base.update(kw)
    return stage_config_from_dict(base)


def test_gate_training_freezes_everything_but_the_head():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    runner = make_runner(gate_cfg(), model, toy_bundle(x, y), DistContext(), None)
    runner.train_epoch(0)
    head = "blocks.3.first_block.gate.gate.0.weight"
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [head]


def easy_and_hard_inputs(n_hard: int = 256) -> tuple:
    """ds_mbnet_small (seed 0) and two kinds of input that look different: 256 'easy' ones
    and ``n_hard`` 'hard' ones, BN calibrated on both so the random network's features keep
    the difference."""
    torch.manual_seed(0)
    model = small_model()
    easy = torch.randn(256, 1, 28, 28) * 0.5 + 1.0
    hard = torch.randn(n_hard, 1, 28, 28) * 0.5 - 1.0
    recalibrate_bn(model, [torch.cat([easy[:64], hard[:64]])], ["largest", *range(14)])
    return model, easy, hard


def train_gate_and_route(model, cfg, easy, y_easy, hard, y_hard) -> tuple:
    """Train the gate for ``cfg.epochs`` on both kinds; the eval-mode choices of each."""
    data = toy_bundle(torch.cat([easy, hard]), torch.cat([y_easy, y_hard]))
    runner = make_runner(cfg, model, data, DistContext(), None)
    for epoch in range(cfg.epochs):
        runner.train_epoch(epoch)
    model.eval()
    with torch.no_grad():
        _, c_easy = model(easy, subnet="dynamic", return_choices=True)
        _, c_hard = model(hard, subnet="dynamic", return_choices=True)
    return c_easy, c_hard


def test_sgs_gate_routes_hard_samples_wider():
    """Known answer: labels make the slimmest subnet right on 'easy' inputs and wrong on
    'hard' ones, and the two kinds look different; SGS must learn to tell them apart."""
    model, easy, hard = easy_and_hard_inputs()
    with torch.no_grad():
        y_easy = model(easy, subnet=0).argmax(1)                 # slimmest is right
        y_hard = (model(hard, subnet=0).argmax(1) + 1) % 10      # slimmest is wrong
    cfg = gate_cfg(epochs=4, lr=0.5, sgs_weight=1.0)
    c_easy, c_hard = train_gate_and_route(model, cfg, easy, y_easy, hard, y_hard)
    wide_easy = (c_easy == 3).float().mean().item()
    wide_hard = (c_hard == 3).float().mean().item()
    # Measured: about 0.76 of the hard and 0.2 of the easy samples go to the widest choice.
    assert wide_hard > 0.6 and wide_hard - wide_easy > 0.4, (wide_easy, wide_hard)


def test_expected_estimator_routes_by_each_choice_loss():
    """Known answer, no SGS: on 'easy' inputs the labels are the slimmest choice's
    predictions, on 'hard' ones the widest choice's (where the two differ). The expected
    estimator sees every choice's loss, so with a small MAdds penalty the head must send
    the hard inputs away from the slimmest choice and the easy ones to it."""
    model, easy, hard = easy_and_hard_inputs(n_hard=512)
    with torch.no_grad():
        y_easy = model(easy, subnet=0).argmax(1)
        wide, slim = model(hard, subnet=3).argmax(1), model(hard, subnet=0).argmax(1)
    hard, y_hard = hard[wide != slim][:256], wide[wide != slim][:256]
    cfg = gate_cfg(epochs=4, estimator="expected", opt="adamw", lr=0.05, weight_decay=0.0,
                   complexity_weight=0.01, madds_unit=1e6)
    c_easy, c_hard = train_gate_and_route(model, cfg, easy, y_easy, hard, y_hard)
    # hard inputs: choice 0 is wrong (the others may be right); easy ones: 0 is right
    slim_easy = (c_easy == 0).float().mean().item()
    slim_hard = (c_hard == 0).float().mean().item()
    # Measured: 0.75 of the easy and 0.20 of the hard inputs go to choice 0 (an untrained
    # head routes both kinds alike).
    assert slim_easy - slim_hard > 0.4 and slim_hard < 0.3, (slim_easy, slim_hard, len(hard))


def test_routing_space_from_start_chn_idx_and_bounds():
    assert routing_space_for(gate_cfg(start_chn_idx=10), 14) == (10, 11, 12, 13)
    with pytest.raises(ValueError, match="exceeds"):
        routing_space_for(gate_cfg(start_chn_idx=11), 14)
    model = small_model()
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    runner = make_runner(gate_cfg(start_chn_idx=6), model, toy_bundle(x, y), DistContext(), None)
    runner.train_epoch(0)  # the release breaks for start > 0; here it trains
    assert model.routing_space == (6, 7, 8, 9)


class Recorder(Hook):
    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, report, save):
        self.epochs.append(report.epoch)


def tiny_supernet_cfg(**kw):
    base = {"stage": "supernet", "dataset": "mnist5k", "num_val": 200, "epochs": 2,
            "batch_size": 64, "lr": 0.1, "warmup_epochs": 0, "workers": 0, "aa": "",
            "reprob": 0.0, "color_jitter": 0.0, "model_ema_decay": 0.9, "seed": 1,
            "cooldown_epochs": 0}
    base.update(kw)
    return stage_config_from_dict(base)


def test_engine_checkpoints_resume_and_chain(tmp_path, monkeypatch):
    # Cut mnist5k to 512 training images so the two epochs stay fast.
    import dsnet.train.engine as engine

    real = engine.build_data

    def small_data(cfg):
        bundle = real(cfg)
        bundle.train = torch.utils.data.Subset(bundle.train, range(512))
        return bundle

    monkeypatch.setattr(engine, "build_data", small_data)
    rec = Recorder()
    cfg = tiny_supernet_cfg(epochs=1)
    run_stage(cfg, hooks=[rec, CheckpointHook(tmp_path / "s")])
    ckpt = dsnet.read_checkpoint(tmp_path / "s" / "checkpoint.pt")
    assert ckpt["stage"] == "supernet" and ckpt["epoch"] == 0 and ckpt["optimizer"]
    # Resume with more epochs: only epoch 1 runs.
    rec2 = Recorder()
    run_stage(tiny_supernet_cfg(epochs=2), hooks=[rec2],
              resume_from=tmp_path / "s" / "checkpoint.pt")
    assert rec.epochs == [0] and rec2.epochs == [1]
    # Chaining: reset_bn from the supernet checkpoint produces the subnet table.
    res = run_stage(tiny_supernet_cfg(stage="reset_bn", reset_bn_batches=2),
                    init_from=tmp_path / "s" / "checkpoint.pt",
                    hooks=[CheckpointHook(tmp_path / "r")])
    assert [r["subnet"] for r in res.subnets] == list(range(14))
    # ... and writes it into its checkpoint, for sweeps given that checkpoint (--supernet).
    assert dsnet.read_checkpoint(tmp_path / "r" / "checkpoint.pt")["extra"]["subnets"] == \
        res.subnets
    # A later stage's checkpoint given to an earlier stage is refused.
    with pytest.raises(dsnet.CheckpointError, match="runs after"):
        run_stage(tiny_supernet_cfg(epochs=1), init_from=tmp_path / "r" / "checkpoint.pt")
    with pytest.raises(dsnet.CheckpointError, match="needs the previous stage"):
        run_stage(tiny_supernet_cfg(stage="gate", num_choice=4))


def test_gate_finish_reports_the_final_weights():
    """``finish`` reuses the last epoch's dynamic evaluation (the weights it evaluated are
    the final ones) and evaluates itself when no epoch ran (a resume of a finished stage)."""
    from dsnet.eval.evaluate import evaluate_dynamic

    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    torch.manual_seed(0)
    runner = make_runner(gate_cfg(lr=0.5, eval_subnets=[0]), small_model(), toy_bundle(x, y),
                         DistContext(), None)
    runner.train_epoch(0)
    runner.validate()
    fresh = evaluate_dynamic(runner.model, runner.val_loader, None, 28)
    assert runner.finish()[1] | fresh == runner.finish()[1]
    idle = make_runner(gate_cfg(eval_subnets=[0]), small_model(), toy_bundle(x, y),
                       DistContext(), None)
    fresh = evaluate_dynamic(idle.model, idle.val_loader, None, 28)
    assert idle.finish()[1] | fresh == idle.finish()[1]


def test_gate_reuses_reset_bn_table_only_when_it_measured_the_same(tmp_path, monkeypatch):
    """The gate freezes the supernet and BN, so reset_bn's recorded table is its table;
    a table measured on other validation images, subnets or precision is evaluated anew."""
    import dsnet.train.stages as stages
    from dsnet.config import config_to_dict

    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    reset_cfg = gate_cfg(stage="reset_bn", reset_bn_batches=2)
    reset = make_runner(reset_cfg, small_model(), toy_bundle(x, y), DistContext(), None)
    reset.train_epoch(0)
    reset.validate()
    reset.save(tmp_path / "r.pt", epoch=0, metrics={}, config=config_to_dict(reset_cfg))
    ckpt = dsnet.read_checkpoint(tmp_path / "r.pt")
    model = small_model()
    model.load_state_dict(ckpt["state_dict"])
    calls = []
    real = stages.evaluate_subnets
    monkeypatch.setattr(stages, "evaluate_subnets", lambda *a: calls.append(a[2]) or real(*a))
    gate = make_runner(gate_cfg(), model, toy_bundle(x, y), DistContext(), ckpt)
    rows = gate.finish()[0]
    assert calls == [] and rows == reset.table   # not evaluated again ...
    assert real(gate.model, gate.val_loader, list(range(14)), None, 28) == rows  # ... and right
    for changed in ({"num_val": 32}, {"eval_subnets": [0, 13]}, {"seed": 1}):
        gate = make_runner(gate_cfg(**changed), model, toy_bundle(x, y), DistContext(), ckpt)
        assert gate.recorded_table is None
    gate = make_runner(gate_cfg(), model, toy_bundle(x, y), DistContext(), None)
    gate.finish()
    assert calls == [list(range(14))]  # no checkpoint given: evaluated


def test_nan_loss_stops_with_a_clear_error(monkeypatch):
    import dsnet.train.stages as stages

    model = small_model()
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    runner = make_runner(gate_cfg(), model, toy_bundle(x, y), DistContext(), None)
    monkeypatch.setattr(stages, "label_smoothing_ce", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="epoch 1 batch 0"):
        runner.train_epoch(0)


def test_ema_warmup_follows_early_weights():
    model = torch.nn.Linear(2, 1)
    ema = ModelEma(model, decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    for _ in range(1000):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(1001 / 1010)
    ema.decay = 0.99
    assert ema.current_decay() == pytest.approx(0.99)
    assert ModelEma(model, decay=0.999).current_decay() == 0.999  # the release: no warm-up


def test_head_size_of_a_checkpoint_with_a_hidden_layer_is_its_last_conv():
    """A checkpoint without a routing space (the release's) sizes the slimming head by its
    logits: the last conv of a head with a hidden layer (BN -> gate.1 -> ReLU -> gate.3)."""
    from dsnet.train.engine import _match_head_size

    model = dsnet.create_model("ds_mbnet_tiny", routing_space=(0, 4, 8, 13))
    state = dsnet.create_model("ds_mbnet_tiny", routing_space=range(6)).state_dict()
    assert state["blocks.3.first_block.gate.gate.1.weight"].shape[0] == 32   # hidden width
    _match_head_size(model, {"state_dict": state})
    assert model.routing_space == tuple(range(6))


@pytest.mark.parametrize("field", ["gate_grid", "gate_hidden"])
def test_arch_refuses_a_negative_slimming_head_size(field):
    import dataclasses

    from dsnet.models.arch import DS_MBNET_TINY

    with pytest.raises(ValueError, match="gate_grid and gate_hidden must be >= 0"):
        dataclasses.replace(DS_MBNET_TINY, **{field: -1})
