"""The Ray layer (``pipelines``): CLI errors, resource checks, the three-stage run on Ray
Train workers, skipping and resuming, the in-process path (``ray job submit`` on a real
two-node cluster: ``test_multinode.py``).

Ray fits cost 10-20 s each on 2 CPUs, so these tests share one local Ray (the
``ray_session`` fixture) and run few fits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsnet.config import STAGES, config_to_dict
from dsnet.configs import CONFIG_DIR
from dsnet.models.checkpoint import file_sha256
from pipelines import full
from pipelines.config import load_pipeline_config
from pipelines.runtime import REPO_ROOT, ResourceError, check_resources
from tests.conftest import FAST_OVERRIDES
from tests.helpers import TINY, run_json


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    """``python -m pipelines.full ARGS`` in a subprocess (started, not waited for)."""
    return subprocess.Popen([sys.executable, "-m", "pipelines.full", *args], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------- no Ray


def test_cli_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    """Bad flag, bad --set key, missing config: exit 2, one line on stderr, before Ray."""
    cases = {
        "unrecognized arguments: --bogus": ["--bogus"],
        "unknown stage key 'epoch'; did you mean 'epochs'?":
            ["-c", str(TINY), "--set", "supernet.epoch=3", "--output", str(tmp_path)],
        "config file not found": ["-c", str(tmp_path / "missing.yml")],
    }
    procs = {msg: _cli(*args) for msg, args in cases.items()}  # in parallel: ~4 s each
    for msg, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (msg, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], err
        assert "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing was run


def test_single_stage_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The gate stage needs an input checkpoint; a missing one is named. Exit 2, no Ray."""
    cfg = CONFIG_DIR / "mobilenetv1_bn_uniform_gate.yml"  # the authors' file
    from pipelines import gate

    assert gate.main(["-c", str(cfg), "--output", str(tmp_path)]) == 2
    assert "needs the previous stage's checkpoint" in capsys.readouterr().err
    assert gate.main(["-c", str(cfg), "--resume", str(tmp_path / "nope.pth.tar"),
                      "--output", str(tmp_path)]) == 2
    assert "input checkpoint not found" in capsys.readouterr().err


def test_in_process_pipeline_and_skip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--num-workers 0``: the three stages in this process, no Ray; a re-run skips all."""
    args = ["-c", str(TINY), "--output", str(tmp_path), "--name", "local",
            "--num-workers", "0", *FAST_OVERRIDES]
    assert full.main(args) == 0
    run_dir = tmp_path / "local"
    rec = run_json(run_dir)
    for stage in STAGES:
        assert rec["stages"][stage]["status"] == "done"
        assert (run_dir / stage / "local" / "checkpoint.pt").is_file()
    assert rec["stages"]["gate"]["init_from"] == rec["stages"]["reset_bn"]["checkpoint"]
    assert (run_dir / "results" / "dsnet_final.pt").is_file()
    out = capsys.readouterr().out
    assert "[supernet] epoch 1/1" in out and "dynamic" in out
    assert full.main(args) == 0
    assert capsys.readouterr().out.count("already done") == 3


def test_relative_paths_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train workers run in their own folder: relative input paths become absolute."""
    from pipelines.cli import plan_single, stage_parser

    (tmp_path / "in.pt").write_bytes(b"x")
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = CONFIG_DIR / "mobilenetv1_bn_uniform_gate.yml"
    args = stage_parser("gate").parse_args(["-c", str(cfg), "data", "--resume", "in.pt"])
    plan = plan_single("gate", args)
    assert plan.stages["gate"].resume == str(tmp_path / "in.pt")
    assert plan.stages["gate"].data == str(tmp_path / "data")
    assert plan.stages["gate"].stage == "gate" and plan.ray.num_workers == 2


# ----------------------------------------------------------------------------- Ray


@pytest.mark.ray
def test_resource_check_fails_fast(ray_session: object, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    """8 workers on a 2-CPU Ray: a clear error at once instead of Ray waiting forever."""
    t0 = time.perf_counter()
    code = full.main(["-c", str(TINY), "--output", str(tmp_path), "--name", "big",
                      "--num-workers", "8"])
    assert code == 2
    err = capsys.readouterr().err
    assert "needs 8 CPUs for 8 workers x 1 CPU but the cluster has 2" in err
    assert "lower --num-workers or ray.cpus_per_worker" in err
    assert time.perf_counter() - t0 < 30
    assert run_json(tmp_path / "big")["stages"]["supernet"]["status"] == "pending"
    ray_cfg = load_pipeline_config(TINY, ["ray.num_workers=1", "ray.use_gpu=true"]).ray
    with pytest.raises(ResourceError, match="GPUs"):
        check_resources(ray_cfg)


@pytest.mark.ray
def test_end_to_end_on_ray_then_skip(ray_session: object, tmp_path: Path,
                                     capfd: pytest.CaptureFixture) -> None:
    """dsnet/configs/tiny.yml on 2 gloo workers: outputs, run.json, chained checkpoints, skip."""
    args = ["-c", str(TINY), "--output", str(tmp_path), "--name", "e2e"]
    assert full.main(args) == 0
    run_dir = tmp_path / "e2e"
    rec = run_json(run_dir)
    assert set(rec["versions"]) >= {"dsnet", "torch", "ray", "python"}
    assert rec["seeds"] == {s: 42 for s in STAGES}
    cfg = load_pipeline_config(TINY)
    prev = None
    for stage in STAGES:
        st = rec["stages"][stage]
        assert st["status"] == "done" and st["wall_s"] > 0
        assert st["config"] == json.loads(json.dumps(config_to_dict(cfg.stages[stage])))
        ckpt = Path(st["checkpoint"])
        assert ckpt.is_file() and ckpt.parent.parent == run_dir / stage  # Ray Train run dir
        assert st["checkpoint_sha256"] == file_sha256(ckpt)
        assert st["checkpoint_bytes"] == ckpt.stat().st_size
        assert st["init_from"] == prev  # chained: each stage starts from the previous one
        assert st.get("init_from_sha256") == (file_sha256(prev) if prev else None)
        assert st["epochs_run"] == [0] and st["metrics"]["top1"] >= 0
        prev = st["checkpoint"]
    results = run_dir / "results"
    for name in ("subnets.csv", "dynamic.csv", "accuracy_madds.png", "dsnet_final.pt"):
        assert (results / name).is_file(), name
    assert file_sha256(results / "dsnet_final.pt") == rec["stages"]["gate"]["checkpoint_sha256"]
    out = capfd.readouterr().out
    assert "[supernet] epoch 1/1 loss" in out  # rank 0's progress line reached the driver
    assert "dynamic" in out  # the summary table

    t0 = time.perf_counter()
    assert full.main(args) == 0
    assert time.perf_counter() - t0 < 20  # no fit, no Ray start
    assert capfd.readouterr().out.count("already done") == 3
    again = run_json(run_dir)
    for stage in STAGES:
        assert again["stages"][stage]["attempts"] == 1
        assert again["stages"][stage]["checkpoint"] == rec["stages"][stage]["checkpoint"]


def test_worker_report_log_is_quieted() -> None:
    """Ray Train V2 logs every report() at INFO from a logger named after its source file;
    the workers turn every such Ray-file logger down so the console shows our one line per
    epoch (a logger of that form stands in for Train's, which no public API names)."""
    import logging

    import ray

    from pipelines.stage import quiet_report_log

    name = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "example_context.py")
    logger = logging.getLogger(name)
    other = logging.getLogger("dsnet.example")
    try:
        logger.setLevel(logging.INFO)
        other.setLevel(logging.INFO)
        quiet_report_log()
        assert not logger.isEnabledFor(logging.INFO)
        assert logger.isEnabledFor(logging.WARNING)
        assert other.isEnabledFor(logging.INFO)  # only Ray's file loggers
    finally:
        logger.setLevel(logging.NOTSET)
        other.setLevel(logging.NOTSET)
