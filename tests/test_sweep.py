"""``pipelines.sweep``: the sweep config (validation, ``--set`` routing, search spaces),
supernet sharing and trial concurrency without Ray; then a tiny Tune sweep end to end on
the session's local Ray: a trial that raises is recorded, an interrupted sweep resumes
with the same command, and the output files.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from dsnet.config import ConfigError
from dsnet.models.checkpoint import read_checkpoint
from pipelines import sweep
from pipelines.command import UsageError
from pipelines.sweep import (
    param_space,
    parser,
    supernet_id,
    supernet_variants,
    trial_concurrency,
    trial_gate_config,
)
from pipelines.sweep_config import AshaConfig, Dist, SweepConfig, load_sweep_config
from pipelines.sweep_plan import SweepPlan, make_plan
from pipelines.sweep_results import (
    check_same_sweep,
    expected_trials,
    front_hypervolume,
    front_vs_static,
    mark_front,
    rank_correlations,
    resolved_config,
    static_curves,
)
from tests.helpers import TINY

# tiny.yml's budgets on 64 synthetic 16 px images: a gate fit is ~1 s of work.
FAST_SET = ["dataset=synthetic", "synthetic_size=64", "img_size=16", "batch_size=32",
            "gate.eval_subnets=[0,3]", "gate.madds_unit=1.0e6"]


def _sweep_yaml(tmp_path: Path, **keys: object) -> Path:
    d = {"name": "s", "output": str(tmp_path / "out"), "pipeline": str(TINY),
         "set": FAST_SET, "ray": {"num_workers": 1},
         "space": {"gate.complexity_weight": {"grid": [0.1, 1.0]}}}
    d.update(keys)
    path = tmp_path / "sweep.yml"
    path.write_text(yaml.safe_dump(d))
    return path


def _plan(path: Path, *argv: str) -> SweepPlan:
    return make_plan(parser().parse_args(["-c", str(path), *argv]), ["test"])


# ----------------------------------------------------------------------------- no Ray


def test_default_sweep_config() -> None:
    """dsnet/configs/sweep_default.yml: <= 12 gate trials of 1 worker on one shared supernet."""
    plan = make_plan(parser().parse_args([]), ["test"])
    assert plan.sweep_dir.name == "sweep_default" and plan.supernet is None
    assert plan.trial_ray.num_workers == 1
    assert plan.pipeline.ray.num_workers == 2  # the supernet keeps the pipeline's workers
    gate = plan.pipeline.stages["gate"]
    assert gate.madds_unit == 1e6 and gate.stage == "gate"
    assert math.prod(len(d.values) for d in plan.cfg.space.values()) <= 12
    assert "gate.complexity_weight" in plan.cfg.space
    assert supernet_variants(plan.cfg.space) == {"base": {}}


@pytest.mark.parametrize("keys, message", [
    ({"spcae": {}}, "unknown key 'spcae'; did you mean 'space'?"),
    ({"search": "optuan"}, "did you mean 'optuna'?"),
    ({"asha": {"grace": 1}}, "unknown key 'grace'; did you mean 'grace_period'?"),
    ({"num_samples": 0}, "'num_samples' must be >= 1"),
    ({"space": {"gate.complexity_weight": [0.1, 1]}}, "must be a one-key mapping"),
    ({"space": {"gate.complexity_weight": {"gird": [1]}}},
     "unknown distribution 'gird'; did you mean 'grid'?"),
    ({"space": {"gate.complexity_weight": {"grid": []}}}, "grid needs a non-empty list"),
    ({"search": "random", "space": {"gate.complexity_weight": {"loguniform": [0, 1]}}},
     "loguniform needs low > 0"),
    ({"search": "random", "space": {"gate.gumbel_tau": {"uniform": [2, 1]}}},
     "low < high"),
    ({"space": {"gate.complexity_wieght": {"grid": [1]}}},
     "unknown stage key 'complexity_wieght'; did you mean 'complexity_weight'?"),
    ({"space": {"gat.complexity_weight": {"grid": [1]}}}, "did you mean 'gate'?"),
    ({"space": {"gate.start_chn_idx": {"grid": [0, -1]}}},
     "value -1: .*key 'start_chn_idx' must be >= 0"),
    ({"space": {"gate.complexity_form": {"grid": ["squared"]}}}, "did you mean 'square'?"),
    ({"search": "random", "space": {"gate.start_chn_idx": {"uniform": [0, 5]}}},
     "not a float key; use grid or choice"),
    ({"search": "random", "space": {"supernet.lr": {"loguniform": [0.01, 0.1]}}},
     "supernet keys need a finite list"),
    ({"space": {"gate.complexity_weight": {"loguniform": [0.01, 1]}}},
     "needs search: random or optuna"),
])
def test_config_errors(tmp_path: Path, keys: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        _plan(_sweep_yaml(tmp_path, **keys))


def test_cli_error_exits_2_before_anything_runs(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    path = _sweep_yaml(tmp_path, space={"gate.sgs_wieght": {"grid": [1.0]}})
    assert sweep.main(["-c", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'sgs_weight'?" in err[0], err
    assert sweep.main(["-c", str(path), "--supernet", str(tmp_path / "nope.pt")]) == 2
    assert "supernet checkpoint not found" in capsys.readouterr().err
    assert sweep.main(["-c", str(_sweep_yaml(tmp_path)), "--output", "s3://b/sweeps"]) == 2
    assert "a sweep folder is local or on a shared file system" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_supernet_flag_excludes_supernet_keys(tmp_path: Path) -> None:
    ckpt = tmp_path / "given.pt"
    ckpt.write_bytes(b"x")
    path = _sweep_yaml(tmp_path, space={"supernet.num_random": {"grid": [1, 2]}})
    with pytest.raises(ConfigError, match="--supernet gives a trained supernet"):
        _plan(path, "--supernet", str(ckpt))


def test_supernet_flag_reads_the_checkpoint_before_ray(tmp_path: Path,
                                                      tiny_supernet: Path) -> None:
    """--supernet is read when the plan is made: its static table comes with it, and a
    damaged file is refused then, not in every trial after Ray's start-up."""
    plan = _plan(_sweep_yaml(tmp_path), "--supernet", str(tiny_supernet))
    assert plan.supernet_subnets == read_checkpoint(tiny_supernet)["extra"]["subnets"]
    # Trials on other validation images: that table is not their static curve.
    other = _plan(_sweep_yaml(tmp_path), "--supernet", str(tiny_supernet),
                  "--set", "gate.seed=7")
    assert other.pipeline.stages["gate"].seed == 7 and other.supernet_subnets is None
    bad = tmp_path / "bad.pt"
    bad.write_bytes(tiny_supernet.read_bytes()[:1000])  # truncated
    with pytest.raises(UsageError, match="input checkpoint: .* truncated or corrupt"):
        _plan(_sweep_yaml(tmp_path), "--supernet", str(bad))


def test_set_routes_sweep_and_pipeline_keys(tmp_path: Path) -> None:
    cfg = load_sweep_config(_sweep_yaml(tmp_path), [
        "search=random", "num_samples=3", "asha.enabled=true", "ray.max_failures=0",
        "space.gate.gumbel_tau={loguniform: [0.5, 2]}", "gate.epochs=2",
        "pipeline.ray.num_workers=1"])
    assert cfg.search == "random" and cfg.num_samples == 3 and cfg.asha.enabled
    assert cfg.ray == {"num_workers": 1, "max_failures": 0}
    assert cfg.space["gate.gumbel_tau"] == Dist("loguniform", [0.5, 2])
    assert cfg.set[-2:] == ["gate.epochs=2", "ray.num_workers=1"]
    plan = _plan(_sweep_yaml(tmp_path), "--set", "gate.epochs=2", "--num-samples", "2",
                 "--max-concurrent", "1", "--set", "pipeline.ray.num_workers=1")
    assert plan.pipeline.stages["gate"].epochs == 2 and plan.pipeline.ray.num_workers == 1
    assert plan.cfg.num_samples == 2 and plan.cfg.max_concurrent == 1


def test_optuna_missing_is_a_clear_error(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(UsageError, match="needs the optuna package: pip install optuna"):
        _plan(_sweep_yaml(tmp_path, search="optuna"))


def test_expected_trials() -> None:
    space = {"gate.complexity_weight": Dist("grid", [0.1, 1.0, 10.0]),
             "gate.start_chn_idx": Dist("choice", [0, 6])}
    assert expected_trials(SweepConfig(search="grid", space=space)) == 6
    cfg = SweepConfig(search="random", num_samples=2, space=space)
    assert expected_trials(cfg) == 6  # the grid, twice; the choice sampled
    cfg.search = "optuna"
    assert expected_trials(cfg) == 2


def test_param_space() -> None:
    space = {"gate.complexity_weight": Dist("loguniform", [1e-3, 1.0]),
             "gate.start_chn_idx": Dist("choice", [0, 6]),
             "gate.sgs_weight": Dist("grid", [0.0, 1.0])}
    cfg = SweepConfig(search="random", space=space)
    ps = param_space(cfg)
    assert ps["gate.sgs_weight"] == {"grid_search": [0.0, 1.0]}
    assert ps["gate.start_chn_idx"].categories == [0, 6]
    assert (ps["gate.complexity_weight"].lower, ps["gate.complexity_weight"].upper) == (1e-3, 1)
    cfg.search = "grid"
    cfg.space = {k: v for k, v in space.items() if v.finite}
    assert param_space(cfg)["gate.start_chn_idx"] == {"grid_search": [0, 6]}
    cfg.search = "optuna"  # Optuna samples every dimension
    assert param_space(cfg)["gate.sgs_weight"].categories == [0.0, 1.0]


def test_searchers() -> None:
    """Grid/random: Tune's variant generator capped at the concurrency; optuna: the
    multi-objective searcher (top1 max, madds min) behind a concurrency limiter."""
    space = {"gate.complexity_weight": Dist("loguniform", [1e-3, 1.0])}
    basic = sweep._search_alg(SweepConfig(search="random", space=space), 2)
    assert type(basic).__name__ == "BasicVariantGenerator" and basic.max_concurrent == 2
    assert sweep._scheduler(SweepConfig(), 6) is None
    asha = sweep._scheduler(SweepConfig(asha=AshaConfig(enabled=True)), 6)
    assert asha._metric == "score" and asha._mode == "max" and asha._max_t == 7
    pytest.importorskip("optuna")
    limiter = sweep._search_alg(SweepConfig(search="optuna", space=space), 3)
    assert limiter.max_concurrent == 3
    assert limiter.searcher.metric == ["top1", "madds"]
    assert limiter.searcher.mode == ["max", "min"]


def test_supernets_are_shared_by_their_trials() -> None:
    space = {"supernet.num_random": Dist("grid", [1, 2]),
             "gate.complexity_weight": Dist("grid", [0.1, 1.0, 10.0])}
    variants = supernet_variants(space)
    assert variants == {"num_random=1": {"supernet.num_random": 1},
                        "num_random=2": {"supernet.num_random": 2}}
    trial = {"supernet.num_random": 2, "gate.complexity_weight": 10.0}
    assert supernet_id(trial) == "num_random=2"
    assert supernet_id({"gate.complexity_weight": 1.0}) == "base"
    long = supernet_id({"supernet.routing_space": list(range(40))})
    assert long.startswith("sn-") and len(long) == 13


def test_sweep_folder_refuses_another_config(tmp_path: Path) -> None:
    from dsnet.utils.atomic import atomic_write_json

    path = _sweep_yaml(tmp_path)
    plan = _plan(path)
    atomic_write_json(plan.sweep_dir / "sweep.json", {"config": resolved_config(plan)})
    check_same_sweep(_plan(path))  # the same config: resumes
    with pytest.raises(ConfigError, match=r"pipeline_stages\.gate\.epochs: 1 -> 2\); use a new "
                                          "--name"):
        check_same_sweep(_plan(path, "--set", "gate.epochs=2"))


def test_trial_concurrency_never_overbooks() -> None:
    from pipelines.config import RayConfig

    one, two = RayConfig(num_workers=1), RayConfig(num_workers=2)
    assert trial_concurrency(None, one, {"CPU": 2.0}) == 2
    assert trial_concurrency(None, two, {"CPU": 2.0}) == 1
    assert trial_concurrency(None, two, {"CPU": 0.0}) == 1  # never zero
    assert trial_concurrency(3, two, {"CPU": 16.0}) == 3
    assert trial_concurrency(None, two, {"CPU": 16.0}) == 8
    # 2 workers x (1 + 3 DataLoader processes) = 8 CPUs a trial
    assert trial_concurrency(None, two, {"CPU": 16.0}, loaders=3) == 2
    gpu = RayConfig(num_workers=1, use_gpu=True)
    assert trial_concurrency(None, gpu, {"CPU": 16.0, "GPU": 2.0}) == 2


def test_trial_gate_config_types_values_like_set() -> None:
    np = pytest.importorskip("numpy")
    from dsnet.config import config_to_dict
    from pipelines.config import load_pipeline_config

    base = config_to_dict(load_pipeline_config(TINY).stages["gate"])
    cfg = trial_gate_config(base, {"gate.complexity_weight": np.float64(1e-05),
                                   "gate.start_chn_idx": np.int64(6),
                                   "supernet.num_random": 1})
    assert cfg.complexity_weight == 1e-05 and type(cfg.complexity_weight) is float
    assert cfg.start_chn_idx == 6 and type(cfg.start_chn_idx) is int
    with pytest.raises(ConfigError, match="must be >= 0"):
        trial_gate_config(base, {"gate.sgs_weight": -1.0})


def test_front_and_rank_correlation_of_rows() -> None:
    space = {"gate.complexity_weight": Dist("grid", [0.1, 1.0]),
             "gate.start_chn_idx": Dist("grid", [0, 6])}

    def row(cw: float, start: int, top1: float, madds: float, status: str = "done") -> dict:
        return {"trial_id": f"t{cw}{start}", "status": status, "gate.complexity_weight": cw,
                "gate.start_chn_idx": start, "top1": top1, "madds": madds}

    rows = [row(0.1, 0, 97.0, 1.2e6), row(1.0, 0, 96.0, 0.9e6), row(0.1, 6, 98.0, 2.6e6),
            row(1.0, 6, 97.5, 2.1e6), row(1.0, 6, None, None, "error")]
    assert [rows[i]["trial_id"] for i in mark_front(rows)] == ["t1.00", "t0.10", "t1.06",
                                                                "t0.16"]
    assert rows[4]["on_front"] is False
    corr = rank_correlations(rows, space)["gate.complexity_weight"]
    assert corr["within"] == {"gate.start_chn_idx=0": -1.0, "gate.start_chn_idx=6": -1.0}
    assert corr["mean_within"] == -1.0 and corr["n"] == 4


def test_front_against_the_static_curve_and_hypervolume() -> None:
    # Static curve of supernet "base": (1M, 80 %) - (2M, 84 %) - (4M, 86 %).
    static = [{"supernet": "base", "subnet": s, "madds": m, "top1": a}
              for s, m, a in ((0, 1e6, 80.0), (6, 2e6, 84.0), (13, 4e6, 86.0))]
    rows = [{"trial_id": "a", "status": "done", "supernet": "base", "madds": 1.5e6,
             "top1": 83.0},
            {"trial_id": "b", "status": "done", "supernet": "base", "madds": 3e6, "top1": 84.5},
            {"trial_id": "c", "status": "error", "supernet": "base", "madds": None,
             "top1": None}]
    a, b = front_vs_static(rows, [0, 1], static)
    # a: the curve gives 82 % at 1.5M (+1 point); it reaches 83 % at 1.75M (1.17x saving).
    assert (a["static_top1"], a["gain"]) == (pytest.approx(82.0), pytest.approx(1.0))
    assert a["madds_saving"] == pytest.approx(1.75 / 1.5)
    # b lies below the curve (85 % at 3M): a negative gain, and no MAdds saving.
    assert b["gain"] == pytest.approx(-0.5) and b["madds_saving"] == pytest.approx(2.5 / 3)
    hv = front_hypervolume(rows, static)
    assert (hv["ref_top1"], hv["ref_madds_m"]) == (80.0, 4.0)
    # (4 - 1.5) * (83 - 80) + (4 - 3) * (84.5 - 83)
    assert hv["hypervolume"] == pytest.approx(7.5 + 1.5)
    assert front_hypervolume(rows, []) is None
    one_point = [{**static[0], "supernet": "given"}]
    assert static_curves(static + one_point) == static


# ----------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def tiny_supernet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BN-recalibrated supernet of tiny.yml on 64 synthetic images, made in-process."""
    import torch

    from dsnet.train.engine import CheckpointHook, run_stage
    from pipelines.config import load_pipeline_config

    folder = tmp_path_factory.mktemp("supernet")
    cfg = load_pipeline_config(TINY, FAST_SET)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only add contention
    try:
        run_stage(cfg.stages["supernet"], hooks=[CheckpointHook(folder / "supernet")])
        run_stage(cfg.stages["reset_bn"], hooks=[CheckpointHook(folder / "reset_bn")],
                  init_from=folder / "supernet" / "checkpoint.pt")
    finally:
        torch.set_num_threads(threads)
    return folder / "reset_bn" / "checkpoint.pt"


def _interrupt_after_first_trial(marker: Path) -> object:
    """A Tune callback that stops the sweep like Ctrl-C once the first trial finished
    (Tune treats SIGUSR1 like SIGINT: it saves the experiment's state and returns).

    Tune saves the callbacks with the experiment and restores them: ``marker`` makes it
    fire once only.
    """
    from ray import tune

    class Interrupt(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: object,
                              **info: object) -> None:
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGUSR1)

    return Interrupt()


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.ray
def test_tiny_sweep_failure_interrupt_resume(ray_session: object, tmp_path: Path,
                                             tiny_supernet: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """3 trials, one at a time, 1 worker each; start_chn_idx 12 leaves no room for 4
    choices (of 14 subnets), so that trial raises. Interrupted after the first trial, the
    same command resumes the other two and writes every output."""
    path = _sweep_yaml(tmp_path, ray={"num_workers": 1, "max_failures": 0},
                       max_concurrent=1,
                       space={"gate.complexity_weight": {"grid": [0.5]},
                              "gate.start_chn_idx": {"grid": [0, 10, 12]}})
    args = ["-c", str(path), "--supernet", str(tiny_supernet)]
    sweep_dir = tmp_path / "out" / "s"

    interrupt = _interrupt_after_first_trial(tmp_path / "interrupted")
    assert sweep.main(args, callbacks=[interrupt]) == 130
    assert "resume with: python -m pipelines.sweep -c" in capsys.readouterr().err
    rows = _csv(sweep_dir / "trials.csv")  # Tune creates trials lazily: one so far
    assert [r["status"] for r in rows] == ["done"]
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    assert meta["interrupted"] is True and meta["trials"]["not_started"] == 2
    first = sweep_dir / "trials" / rows[0]["trial_id"] / "trial.json"
    first_record = first.read_text()

    assert sweep.main(args) == 0  # the same command: Tuner.restore
    out = capsys.readouterr().out
    assert "resuming Tune" in out and "Pareto front" in out
    assert first.read_text() == first_record  # the finished trial did not run again
    rows = _csv(sweep_dir / "trials.csv")
    assert [r["status"] for r in rows] == ["done", "done", "error"]
    assert [r["gate.start_chn_idx"] for r in rows] == ["0", "10", "12"]
    assert "routing space (12, 13, 14, 15)" in rows[2]["error"]
    assert f"trial {rows[2]['trial_id']} failed" in out
    _check_outputs(sweep_dir, rows, read_checkpoint(tiny_supernet)["extra"]["subnets"])


def _check_outputs(sweep_dir: Path, rows: list[dict[str, str]],
                   static: list[dict[str, object]]) -> None:
    """The finished trials' rows, pareto.csv/png and sweep.json of the tiny sweep."""
    for r in rows[:2]:
        assert float(r["top1"]) >= 0 and float(r["madds"]) > 0
        assert sum(json.loads(r["choices"]).values()) > 0  # the validation images
        assert Path(r["checkpoint"]).is_file()
        assert Path(r["checkpoint"]).parents[1] == sweep_dir / "trials" / r["trial_id"] / "gate"
    assert float(rows[0]["madds"]) < float(rows[1]["madds"])
    pareto = _csv(sweep_dir / "pareto.csv")
    front = [p for p in pareto if p["series"] == "front"]
    assert front and {p["trial_id"] for p in front} == {r["trial_id"] for r in rows
                                                       if r["on_front"] == "True"}
    # The static series is the table the given checkpoint's BN recalibration wrote into it
    # (every subnet), not the trials' own (eval_subnets [0, 3]); the front is compared with it.
    assert [p["subnet"] for p in pareto if p["series"] == "static"] == \
        [str(r["subnet"]) for r in static]
    assert len(static) > 2
    assert (sweep_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    assert meta["interrupted"] is False
    assert meta["trials"] == {"done": 2, "error": 1, "stopped": 0, "incomplete": 0,
                              "not_started": 0}
    assert set(meta["versions"]) >= {"dsnet", "torch", "ray", "python"}
    assert meta["wall_s"] > 0 and meta["wall_s_total"] > meta["wall_s"]
    assert meta["config"]["trial_ray"]["num_workers"] == 1
    assert meta["rank_correlation"]["gate.start_chn_idx"]["pooled"] == 1.0
    assert not list(sweep_dir.rglob(".*.tmp"))  # atomic writes left no temporary files
    assert len(meta["front_vs_static"]) == len(front)
    assert all(math.isfinite(p["gain"]) for p in meta["front_vs_static"])
