"""DS-ResNet: torchvision/timm parity, MAdds, load_pretrained, Stage I's ``pretrained:``,
checkpoints, training on the ResNet family (the export/dynamic/MAdds/checkpoint contracts
of every model are in test_contracts, the masked ones in test_inference and
test_masked_estimator)."""

from __future__ import annotations

import pytest
import torch

import dsnet
from dsnet.config import ConfigError, StageConfig
from dsnet.models.export import export_subnet
from dsnet.train.distributed import DistContext
from dsnet.train.stages import make_runner
from tests.helpers import randomize_bn, randomize_bn_stats, stage_cfg, toy_bundle

pytestmark = pytest.mark.usefixtures("one_thread")

TORCHVISION_RESNET50_GMADDS = 4.09  # torchvision's documented GFLOPS of resnet50


def randomize_plain_bn(model: torch.nn.Module, seed: int = 1) -> None:
    """Distinct running statistics and affine in every BatchNorm of a plain network (a
    freshly built one has identity BNs, which would hide a mapping error)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """A random-weight torchvision ResNet-50 (eval) and its state dict saved as a file."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    randomize_plain_bn(net)
    path = tmp_path_factory.mktemp("tv") / "resnet50.pth"
    torch.save(net.state_dict(), path)
    return net, path


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- parity


def test_largest_equals_torchvision_resnet50(torchvision_file):
    net, path = torchvision_file
    model = dsnet.create_model("ds_resnet50", num_classes=1000, attention=False)
    dsnet.load_pretrained(model, path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = net(x)
        out = model.eval()(x)
    assert rel_error(out, ref) < 1e-5          # measured: 0.0 (bitwise the same ops)
    # the largest network is uniform subnet 13 (one-width trunk)
    assert dsnet.count_madds(model, "largest") == dsnet.count_madds(model, 13)


def test_attention_head_starts_neutral_after_load(torchvision_file):
    """With the gate's attention head (the default), loading a plain ResNet leaves it a
    uniform 0.5 scale that the next BatchNorms cancel: the function is the plain one."""
    net, path = torchvision_file
    model = dsnet.create_model("ds_resnet50", num_classes=1000)
    dsnet.load_pretrained(model, path)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert rel_error(model.eval()(x), net(x)) < 1e-4              # eps of rescaled stats
        net.train()
        try:
            assert rel_error(model.train()(x), net(x)) < 1e-4         # batch statistics
        finally:
            net.eval()
    assert model.gate.conv_expand.weight.abs().sum() == 0


def test_timm_resnet50_state_dict_loads_too():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("resnet50", pretrained=False).eval()
    randomize_plain_bn(net)
    model = dsnet.create_model("ds_resnet50", num_classes=1000, attention=False)
    model.load_plain_state_dict(net.state_dict())        # what load_pretrained calls
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_error(model.eval()(x), net(x)) < 1e-5


def test_resnet50_madds_match_torchvision():
    model = dsnet.create_model("ds_resnet50", num_classes=1000, attention=False)
    largest = dsnet.count_madds(model, subnet="largest", input_size=224)
    # convolutions and fc (torchvision's 4.09 G: 4,089,184,256) + the global pool (100,352)
    assert largest == 4_089_184_256 + 2048 * 7 * 7
    assert abs(largest / (TORCHVISION_RESNET50_GMADDS * 1e9) - 1) < 0.005
    # the attention head adds its pool and two 1x1 convs (512 -> 128 -> 512) at 28x28
    with_attention = dsnet.count_madds(dsnet.create_model("ds_resnet50"), "largest", 224)
    assert with_attention - largest == 512 * 28 * 28 + 2 * 512 * 128


@pytest.mark.parametrize("name, size, kw", [
    ("ds_resnet_small", 28, {"attention": False}),
    ("ds_resnet_small", 28, {"slice_residual": False}),
])
def test_madds_equal_the_forward_work(name, size, kw):
    """The analytic count equals the work measured by hooks on a real forward (every conv,
    the average pools, the classifier) for every subnet, in the variants the registered
    defaults do not cover (those: test_contracts, on the exported networks)."""
    torch.manual_seed(0)
    model = dsnet.create_model(name, **kw).eval()
    work = []

    def conv(module, inputs, output):
        c_in, (c_out, h, w) = inputs[0].size(1), output.shape[1:]
        work.append(c_in * c_out * module.kernel_size[0] * module.kernel_size[1] * h * w)

    def pooled(module, inputs, output):   # an average pool over this module's input/output
        work.append(output.size(1) * output.size(2) * output.size(3))

    hooks = [m.register_forward_hook(conv) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d) and m is not model.gate_head.gate[0]]
    hooks.append(model.stages[-1].register_forward_hook(pooled))          # global pool
    hooks.append(model.gate.register_forward_hook(pooled))                # attention pool
    hooks.append(model.fc.register_forward_hook(
        lambda m, i, o: work.append(i[0].size(1) * o.size(1))))
    x = torch.randn(1, model.in_chans, size, size)
    try:
        for c in (range(model.num_subnets) if name != "ds_resnet50" else (0, 7, 13)):
            work.clear()
            with torch.no_grad():
                model(x, subnet=c)
            assert sum(work) == dsnet.count_madds(model, c, size), c
    finally:
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------- load_pretrained


def small_resnet(seed: int = 0, **kw) -> dsnet.DSResNet:
    torch.manual_seed(seed)
    model = dsnet.create_model("ds_resnet_small", **kw)
    randomize_bn_stats(model, seed)
    with torch.no_grad():       # bn3 starts at zero (zero_init_residual): give it a scale
        for name, p in model.named_parameters():
            if name.endswith("bn3.aux_bn.13.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def plain_file(tmp_path, model: dsnet.DSResNet, edit=None):
    """The largest network exported as a plain (torchvision-named) state dict, saved."""
    state = export_subnet(model, "largest").state_dict()
    if edit is not None:
        edit(state)
    path = tmp_path / "plain.pth"
    torch.save(state, path)
    return path


def test_export_of_the_largest_loads_back_as_pretrained(tmp_path):
    """A DS-ResNet's static export is a plain ResNet: its state dict loads into a fresh
    supernet, whose largest network is then the exported one (the gate's attention head
    included); narrower widths start from the first entries of the BN statistics."""
    src = small_resnet(0)
    path = plain_file(tmp_path, src)
    dst = small_resnet(1)
    dsnet.load_pretrained(dst, path)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    widest = src.layer2[0].bn1.aux_bn[-1].running_mean
    assert torch.equal(dst.layer2[0].bn1.aux_bn[0].running_mean, widest[:6])


@pytest.mark.parametrize("edit, kw, match", [
    (lambda s: s.pop("layer2.1.conv2.weight"), {}, "missing key 'layer2.1.conv2.weight'"),
    (lambda s: s.pop("layer1.0.bn1.running_var"), {}, "missing key 'layer1.0.bn1.running_var'"),
    (lambda s: s.update({"head.weight": torch.zeros(3)}), {}, "unexpected key 'head.weight'"),
    (None, {"num_classes": 7}, r"key 'fc.weight' has shape \(10, 256\) in the file, \(7, 256\)"),
])
def test_load_pretrained_refuses_what_does_not_fit(tmp_path, edit, kw, match):
    path = plain_file(tmp_path, small_resnet(0), edit)
    model = small_resnet(1, **kw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dsnet.CheckpointError, match=match):
        dsnet.load_pretrained(model, path)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # untouched


def test_load_pretrained_refuses_models_without_a_plain_counterpart(tmp_path):
    path = plain_file(tmp_path, small_resnet(0))
    with pytest.raises(dsnet.CheckpointError, match="no plain counterpart"):
        dsnet.load_pretrained(dsnet.create_model("ds_mbnet_tiny"), path)


# ----------------------------------------------------------------------------- config, stages


def resnet_cfg(**kw) -> StageConfig:
    """:func:`tests.helpers.stage_cfg` for ds_resnet_small: two batches of 32 a toy epoch."""
    return stage_cfg(**{"model": "ds_resnet_small", "batch_size": 32, "lr": 0.05, **kw})


def test_pretrained_key_takes_an_existing_file(tmp_path):
    assert resnet_cfg().pretrained is False
    with pytest.raises(ConfigError, match="'pretrained': file .*nope.pth' not found"):
        resnet_cfg(pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match="downloads no weights"):
        resnet_cfg(pretrained=True)
    path = plain_file(tmp_path, small_resnet(0))
    assert resnet_cfg(pretrained=str(path)).pretrained == str(path)


def test_stage_one_starts_from_pretrained_and_trains(tmp_path):
    """Stage I loads ``pretrained:`` before the EMA teacher copies the model, then the
    sandwich trains the ResNet family; a checkpoint given in ``resume:`` would win."""
    src = small_resnet(0)
    path = plain_file(tmp_path, src)
    model = dsnet.create_model("ds_resnet_small")
    runner = make_runner(resnet_cfg(pretrained=str(path)), model, toy_bundle(), DistContext(),
                         None)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), src(x))
        assert torch.equal(runner.ema.module.eval()(x), src(x))
    metrics = runner.train_epoch(0)
    assert metrics["loss"] > 0 and not torch.equal(model.fc.weight, src.fc.weight)


@pytest.mark.parametrize("estimator", ["tails", "masked"])
def test_gate_stage_trains_the_resnet_head_with_both_estimators(estimator):
    model = small_resnet(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = make_runner(resnet_cfg(stage="gate", num_choice=4, estimator=estimator,
                                   complexity_weight=0.1, lr=0.5), model, toy_bundle(),
                         DistContext(), None)
    runner.train_epoch(0)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed == ["gate.gate.0.weight"]


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name, kw, size", [
    ("ds_resnet_small", {"attention": False, "routing_space": (0, 4, 8, 13)}, 28),
    ("ds_resnet_small", {"slice_residual": False}, 28),
])
def test_checkpoint_round_trip(tmp_path, name, kw, size):
    torch.manual_seed(0)
    model = dsnet.create_model(name, **kw)
    randomize_bn_stats(model)
    path = dsnet.save_checkpoint(tmp_path / "m.pt", model.eval(), stage="gate", epoch=0)
    again, meta = dsnet.model_from_checkpoint(path)
    assert type(again) is dsnet.DSResNet and again.routing_space == model.routing_space
    assert again.arch == model.arch and again.gate.attends == model.gate.attends
    x = torch.randn(2, model.in_chans, size, size)
    with torch.no_grad():
        for subnet in ("largest", 0, "dynamic"):
            assert torch.equal(again.eval()(x, subnet=subnet), model(x, subnet=subnet))
    saved = model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in again.state_dict().items())
    fresh = dsnet.create_model(name, **kw)    # load_checkpoint into a model built by hand
    dsnet.load_checkpoint(fresh, path)
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())


def forced_choices(model: dsnet.DSSupernet, index: torch.Tensor):
    """Make the slimming head route sample i to choice ``index[i]`` (its logits replaced)."""
    k = len(model.routing_space)
    return model.gate_head.gate[0].register_forward_hook(
        lambda m, i, o: 10.0 * torch.nn.functional.one_hot(index, k).to(o.dtype).view_as(o))


def test_inner_only_variant_keeps_the_contracts():
    """``slice_residual=False`` (the measured alternative: residual stream at full width):
    export, grouped dynamic and both masked forwards still compute the chosen subnets."""
    from dsnet.models.masked import masked_dynamic_forward, masked_train_forward

    torch.manual_seed(0)
    model = dsnet.create_model("ds_resnet_small", slice_residual=False,
                               routing_space=(0, 4, 9, 13)).eval()
    randomize_bn(model)
    assert model.layer3[1].bn3.widths == (256,) and model.layer3[1].bn1.widths[0] == 12
    x = torch.randn(8, 1, 28, 28)
    hook = forced_choices(model, torch.arange(8) % 4)
    try:
        with torch.no_grad():
            logits, choices = model(x, subnet="dynamic", return_choices=True)
            assert choices.tolist() == [0, 4, 9, 13] * 2
            for i in range(len(x)):
                single = model(x[i:i + 1], subnet=int(choices[i]))
                torch.testing.assert_close(logits[i:i + 1], single, rtol=1e-4, atol=1e-4)
            assert torch.equal(export_subnet(model, 5)(x), model(x, subnet=5))
            torch.testing.assert_close(masked_dynamic_forward(model, x), logits, rtol=1e-4,
                                       atol=1e-4)
        model.gate_head.train()
        torch.manual_seed(1)
        tails = model.forward_dynamic(x)
        torch.manual_seed(1)
        masked = masked_train_forward(model, x)
        torch.testing.assert_close(masked.logits, tails.logits, rtol=1e-4, atol=1e-4)
    finally:
        hook.remove()
