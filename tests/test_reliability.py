"""Reliability (issue 7): failures and interruptions lose at most one epoch, bad inputs get
one clear error, and nothing unsafe is loaded or executed.

Bad configs, data and checkpoints are covered in test_config/test_data/test_checkpoint and
the CLI exit codes in test_pipeline; this file covers what those leave out: killed
workers and drivers, corrupted latest checkpoints, NaN losses, unwritable or full output
disks, a head smaller than the data's label set, and a scan of the sources for unsafe calls.
"""

from __future__ import annotations

import ast
import collections
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dsnet
from dsnet.config import stage_config_from_dict
from dsnet.data.datasets import DataBundle, DataError
from dsnet.models.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    previous_path,
    read_checkpoint,
    rotate_save,
    rotation_candidates,
)
from dsnet.train.engine import CheckpointHook, Hook, build_model, run_stage
from pipelines import full, supernet
from pipelines.config import load_pipeline_config
from pipelines.faults import FAULT_ENV, FAULT_MARKER_ENV
from pipelines.runtime import REPO_ROOT
from pipelines.stage import pick_resume_checkpoint, ray_resume_candidates
from tests.conftest import FAST_OVERRIDES
from tests.helpers import FAST_STAGE_YAML, TINY, run_json

SOURCE_DIRS = ("dsnet", "pipelines")


# ----------------------------------------------------------------------------- security


def _dotted(node: ast.AST) -> str:
    """``os.system`` for the call target ``os.system`` (``""`` for anything fancier)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, why) of every call that could run or unpickle untrusted input."""
    banned = {"eval", "exec", "os.system", "os.popen", "yaml.load", "yaml.unsafe_load",
              "pickle.load", "pickle.loads", "marshal.loads"}
    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name, kwargs = _dotted(call.func), {k.arg: k.value for k in call.keywords}
        if name in banned:
            found.append((call.lineno, f"{name}()"))
        if name == "torch.load" and not _is_true(kwargs.get("weights_only")):
            found.append((call.lineno, "torch.load() without weights_only=True"))
        if "shell" in kwargs and not (isinstance(kwargs["shell"], ast.Constant)
                                      and kwargs["shell"].value is False):
            found.append((call.lineno, f"{name}(shell=...)"))
    return found


def test_sources_have_no_unsafe_calls() -> None:
    """No eval/exec, unsafe YAML or pickle loading, shell commands in the library or the
    Ray layer: config values and paths never reach an interpreter or a shell."""
    files = sorted(p for d in SOURCE_DIRS for p in (REPO_ROOT / d).rglob("*.py"))
    assert len(files) > 10
    problems = [f"{path.relative_to(REPO_ROOT)}:{line}: {why}" for path in files
                for line, why in _unsafe_calls(ast.parse(path.read_text(), str(path)))]
    assert not problems, "\n".join(problems)
    # The scanner itself catches what it should.
    bad = ast.parse("eval(x)\nyaml.load(f)\ntorch.load(p)\nsubprocess.run(c, shell=True)\n"
                    "torch.load(p, weights_only=False)\nos.system(c)\n")
    assert [line for line, _ in _unsafe_calls(bad)] == [1, 2, 3, 4, 5, 6]
    ok = ast.parse("model.eval()\nyaml.safe_load(f)\ntorch.load(p, weights_only=True)\n")
    assert _unsafe_calls(ok) == []


# ----------------------------------------------------------------------------- checkpoints


def _fake_ckpt(path: Path, epoch: int) -> Path:
    atomic_torch_save({"format": "dsnet-checkpoint", "epoch": epoch}, path)
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_rotate_save_keeps_the_previous_epoch(tmp_path: Path) -> None:
    """Every save keeps the one before as ``.prev``; a crash between the two renames
    still leaves both files, newest first in the candidates."""
    path = tmp_path / "checkpoint.pt"
    for epoch in range(3):
        rotate_save(lambda p, e=epoch: _fake_ckpt(p, e), path)
    assert read_checkpoint(path)["epoch"] == 2
    assert read_checkpoint(previous_path(path))["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert rotation_candidates(path) == [path, previous_path(path)]

    def crash_between_renames(p: Path) -> None:
        _fake_ckpt(p, 3)
        os.replace(path, previous_path(path))  # the old one moved away ...
        raise KeyboardInterrupt  # ... and the driver dies before the new one moves in

    with pytest.raises(KeyboardInterrupt):
        rotate_save(crash_between_renames, path)
    chosen, corrupt = pick_resume_checkpoint(rotation_candidates(path), "supernet")
    assert read_checkpoint(chosen)["epoch"] == 3 and corrupt == []


def test_ray_resume_skips_an_unreadable_latest_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Ray's run folder: the reported latest is truncated -> the newest older readable one,
    with a warning; a folder Ray never registered is not considered."""
    run = tmp_path / "supernet"
    files = [_fake_ckpt(run / f"ckpt_{i}" / "checkpoint.pt", i) for i in range(4)]
    latest = files[2]  # what ray.train.get_checkpoint() returned; files[3] is unregistered
    _truncate(latest)
    candidates = ray_resume_candidates(latest, files[:3])  # Ray's registered list
    assert candidates == [latest, files[1], files[0]]
    chosen, corrupt = pick_resume_checkpoint(candidates, "supernet")
    assert chosen == files[1]
    assert [c["path"] for c in corrupt] == [str(latest)]
    assert "truncated or corrupt" in corrupt[0]["error"]
    err = capsys.readouterr().err
    assert f"warning: [supernet] checkpoint {latest} is truncated or corrupt" in err
    assert f"resuming from the previous one instead, {files[1]} (epoch 2)" in err
    for f in files[:2]:
        _truncate(f)
    with pytest.raises(CheckpointError, match="no readable checkpoint to resume the supernet"):
        pick_resume_checkpoint(candidates, "supernet", log=None)
    assert pick_resume_checkpoint([], "supernet") == (None, [])


def test_corrupt_latest_checkpoint_falls_back_in_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """In-process stage: a fault after epoch 2 of 2 leaves checkpoint.pt (epoch 2) and
    checkpoint.prev.pt (epoch 1); checkpoint.pt is then truncated. The re-run says so,
    resumes from epoch 1's file, redoes epoch 2 only, and run.json records it. Then the
    finished stage's checkpoint is replaced by a stale (readable) copy: its SHA-256 no
    longer matches run.json, and the next run again redoes epoch 2 only."""
    cfg = tmp_path / "supernet.yml"
    cfg.write_text(FAST_STAGE_YAML)
    monkeypatch.setenv(FAULT_ENV, "1")
    monkeypatch.setenv(FAULT_MARKER_ENV, str(tmp_path / "fault.marker"))
    args = ["-c", str(cfg), "--output", str(tmp_path), "--name", "c", "--num-workers", "0"]
    assert supernet.main(args) == 1
    local = tmp_path / "c" / "supernet" / "local"
    latest = local / "checkpoint.pt"
    assert read_checkpoint(latest)["epoch"] == 1
    assert read_checkpoint(previous_path(latest))["epoch"] == 0
    _truncate(latest)
    capsys.readouterr()

    assert supernet.main(args) == 0
    err = capsys.readouterr().err
    assert f"warning: [supernet] checkpoint {latest} is truncated or corrupt" in err
    st = run_json(tmp_path / "c")["stages"]["supernet"]
    assert st["status"] == "done" and st["epochs_run"] == [1]
    assert st["resumed_from"] == str(previous_path(latest))
    assert [c["path"] for c in st["corrupt_checkpoints"]] == [str(latest)]
    assert Path(st["corrupt_checkpoints"][0]["kept_as"]).is_file()  # kept for inspection
    assert read_checkpoint(latest)["epoch"] == 1

    shutil.copyfile(previous_path(latest), latest)  # loads fine, but is not epoch 2's file
    assert supernet.main(args) == 0
    assert f"warning: [supernet] checkpoint {latest} has another size or SHA-256 than run.json " \
        "recorded; resuming from the previous one instead" in capsys.readouterr().err
    st = run_json(tmp_path / "c")["stages"]["supernet"]
    assert st["status"] == "done" and st["attempts"] == 3 and st["epochs_run"] == [1]
    assert st["resumed_from"] == str(previous_path(latest))
    assert st["distrust"] == [str(latest)]  # remembered, should this run be cut short


# ----------------------------------------------------------------------------- NaN, labels


def _fast_supernet(**kw: object):
    base = {"stage": "supernet", "dataset": "synthetic", "synthetic_size": 64, "img_size": 16,
            "workers": 0, "aa": "", "reprob": 0.0, "color_jitter": 0.0, "epochs": 3,
            "warmup_epochs": 0, "batch_size": 32, "num_random": 1, "seed": 0,
            "cooldown_epochs": 0}
    return stage_config_from_dict({**base, **kw})


def test_nan_loss_in_epoch_2_keeps_epoch_1_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss turns NaN in the second epoch: the stage stops naming epoch and batch, and
    the checkpoint on disk is still the first epoch's (no NaN checkpoint is ever written)."""
    import dsnet.train.stages as stages

    poisoned = []
    real_loss = stages.label_smoothing_ce

    def loss(*args: object, **kwargs: object) -> torch.Tensor:
        out = real_loss(*args, **kwargs)
        return out * float("nan") if poisoned else out

    class Poison(Hook):
        def on_epoch_end(self, report: object, save: object) -> None:
            poisoned.append(True)

    monkeypatch.setattr(stages, "label_smoothing_ce", loss)
    folder = tmp_path / "s"
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 2 batch 0"):
        run_stage(_fast_supernet(), hooks=[CheckpointHook(folder), Poison()])
    ckpt = read_checkpoint(folder / "checkpoint.pt")
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
               if v.is_floating_point())
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt"]


def test_num_classes_smaller_than_the_data_fails_before_training() -> None:
    """A 5-class head on 10-class data would fail mid-epoch deep in the loss: say it first."""
    x = torch.zeros(4, 1, 28, 28)
    ds = torch.utils.data.TensorDataset(x, torch.arange(4))
    data = DataBundle(train=ds, val=ds, num_classes=10, in_chans=1, img_size=28, name="mnist5k")
    with pytest.raises(DataError, match=r"num_classes is 5 but dataset mnist5k has 10 classes "
                                        r"\(labels 0-9\); set num_classes to at least 10"):
        build_model(_fast_supernet(dataset="mnist5k", num_classes=5), data)
    model = build_model(_fast_supernet(dataset="mnist5k", num_classes=12), data)
    assert isinstance(model, dsnet.DSNet)  # a larger head is fine


def test_data_checked_on_the_driver_before_any_stage(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The pipeline checks num_classes and a folder dataset's layout before Ray or a stage
    starts (exit 2); no image is read for that."""
    base = ["-c", str(TINY), "--output", str(tmp_path), "--name", "n", "--num-workers", "0"]
    assert full.main([*base, "--set", "num_classes=5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: supernet: num_classes is 5 but dataset mnist5k has 10 classes (labels 0-9); "
        "set num_classes to at least 10 or drop it to infer it")
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    folder = ["--set", "dataset=imagefolder", "--data", str(tmp_path / "data")]
    assert full.main([*base, *folder]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: supernet: missing folder {tmp_path / 'data' / 'val'}; the data path must "
        "contain train/ and val/ with one sub-folder per class")
    (tmp_path / "data" / "val" / "dog").mkdir(parents=True)
    assert full.main([*base, *folder]) == 2
    assert "class folders differ between" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_model_and_width_list_checked_before_any_stage(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A gate routing space beyond the width list, or an unknown model, fails at once (the
    gate stage would otherwise find out after the supernet's training)."""
    base = ["-c", str(TINY), "--output", str(tmp_path), "--name", "n", "--num-workers", "0"]
    assert full.main([*base, "--set", "gate.start_chn_idx=12"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: gate: routing space (12, 13, 14, 15) (start_chn_idx 12, num_choice 4) exceeds "
        "the model's 14 subnets; lower start_chn_idx or num_choice")
    assert full.main([*base, "--set", "model=ds_mbnet_smal"]) == 2
    assert "error: supernet: unknown model 'ds_mbnet_smal'. Did you mean 'ds_mbnet_small'?" \
        in capsys.readouterr().err
    assert not tmp_path.joinpath("n").exists()  # nothing written


def test_bad_input_checkpoint_fails_before_any_stage(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The input checkpoint is read on the driver first: a later stage's or a truncated file
    is a usage error (exit 2) before any data, model or Ray work."""
    from pipelines import reset_bn

    cfg = tmp_path / "stage.yml"
    cfg.write_text(FAST_STAGE_YAML)
    gate_ckpt = dsnet.save_checkpoint(tmp_path / "gate.pt", dsnet.create_model("ds_mbnet_small"),
                                      stage="gate", epoch=0)
    base = ["-c", str(cfg), "--output", str(tmp_path), "--name", "n", "--num-workers", "0"]
    assert reset_bn.main([*base, "--resume", str(gate_ckpt)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: input checkpoint: {gate_ckpt} comes from the gate stage, which runs after "
        "reset_bn; give the reset_bn stage a checkpoint of an earlier stage")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(gate_ckpt.read_bytes()[:1000])
    assert reset_bn.main([*base, "--resume", str(truncated)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: input checkpoint: {truncated} is truncated or corrupt")
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am a text file\n")
    assert reset_bn.main([*base, "--resume", str(text)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: input checkpoint: {text} is not a checkpoint file (")
    assert not (tmp_path / "n").exists()


# ----------------------------------------------------------------------------- output disk


def test_unwritable_output_fails_before_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An output path under a regular file (chmod does not stop root): exit 2, one line."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "sub"
    assert full.main(["-c", str(TINY), "--output", str(out), "--name", "n",
                      "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: cannot create the output folder {out / 'n'}: {blocker} "
                           "is a file, not a folder; pass --output DIR")


def test_low_disk_space_fails_before_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Less than ray.min_free_mb free on the output disk: exit 2 naming the numbers; the
    threshold is a config key."""
    import pipelines.runtime as runtime

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda p: usage(1 << 40, 0, 50 << 20))
    args = ["-c", str(TINY), "--output", str(tmp_path), "--name", "n", "--num-workers", "0"]
    assert full.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: only 50 MB free on the disk of {tmp_path / 'n'}, below "
                          "ray.min_free_mb (200 MB)")
    assert "--set ray.min_free_mb=N" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "n" / "run.json").exists()
    cfg = load_pipeline_config(TINY, ["ray.min_free_mb=10"])
    runtime.check_output_dir(tmp_path / "m", cfg.ray.min_free_mb)  # 50 MB >= 10 MB: fine


# ----------------------------------------------------------------------------- the driver


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.full", *args], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:  # absent, or between the two renames of a rotation
        return None


def _signal_after_next_checkpoint(proc: subprocess.Popen, ckpt: Path, sig: int,
                                  timeout: float = 600) -> tuple[int, str]:
    """Send ``sig`` once ``ckpt`` is (re)written; returns the exit code and stderr."""
    before, deadline = _mtime(ckpt), time.monotonic() + timeout
    while _mtime(ckpt) in (None, before):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no new checkpoint before the run ended:\n{out[-2000:]}\n{err[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_driver_interrupted_or_killed_resumes(tmp_path: Path) -> None:
    """In-process pipeline, 8 supernet epochs: SIGINT, then SIGTERM, then SIGKILL, each
    after a new checkpoint; every run goes on from the last, and the fourth finishes."""
    args = ["-c", str(TINY), "--output", str(tmp_path), "--name", "n",
            "--set", "ray.num_workers=0", "--set", "supernet.epochs=8", *FAST_OVERRIDES]
    ckpt = tmp_path / "n" / "supernet" / "local" / "checkpoint.pt"
    epochs = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        code, err = _signal_after_next_checkpoint(_start(args), ckpt, sig)
        st = run_json(tmp_path / "n")["stages"]["supernet"]
        epochs.append(read_checkpoint(ckpt)["epoch"])
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL and st["status"] == "running"  # no chance to record
            continue
        assert code == 130, err
        assert err.strip().endswith("interrupted; resume with: python -m pipelines.full "
                                    + shlex.join(args)), err
        assert "Traceback" not in err
        assert st["status"] == "failed" and st["error"] == "interrupted"
    assert epochs == sorted(set(epochs)), epochs  # each run went on from the last one

    proc = _start(args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    rec = run_json(tmp_path / "n")
    st = rec["stages"]["supernet"]
    assert st["status"] == "done" and st["attempts"] == 4
    assert st["resumed_from"] == str(ckpt)
    assert st["epochs_run"] == list(range(epochs[-1] + 1, 8))  # nothing done twice
    assert all(rec["stages"][s]["status"] == "done" for s in ("reset_bn", "gate"))


# ----------------------------------------------------------------------------- Ray workers


def test_too_many_workers_for_this_machine_fails_before_ray_starts(tmp_path: Path) -> None:
    """A local run asking more CPUs than the machine has: exit 2 in a second or two, one
    line, and no Ray start-up (its log lines would precede the error)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipelines.full", "--output", str(tmp_path),
                           "--num-workers", "512"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"error: needs 512 CPUs for 512 workers x 1 CPU but this machine has {os.cpu_count()}; "
        "lower --num-workers or ray.cpus_per_worker")
    assert time.monotonic() - t0 < 60
