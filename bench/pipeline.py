"""Benchmark the Ray layer: the pipeline on Ray Train workers vs in-process, and start-up.

Usage (from the repo root)::

    python -m bench.pipeline [-c CONFIG] [--set KEY=VALUE ...] [--num-workers N]
                             [--skip-startup] [--skip-pipeline]

1. Start-up: ``ray.init`` (with and without the dashboard), a ``num_cpus=0`` task hop,
   and ``fit()`` of an empty training function with 1 and 2 workers, as a
   ``TorchTrainer`` (gloo process group) and as a plain ``DataParallelTrainer`` (no process
   group: the difference is the process-group set-up), with the Train controller's health
   check at Ray's default (2 s) and at 0.1 s; plus ``ScalingConfig(num_workers=0)``.
2. The pipeline (default ``dsnet/configs/default.yml``) through Ray, then the same stages with
   the same settings in-process (``ray.num_workers=0``). Per stage: wall time of each, and
   on Ray where the time went: worker-group start-up (``fit()`` called -> training function
   entered), the stage itself on rank 0, tear-down, and the overhead (wall - stage).

Prints a table and writes ``bench/out/pipeline.json`` (run folders in ``bench/out/runs``).
Note: with N workers each processes 1/N of the data, so "in-process" vs "Ray" also
compares 1 process with N; the overhead column isolates what Ray adds. The in-process run
uses ``--threads`` torch threads (default 1, as each 1-CPU Ray worker gets
``OMP_NUM_THREADS=1``): on a busy 2-core machine 2 threads were 15-35x slower than 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402
import torch  # noqa: E402
from ray.train import RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer  # noqa: E402

from dsnet.configs import CONFIG_DIR
from pipelines.cli import execute, full_parser, plan_full  # noqa: E402
from pipelines.runtime import HEALTH_CHECK_ENV, REPO_ROOT  # noqa: E402

OUT = REPO_ROOT / "bench" / "out"
STAGES = ("supernet", "reset_bn", "gate")


def _empty_loop(config: dict[str, Any]) -> tuple[float, float]:
    """The training function that only imports torch: (when entered, import seconds).

    A TorchTrainer worker has imported torch before the function starts (to set up the
    process group); a DataParallelTrainer worker has not, so the import is timed apart.
    """
    entered = time.time()
    import torch  # noqa: F401

    return entered, time.time() - entered


def time_fit(trainer_cls: type, workers: int, storage: Path, name: str) -> dict[str, float]:
    """``fit()`` of the empty loop: total, until the function is entered (plus torch's
    import when the function had to do it), and after it."""
    trainer = trainer_cls(_empty_loop, scaling_config=ScalingConfig(num_workers=workers),
                          run_config=RunConfig(name=name, storage_path=str(storage)))
    t0 = time.time()
    result = trainer.fit()
    t1 = time.time()
    entered, import_s = result.return_value or (t1, 0.0)
    return {"fit_s": t1 - t0, "to_entry_s": entered - t0 + import_s, "import_torch_s": import_s,
            "after_s": t1 - entered - import_s}


@ray.remote(num_cpus=0)
def _noop() -> None:
    return None


def time_task_hop() -> dict[str, float]:
    """A ``num_cpus=0`` task (how each stage is launched): first call, then a warm call."""
    out = {}
    for key in ("task_first_s", "task_warm_s"):
        t0 = time.perf_counter()
        ray.get(_noop.remote())
        out[key] = time.perf_counter() - t0
    return out


def time_init(**kwargs: Any) -> float:
    """``ray.init(address="local", ...)`` wall time (Ray is left running)."""
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False, **kwargs)
    return time.perf_counter() - t0


def startup(storage: Path) -> dict[str, Any]:
    """Start-up costs with the health check at Ray's default and at 0.1 s."""
    results: dict[str, Any] = {}
    for interval in (None, "0.1"):
        if interval is None:
            os.environ.pop(HEALTH_CHECK_ENV, None)
        else:
            os.environ[HEALTH_CHECK_ENV] = interval  # inherited by the raylet's workers
        key = f"health_check_{interval or 'default'}"
        row: dict[str, Any] = {"ray_init_s": time_init(include_dashboard=interval is None)}
        row.update(time_task_hop())
        for cls, workers in ((TorchTrainer, 1), (TorchTrainer, 2), (DataParallelTrainer, 2)):
            label = f"{cls.__name__}_{workers}w"
            row[label] = time_fit(cls, workers, storage, f"{key}_{label}")
            print(f"  {key:<22} {label:<24} {row[label]['fit_s']:6.1f} s", flush=True)
        row["TorchTrainer_local_mode"] = time_fit(TorchTrainer, 0, storage, f"{key}_local")
        t0 = time.perf_counter()
        ray.shutdown()
        row["ray_shutdown_s"] = time.perf_counter() - t0
        results[key] = row
    for row in results.values():  # what the process group costs on top of the workers
        # (both entries include importing torch in the worker)
        row["process_group_s"] = (row["TorchTrainer_2w"]["to_entry_s"]
                                  - row["DataParallelTrainer_2w"]["to_entry_s"])
    results["ray_init_with_dashboard_s"] = results["health_check_default"]["ray_init_s"]
    results["ray_init_without_dashboard_s"] = results["health_check_0.1"]["ray_init_s"]
    return results


def run_pipeline(argv: list[str], name: str) -> dict[str, Any]:
    """Run the pipeline with ``pipelines.full``'s arguments; returns its run.json."""
    plan = plan_full(full_parser().parse_args([*argv, "--output", str(OUT / "runs"),
                                               "--name", name]))
    record = execute(plan, ["python", "-m", "bench.pipeline", *argv], log=lambda s: None)
    return record.data


def stage_rows(ray_run: dict[str, Any], local_run: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage: in-process and Ray wall time, Ray's start-up, tear-down and overhead."""
    rows = []
    for stage in STAGES:
        on_ray, local = ray_run["stages"][stage], local_run["stages"][stage]
        timing = on_ray.get("timing") or {}
        loop = timing.get("loop_s", float("nan"))
        rows.append({"stage": stage, "in_process_s": local["wall_s"], "ray_s": on_ray["wall_s"],
                     "ray_startup_s": timing.get("ray_startup_s"), "stage_s": loop,
                     "ray_teardown_s": timing.get("ray_teardown_s"),
                     "ray_overhead_s": on_ray["wall_s"] - loop})
    total = {k: sum(r[k] or 0.0 for r in rows) for k in rows[0] if k != "stage"}
    return rows + [{"stage": "total", **total}]


def print_table(rows: list[dict[str, Any]], workers: int) -> None:
    cols = ("in_process_s", "ray_s", "ray_startup_s", "stage_s", "ray_teardown_s",
            "ray_overhead_s")
    print(f"\nwall time per stage, seconds (Ray: {workers} workers)")
    print(f"{'stage':<9}" + "".join(f"{c:>16}" for c in cols))
    for r in rows:
        print(f"{r['stage']:<9}" + "".join(f"{(r[c] or 0.0):>16.1f}" for c in cols))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", default=str(CONFIG_DIR / "default.yml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--num-workers", type=int, help="Ray workers (default: the config's)")
    p.add_argument("--skip-startup", action="store_true")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the in-process run (default 1, like a 1-CPU Ray "
                        "worker, which Ray gives OMP_NUM_THREADS=1)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict[str, Any] = {"config": args.config, "overrides": args.overrides,
                              "cpus": os.cpu_count(), "ray": ray.__version__}
    if not args.skip_startup:
        print("start-up (empty training function):", flush=True)
        report["startup"] = startup(OUT / "runs" / f"startup-{stamp}")
    if not args.skip_pipeline:
        report.update(pipeline(args, stamp))
    (OUT / "pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {OUT / 'pipeline.json'}")


def pipeline(args: argparse.Namespace, stamp: str) -> dict[str, Any]:
    """The pipeline on Ray (Ray started and timed here), then in-process; prints the table."""
    base = ["-c", args.config] + [x for item in args.overrides for x in ("--set", item)]
    if args.num_workers is not None:
        base += ["--num-workers", str(args.num_workers)]
    os.environ[HEALTH_CHECK_ENV] = os.environ.get(HEALTH_CHECK_ENV, "0.1")
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False)
    init_s = time.perf_counter() - t0
    try:
        print("pipeline on Ray ...", flush=True)
        on_ray = run_pipeline(base, f"ray-{stamp}")
    finally:
        ray.shutdown()
    print(f"pipeline in-process ({args.threads} torch threads) ...", flush=True)
    torch.set_num_threads(args.threads)
    local = run_pipeline([*base, "--num-workers", "0"], f"local-{stamp}")
    rows = stage_rows(on_ray, local)
    workers = on_ray["ray"]["num_workers"]
    print_table(rows, workers)
    print(f"ray.init: {init_s:.1f} s (not in the table)")
    return {"pipeline": {"ray_init_s": init_s, "ray_workers": workers, "stages": rows,
                         "in_process_threads": args.threads,
                         "ray_run": on_ray["run_dir"], "local_run": local["run_dir"]}}


if __name__ == "__main__":
    main()
