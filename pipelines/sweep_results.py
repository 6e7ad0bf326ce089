"""Sweep results: trial rows, the Pareto front, rank correlations and the output files.

``trials.csv`` (every trial), ``pareto.csv`` (the front, then the supernets' static
subnets), ``pareto.png`` and ``sweep.json`` (resolved config, versions, counts, correlation),
all written atomically; and the check that a sweep folder is resumed only by the same
config. Used by :mod:`pipelines.sweep`.
"""

from __future__ import annotations

import collections
import json
import math
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsnet.config import (
    ConfigError,
    config_to_dict,
)
from dsnet.eval.evaluate import interpolate_static, save_figure, static_madds_at
from dsnet.eval.pareto import hypervolume, pareto_front, spearman
from dsnet.utils.atomic import atomic_write_json, atomic_write_text
from dsnet.utils.provenance import to_builtins, versions
from pipelines.stage import error_summary
from pipelines.sweep_config import Dist, SweepConfig
from pipelines.sweep_plan import SweepPlan

TRIAL_STATUSES = ("done", "error", "stopped", "incomplete")  # trials.csv's status column
# Correlated with mean MAdds in sweep.json: larger weight -> cheaper, larger target -> dearer.
CORRELATED_KEYS = ("gate.complexity_weight", "gate.target_madds", "gate.sgs_weight",
                   "gate.gumbel_tau", "gate.start_chn_idx")
# Short names for the plot's labels.
_ABBREV = {"complexity_weight": "cw", "start_chn_idx": "start", "sgs_weight": "sgs",
           "gumbel_tau": "tau", "target_madds": "target", "num_random": "nr",
           "num_choice": "k"}


# ----------------------------------------------------------------------------- results


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def tune_statuses(experiment_path: str) -> dict[str, str]:
    """Tune's status of every trial (TERMINATED, ERROR, PENDING, ...), read back from the
    experiment's saved state (needs Ray initialised)."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.status for t in ExperimentAnalysis(experiment_path).trials}


def _status(tune_status: str | None, error: Any, final: bool) -> str:
    """done | stopped (ended early by the scheduler) | error | incomplete (interrupted)."""
    if error is not None or tune_status == "ERROR":
        return "error"
    if final:
        return "done"
    return "stopped" if tune_status == "TERMINATED" else "incomplete"


def trial_rows(plan: SweepPlan, results: Any,
               statuses: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per trial (sorted by trial id): its values, status, metrics, error."""
    rows = []
    for r in results:
        metrics = r.metrics or {}
        tid = metrics.get("trial_id") or Path(r.path).name  # the folder is the id
        rec = _read_json(plan.sweep_dir / "trials" / tid / "trial.json")
        dyn = (rec.get("result") or {}).get("dynamic") or {}
        final = metrics.get("final") == 1 and rec.get("status") == "done"
        status = _status(statuses.get(tid), r.error, final)
        error = rec.get("error") or (_one_line(r.error) if r.error is not None else None)
        row = {"trial_id": tid, "status": status, "supernet": rec.get("supernet")}
        row.update({k: to_builtins((r.config or {}).get(k)) for k in plan.cfg.space})
        row.update({"top1": dyn.get("top1"), "top5": dyn.get("top5"), "madds": dyn.get("madds"),
                    "score": metrics.get("score") if final else None,
                    "choices": json.dumps(dyn["choices"]) if dyn.get("choices") else None,
                    "wall_s": rec.get("wall_s"), "checkpoint": rec.get("checkpoint"),
                    "error": error if status == "error" else None})
        rows.append(row)
    rows.sort(key=lambda row: row["trial_id"])
    return rows


def _one_line(err: BaseException, limit: int = 300) -> str:
    return f"{type(err).__name__}: {error_summary(err, limit)}"


def mark_front(rows: list[dict[str, Any]]) -> list[int]:
    """Set ``on_front`` on every row; indices of the front's rows in ascending MAdds."""
    done = [i for i, r in enumerate(rows) if r["status"] == "done"]
    front = [done[j] for j in pareto_front([rows[i]["top1"] for i in done],
                                           [rows[i]["madds"] for i in done])]
    for i, row in enumerate(rows):
        row["on_front"] = i in front
    return front


def _groups(rows: Sequence[dict[str, Any]], key: str,
            space: Mapping[str, Dist]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by the values of every other swept key."""
    others = [k for k in space if k != key]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = ", ".join(f"{k}={_fmt(row[k])}" for k in others) or "all"
        groups.setdefault(label, []).append(row)
    return groups


def rank_correlations(rows: Sequence[dict[str, Any]],
                      space: Mapping[str, Dist]) -> dict[str, dict[str, Any]]:
    """Spearman correlation of each swept numeric gate key with mean MAdds: pooled over the
    done trials, and within each group where the other swept keys are equal."""
    done = [r for r in rows if r["status"] == "done"]
    out = {}
    for key in space:
        if key not in CORRELATED_KEYS:
            continue
        within = {label: spearman([r[key] for r in g], [r["madds"] for r in g])
                  for label, g in _groups(done, key, space).items()}
        finite = [v for v in within.values() if not math.isnan(v)]
        out[key] = {"metric": "madds", "n": len(done),
                    "pooled": spearman([r[key] for r in done], [r["madds"] for r in done]),
                    "within": within,
                    "mean_within": sum(finite) / len(finite) if finite else math.nan}
    return out


def static_rows(supernets: Mapping[str, Mapping[str, Any]],
                plan: SweepPlan) -> list[dict[str, Any]]:
    """The static subnets of each supernet (from its BN recalibration: the stage's result,
    or the table a ``--supernet`` checkpoint carries; else from a finished trial's table:
    the gate leaves the supernet's weights untouched)."""
    out = []
    for sid, s in supernets.items():
        subnets = s.get("subnets") or _subnets_from_trials(plan.sweep_dir, sid)
        for r in subnets or []:
            out.append({"series": "static", "supernet": sid, "subnet": r["subnet"],
                        "top1": r["top1"], "top5": r["top5"], "madds": r["madds"]})
    return out


def _subnets_from_trials(sweep_dir: Path, sid: str) -> list[dict[str, Any]] | None:
    for path in sorted((sweep_dir / "trials").glob("*/trial.json")):
        rec = _read_json(path)
        if rec.get("status") == "done" and rec.get("supernet") == sid:
            return (rec.get("result") or {}).get("subnets")
    return None


def label(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    """A short label of a trial's swept values, e.g. ``cw=0.1 start=6``."""
    parts = []
    for k in keys:
        name = k.split(".", 1)[1]
        v = row.get(k)
        text = f"{v:.3g}" if isinstance(v, float) else str(v)
        parts.append(f"{_ABBREV.get(name, name)}={text}")
    return " ".join(parts)


def write_csvs(sweep_dir: Path, rows: Sequence[dict[str, Any]], front: Sequence[int],
               static: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """``trials.csv`` (every trial) and ``pareto.csv`` (the front, then the static series)."""
    import pandas as pd

    # dtype object: a column mixing ints and blanks stays "6", not "6.0"
    atomic_write_text(sweep_dir / "trials.csv",
                       pd.DataFrame(list(rows), dtype=object).to_csv(index=False))
    front_rows = [{"series": "front", "supernet": rows[i]["supernet"],
                   "trial_id": rows[i]["trial_id"], "subnet": None,
                   **{k: rows[i][k] for k in keys},
                   **{m: rows[i][m] for m in ("top1", "top5", "madds", "choices")},
                   "label": label(rows[i], keys)} for i in front]
    cols = ["series", "supernet", "trial_id", "subnet", *keys, "top1", "top5", "madds",
            "choices", "label"]
    table = pd.DataFrame([*front_rows, *static], columns=cols, dtype=object)
    atomic_write_text(sweep_dir / "pareto.csv", table.to_csv(index=False))


def plot_front(path: Path, rows: Sequence[dict[str, Any]], front: Sequence[int],
               static: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """Accuracy vs MAdds: static subnets' curves, every trial, the labelled front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for sid in sorted({r["supernet"] for r in static}):
        pts = sorted((r["madds"] / 1e6, r["top1"]) for r in static
                     if r["supernet"] == sid and isinstance(r["subnet"], int))
        ax.plot(*zip(*pts, strict=True), "o-", ms=3, alpha=0.6,
                label=f"static subnets ({sid})" if len(static) else None)
    done = [r for r in rows if r["status"] == "done"]
    if done:
        ax.plot([r["madds"] / 1e6 for r in done], [r["top1"] for r in done], "x",
                color="grey", label="trials")
    if front:
        pts = [(rows[i]["madds"] / 1e6, rows[i]["top1"]) for i in front]
        ax.plot(*zip(*pts, strict=True), "r*-", ms=11, label="Pareto front")
        for i, (x, y) in zip(front, pts, strict=True):
            ax.annotate(label(rows[i], keys), (x, y), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    ax.set_xlabel("mean MAdds (M)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def format_front(rows: Sequence[dict[str, Any]], front: Sequence[int],
                 keys: Sequence[str]) -> str:
    """The front as a plain-text table, in ascending MAdds."""
    names = [k.split(".", 1)[1] for k in keys]
    width = [max(len(n), 8) for n in names]
    head = " ".join(f"{n:>{w}}" for n, w in zip(names, width, strict=True))
    lines = [f"{'trial':<12} {head} {'top1':>7} {'top5':>7} {'MAdds(M)':>9}  choices"]
    for i in front:
        r = rows[i]
        vals = " ".join(f"{_fmt(r[k]):>{w}}" for k, w in zip(keys, width, strict=True))
        lines.append(f"{r['trial_id']:<12} {vals} {r['top1']:>7.2f} {r['top5']:>7.2f} "
                     f"{r['madds'] / 1e6:>9.3f}  {r['choices']}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- sweep.json


def resolved_config(plan: SweepPlan) -> dict[str, Any]:
    """The sweep as it runs: sweep keys, the base pipeline's stages, the trials' Ray."""
    cfg = asdict(plan.cfg)
    return {"sweep": cfg, "pipeline_stages": {s: config_to_dict(c)
                                              for s, c in plan.pipeline.stages.items()},
            "pipeline_ray": config_to_dict(plan.pipeline.ray),
            "trial_ray": config_to_dict(plan.trial_ray), "supernet": plan.supernet}


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two JSON-like mappings."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [] if old == new else [f"{prefix or 'value'}: {old!r} -> {new!r}"]
    out = []
    for key in sorted(set(old) | set(new), key=str):
        out += _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
    return out


def check_same_sweep(plan: SweepPlan) -> None:
    """A sweep folder holds one sweep: refuse to continue it with another config."""
    old = _read_json(plan.sweep_dir / "sweep.json").get("config")
    new = json.loads(json.dumps(resolved_config(plan), default=str))
    if not old:
        return
    for cfg in (old, new):  # ``set`` is compared through its effect, the resolved stages
        cfg.get("sweep", {}).pop("set", None)
    diff = _diff(old, new)
    if not diff:
        return
    raise ConfigError(f"{plan.sweep_dir} holds a sweep with another config "
                      f"({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}); use a new "
                      "--name, or delete the folder")


def trial_counts(rows: Sequence[dict[str, Any]], cfg: SweepConfig) -> dict[str, int]:
    """Trials per status, plus those Tune has not created yet (``not_started``)."""
    counts = {s: sum(r["status"] == s for r in rows) for s in TRIAL_STATUSES}
    counts["not_started"] = max(expected_trials(cfg) - len(rows), 0)
    return counts


@dataclass
class SweepOutcome:
    """What a finished (or interrupted) sweep produced."""

    rows: list[dict[str, Any]]
    front: list[int]
    correlations: dict[str, dict[str, Any]]
    interrupted: bool
    wall_s: float
    vs_static: list[dict[str, Any]] = field(default_factory=list)
    hypervolume: dict[str, Any] | None = None


def write_outputs(plan: SweepPlan, rows: list[dict[str, Any]],
                  supernets: Mapping[str, Mapping[str, Any]], started: float,
                  concurrency: int) -> SweepOutcome:
    """trials.csv, pareto.csv, pareto.png and sweep.json (all atomically)."""
    keys = list(plan.cfg.space)
    front = mark_front(rows)
    static = static_rows(supernets, plan)
    write_csvs(plan.sweep_dir, rows, front, static, keys)
    plot_front(plan.sweep_dir / "pareto.png", rows, front, static, keys)
    corr = rank_correlations(rows, plan.cfg.space)
    counts = trial_counts(rows, plan.cfg)
    interrupted = counts["incomplete"] + counts["not_started"] > 0
    curves = static_curves(static)
    vs_static, hv = front_vs_static(rows, front, curves), front_hypervolume(rows, curves)
    wall = time.time() - started
    prev = _read_json(plan.sweep_dir / "sweep.json")
    atomic_write_json(plan.sweep_dir / "sweep.json", {
        "name": plan.sweep_dir.name, "command": shlex.join(plan.command),
        "config": resolved_config(plan), "versions": versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": round(wall, 1),
        "wall_s_total": round(prev.get("wall_s_total", 0.0) + wall, 1),
        "max_concurrent_trials": concurrency, "trials": counts, "interrupted": interrupted,
        "supernets": supernets, "front": [rows[i]["trial_id"] for i in front],
        "front_madds_ratio": _madds_ratio(rows, front), "rank_correlation": corr,
        "front_vs_static": vs_static, "hypervolume": hv})
    return SweepOutcome(rows, front, corr, interrupted, wall, vs_static, hv)


def static_curves(static: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The static rows of supernets with at least two subnets: a curve to compare with.
    (With ``--supernet`` and a checkpoint older than the table it carries, the rows come
    from a trial's own table, which ``eval_subnets`` may cut to one subnet; a single point
    would pass for a flat curve.)"""
    counts = collections.Counter(s["supernet"] for s in static)
    return [s for s in static if counts[s["supernet"]] >= 2]


def front_vs_static(rows: Sequence[dict[str, Any]], front: Sequence[int],
                    static: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each front point against its supernet's static curve: the top-1 gain at equal MAdds
    and the MAdds saving (static MAdds for the same top-1 / the point's) at equal top-1."""
    out = []
    for i in front:
        r = rows[i]
        curve = [s for s in static if s["supernet"] == r["supernet"]]
        if not curve:
            continue
        static_top1 = interpolate_static(curve, r["madds"])
        static_madds = static_madds_at(curve, r["top1"])
        out.append({"trial_id": r["trial_id"], "madds": r["madds"], "top1": r["top1"],
                    "static_top1": static_top1, "gain": r["top1"] - static_top1,
                    "static_madds": static_madds,
                    "madds_saving": static_madds / r["madds"] if static_madds else None})
    return out


def front_hypervolume(rows: Sequence[dict[str, Any]],
                      static: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Hypervolume (top-1 points x MAdds in millions) of the finished trials, against the
    static curves' worst corner (least accurate subnet's top-1, costliest subnet's MAdds):
    fixed by the supernets, so searches over the same supernets compare."""
    if not static:
        return None
    ref = (min(s["top1"] for s in static), max(s["madds"] for s in static) / 1e6)
    done = [r for r in rows if r["status"] == "done"]
    hv = hypervolume([r["top1"] for r in done], [r["madds"] / 1e6 for r in done], ref)
    return {"hypervolume": hv, "ref_top1": ref[0], "ref_madds_m": ref[1]}


def expected_trials(cfg: SweepConfig) -> int:
    """How many trials the sweep makes: ``num_samples`` times every enumerated dimension
    (Tune creates them lazily, so an interrupted sweep may not list them all yet)."""
    n = cfg.num_samples
    for dist in cfg.space.values():
        enumerated = dist.kind == "grid" or (dist.kind == "choice" and cfg.search == "grid")
        if enumerated and cfg.search != "optuna":
            n *= len(dist.values)
    return n


def _madds_ratio(rows: Sequence[dict[str, Any]], front: Sequence[int]) -> float | None:
    """Largest over smallest mean MAdds on the front."""
    madds = [rows[i]["madds"] for i in front]
    return max(madds) / min(madds) if madds and min(madds) > 0 else None


