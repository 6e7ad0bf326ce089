"""Deployment and inference: export_dynamic, the masked baseline, the predict CLI, the bench."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dsnet
from dsnet.models.export import DynamicStaticNet, export_dynamic
from dsnet.models.layers import Swish
from dsnet.models.masked import masked_dynamic_forward
from tests.helpers import (
    CONTRACT_INPUTS,
    assert_logits_close,
    point_head_at_samples,
    randomize_bn,
)

REPO = Path(__file__).resolve().parents[1]
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Tiny models gain nothing from a second thread, and on a shared machine OpenMP's spinning
# workers stall whenever another process holds a core (seconds per test instead of ms).
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def routed_model(routing_space: tuple[int, ...] = (0, 1, 2, 3), batch: int = 16,
                 seed: int = 0, name: str = "ds_mbnet_small"
                 ) -> tuple[dsnet.DSSupernet, torch.Tensor]:
    """An eval-mode model (small by default) with distinct per-width BN statistics and an
    input batch that its slimming head routes to at least three different subnets."""
    torch.manual_seed(seed)
    model = dsnet.create_model(name, routing_space=routing_space).eval()
    randomize_bn(model, seed)
    x = torch.randn(batch, *CONTRACT_INPUTS[name]) * torch.linspace(0.2, 3, batch).view(
        batch, 1, 1, 1)
    choices = point_head_at_samples(model, x)
    if len(set(choices.tolist())) < 3:
        # A ResNet's gate features follow the input scale ramp too closely for the rows to
        # separate; unscaled inputs differ in more directions.
        x = torch.randn(batch, *CONTRACT_INPUTS[name])
        choices = point_head_at_samples(model, x)
    assert len(set(choices.tolist())) >= 3, choices
    return model, x


# ----------------------------------------------------------------------------- export_dynamic


# The contract cases: every model over the first four subnets (the release's routing space),
# the small ones over a spread-out space too.
ROUTED = [(name, (0, 1, 2, 3)) for name in dsnet.list_models()] + [
    ("ds_mbnet_small", (2, 5, 9, 13)), ("ds_resnet_small", (2, 5, 9, 13))]


@pytest.mark.parametrize("name, space", ROUTED)
def test_export_dynamic_equals_model_dynamic_per_sample(name, space):
    model, x = routed_model(space, name=name)
    net = export_dynamic(model)
    assert isinstance(net, DynamicStaticNet)
    assert all(type(m).__module__.startswith(("torch.nn", "dsnet.models.export"))
               or type(m) is Swish for m in net.modules())
    with torch.no_grad():
        ref, ref_choices = model(x, subnet="dynamic", return_choices=True)
        logits, choices = net.forward_with_choices(x)
        assert torch.equal(logits, ref)  # the same groups through the same arithmetic
        assert torch.equal(choices, ref_choices)
        torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-5)
        for i in (0, len(x) - 1):     # a batch of one: the other groups are empty
            assert_logits_close(net(x[i:i + 1]), model(x[i:i + 1], subnet=int(choices[i])))


def test_export_dynamic_holds_copies():
    model, x = routed_model()
    net = export_dynamic(model)
    with torch.no_grad():
        before = net(x)
        for p in model.parameters():
            p.add_(1.0)
        torch.testing.assert_close(net(x), before)


def test_export_dynamic_is_scriptable():
    model, x = routed_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # jit.script is deprecated upstream
        scripted = torch.jit.script(export_dynamic(model))
    with torch.no_grad():
        ref, choices = model(x, subnet="dynamic", return_choices=True)
        logits, scripted_choices = scripted.forward_with_choices(x)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(scripted_choices, choices)


# ----------------------------------------------------------------------------- masked


@pytest.mark.parametrize("name, space", ROUTED)
@pytest.mark.parametrize("full_width", [False, True])
def test_masked_equals_dynamic_per_sample(name, space, full_width):
    model, x = routed_model(space, name=name)
    with torch.no_grad():
        ref, choices = model(x, subnet="dynamic", return_choices=True)
        logits, masked_choices = masked_dynamic_forward(model, x, full_width=full_width,
                                                        return_choices=True)
        assert torch.equal(masked_choices, choices)
        assert_logits_close(logits, ref)
        for i in range(len(x)):
            single = model(x[i:i + 1], subnet=int(choices[i]))
            assert_logits_close(logits[i:i + 1], single)


def test_masked_refuses_train_mode():
    model, x = routed_model()
    model.gate_head.train()
    with pytest.raises(RuntimeError, match="eval"):
        masked_dynamic_forward(model, x)


# ----------------------------------------------------------------------------- predict CLI


def run_in_process(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``python -m pipelines.predict ARGS`` in this process: (exit code, stdout, stderr)."""
    from pipelines import predict

    capsys.readouterr()
    code = predict.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def run_module(*args: str, module: str = "pipelines.predict") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def predict_setup(tmp_path_factory):
    """A gate-stage checkpoint of a random ds_mbnet_small and a folder of 28 px PNGs."""
    root = tmp_path_factory.mktemp("predict")
    model, _ = routed_model()
    ckpt = dsnet.save_checkpoint(root / "gate.pth", model, stage="gate", epoch=0,
                                 config={"dataset": "mnist5k"})
    rng = np.random.default_rng(0)
    images = root / "images"
    (images / "nested").mkdir(parents=True)
    paths = [images / f"digit{i}.png" for i in range(4)] + [images / "nested" / "deep.png"]
    for i, path in enumerate(paths):
        pixels = (rng.random((28, 28)) * 255 * (i + 1) / len(paths)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(path)
    (images / "notes.txt").write_text("not an image")
    return model, ckpt, images, sorted(paths)


def expected_rows(model: dsnet.DSNet, paths: list[Path], subnet) -> list[tuple[str, int, float]]:
    """(class, confidence, subnet) computed in-process with the MNIST eval preprocessing."""
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255.0)
                     for p in paths]).unsqueeze(1)               # (N, 1, 28, 28)
    x = (x - MNIST_MEAN) / MNIST_STD
    with torch.no_grad():
        logits, choices = model(x, subnet=subnet, return_choices=True)
    conf, label = logits.softmax(1).max(1)
    return [(str(c), float(p), "largest" if s < 0 else str(s))
            for c, p, s in zip(label.tolist(), conf.tolist(), choices.tolist())]


def test_predict_end_to_end_dynamic_with_csv(predict_setup, tmp_path):
    model, ckpt, images, paths = predict_setup
    out = tmp_path / "sub" / "pred.csv"
    res = run_module("--checkpoint", str(ckpt), "--csv", str(out), "--batch-size", "2",
                     str(images))
    assert res.returncode == 0, res.stderr
    lines = [line.split("\t") for line in res.stdout.splitlines()]
    assert [line[0] for line in lines] == [str(p) for p in paths]   # .txt skipped, recursive
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "class", "confidence", "subnet"]
    assert [r[0] for r in rows[1:]] == [str(p) for p in paths]
    for line, row, (label, conf, subnet) in zip(lines, rows[1:],
                                                expected_rows(model, paths, "dynamic")):
        assert (line[1], line[3]) == (row[1], row[3]) == (label, subnet)
        assert abs(float(row[2]) - conf) < 1e-5 and abs(float(line[2]) - conf) < 1e-3
        assert int(subnet) in model.routing_space
    assert not list(out.parent.glob(".*.tmp"))        # the atomic write left nothing behind


@pytest.mark.parametrize("subnet", ["5", "largest"])
def test_predict_static_subnet(predict_setup, subnet, capsys):
    model, ckpt, images, paths = predict_setup
    code, out, err = run_in_process(capsys, "--checkpoint", str(ckpt), "--subnet", subnet,
                                    str(paths[0]), str(paths[1]))
    assert code == 0, err
    got = [tuple(line.split("\t")[1:4:2]) for line in out.splitlines()]
    want = [(label, s) for label, _, s in
            expected_rows(model, paths[:2], subnet if subnet == "largest" else int(subnet))]
    assert got == want


@pytest.mark.parametrize("case, code, message", [
    ("missing_checkpoint", 2, "does not exist"),
    ("missing_input", 2, "does not exist"),
    ("no_images", 2, "no images"),
    ("bad_subnet_name", 2, "--subnet"),
    ("subnet_out_of_range", 2, "[0, 13]"),
    ("no_inputs", 2, "required"),
    ("corrupt_checkpoint", 2, "is not a checkpoint file (neither a PyTorch zip archive"),
    ("unreadable_image", 1, "cannot read image"),
])
def test_predict_errors_are_one_line(predict_setup, tmp_path, capsys, case, code, message):
    _, ckpt, images, paths = predict_setup
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    args = {
        "missing_checkpoint": ["--checkpoint", str(tmp_path / "nope.pth"), str(paths[0])],
        "missing_input": ["--checkpoint", str(ckpt), str(tmp_path / "nope.png")],
        "no_images": ["--checkpoint", str(ckpt), str(tmp_path / "empty")],
        "bad_subnet_name": ["--checkpoint", str(ckpt), "--subnet", "widest", str(paths[0])],
        "subnet_out_of_range": ["--checkpoint", str(ckpt), "--subnet", "14", str(paths[0])],
        "no_inputs": ["--checkpoint", str(ckpt)],
        "corrupt_checkpoint": ["--checkpoint", str(tmp_path / "bad.pth"), str(paths[0])],
        "unreadable_image": ["--checkpoint", str(ckpt), str(tmp_path / "broken.png")],
    }[case]
    got, out, err = run_in_process(capsys, *args)  # the end-to-end test runs the module
    assert got == code, (out, err)
    assert len(err.strip().splitlines()) == 1 and message in err
    assert "Traceback" not in err and out == ""


def test_predict_debug_shows_traceback(predict_setup, tmp_path):
    _, _, _, paths = predict_setup
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    res = run_module("--checkpoint", str(tmp_path / "bad.pth"), "--debug", str(paths[0]))
    assert res.returncode == 2 and "Traceback" in res.stderr


# ----------------------------------------------------------------------------- benchmark


def test_bench_quick_writes_valid_json(tmp_path):
    res = subprocess.run([sys.executable, "bench/inference.py", "--quick", "--models",
                          "ds_mbnet_small", "--batch-sizes", "2", "--devices", "cpu",
                          "--out", str(tmp_path)],
                         cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "inference.json").read_text())
    assert (tmp_path / "madds_vs_latency_ds_mbnet_small.png").stat().st_size > 0
    parity = report["parity_max_abs_diff"]["ds_mbnet_small/cpu"]
    assert max(parity.values()) < 1e-4
    assert all(v == 0.0 for k, v in parity.items() if k.startswith("export:"))  # bitwise
    assert report["meta"]["allocator"] in ("glibc default", {"mmap_max": 0,
                                                             "trim_threshold": 1 << 30})
    (group,) = report["results"]
    assert (group["model"], group["batch_size"], group["device"]) == ("ds_mbnet_small", 2, "cpu")
    assert [r["subnet"] for r in group["slicing"]] == ["0", "6", "13", "largest"]
    assert all(r["ratio"] > 0 for r in group["slicing"])
    dyn = group["dynamic"]
    assert dyn["routing"]["fractions"] == [0.7, 0.2, 0.1, 0.0]
    assert set(dyn["comparisons"]) >= {"dynamic_vs_masked", "dynamic_vs_subnet_13"}
    for c in dyn["comparisons"].values():  # no routing beats its own trunk
        assert c["trunk_bound_speedup"] > 0
    assert dyn["madds_per_image"]["dynamic"] < dyn["madds_per_image"]["masked"]
    curve = group["madds_latency"]
    assert len(curve["madds"]) == len(curve["ms_per_image"]) == 14
    assert -1.0 <= curve["pearson"] <= 1.0


def test_bench_rejects_an_unknown_memory_format():
    res = subprocess.run([sys.executable, "bench/inference.py", "--memory-format", "nchw"],
                         cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "--memory-format: invalid choice: 'nchw'" in res.stderr
    assert "channels_last" in res.stderr and "contiguous" in res.stderr
