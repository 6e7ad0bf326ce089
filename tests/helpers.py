"""Helpers shared by the test modules: small models with distinct per-width BN, the contract
models and inputs, routed batches, toy data and stage configs, the tiny pipeline's files.

One home: a test module imports shared helpers from here (fixtures stay in ``conftest.py``,
process helpers in ``procs.py``), never from another ``test_*`` module.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

import dsnet
from dsnet.config import StageConfig, stage_config_from_dict
from dsnet.configs import CONFIG_DIR
from dsnet.data.datasets import DataBundle

DATA = Path(__file__).parent / "data"
TINY = CONFIG_DIR / "tiny.yml"
# A supernet stage small enough for two fits in a test: 64 synthetic 16 px images.
FAST_STAGE_YAML = """\
dataset: synthetic
synthetic_size: 64
img_size: 16
model: ds_mbnet_small
workers: 0
cooldown_epochs: 0
aa: ''
reprob: 0.0
color_jitter: 0.0
epochs: 2
warmup_epochs: 0
batch_size: 32
num_random: 1
"""


def run_json(run_dir: Path) -> dict:
    """A pipeline run folder's ``run.json``."""
    return json.loads((run_dir / "run.json").read_text())


def reference_keys() -> list[tuple[str, list[int]]]:
    """The release checkpoint's (key, shape) list, in its order."""
    return [(k, s) for k, s in json.loads((DATA / "ds_mbnet_v1_state_dict_keys.json")
                                          .read_text())["keys"]]


# ----------------------------------------------------------------------------- models


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


def small_model(**kw: Any) -> dsnet.DSNet:
    """An eval-mode ds_mbnet_small (seed 0) with distinct per-width BN statistics."""
    torch.manual_seed(0)
    model = dsnet.create_model("ds_mbnet_small", **kw)
    randomize_bn_stats(model)
    return model.eval()


@functools.cache
def contract_shape(name: str) -> tuple[int, int, int]:
    """(C, H, W) of the contract tests' input for model ``name``: its own size where that
    is cheap, 64 px for the 224-px ImageNet models (built on the meta device: no memory,
    no initialisation cost, so a newly registered model gets a shape without a table)."""
    with torch.device("meta"):
        model = dsnet.create_model(name)
    size = min(model.arch.img_size, 64)
    return model.in_chans, size, size


class _ContractInputs(Mapping):
    """``{model name: contract_shape(name)}`` over every registered model, computed lazily."""

    def __getitem__(self, name: str) -> tuple[int, int, int]:
        if name not in dsnet.list_models():
            raise KeyError(name)
        return contract_shape(name)

    def __iter__(self) -> Iterator[str]:
        return iter(dsnet.list_models())

    def __len__(self) -> int:
        return len(dsnet.list_models())


CONTRACT_INPUTS: Mapping[str, tuple[int, int, int]] = _ContractInputs()


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
    """A random (batch, C, H, W) input of :func:`contract_shape` (global RNG)."""
    return torch.randn(batch, *contract_shape(name))


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4,
                        atol: float = 1e-5) -> None:
    """``assert_close`` with ``atol`` relative to the logits' scale where that exceeds 1: a
    random ResNet-50's logits reach hundreds, and batch-1 and batch-16 convolutions round
    differently at that scale."""
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale)


# ----------------------------------------------------------------------------- routing


@torch.no_grad()
def point_head_at_samples(model: dsnet.DSSupernet, x: torch.Tensor) -> torch.Tensor:
    """Point each row of the slimming head's last conv at what it reads for one sample (the
    reduced features, or the hidden layer's output; minus the batch mean, orthogonal to
    it), so the batch ``x`` is routed to several subnets; returns the choices."""
    captured = []
    head = model.gate_head.gate[-1]
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


# ----------------------------------------------------------------------------- training


def toy_bundle(n: int = 64) -> DataBundle:
    """``n`` random 28 px grey images of 10 classes (the same set for train and val)."""
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 1, 28, 28, generator=g),
                       torch.randint(0, 10, (n,), generator=g))
    return DataBundle(train=ds, val=ds, num_classes=10, in_chans=1, img_size=28, name="toy")


def stage_cfg(stage: str = "supernet", **kw: Any) -> StageConfig:
    """A one-epoch stage config without augmentation, warm-up or loader processes."""
    base = {"stage": stage, "dataset": "synthetic", "epochs": 1, "batch_size": 16,
            "lr": 0.1, "warmup_epochs": 0, "weight_decay": 1e-4, "workers": 0, "seed": 0,
            "cooldown_epochs": 0, "num_random": 1, "validation_batch_size_multiplier": 1,
            "num_choice": 4, "aa": "", "reprob": 0.0}
    base.update(kw)
    return stage_config_from_dict(base)
