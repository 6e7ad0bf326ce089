"""``python -m pipelines.sweep``: Ray Tune sweeps of the gate's loss weights and width
schedules, collecting the accuracy-vs-MAdds Pareto front.

Usage::

    python -m pipelines.sweep [-c SWEEP_CONFIG] [--output DIR] [--name NAME]
                              [--supernet CHECKPOINT] [--num-samples K]
                              [--max-concurrent N] [--set KEY=VALUE ...] [--debug]

With no arguments: ``dsnet/configs/sweep_default.yml`` on the embedded ``fashion_mnist`` data. The
sweep first trains (or reuses, when the sweep folder already has it) every distinct
supernet the space needs, with its BN recalibration, through :func:`pipelines.stage.run_stages`
(``supernet.*``/``reset_bn.*`` keys in the space make several; each is trained once and
shared by the trials that use it). ``--supernet CKPT`` skips that and sweeps gate training
of a recalibrated checkpoint (this project's or the authors' release).

Each Tune trial fits one gate stage with :func:`pipelines.stage.fit_stage` (a
``TorchTrainer``) in ``<sweep>/trials/<trial_id>/gate``, so a restarted trial resumes its
Train run. The trial function reserves no CPU (``{"cpu": 0, "memory": 1 MiB}``): the
trial's Train workers take the CPUs, and concurrency is capped at free CPUs / CPUs per
trial, so a 2-CPU machine never deadlocks. A failing trial is recorded and the sweep goes
on; Ctrl-C stops it (Tune saves its state) and the same command resumes it with
``Tuner.restore(..., resume_errored=True)`` (so failed trials run again on every resume).
A sweep folder refuses a changed config (use a new ``--name``).

Every epoch of a trial reaches Tune (``SweepReportCallback``), with
``score = top1 - asha.madds_weight * madds / gate.madds_unit``: the single metric of the
optional ASHA early stopping. ``search: optuna`` is multi-objective (top-1 max, mean MAdds
min) and needs ``pip install optuna``. ASHA needs the Ray dashboard (a Ray this command
starts has it): it frees the placement group of a trial it stops.

``trials.csv`` status: ``done``, ``error``, ``stopped`` (by ASHA) or ``incomplete``
(interrupted). The front (:func:`dsnet.eval.pareto.pareto_front`) is over the done trials.

Sweep folder ``<output>/<name>/``: ``trials.csv`` (one row per trial), ``pareto.csv`` (the
non-dominated trials and the supernets' static subnets), ``pareto.png``, ``sweep.json``
(resolved config, versions, wall time, rank correlation, each front point's gain over its
supernet's static curve and the front's hypervolume); ``supernets/<id>/`` (pipeline
run folders), ``trials/<trial_id>/`` (``trial.json`` and the Train run), ``tune/``.

The sweep YAML (see ``dsnet/configs/sweep_default.yml``): ``name``, ``output``, ``pipeline`` (the
base pipeline YAML, relative to the sweep file), ``set`` (overrides of that pipeline,
``--set`` syntax), ``ray`` (Ray settings of each trial, over the pipeline's), ``search``
(grid | random | optuna), ``num_samples``, ``max_concurrent`` (null = as many as the free
CPUs hold), ``seed``, ``asha`` and ``space``: ``STAGE.KEY: {DIST: ARGS}`` with DIST one of
``grid`` (every value), ``choice`` (sampled; enumerated under ``search: grid``),
``uniform``/``loguniform`` (``[low, high]``). The supernet stages run with the pipeline's
own ``ray`` settings. ``--set`` takes sweep keys (``search=random``, ``asha.enabled=true``,
``ray.num_workers=1``, ``space.gate.sgs_weight={grid: [0.5, 1]}``), ``pipeline.ray.KEY``
and any pipeline override (``gate.epochs=2``, ``supernet.lr=0.05``, ``seed=1``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train

from dsnet.config import (
    StageConfig,
    apply_overrides,
    config_to_dict,
    stage_config_from_dict,
)
from dsnet.configs import CONFIG_DIR, find_config
from dsnet.utils.atomic import atomic_write_json
from dsnet.utils.provenance import to_builtins
from pipelines.cli import PIPELINE_ERRORS
from pipelines.command import (
    EXIT_FAILED,
    EXIT_OK,
    CommandParser,
    add_debug_option,
    add_set_option,
    run_main,
)
from pipelines.config import (
    RayConfig,
    override_pipeline,
    ray_config_from_dict,
)
from pipelines.run_record import RunRecord
from pipelines.runtime import (
    RaySession,
    check_resources,
    worker_cpus,
    worker_gpus,
)
from pipelines.stage import error_summary, fit_stage, run_stages
from pipelines.sweep_config import Dist, SweepConfig
from pipelines.sweep_plan import SUPERNET_STAGES, SweepPlan, make_plan, override_item
from pipelines.sweep_results import (
    SweepOutcome,
    check_same_sweep,
    format_front,
    trial_counts,
    trial_rows,
    tune_statuses,
    write_outputs,
)

DEFAULT_SWEEP = CONFIG_DIR / "sweep_default.yml"
PROG = "python -m pipelines.sweep"
OBJECTIVES = {"top1": "max", "madds": "min"}  # the multi-objective search's targets


# ----------------------------------------------------------------------------- supernets


def supernet_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The supernet-side part of a trial's values (``supernet.*`` and ``reset_bn.*``)."""
    return {k: to_builtins(v) for k, v in sorted(values.items())
            if k.split(".", 1)[0] in SUPERNET_STAGES}


def supernet_id(values: Mapping[str, Any]) -> str:
    """A folder-safe id of a supernet's values: ``base`` when none are swept."""
    sv = supernet_values(values)
    if not sv:
        return "base"
    text = ",".join(f"{k.split('.', 1)[1]}={json.dumps(v)}" for k, v in sv.items())
    text = re.sub(r"[^A-Za-z0-9_.=,+-]", "", text)
    if len(text) > 60:  # long lists of widths: a stable short hash instead
        text = "sn-" + hashlib.sha1(json.dumps(sv, sort_keys=True).encode()).hexdigest()[:10]
    return text


def supernet_variants(space: Mapping[str, Dist]) -> dict[str, dict[str, Any]]:
    """Every distinct supernet the space can ask for: id -> its supernet-side values."""
    keys = [k for k in space if k.split(".", 1)[0] in SUPERNET_STAGES]
    combos = itertools.product(*(space[k].values for k in keys))
    variants = {}
    for combo in combos:
        values = dict(zip(keys, combo, strict=True))
        variants[supernet_id(values)] = values
    return variants


def prepare_supernets(plan: SweepPlan, session: RaySession,
                      log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Train (or reuse) each supernet + BN recalibration; id -> checkpoint and subnets."""
    if plan.supernet is not None:
        return {"given": {"values": {}, "checkpoint": plan.supernet,
                          "subnets": plan.supernet_subnets}}
    out = {}
    for sid, values in supernet_variants(plan.cfg.space).items():
        pipeline = copy.deepcopy(plan.pipeline)
        override_pipeline(pipeline, [override_item(k, v) for k, v in values.items()])
        stages = {s: pipeline.stages[s] for s in SUPERNET_STAGES}
        if pipeline.ray.num_workers > 0:
            session.ensure()
            check_resources(pipeline.ray, stages)
        record = RunRecord.open(plan.sweep_dir / "supernets" / sid, stages, pipeline.ray,
                                plan.command)
        log(f"supernet '{sid}': {record.run_dir}")
        ckpt = run_stages(record, stages, pipeline.ray, session, log)
        result = record.stage("reset_bn").get("result") or {}
        out[sid] = {"values": values, "checkpoint": str(ckpt), "subnets": result.get("subnets")}
    return out


# ----------------------------------------------------------------------------- trials


def combined_score(top1: float, madds: float, madds_weight: float, madds_unit: float) -> float:
    """ASHA's single metric: top-1 minus ``madds_weight`` points per ``madds_unit`` MAdds."""
    return top1 - madds_weight * madds / madds_unit


class SweepReportCallback(ray.train.UserCallback):
    """Forwards every Train report (one per epoch) to Tune, adding the combined ``score``.

    Passed to the trial's TorchTrainer through ``RunConfig(callbacks=...)``; Train pickles
    it to its controller and calls :meth:`after_report` there. Made in the trial process:
    Tune's :class:`TuneReportCallback` must be created inside a Tune session.
    """

    def __init__(self, madds_weight: float, madds_unit: float) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        self.forward = TuneReportCallback()
        self.madds_weight, self.madds_unit = madds_weight, madds_unit

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: ray.train.Checkpoint | None) -> None:
        """Called on the Train controller once all workers reported an epoch."""
        self.forward.after_report(run_context, [self._scored(m) for m in metrics], checkpoint)

    def _scored(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(metrics)
        if "top1" in out and "madds" in out:
            out["score"] = combined_score(out["top1"], out["madds"], self.madds_weight,
                                          self.madds_unit)
        return out


def trial_gate_config(gate: Mapping[str, Any], values: Mapping[str, Any]) -> StageConfig:
    """The gate StageConfig of a trial: the base one with the trial's ``gate.*`` values."""
    cfg = stage_config_from_dict(gate, source="sweep gate config")
    items = [override_item(k.split(".", 1)[1], v) for k, v in sorted(values.items())
             if k.startswith("gate.")]
    return apply_overrides(cfg, items)


def _write_trial(run_dir: Path, record: Mapping[str, Any]) -> None:
    atomic_write_json(run_dir / "trial.json", record)


def gate_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """The Tune trial: fit one gate stage with this trial's values, report the result.

    Args:
        config: the trial's swept values (``STAGE.KEY`` -> value).
        setup: ``sweep_dir``, ``gate`` (base gate config dict), ``ray`` (trial RayConfig
            dict), ``supernets`` (id -> checkpoint) and ``madds_weight`` (ASHA's score).
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(setup["sweep_dir"]) / "trials" / trial_id
    values = {k: to_builtins(v) for k, v in config.items()}
    sid = "given" if "given" in setup["supernets"] else supernet_id(values)
    record: dict[str, Any] = {"trial_id": trial_id, "values": values, "supernet": sid,
                              "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_trial(run_dir, record)
    t0 = time.perf_counter()
    try:
        cfg = trial_gate_config(setup["gate"], values)
        ray_cfg = ray_config_from_dict(setup["ray"])
        forward = SweepReportCallback(setup["madds_weight"], cfg.madds_unit)
        out = fit_stage(cfg, ray_cfg, str(run_dir), setup["supernets"][sid],
                        callbacks=[forward])
    except Exception as e:
        record.update(status="error", error=f"{type(e).__name__}: {error_summary(e)}",
                      wall_s=round(time.perf_counter() - t0, 3))
        _write_trial(run_dir, record)
        raise
    result = out["result"] or {}
    dyn = result.get("dynamic") or {}
    record.update(status="done", wall_s=round(time.perf_counter() - t0, 3),
                  checkpoint=out["checkpoint"], result=result)
    _write_trial(run_dir, record)
    tune.report({"top1": dyn.get("top1"), "top5": dyn.get("top5"), "madds": dyn.get("madds"),
                 "score": combined_score(dyn["top1"], dyn["madds"], setup["madds_weight"],
                                         cfg.madds_unit),
                 "choices": json.dumps(dyn.get("choices") or {}), "supernet": sid,
                 "final": 1})


def _trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: its id (the config is in trials.csv)."""
    return str(trial.trial_id)


# ----------------------------------------------------------------------------- Tune


def trial_concurrency(requested: int | None, ray_cfg: RayConfig,
                      free: Mapping[str, float], loaders: int = 0) -> int:
    """Concurrent trials: at most the free CPUs (and GPUs) over what one trial's workers
    take (each with its ``loaders`` DataLoader processes, :func:`worker_cpus`), at least
    one; the trial function itself reserves nothing."""
    workers = max(ray_cfg.num_workers, 1)
    bound = int(free.get("CPU", 0.0) // (workers * worker_cpus(ray_cfg, loaders)) + 1e-9)
    if ray_cfg.use_gpu:
        bound = min(bound, int(free.get("GPU", 0.0) // (workers * worker_gpus(ray_cfg)) + 1e-9))
    bound = max(bound, 1)
    return min(requested, bound) if requested else bound


def _free_resources(wait_s: float = 10.0) -> dict[str, float]:
    """The cluster's free resources, after waiting briefly for a just-finished stage's
    workers to hand theirs back."""
    import ray

    total = ray.cluster_resources()
    deadline = time.monotonic() + wait_s
    while True:
        free = ray.available_resources()
        if free.get("CPU", 0.0) >= total.get("CPU", 0.0) or time.monotonic() > deadline:
            return free
        time.sleep(0.5)


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """Tune's param space from the sweep's space."""
    from ray import tune

    out = {}
    for key, dist in cfg.space.items():
        if dist.kind == "grid" or (dist.kind == "choice" and cfg.search == "grid"):
            out[key] = tune.grid_search(dist.values)
        elif dist.kind == "choice":
            out[key] = tune.choice(dist.values)
        elif dist.kind == "uniform":
            out[key] = tune.uniform(*dist.values)
        else:
            out[key] = tune.loguniform(*dist.values)
    if cfg.search == "optuna":  # Optuna samples every dimension: a grid becomes a choice
        out = {k: tune.choice(cfg.space[k].values) if isinstance(v, dict) else v
               for k, v in out.items()}
    return out


def _search_alg(cfg: SweepConfig, concurrency: int) -> Any:
    """The searcher, limited to ``concurrency`` running trials (Tune ignores
    ``max_concurrent_trials`` for a BasicVariantGenerator passed in explicitly)."""
    if cfg.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        optuna = OptunaSearch(metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()),
                              seed=cfg.seed)
        return ConcurrencyLimiter(optuna, max_concurrent=concurrency)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=concurrency, random_state=cfg.seed)


def _scheduler(cfg: SweepConfig, gate_epochs: int) -> Any:
    if not cfg.asha.enabled:
        return None
    from ray.tune.schedulers import ASHAScheduler

    a = cfg.asha
    return ASHAScheduler(metric="score", mode="max", time_attr="training_iteration",
                         max_t=a.max_t or gate_epochs + 1, grace_period=a.grace_period,
                         reduction_factor=a.reduction_factor)


def trial_setup(plan: SweepPlan, supernets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What every trial needs besides its values (passed with ``tune.with_parameters``)."""
    return {"sweep_dir": str(plan.sweep_dir), "gate": config_to_dict(plan.pipeline.stages["gate"]),
            "ray": config_to_dict(plan.trial_ray), "madds_weight": plan.cfg.asha.madds_weight,
            "supernets": {sid: s["checkpoint"] for sid, s in supernets.items()}}


def build_tuner(plan: SweepPlan, setup: dict[str, Any], concurrency: int,
                callbacks: Sequence[Any] = ()) -> Any:
    """A new Tuner, or the interrupted one restored when ``<sweep>/tune`` holds a state."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(gate_trial, setup=setup),
                                    {"cpu": 0, "memory": 1 << 20})
    if tune.Tuner.can_restore(str(plan.tune_dir)):
        return tune.Tuner.restore(str(plan.tune_dir), trainable, resume_errored=True)
    run_config = tune.RunConfig(name=plan.tune_dir.name, storage_path=str(plan.sweep_dir),
                                failure_config=tune.FailureConfig(max_failures=0),
                                callbacks=list(callbacks), verbose=1)
    tune_config = tune.TuneConfig(
        search_alg=_search_alg(plan.cfg, concurrency),
        scheduler=_scheduler(plan.cfg, plan.pipeline.stages["gate"].total_epochs),
        num_samples=plan.cfg.num_samples,
        trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_dirname)
    return tune.Tuner(trainable, param_space=param_space(plan.cfg), tune_config=tune_config,
                      run_config=run_config)


# ----------------------------------------------------------------------------- driver


def run_sweep(plan: SweepPlan, log: Callable[[str], None] = print,
              callbacks: Sequence[Any] = ()) -> SweepOutcome:
    """Supernets, then the Tune sweep (new or restored), then the outputs.

    Args:
        plan: from :func:`make_plan`.
        log: progress lines.
        callbacks: extra ``ray.tune.Callback`` objects for a new sweep; Tune saves them
            with the experiment and a resumed sweep gets them back.
    """
    started = time.time()
    check_same_sweep(plan)
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    log(f"sweep folder: {plan.sweep_dir}")
    with RaySession(plan.trial_ray) as session:
        supernets = prepare_supernets(plan, session, log)
        session.ensure()
        gate = plan.pipeline.stages["gate"]
        check_resources(plan.trial_ray, {"gate": gate})
        concurrency = trial_concurrency(plan.cfg.max_concurrent, plan.trial_ray,
                                        _free_resources(), gate.workers)
        resuming = plan.tune_dir.exists()
        log(f"{'resuming' if resuming else 'starting'} Tune: up to {concurrency} concurrent "
            f"trial(s) x {max(plan.trial_ray.num_workers, 1)} worker(s)")
        tuner = build_tuner(plan, trial_setup(plan, supernets), concurrency, callbacks)
        results = tuner.fit()
        rows = trial_rows(plan, results, tune_statuses(results.experiment_path))
    return write_outputs(plan, rows, supernets, started, concurrency)


def _static_lines(outcome: SweepOutcome) -> list[str]:
    """The front against the static curve, and the hypervolume."""
    lines = []
    if outcome.vs_static:
        below = sum(p["gain"] < 0 for p in outcome.vs_static)
        savings = [p["madds_saving"] for p in outcome.vs_static if p["madds_saving"]]
        lines.append(f"front vs static curve: largest top-1 gain at equal MAdds "
                     f"{max(p['gain'] for p in outcome.vs_static):+.2f} points, largest "
                     f"MAdds saving at equal top-1 "
                     f"{max(savings) if savings else float('nan'):.2f}x; {below} of "
                     f"{len(outcome.vs_static)} front points below the curve")
    if outcome.hypervolume:
        hv = outcome.hypervolume
        lines.append(f"hypervolume {hv['hypervolume']:.3f} (top-1 points x MAdds M, "
                     f"reference {hv['ref_top1']:.2f} %, {hv['ref_madds_m']:.3f}M)")
    return lines


def summary(outcome: SweepOutcome, plan: SweepPlan) -> str:
    """The front table, the trial counts, the rank correlation and the wall time."""
    keys = list(plan.cfg.space)
    counts = trial_counts(outcome.rows, plan.cfg)
    lines = [f"Pareto front ({len(outcome.front)} of {counts['done']} finished trials; "
             f"{counts['error']} failed, {counts['stopped']} stopped early, "
             f"{counts['incomplete'] + counts['not_started']} not finished):",
             format_front(outcome.rows, outcome.front, keys)]
    for key, c in outcome.correlations.items():
        lines.append(f"Spearman({key}, mean MAdds) = {_fmt_corr(c['pooled'])} pooled, "
                     f"{_fmt_corr(c['mean_within'])} within groups ("
                     + "; ".join(f"{g}: {_fmt_corr(v)}" for g, v in c["within"].items()) + ")")
    lines += _static_lines(outcome)
    lines.append(f"wall time {outcome.wall_s:.0f} s; outputs in {plan.sweep_dir}")
    for r in outcome.rows:
        if r["status"] == "error":
            lines.append(f"trial {r['trial_id']} failed: {r['error']}")
    return "\n".join(lines)


def _fmt_corr(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:+.3f}"


def parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = CommandParser(prog=PROG, description="Ray Tune sweep of DS-Net gate training: "
                      "accuracy-vs-MAdds Pareto front.")
    p.add_argument("-c", "--config", default=str(DEFAULT_SWEEP), type=find_config,
                   help="sweep YAML, a path or a shipped config's name "
                        "(default: dsnet/configs/sweep_default.yml)")
    p.add_argument("--output", metavar="DIR", help="parent folder of sweep folders")
    p.add_argument("--name", help="sweep folder name; re-using one resumes that sweep")
    p.add_argument("--supernet", metavar="CHECKPOINT",
                   help="a BN-recalibrated supernet: sweep gate training only")
    p.add_argument("--num-samples", type=int, metavar="K", help="Tune num_samples")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="at most N trials at once (also capped by free CPUs)")
    add_set_option(p, "override a sweep or pipeline key (repeatable)")
    add_debug_option(p)
    return p


@dataclass
class _Run:
    plan: SweepPlan | None = None


def _execute(argv: list[str], run: _Run, callbacks: Sequence[Any]) -> int:
    args = parser().parse_args(argv)
    run.plan = make_plan(args, [*PROG.split(), *argv])
    outcome = run_sweep(run.plan, callbacks=callbacks)
    print(summary(outcome, run.plan), flush=True)
    if outcome.interrupted:
        raise KeyboardInterrupt
    if not any(r["status"] == "done" for r in outcome.rows):
        print("error: no trial finished (see trials.csv)", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None, callbacks: Sequence[Any] = ()) -> int:
    """Run a sweep; returns the exit code (0 ok, 1 failed, 2 usage, 130 interrupted).

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
        callbacks: extra ``ray.tune.Callback`` objects for a new Tuner (tests).
    """
    run = _Run()
    return run_main(PROG, argv, lambda args: _execute(args, run, callbacks), PIPELINE_ERRORS,
                    resume_name=lambda: run.plan.sweep_dir.name if run.plan else None)


if __name__ == "__main__":
    # Run the importable module's main, so that Tune pickles ``pipelines.sweep.gate_trial``
    # by reference rather than ``__main__``'s copy by value.
    from pipelines.sweep import main as _main

    sys.exit(_main())
