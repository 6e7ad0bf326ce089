"""Contracts every registered model and every shipped config must keep (timm's model-test
style): a newly registered model or a new YAML in ``dsnet/configs/`` is picked up here.

Models (``dsnet.list_models()``, 64 px inputs for the 224-px ImageNet models, random
per-width BN so that no equality holds trivially): the static export computes the
supernet's subnet bit for bit; a checkpoint rebuilds the same model; the MAdds count is the
work the exported network does; dynamic inference gives each sample its chosen subnet's
logits; channels-last computes the same; ``torch.export`` takes the static export.

Configs (``dsnet.configs.shipped_configs()``): each loads with its loader, and every stage
config it yields trains one step and evaluates one batch through the real stage runner
(``dsnet.train.engine.run_stage``) on synthetic data at a reduced size.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.overrides import TorchFunctionMode

import dsnet
from dsnet.config import STAGES, StageConfig, apply_overrides, config_to_dict, load_stage_config
from dsnet.configs import shipped_configs
from dsnet.models.export import export_dynamic, export_subnet
from dsnet.models.layers import Swish
from dsnet.models.registry import resolve_model_name
from dsnet.train.engine import StageResult, build_data, build_model, run_stage
from dsnet.train.stages import routing_space_for
from pipelines.config import load_pipeline_config
from pipelines.sweep_config import load_sweep_config
from tests.helpers import (
    assert_logits_close,
    contract_input,
    contract_model,
    contract_shape,
    randomize_bn,
    routed_input,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = dsnet.list_models()


def spread_subnets(model: dsnet.DSSupernet) -> list[int | str]:
    """The slimmest, a middle and the widest uniform subnet, and the largest network."""
    n = model.num_subnets
    return [0, n // 2, n - 1, "largest"]


def assert_plain(net: torch.nn.Module) -> None:
    """Only ``torch.nn`` modules, the export's static blocks and the release's Swish."""
    assert all(type(m).__module__.startswith(("torch.nn", "dsnet.models.export"))
               or type(m) is Swish for m in net.modules())


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", MODELS)
def test_static_export_is_the_subnet_bit_for_bit(name):
    """The export does the supernet's arithmetic on copies: bitwise equal logits with and
    without autograd (grad mode slices views, inference reuses contiguous copies); the
    fused-SiLU export is within rounding."""
    model = contract_model(name)
    x = contract_input(name, 4)
    for subnet in spread_subnets(model):
        dense = export_subnet(model, subnet)
        assert_plain(dense)
        with torch.no_grad():
            want = dense(x)
            assert torch.equal(model(x, subnet=subnet), want), subnet
            torch.testing.assert_close(export_subnet(model, subnet, silu=True)(x), want,
                                       rtol=1e-5, atol=1e-6)
        assert torch.equal(model(x, subnet=subnet).detach(), want), subnet


@pytest.mark.parametrize("name", MODELS)
def test_exported_subnet_goes_through_torch_export(name):
    """``torch.export`` (the successor of ``torch.jit.script``) takes the static export with
    a dynamic batch dimension, and the program computes the same logits bit for bit."""
    model = contract_model(name)
    subnet = model.num_subnets // 2
    dense = export_subnet(model, subnet)
    x = contract_input(name, 3)
    batch = torch.export.Dim("batch")
    program = torch.export.export(dense, (x[:2],), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        assert torch.equal(program.module()(x), dense(x))   # batch 3: not the traced one
        assert torch.equal(program.module()(x), model(x, subnet=subnet))


# ----------------------------------------------------------------------------- dynamic


@pytest.mark.parametrize("name", MODELS)
def test_dynamic_gives_each_sample_its_chosen_subnet(name):
    """Eval-mode dynamic inference: each sample gets the logits of the uniform subnet the
    gate chose for it, and ``export_dynamic`` computes them bit for bit.

    Not bitwise against the uniform subnet: the tails run on each choice's group of
    samples, and a convolution's rounding depends on the batch size (a tail on the whole
    batch does equal the uniform subnet's rows bitwise). Measured at most 2.4e-6 on logits
    of scale 9.5 (ds_resnet50), 3e-8 on logits of scale 0.3 (ds_mbnet_small)."""
    model = contract_model(name)
    x = routed_input(model, name)                      # at least three choices
    with torch.no_grad():
        logits, choices = model(x, subnet="dynamic", return_choices=True)
        assert set(choices.tolist()) <= set(model.routing_space)
        for c in set(choices.tolist()):
            rows = choices == c
            assert_logits_close(logits[rows], model(x, subnet=c)[rows], rtol=1e-5, atol=1e-6)
        net = export_dynamic(model)
        assert_plain(net)
        net_logits, net_choices = net.forward_with_choices(x)
    assert torch.equal(net_logits, logits) and torch.equal(net_choices, choices)


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_gives_the_same_logits(name):
    """A channels-last supernet (the fast CPU layout) computes what the default one does.
    Measured: at most 1.5e-6 of the logits' scale (ds_resnet50's largest network)."""
    model = contract_model(name)
    x = contract_input(name, 4)
    subnets = spread_subnets(model) + ["dynamic"]
    with torch.inference_mode():
        want = {s: model(x, subnet=s) for s in subnets}
        model.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        for s in subnets:
            assert_logits_close(model(xc, subnet=s), want[s], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_rebuilds_the_same_model(name, tmp_path):
    """``save_checkpoint`` -> ``model_from_checkpoint``: same class, name, arguments,
    architecture and routing space (set after building, so the file must carry it), a
    bitwise equal state dict (in order) and bitwise equal logits."""
    torch.manual_seed(0)
    model = dsnet.create_model(name, num_classes=7, drop_rate=0.1)
    randomize_bn(model)
    model.routing_space = (1, 5, 9, 13)
    model.eval()
    path = dsnet.save_checkpoint(tmp_path / "m.pt", model, stage="gate", epoch=0)
    again, meta = dsnet.model_from_checkpoint(path)
    assert type(again) is type(model) and again.model_name == name == meta["model_name"]
    assert again.model_kwargs == {"num_classes": 7, "drop_rate": 0.1,
                                  "routing_space": (1, 5, 9, 13)}
    assert again.arch == model.arch and again.routing_space == (1, 5, 9, 13)
    saved, loaded = model.state_dict(), again.state_dict()
    assert list(loaded) == list(saved)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.items())
    x = contract_input(name, 2)
    again.eval()
    with torch.no_grad():
        for subnet in (0, "largest", "dynamic"):
            assert torch.equal(again(x, subnet=subnet), model(x, subnet=subnet)), subnet


# ----------------------------------------------------------------------------- MAdds


class WorkCounter(TorchFunctionMode):
    """The MAdds rule applied to what a forward actually calls (per image of the batch):
    convolutions ``out * H_out * W_out * (in / groups) * k * k``, linear layers
    ``out * in``, average pools ``C * H_in * W_in``; everything else is free."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_function__(self, func: Callable, types: Collection[type], args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is F.conv2d:           # weight (out, in / groups, k, k)
            self.total += out[0].numel() * args[1][0].numel()
        elif func is F.linear:         # weight (out, in)
            self.total += out[0].numel() * args[1].size(1)
        elif func in (F.adaptive_avg_pool2d, F.avg_pool2d):
            self.total += args[0][0].numel()
        return out


@pytest.mark.parametrize("name", MODELS)
def test_madds_count_the_work_of_every_exported_subnet(name):
    """``count_madds`` of every subnet (and the largest network) is exactly the work its
    exported network does; the counts grow strictly along the ladder at any input size,
    and the largest network is wider than the last subnet only where the trunk has
    several widths."""
    model = contract_model(name)
    size = contract_shape(name)[-1]
    x = contract_input(name, 1)
    for subnet in [*range(model.num_subnets), "largest"]:
        with torch.no_grad(), WorkCounter() as work:
            export_subnet(model, subnet)(x)
        assert work.total == dsnet.count_madds(model, subnet, size), subnet
    widened = any(len(w) > 1 for w in model.arch.part_widths[:model.arch.gate_stage + 1])
    for s in (32, 64):
        counts = [dsnet.count_madds(model, c, s) for c in range(model.num_subnets)]
        assert all(a < b for a, b in zip(counts, counts[1:])), (s, counts)
        largest = dsnet.count_madds(model, "largest", s)
        assert largest > counts[-1] if widened else largest == counts[-1]


@pytest.mark.parametrize("name", MODELS)
def test_dynamic_madds_are_the_chosen_subnet_plus_the_slimming_head(name):
    """One image through the exported dynamic network costs its chosen subnet's count plus
    ``gate_madds`` (the slimming head: its own pool and convolutions when it reads a grid)."""
    model = contract_model(name)
    size = contract_shape(name)[-1]
    net = export_dynamic(model)
    with torch.no_grad(), WorkCounter() as work:
        _, choice = net.forward_with_choices(contract_input(name, 1))
    expected = dsnet.count_madds(model, int(choice), size) + model.gate_madds(size)
    assert work.total == expected, (int(choice), work.total, expected)


# ----------------------------------------------------------------------------- configs

# What the YAML runs keep of the shipped values: everything but the data (synthetic, 4
# images: one training step of 4 and one validation batch), the budget (one epoch, at most
# one of warm-up, one calibration batch, subnet 0 evaluated) and the process (one thread,
# no loader workers).
REDUCED = ["dataset=synthetic", "synthetic_size=4", "batch_size=4", "epochs=1",
           "cooldown_epochs=0", "reset_bn_batches=1", "eval_subnets=[0]", "workers=0",
           "threads=1", "device=cpu"]
NATIVE_SIZE = {"mnist5k": 28, "fashion_mnist": 28}   # else 32 px (224 px is too slow here)


def config_kind(path: Path) -> str:
    """``sweep``, ``pipeline`` or ``stage``: which loader a shipped YAML is for."""
    data = yaml.safe_load(path.read_text())
    if "space" in data:
        return "sweep"
    # A pipeline's stage slot holds a mapping or a stage file; the authors' stage files
    # have a `reset_bn: true` flag.
    if "stages" in data or any(isinstance(data.get(s), (dict, str)) for s in STAGES):
        return "pipeline"
    return "stage"


def sweep_stage_configs(path: Path) -> list[tuple[str, StageConfig]]:
    """The stage configs a sweep runs: its pipeline (with the sweep's ``set``) and, for
    every point of its space (grid values; the bounds of a continuous range), each
    stage with that point's keys of the stage set; distinct configs only."""
    sweep = load_sweep_config(path)
    pipeline = load_pipeline_config(sweep.pipeline, sweep.set)
    keys = list(sweep.space)
    found: dict[str, tuple[str, StageConfig]] = {}
    for point in itertools.product(*(sweep.space[k].values for k in keys)):
        for stage in STAGES:
            items = [f"{k.split('.', 1)[1]}={json.dumps(v)}" for k, v in zip(keys, point)
                     if k.split(".", 1)[0] == stage]
            cfg = apply_overrides(copy.deepcopy(pipeline.stages[stage]), items)
            label = f"{stage} {' '.join(items)}".strip()
            found.setdefault(json.dumps(config_to_dict(cfg), sort_keys=True), (label, cfg))
    return list(found.values())


def shipped_stage_configs(path: Path) -> list[tuple[str, StageConfig]]:
    """(label, config) of every stage a shipped YAML yields, loaded with its loader."""
    kind = config_kind(path)
    if kind == "sweep":
        return sweep_stage_configs(path)
    if kind == "pipeline":
        pipeline = load_pipeline_config(path)
        assert list(pipeline.stages) == list(STAGES)
        assert all(pipeline.stages[s].stage == s for s in STAGES)
        return [(s, pipeline.stages[s]) for s in STAGES]
    cfg = load_stage_config(path)
    return [(cfg.stage, cfg)]


def reduced(cfg: StageConfig) -> StageConfig:
    """``cfg`` with :data:`REDUCED` applied, at its dataset's native size or 32 px."""
    size = NATIVE_SIZE.get(cfg.dataset, 32)
    return apply_overrides(copy.deepcopy(cfg), [*REDUCED, f"img_size={size}",
                                                 f"warmup_epochs={min(cfg.warmup_epochs, 1)}"])


def supernet_checkpoint(cfg: StageConfig, path: Path) -> tuple[Path, dsnet.DSSupernet]:
    """A freshly built supernet of ``cfg`` (the engine's own builder: the config's model
    and arguments), saved at ``path`` as a supernet-stage checkpoint for later stages."""
    model = build_model(cfg, build_data(cfg))
    assert model.model_name == resolve_model_name(cfg.model)
    return dsnet.save_checkpoint(path, model, stage="supernet", epoch=0), model


def check_result(result: StageResult, cfg: StageConfig, model: dsnet.DSSupernet) -> None:
    """One epoch ran, its metrics are finite, its MAdds are those of ``cfg``'s model and a
    gate stage routed over ``cfg``'s routing space."""
    assert result.stage == cfg.stage and result.epochs_run == [0]
    assert all(math.isfinite(v) for v in result.metrics.values()), result.metrics
    size = cfg.img_size
    if cfg.stage == "supernet":
        assert result.metrics["madds"] == dsnet.count_madds(model, "largest", size)
        assert result.metrics["loss"] > 0
        return
    assert [row["subnet"] for row in result.subnets] == [0]
    assert result.subnets[0]["madds"] == dsnet.count_madds(model, 0, size)
    if cfg.stage == "reset_bn":
        assert result.metrics["batches"] == cfg.reset_bn_batches
        return
    routing = result.dynamic["routing"]
    assert routing["routing_space"] == list(routing_space_for(cfg, model.num_subnets))
    assert min(routing["choice_madds"]) <= result.dynamic["madds"] <= max(routing["choice_madds"])
    assert sum(result.dynamic["choices"].values()) == len(build_data(cfg).val)


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_shipped_config_trains_and_evaluates_every_stage(path, tmp_path):
    """Every shipped YAML loads with its loader, every model it names builds with its
    arguments, and every stage config it yields runs one training step and one
    evaluation batch through ``run_stage`` (reset_bn and gate from a freshly built
    supernet's checkpoint)."""
    stages = shipped_stage_configs(path)
    assert stages
    built: dict[str, tuple[Path, dsnet.DSSupernet]] = {}
    for label, cfg in stages:
        small = reduced(cfg)
        key = json.dumps([small.model, small.num_classes, small.in_chans, small.img_size])
        if key not in built:
            built[key] = supernet_checkpoint(small, tmp_path / f"supernet{len(built)}.pt")
        ckpt, model = built[key]
        init = None if small.stage == "supernet" else ckpt
        try:
            result = run_stage(small, init_from=init)
        except Exception as exc:
            raise AssertionError(f"{path.name} [{label}]: {exc}") from exc
        check_result(result, small, model)
