"""Model library: key parity, MAdds table, slicing == dense, dynamic routing, errors."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

import dsnet
from dsnet.models.export import export_subnet
from dsnet.models.layers import DSConv2d, Swish, clear_slice_caches

DATA = Path(__file__).parent / "data"
RELEASE_MADDS = [132_890_144, 152_917_184, 175_151_968, 199_594_496, 226_244_768,
                 255_102_784, 286_168_544, 319_442_048, 354_923_296, 392_612_288,
                 432_509_024, 474_613_504, 518_925_728, 565_445_696]


def reference_keys() -> list[tuple[str, list[int]]]:
    return [(k, s) for k, s in json.loads((DATA / "ds_mbnet_v1_state_dict_keys.json")
                                          .read_text())["keys"]]


def randomize_bn_stats(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every per-width BN distinct running statistics so a wrong index shows."""
    g = torch.Generator().manual_seed(seed)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)


def randomize_bn_affine(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every shared BN affine random values: a DS-ResNet starts each residual branch's
    last BN scale at zero (zero_init_residual), which would make every width compute the
    same thing and every width test pass vacuously."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".aux_bn." in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight")
                        else torch.randn(p.shape, generator=g) * 0.1)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Distinct per-width statistics (every model), and random affine for the DS-ResNets."""
    randomize_bn_stats(model, seed)
    if isinstance(model, dsnet.DSResNet):
        randomize_bn_affine(model, seed)


def small_model(**kw) -> dsnet.DSNet:
    torch.manual_seed(0)
    model = dsnet.create_model("ds_mbnet_small", **kw)
    randomize_bn_stats(model)
    return model.eval()


# Input of the contract tests (export parity, dynamic per sample, masked) for every registered
# model: each model's own size, where that is cheap; 64 px for the 224-px ImageNet models.
CONTRACT_INPUTS = {"ds_mbnet_small": (1, 28, 28), "ds_mbnet_tiny": (1, 28, 28),
                   "ds_mbnet_v1": (3, 64, 64), "ds_resnet_small": (1, 28, 28),
                   "ds_resnet50": (3, 64, 64)}


@functools.cache
def _contract_model(name: str) -> tuple[dsnet.DSSupernet, torch.Tensor]:
    if name == "ds_mbnet_small":
        model = small_model()
    else:
        torch.manual_seed(0)
        model = dsnet.create_model(name)
        randomize_bn(model)
    return model.eval(), torch.get_rng_state()


def contract_model(name: str) -> dsnet.DSSupernet:
    """An eval-mode ``name`` with random per-width BN statistics (a private copy: built once
    per session, ResNet-50 takes a second), the global RNG left as building it leaves it."""
    model, rng = _contract_model(name)
    torch.set_rng_state(rng)
    return copy.deepcopy(model)


def contract_input(name: str, batch: int) -> torch.Tensor:
    return torch.randn(batch, *CONTRACT_INPUTS[name])


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4,
                        atol: float = 1e-5) -> None:
    """``assert_close`` with ``atol`` relative to the logits' scale where that exceeds 1: a
    random ResNet-50's logits reach hundreds, and batch-1 and batch-16 convolutions round
    differently at that scale."""
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale)


def test_every_model_has_contract_inputs():
    assert set(CONTRACT_INPUTS) == set(dsnet.list_models())


@pytest.mark.parametrize("name", ["ds_mbnet_v1", "slimmable_mbnet_v1_bn_uniform"])
def test_state_dict_matches_release_keys_and_shapes(name):
    model = dsnet.create_model(name, num_classes=1000)
    mine = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert mine == reference_keys()


def test_madds_table_matches_release():
    model = dsnet.create_model("ds_mbnet_v1")
    assert [dsnet.count_madds(model, c, 224) for c in range(14)] == RELEASE_MADDS
    assert dsnet.count_madds(model, "largest", 224) == 819_883_136
    assert dsnet.count_madds(model, "smallest") == RELEASE_MADDS[0]


@pytest.mark.parametrize("name", dsnet.list_models())
@pytest.mark.parametrize("size", [32, 64])
def test_madds_monotone_for_every_model_and_size(name, size):
    model = dsnet.create_model(name)
    counts = [dsnet.count_madds(model, c, size) for c in range(model.num_subnets)]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    # The largest network is wider than uniform subnet 13 before the gate, where the arch
    # has more than one width there (DS-MBNet); with a one-width trunk it *is* subnet 13.
    widened = any(len(w) > 1 for w in model.arch.part_widths[:model.arch.gate_stage + 1])
    largest = dsnet.count_madds(model, "largest", size)
    assert largest > counts[-1] if widened else largest == counts[-1]


def test_madds_counts_real_conv_work():
    """Cross-check the analytic count against a hook-based count of the actual forward."""
    model = small_model()
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        w = module.weight
        # Sliced weights: count with the running (input, output) channels of this call.
        c_in, c_out = inputs[0].size(1), output.size(1)
        groups = c_in if module.groups > 1 else 1
        total += c_in * c_out * w.size(2) * w.size(3) * output.size(2) * output.size(3) // groups

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d) and m is not model.gate_head.gate[0]]
    model(torch.randn(1, 1, 28, 28), subnet=5)
    for h in hooks:
        h.remove()
    # Add pools (attention + global) and classifier, which are not convolutions.
    widths = model.arch.uniform_widths(5)
    analytic = dsnet.count_madds(model, 5, 28)
    assert total < analytic and analytic - total < 60_000
    assert widths[-1] * model.num_classes < analytic - total


@pytest.mark.parametrize("name", dsnet.list_models())
def test_every_model_runs_every_mode(name):
    model = dsnet.create_model(name, num_classes=7).eval()
    size = min(model.arch.img_size, 64)
    x = torch.randn(2, model.in_chans, size, size)
    for subnet in ["largest", "smallest", 0, model.num_subnets - 1, "dynamic"]:
        assert model(x, subnet=subnet).shape == (2, 7)


@pytest.mark.parametrize("name", dsnet.list_models())
@pytest.mark.parametrize("subnet", ["largest", 0, 6, 13])
def test_sliced_forward_equals_dense_network(name, subnet):
    """The export does the supernet's arithmetic on copies: bitwise equal logits (with
    and without autograd); the fused-SiLU export is within rounding."""
    model = contract_model(name)
    dense = export_subnet(model, subnet)
    assert all(type(m).__module__.startswith(("torch.nn", "dsnet.models.export"))
               or type(m) is Swish for m in dense.modules())
    x = contract_input(name, 4)
    with torch.no_grad():
        assert torch.equal(model(x, subnet=subnet), dense(x))
        torch.testing.assert_close(export_subnet(model, subnet, silu=True)(x), dense(x),
                                   rtol=1e-5, atol=1e-6)
    assert torch.equal(model(x, subnet=subnet).detach(), dense(x).detach())


def test_slice_cache_reuses_copies_and_follows_weight_changes():
    """Inference reuses contiguous copies of strided slices; any in-place weight change
    (optimizer step, load_state_dict) is seen at once; autograd always gets views."""
    model = small_model()
    convs = [m for m in model.modules() if isinstance(m, DSConv2d)]
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        first = model(x, subnet=5)
    cached = sum(len(c.weight_slices) + len(c.bias_slices) for c in convs)
    assert cached > 0
    with torch.inference_mode():
        assert torch.equal(model(x, subnet=5), first)  # served from the cache ...
    assert sum(len(c.weight_slices) + len(c.bias_slices)
               for c in convs) == cached                      # ... without new entries
    conv = model.blocks[4].residual_blocks[0].conv_pw
    ((stamp, copy),) = [v for k, v in conv.weight_slices._entries.items()]
    assert copy.is_contiguous() and copy.data_ptr() != conv.weight.data_ptr()

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x, subnet=5).square().sum().backward()   # grad mode: views, nothing cached
    opt.step()
    with torch.no_grad():
        after_step = model(x, subnet=5)
        reference = model(x, subnet=5)
    with torch.enable_grad():
        fresh = model(x, subnet=5).detach()
    assert not torch.equal(after_step, first)
    assert torch.equal(after_step, fresh) and torch.equal(reference, fresh)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["blocks.4.residual_blocks.0.conv_pw.weight"].mul_(-1)
    model.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model(x, subnet=5), model(x, subnet=5).detach())
        loaded = model(x, subnet=5)
    assert torch.equal(loaded, model(x, subnet=5).detach())
    assert not torch.equal(loaded, after_step)
    clear_slice_caches(model)
    assert sum(len(c.weight_slices) + len(c.bias_slices) for c in convs) == 0


def test_export_is_scriptable():
    model = small_model()
    scripted = torch.jit.script(export_subnet(model, 3))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x, subnet=3), rtol=1e-4, atol=1e-5)


def test_narrow_width_uses_first_filters_without_copy():
    model = small_model()
    seen = []
    conv = model.blocks[4].first_block.conv_pw
    conv.register_forward_hook(lambda m, i, o: seen.append(o.size(1)))
    model(torch.randn(1, 1, 28, 28), subnet=2)
    assert seen == [model.arch.stages[4].widths[2]]
    view = conv.weight[:seen[0]]
    assert view.data_ptr() == conv.weight.data_ptr()  # a contiguous slice is a view


def test_width_travels_with_the_call():
    """No hidden mode state: call order must not change results."""
    model = small_model()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        a = model(x, subnet=4)
        model(x, subnet="largest")
        model(x, subnet="dynamic")
        b = model(x, subnet=4)
    assert torch.equal(a, b)


@torch.no_grad()
def point_head_at_samples(model: dsnet.DSSupernet, x: torch.Tensor) -> torch.Tensor:
    """Point each slimming-head row at one sample's reduced features (minus the batch mean,
    orthogonal to it), so the batch ``x`` is routed to several subnets; returns the choices."""
    captured = []
    head = model.gate_head.gate[0]
    hook = head.register_forward_hook(lambda m, i, o: captured.append(i[0].flatten(1)))
    model(x, subnet="dynamic")
    hook.remove()
    mean = captured[0].mean(0)                                  # (r,)
    feats = captured[0] - mean                                  # (B, r)
    feats -= (feats @ mean / mean.dot(mean)).unsqueeze(1) * mean  # orthogonal to mean
    rows = feats[torch.linspace(0, len(x) - 1, head.weight.size(0)).long()]
    head.weight.copy_((rows * 100).view_as(head.weight))
    return model(x, subnet="dynamic", return_choices=True)[1]


def diversify_gate(model: dsnet.DSSupernet, x: torch.Tensor) -> None:
    """:func:`point_head_at_samples`, which must give at least three choices."""
    choices = point_head_at_samples(model, x)
    assert len(set(choices.tolist())) >= 3, choices


def routed_input(model: dsnet.DSSupernet, name: str, batch: int = 16) -> torch.Tensor:
    """A batch of inputs of growing scale that the model's slimming head, pointed at its
    samples, routes to at least three choices (unscaled inputs where the scale ramp does
    not separate: a ResNet's gate features follow it too closely)."""
    x = contract_input(name, batch) * torch.linspace(0.2, 3, batch).view(batch, 1, 1, 1)
    if len(set(point_head_at_samples(model, x).tolist())) < 3:
        x = contract_input(name, batch)
    diversify_gate(model, x)
    return x


@pytest.mark.parametrize("name", dsnet.list_models())
def test_dynamic_matches_chosen_subnet_per_sample_eval(name):
    model = contract_model(name)
    x = routed_input(model, name)
    with torch.no_grad():
        logits, choices = model(x, subnet="dynamic", return_choices=True)
        assert set(choices.tolist()) <= set(model.routing_space)
        for i in range(len(x)):
            single = model(x[i:i + 1], subnet=int(choices[i]))
            assert_logits_close(logits[i:i + 1], single)


def test_dynamic_eval_is_deterministic():
    model = small_model()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        a = model(x, subnet="dynamic", return_choices=True)
        b = model(x, subnet="dynamic", return_choices=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_dynamic_train_mode_routes_per_sample_and_grads_reach_head():
    model = small_model()
    model.gate_head.train()  # Gumbel sampling; BN stays in eval mode
    x = torch.randn(8, 1, 28, 28)
    out = model.forward_dynamic(x)
    assert torch.allclose(out.gate_weights.sum(1), torch.ones(8))
    for i in range(8):
        with torch.no_grad():
            single = model(x[i:i + 1], subnet=int(out.choices[i]))
        torch.testing.assert_close(out.logits[i:i + 1].detach(), single, rtol=1e-4, atol=1e-5)
    out.logits.logsumexp(1).sum().backward()
    grad = model.gate_head.gate[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_routing_space_is_settable_and_head_follows():
    model = small_model()
    model.routing_space = (2, 5, 9, 11, 13)
    assert model.gate_head.gate[0].weight.shape[0] == 5
    _, choices = model(torch.randn(4, 1, 28, 28), subnet="dynamic", return_choices=True)
    assert set(choices.tolist()) <= {2, 5, 9, 11, 13}
    with pytest.raises(ValueError, match="routing_space"):
        model.routing_space = (3, 1)
    with pytest.raises(ValueError, match="routing_space"):
        model.routing_space = (0, 14)


@pytest.mark.parametrize("bad", [14, -1, "medium", 2.0, True, None.__class__])
def test_invalid_subnet_raises_with_valid_range(bad):
    model = small_model()
    with pytest.raises(ValueError, match=r"\[0, 13\]"):
        model(torch.randn(1, 1, 28, 28), subnet=bad)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="ds_mbnet_v1") as err:
        dsnet.create_model("ds_mbnet_v2")
    assert "Did you mean" in str(err.value)
    assert {"ds_mbnet_v1", "ds_mbnet_small"} <= set(dsnet.list_models())


def test_largest_is_default_and_dropout_only_on_largest():
    model = small_model(drop_rate=0.5)
    model.train()
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.equal(a, b)  # dropout active on the largest network
    model.eval()
    torch.testing.assert_close(model(x), model(x, subnet="largest"))


def test_initialisation_follows_release_scheme():
    torch.manual_seed(0)
    model = dsnet.create_model("ds_mbnet_v1")
    w = model.blocks[3].residual_blocks[0].conv_pw.weight  # fan_out = 640
    assert abs(w.std().item() - (2 / 640) ** 0.5) < 0.002
    dw = model.blocks[3].first_block.conv_dw.weight        # depthwise: fan_out = 9
    assert abs(dw.std().item() - (2 / 9) ** 0.5) < 0.03
    bound = 1 / 1000 ** 0.5
    assert model.classifier.weight.abs().max() <= bound and model.classifier.bias.abs().sum() == 0
    bn = model.blocks[0].first_block.bn2.aux_bn[-1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_channels_last_model_gives_the_same_logits():
    """A channels-last supernet (the fast CPU layout) computes what the default one does;
    its cached slices keep the layout of 3x3 kernels."""
    model = small_model(in_chans=3)  # an RGB stem: the one 3x3 kernel with several inputs
    x = torch.randn(6, 3, 28, 28)
    with torch.inference_mode():
        ref = {s: model(x, subnet=s) for s in (0, 6, "largest", "dynamic")}
        model.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        for s, want in ref.items():
            torch.testing.assert_close(model(xc, subnet=s), want, rtol=1e-4, atol=1e-5)
    stem = model.conv_stem.weight_slices._entries        # (16, 3, 3, 3): 8 and 16 filters
    assert len(stem) == 2
    assert all(w.is_contiguous(memory_format=torch.channels_last) for _, w in stem.values())
