"""Checkpoints: round trip, the release's layout, safe loading, clear errors."""

from __future__ import annotations

import argparse
from collections import OrderedDict

import pytest
import torch

import dsnet
from dsnet.models.checkpoint import CheckpointError, model_from_checkpoint
from tests.helpers import reference_keys, small_model


def release_style_checkpoint(path, with_ema=True, prefix="module."):
    """A file laid out like DS_MBNet-70_1.pth.tar, built from the reference key list."""
    g = torch.Generator().manual_seed(0)
    state = OrderedDict()
    for key, shape in reference_keys():
        if key.endswith("num_batches_tracked"):
            state[prefix + key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[prefix + key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[prefix + key] = torch.randn(shape, generator=g) * 0.05
    ckpt = {"epoch": 149, "arch": "slimmable_mbnet_v1_bn_uniform", "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.08, "params": [0, 1]}]},
            "args": argparse.Namespace(model="slimmable_mbnet_v1_bn_uniform", lr=0.08,
                                       num_choice=14, drop=0.2, data="/imagenet"),
            "version": 2}
    if with_ema:
        ckpt["state_dict_ema"] = OrderedDict(
            (k.removeprefix(prefix), v * 2) for k, v in state.items()
            if v.is_floating_point())
        ckpt["state_dict_ema"].update({k.removeprefix(prefix): v for k, v in state.items()
                                       if not v.is_floating_point()})
    torch.save(ckpt, path)
    return state


def test_release_layout_loads_with_weights_only(tmp_path):
    path = tmp_path / "DS_MBNet-70_1.pth.tar"
    state = release_style_checkpoint(path)
    model = dsnet.create_model("slimmable_mbnet_v1_bn_uniform")
    meta = dsnet.load_checkpoint(model, path)
    assert meta["epoch"] == 149 and meta["args"].lr == 0.08
    w = model.blocks[3].first_block.gate.gate[0].weight
    assert torch.equal(w, state["module.blocks.3.first_block.gate.gate.0.weight"])
    dsnet.load_checkpoint(model, path, use_ema=True)
    assert torch.equal(w, 2 * state["module.blocks.3.first_block.gate.gate.0.weight"])


def test_arbitrary_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        dsnet.read_checkpoint(path)


class _Evil:
    pass


def test_round_trip_self_describing(tmp_path):
    model = small_model()
    model.routing_space = (1, 4, 8)
    path = dsnet.save_checkpoint(tmp_path / "ckpt" / "model.pt", model, stage="gate",
                                 epoch=3, config={"lr": 0.1}, metrics={"top1": 97.0},
                                 ema_model=model)
    rebuilt, meta = model_from_checkpoint(path)
    assert rebuilt.routing_space == (1, 4, 8)
    assert meta["stage"] == "gate" and meta["metrics"]["top1"] == 97.0
    assert meta["versions"]["torch"] == torch.__version__
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, subnet="dynamic"), model(x, "dynamic"))
    fresh = dsnet.create_model("ds_mbnet_small")
    dsnet.load_checkpoint(fresh, path)  # routing space restored from the file
    assert fresh.routing_space == (1, 4, 8)
    assert not list(tmp_path.glob("ckpt/.*tmp"))  # atomic write left no temp file


def test_bare_state_dict_loads(tmp_path):
    model = small_model()
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    other = dsnet.create_model("ds_mbnet_small")
    dsnet.load_checkpoint(other, tmp_path / "bare.pt")
    assert torch.equal(other.classifier.weight, model.classifier.weight)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        dsnet.load_checkpoint(small_model(), tmp_path / "nope.pt")


def test_truncated_file(tmp_path):
    path = tmp_path / "model.pt"
    dsnet.save_checkpoint(path, small_model(), stage="supernet", epoch=0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        dsnet.load_checkpoint(small_model(), path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        dsnet.load_checkpoint(small_model(), path)
    torch.save({"epoch": 1}, path)
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        dsnet.load_checkpoint(small_model(), path)


def test_architecture_mismatch_lists_keys_and_shapes(tmp_path):
    path = tmp_path / "release.pth.tar"
    release_style_checkpoint(path, with_ema=False)
    with pytest.raises(CheckpointError) as err:
        dsnet.load_checkpoint(small_model(), path)
    msg = str(err.value)
    assert "shape mismatch" in msg and "conv_stem.weight" in msg


def test_missing_ema_is_clear(tmp_path):
    path = tmp_path / "release.pth.tar"
    release_style_checkpoint(path, with_ema=False)
    with pytest.raises(CheckpointError, match="no EMA"):
        dsnet.load_checkpoint(dsnet.create_model("ds_mbnet_v1"), path, use_ema=True)
