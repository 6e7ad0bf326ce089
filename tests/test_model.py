"""Model library: key parity, MAdds table, slicing, dynamic routing, errors (the contracts
every registered model keeps, export, MAdds, dynamic, checkpoints, are in test_contracts)."""

from __future__ import annotations

import pytest
import torch

import dsnet
from dsnet.models.layers import DSConv2d, clear_slice_caches
from tests.helpers import reference_keys, small_model

RELEASE_MADDS = [132_890_144, 152_917_184, 175_151_968, 199_594_496, 226_244_768,
                 255_102_784, 286_168_544, 319_442_048, 354_923_296, 392_612_288,
                 432_509_024, 474_613_504, 518_925_728, 565_445_696]


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
def test_every_model_runs_every_mode(name):
    model = dsnet.create_model(name, num_classes=7).eval()
    size = min(model.arch.img_size, 64)
    x = torch.randn(2, model.in_chans, size, size)
    for subnet in ["largest", "smallest", 0, model.num_subnets - 1, "dynamic"]:
        assert model(x, subnet=subnet).shape == (2, 7)


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
    grad = model.gate_head.gate[-1].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_routing_space_is_settable_and_head_follows():
    model = small_model()
    model.routing_space = (2, 5, 9, 11, 13)
    assert model.gate_head.gate[-1].weight.shape[0] == 5
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
