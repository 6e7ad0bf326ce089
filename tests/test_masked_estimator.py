"""Gate training's masked straight-through estimator, the Gumbel soft sample, quadratic MAdds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsnet
from dsnet.models.madds import expected_madds, masked_expected_madds, routing_madds, widths_madds
from dsnet.models.masked import _masked_tail, masked_dynamic_forward, masked_train_forward
from dsnet.models.supernet import gumbel_sample, straight_through_gumbel
from tests.helpers import randomize_bn

GREY = {"ds_mbnet_small": (1, 28, 28), "ds_mbnet_tiny": (1, 28, 28),
        "ds_resnet_small": (1, 28, 28)}
# Supernet families on the masked estimator's contract (their grey 28 px models).
FAMILIES = ["ds_mbnet_small", "ds_mbnet_tiny", "ds_resnet_small"]


pytestmark = pytest.mark.usefixtures("one_thread")


def gate_model(name: str, space: tuple[int, ...] = (0, 1, 2, 3), frozen: bool = True,
               batch: int = 32) -> tuple[dsnet.DSNet, torch.Tensor]:
    """Stage II setting: BN frozen (eval), the head sampling; distinct per-width BN stats
    so a wrong statistic index shows; inputs of varied scale so choices vary."""
    torch.manual_seed(0)
    model = dsnet.create_model(name, routing_space=space)
    randomize_bn(model)
    model.eval()
    model.gate_head.train()
    if frozen:
        model.requires_grad_(False)
        for p in model.gate_parameters():
            p.requires_grad_(True)
    x = torch.randn(batch, *GREY[name]) * torch.linspace(0.2, 3, batch).view(batch, 1, 1, 1)
    return model, x


def both(model: dsnet.DSNet, x: torch.Tensor, seed: int = 1, tau: float = 1.0):
    """The tails and the masked estimator on the same Gumbel noise."""
    torch.manual_seed(seed)
    tails = model.forward_dynamic(x, tau)
    torch.manual_seed(seed)
    masked = masked_train_forward(model, x, tau)
    return tails, masked


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("space", [(0, 1, 2, 3), (2, 5, 9, 13)])
def test_masked_forward_equals_tails_estimator(name, space):
    model, x = gate_model(name, space)
    tails, masked = both(model, x)
    assert torch.equal(masked.choices, tails.choices)
    assert len(masked.choices.unique()) >= 2              # several masks really differ
    torch.testing.assert_close(masked.gate_weights, tails.gate_weights, rtol=0, atol=0)
    torch.testing.assert_close(masked.gate_soft, tails.gate_soft, rtol=0, atol=0)
    torch.testing.assert_close(masked.logits, tails.logits, rtol=1e-4, atol=1e-4)
    # tail_logits: [:, 0] is the slimmest routed subnet's in both contracts
    assert masked.tail_logits.shape == (len(x), 1, model.num_classes)
    assert tails.tail_logits.shape == (len(x), len(space), model.num_classes)
    torch.testing.assert_close(masked.tail_logits[:, 0], tails.tail_logits[:, 0].detach(),
                               rtol=1e-5, atol=1e-5)
    assert not masked.tail_logits.requires_grad


def test_masked_forward_matches_each_chosen_subnet():
    model, x = gate_model("ds_mbnet_tiny", batch=8)
    out = masked_train_forward(model, x)
    with torch.no_grad():
        for i in range(len(x)):
            single = model(x[i:i + 1], subnet=int(out.choices[i]))
            torch.testing.assert_close(out.logits[i:i + 1].detach(), single,
                                       rtol=1e-4, atol=1e-4)


def test_masked_train_forward_with_eval_head_is_argmax():
    model, x = gate_model("ds_mbnet_small")
    model.gate_head.eval()
    out = masked_train_forward(model, x)
    with torch.no_grad():
        ref = model.forward_dynamic(x)
    assert torch.equal(out.choices, ref.choices)
    assert out.gate_soft is None and out.tail_logits is None
    torch.testing.assert_close(out.logits.detach(), ref.logits, rtol=1e-4, atol=1e-4)


def test_masked_train_forward_refuses_train_mode_batchnorm():
    model, x = gate_model("ds_mbnet_tiny")
    model.train()
    with pytest.raises(RuntimeError, match="BatchNorm"):
        masked_train_forward(model, x)


# ----------------------------------------------------------------------------- gradients


def head_grad(model: dsnet.DSNet, out: dsnet.DynamicOutput, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(out.logits, y).backward()
    return model.gate_head.gate[-1].weight.grad.clone()   # the logits conv


@pytest.mark.parametrize("name", FAMILIES)
def test_masked_gradients_reach_head_only(name):
    model, x = gate_model(name)
    y = torch.randint(0, model.num_classes, (len(x),), generator=torch.Generator().manual_seed(0))
    tails, masked = both(model, x)
    grad = head_grad(model, masked, y)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    head = {id(p) for p in model.gate_parameters()}
    for name_, p in model.named_parameters():
        if id(p) not in head:
            assert p.grad is None, name_
    # a different estimator: the gradient flows through the masks, not the tails' logits
    assert not torch.allclose(grad, head_grad(model, tails, y), rtol=1e-3, atol=1e-6)


def test_masked_gradients_flow_through_masks_and_bn_statistics():
    """With a (differentiable) constant one-hot, d(logits)/d(one-hot) is non-zero: each
    layer's mask and BN statistics depend on it (the head's only path to the logits)."""
    model, x = gate_model("ds_mbnet_tiny", batch=4)
    with torch.no_grad():
        feats, _ = model.forward_trunk(x)
    onehot = F.one_hot(torch.tensor([0, 1, 2, 3]), 4).float().requires_grad_(True)
    _masked_tail(model, feats, onehot).sum().backward()
    assert torch.isfinite(onehot.grad).all()
    assert (onehot.grad.abs() > 0).sum() >= 12        # wider and narrower choices both felt


def test_unfrozen_supernet_gets_gradients_too():
    """With a trainable supernet the masked path is an ordinary graph: grads reach it too."""
    model, x = gate_model("ds_mbnet_tiny", frozen=False, batch=8)
    out = masked_train_forward(model, x)
    out.logits.logsumexp(1).sum().backward()
    assert model.classifier.weight.grad is not None
    assert model.gate_head.gate[-1].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- Gumbel sample


def test_gumbel_sample_soft_rows_sum_to_one_and_argmax_is_hard_choice():
    model, x = gate_model("ds_mbnet_small")
    for out in both(model, x, seed=3, tau=0.7):
        assert out.gate_soft is not None and out.gate_soft.shape == out.gate_weights.shape
        torch.testing.assert_close(out.gate_soft.sum(1), torch.ones(len(x)))
        assert torch.equal(out.gate_soft.argmax(1), out.gate_weights.argmax(1))
        assert out.gate_soft.requires_grad          # SGS on probabilities needs its gradient


def test_gumbel_sample_is_the_soft_sample_behind_the_one_hot():
    logits = torch.randn(16, 5, requires_grad=True)
    torch.manual_seed(4)
    hard, soft = gumbel_sample(logits, 0.5)
    torch.manual_seed(4)
    assert torch.equal(straight_through_gumbel(logits, 0.5), hard)   # same noise, same draw
    torch.manual_seed(4)
    g = -torch.empty_like(logits).exponential_().log()
    torch.testing.assert_close(soft, ((logits + g) / 0.5).softmax(1))
    torch.testing.assert_close(hard.detach(), F.one_hot(soft.argmax(1), 5).float())


def test_gate_soft_is_none_in_eval():
    model, x = gate_model("ds_mbnet_small")
    model.gate_head.eval()
    with torch.no_grad():
        assert model.forward_dynamic(x).gate_soft is None


# ----------------------------------------------------------------------------- MAdds


@pytest.mark.parametrize("name", dsnet.list_models())
@pytest.mark.parametrize("full_space", [False, True])
def test_masked_madds_equal_linear_for_every_hard_choice(name, full_space):
    model = dsnet.create_model(name)
    if full_space:
        model.routing_space = range(model.num_subnets)
    size = 224 if name == "ds_mbnet_v1" else None
    k = len(model.routing_space)
    onehot = torch.eye(k, dtype=torch.float64)                       # every choice
    quadratic = masked_expected_madds(model, onehot, size)
    linear = expected_madds(onehot, routing_madds(model, size))
    assert quadratic.dtype == torch.float64
    torch.testing.assert_close(quadratic, linear, rtol=0, atol=0)


def test_masked_madds_match_release_table_at_224():
    model = dsnet.create_model("ds_mbnet_v1")
    onehot = torch.eye(4, dtype=torch.float64)
    gate_cost = model.gate_head.reduced_channels * 4
    expected = [dsnet.count_madds(model, c, 224) + gate_cost for c in range(4)]
    assert masked_expected_madds(model, onehot).tolist() == expected


def test_masked_madds_are_quadratic_in_the_one_hot():
    model = dsnet.create_model("ds_mbnet_small")
    per_choice = routing_madds(model)
    soft = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64,
                        requires_grad=True)
    masked_expected_madds(model, soft).sum().backward()
    quad_grad = soft.grad.clone()
    soft.grad = None
    expected_madds(soft, per_choice).sum().backward()
    linear_grad = soft.grad
    assert not torch.allclose(quad_grad, linear_grad, rtol=1e-3)
    # not linear: the midpoint of two one-hots costs less than the mean of their costs
    # (every width product is convex along the segment)
    e = torch.eye(4, dtype=torch.float64)
    mid = masked_expected_madds(model, (e[:1] + e[3:]) / 2)
    ends = masked_expected_madds(model, e[[0, 3]])
    assert (mid - ends.mean()).abs().item() > 1.0
    # and the gradient reaches every choice, also from a hard one-hot
    assert (quad_grad.abs() > 0).all()


def test_widths_madds_broadcasts_tensor_widths():
    model = dsnet.create_model("ds_mbnet_small")
    arch = model.arch
    a, b = arch.uniform_widths(3), arch.uniform_widths(7)
    mixed = [torch.tensor([float(p), float(q)], dtype=torch.float64) for p, q in zip(a, b)]
    got = widths_madds(arch, mixed, model.in_chans, model.num_classes, 28)
    want = [widths_madds(arch, w, model.in_chans, model.num_classes, 28) for w in (a, b)]
    assert got.tolist() == want


# ----------------------------------------------------------------------------- eval baseline


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_masked_forward_still_equals_dynamic(name):
    model, x = gate_model(name)
    model.gate_head.eval()
    with torch.no_grad():
        ref, choices = model(x, subnet="dynamic", return_choices=True)
    logits, masked_choices = masked_dynamic_forward(model, x, return_choices=True)
    assert torch.equal(masked_choices, choices)
    assert not logits.requires_grad
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    model.gate_head.train()
    with pytest.raises(RuntimeError, match="eval"):
        masked_dynamic_forward(model, x)
