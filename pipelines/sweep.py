"""``python -m pipelines.sweep``: Ray Tune sweeps of the gate's loss weights and width
schedules, collecting the accuracy-vs-MAdds Pareto front.

Usage::

    python -m pipelines.sweep [-c SWEEP_CONFIG] [--output DIR] [--name NAME]
                              [--supernet CHECKPOINT] [--num-samples K]
                              [--max-concurrent N] [--set KEY=VALUE ...] [--debug]

With no arguments: ``configs/sweep_default.yml`` on the embedded ``mnist5k`` data. The
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
(interrupted). The front (:func:`dsnet.pareto.pareto_front`) is over the done trials.

Sweep folder ``<output>/<name>/``: ``trials.csv`` (one row per trial), ``pareto.csv`` (the
non-dominated trials and the supernets' static subnets), ``pareto.png``, ``sweep.json``
(resolved config, versions, wall time, rank correlation); ``supernets/<id>/`` (pipeline
run folders), ``trials/<trial_id>/`` (``trial.json`` and the Train run), ``tune/``.

The sweep YAML (see ``configs/sweep_default.yml``): ``name``, ``output``, ``pipeline`` (the
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
import os
import re
import shlex
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsnet.atomic import atomic_write_text
from dsnet.config import (
    STAGES,
    ConfigError,
    PipelineConfig,
    RayConfig,
    StageConfig,
    apply_overrides,
    config_to_dict,
    load_pipeline_config,
    ray_config_from_dict,
    stage_config_from_dict,
)
from dsnet.evaluate import save_figure
from dsnet.pareto import pareto_front, spearman
from pipelines.cli import UsageError, report_failure
from pipelines.run_record import RunRecord, atomic_write_json, versions
from pipelines.runtime import (
    REPO_ROOT,
    RaySession,
    check_resources,
    trap_sigterm,
    worker_gpus,
)
from pipelines.stage import error_summary, fit_stage, run_stages

DEFAULT_SWEEP = REPO_ROOT / "configs" / "sweep_default.yml"
PROG = "python -m pipelines.sweep"
SEARCHES = ("grid", "random", "optuna")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
TRIAL_STATUSES = ("done", "error", "stopped", "incomplete")  # trials.csv's status column
SUPERNET_STAGES = ("supernet", "reset_bn")  # space keys of these define the shared supernet
OBJECTIVES = {"top1": "max", "madds": "min"}  # the multi-objective search's targets
# Correlated with mean MAdds in sweep.json: larger weight -> cheaper, larger target -> dearer.
CORRELATED_KEYS = ("gate.complexity_weight", "gate.target_madds", "gate.sgs_weight",
                   "gate.gumbel_tau", "gate.start_chn_idx")
_SWEEP_KEYS = ("name", "output", "pipeline", "set", "ray", "search", "num_samples",
               "max_concurrent", "seed", "asha", "space")
_ASHA_KEYS = ("enabled", "grace_period", "reduction_factor", "max_t", "madds_weight")
# Short names for the plot's labels.
_ABBREV = {"complexity_weight": "cw", "start_chn_idx": "start", "sgs_weight": "sgs",
           "gumbel_tau": "tau", "target_madds": "target", "num_random": "nr",
           "num_choice": "k"}
# Train V2 builds callbacks named here in the process that constructs the TorchTrainer
# (the trial), which is how a trial adds its report callback to fit_stage's trainer.
TRAIN_CALLBACKS_ENV = "RAY_TRAIN_CALLBACKS"
_SCORE_ENV = "DSNET_SWEEP_SCORE"  # "madds_weight,madds_unit" for SweepReportCallback


# ----------------------------------------------------------------------------- config


@dataclass
class Dist:
    """One dimension of the search space: ``kind`` and its values or ``[low, high]``."""

    kind: str
    values: list[Any]

    @property
    def finite(self) -> bool:
        """Whether the dimension has a finite list of values (grid or choice)."""
        return self.kind in ("grid", "choice")


@dataclass
class AshaConfig:
    """ASHA early stopping on ``score = top1 - madds_weight * madds / gate.madds_unit``."""

    enabled: bool = False
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None  # None = the gate's epochs + 1 (one report per epoch + final)
    madds_weight: float = 1.0  # top-1 points traded for one madds_unit of mean MAdds


@dataclass
class SweepConfig:
    """A validated sweep YAML (paths resolved)."""

    name: str | None = None
    output: str = "results"
    pipeline: str = str(REPO_ROOT / "configs" / "default.yml")
    set: list[str] = field(default_factory=list)
    ray: dict[str, Any] = field(default_factory=dict)
    search: str = "grid"
    num_samples: int = 1
    max_concurrent: int | None = None
    seed: int = 0
    asha: AshaConfig = field(default_factory=AshaConfig)
    space: dict[str, Dist] = field(default_factory=dict)


def _suggest(key: str, valid: Sequence[str]) -> str:
    """``; did you mean 'X'?`` for the closest valid name, or ``""``."""
    import difflib

    # the start of a valid name (grace -> grace_period), else the closest spelling
    close = [v for v in valid if v.startswith(key)] if len(key) >= 3 else []
    close = close or difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_known(d: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    for key in d:
        if key not in valid:
            raise ConfigError(f"{where}: unknown key '{key}'{_suggest(str(key), valid)} "
                              f"(valid: {', '.join(valid)})")


def _typed(where: str, key: str, value: Any, kind: type, low: float | None = None,
           optional: bool = False) -> Any:
    """``value`` checked to be of ``kind`` (ints accepted for floats) and ``>= low``."""
    if value is None and optional:
        return None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{where}: '{key}' must be {kind.__name__}"
                          f"{' or null' if optional else ''}, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{where}: '{key}' must be >= {low}, got {value!r}")
    return value


def parse_dist(key: str, spec: Any, where: str) -> Dist:
    """One space entry, ``{grid: [...]}``, ``{choice: [...]}``, ``{uniform: [lo, hi]}`` or
    ``{loguniform: [lo, hi]}``; ConfigError naming the key otherwise."""
    example = f"e.g. '{key}: {{grid: [0.1, 1.0]}}' or '{key}: {{loguniform: [0.001, 1]}}'"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"{where}: space '{key}' must be a one-key mapping of a "
                          f"distribution ({', '.join(DISTRIBUTIONS)}), {example}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: space '{key}': unknown distribution '{kind}'"
                          f"{_suggest(str(kind), DISTRIBUTIONS)} (use one of "
                          f"{', '.join(DISTRIBUTIONS)})")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: space '{key}': {kind} needs a non-empty list, got "
                          f"{values!r}")
    if kind in ("uniform", "loguniform"):
        _check_bounds(key, kind, values, where)
    return Dist(kind, list(values))


def _check_bounds(key: str, kind: str, values: list[Any], where: str) -> None:
    nums = len(values) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                    for v in values)
    if not nums or not values[0] < values[1]:
        raise ConfigError(f"{where}: space '{key}': {kind} needs [low, high] numbers with "
                          f"low < high, got {values!r}")
    if kind == "loguniform" and values[0] <= 0:
        raise ConfigError(f"{where}: space '{key}': loguniform needs low > 0, got "
                          f"{values[0]!r}")


def _parse_asha(d: Any, where: str) -> AshaConfig:
    if d is None:
        return AshaConfig()
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: 'asha' must be a mapping, got {d!r}")
    _check_known(d, _ASHA_KEYS, f"{where} [asha]")
    w = f"{where} [asha]"
    a = AshaConfig()
    a.enabled = _typed(w, "enabled", d.get("enabled", a.enabled), bool)
    a.grace_period = _typed(w, "grace_period", d.get("grace_period", a.grace_period), int, 1)
    a.reduction_factor = _typed(w, "reduction_factor",
                                d.get("reduction_factor", a.reduction_factor), float, 1.000001)
    a.max_t = _typed(w, "max_t", d.get("max_t"), int, 1, optional=True)
    a.madds_weight = _typed(w, "madds_weight", d.get("madds_weight", a.madds_weight), float, 0)
    return a


def sweep_config_from_dict(d: Mapping[str, Any], base_dir: Path, where: str) -> SweepConfig:
    """Validate a sweep mapping (see the module docstring); ``pipeline`` is resolved against
    ``base_dir``. Raises ConfigError with the offending key."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping of sweep keys, got {type(d).__name__}")
    _check_known(d, _SWEEP_KEYS, where)
    c = SweepConfig()
    c.name = _typed(where, "name", d.get("name"), str, optional=True)
    c.output = _typed(where, "output", d.get("output", c.output), str)
    pipeline = _typed(where, "pipeline", d.get("pipeline", "default.yml"), str)
    c.pipeline = str((base_dir / pipeline).resolve())
    c.set = list(d.get("set") or [])
    if not all(isinstance(s, str) for s in c.set):
        raise ConfigError(f"{where}: 'set' must be a list of 'KEY=VALUE' strings")
    c.ray = dict(_typed(where, "ray", d.get("ray") or {}, dict))
    c.search = d.get("search", c.search)
    if c.search not in SEARCHES:
        raise ConfigError(f"{where}: 'search' must be one of {', '.join(SEARCHES)}, got "
                          f"{c.search!r}{_suggest(str(c.search), SEARCHES)}")
    c.num_samples = _typed(where, "num_samples", d.get("num_samples", 1), int, 1)
    c.max_concurrent = _typed(where, "max_concurrent", d.get("max_concurrent"), int, 1,
                              optional=True)
    c.seed = _typed(where, "seed", d.get("seed", 0), int, 0)
    c.asha = _parse_asha(d.get("asha"), where)
    space = d.get("space")
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(f"{where}: 'space' must be a non-empty mapping of STAGE.KEY: "
                          f"{{DIST: ARGS}}, e.g. 'gate.complexity_weight: {{grid: [0.1, 1]}}'")
    c.space = {str(k): parse_dist(str(k), v, where) for k, v in space.items()}
    return c


def _split_set(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--set`` items for the sweep (its own keys, ``ray.``, ``asha.``, ``space.``) and
    for the pipeline (``pipeline.`` prefix removed, or any other key)."""
    sweep_items, pipeline_items = [], []
    for item in items:
        key = item.partition("=")[0].strip()
        head = key.split(".", 1)[0]
        if "=" not in item or not key:
            raise ConfigError(f"malformed override {item!r}: expected KEY=VALUE, e.g. "
                              f"'gate.epochs=2' or 'search=random'")
        if head == "pipeline":
            pipeline_items.append(item.split(".", 1)[1])
        elif head in _SWEEP_KEYS and head not in ("pipeline", "set"):
            sweep_items.append(item)
        else:
            pipeline_items.append(item)
    return sweep_items, pipeline_items


def _set_sweep_key(d: dict[str, Any], item: str) -> None:
    """Apply one sweep ``--set`` item (values parsed as YAML) to the raw sweep mapping."""
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: malformed value ({e.__class__.__name__})") from None
    head, _, rest = key.strip().partition(".")
    if head in ("ray", "asha", "space"):
        if not rest:
            raise ConfigError(f"override {item!r}: give a sub-key, e.g. '{head}.KEY=VALUE'")
        section = d.get(head)
        d[head] = section = dict(section) if isinstance(section, Mapping) else {}
        section[rest] = value
    else:
        d[head] = value


def load_sweep_config(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep YAML, apply the sweep's ``--set`` items and validate.

    The pipeline overrides among ``overrides`` are appended to the config's ``set`` list.
    """
    from dsnet.config import _read_yaml  # one YAML reader, one set of error messages

    path = Path(path)
    d = dict(_read_yaml(path))
    d.setdefault("name", path.stem)
    sweep_items, pipeline_items = _split_set(overrides)
    for item in sweep_items:
        _set_sweep_key(d, item)
    cfg = sweep_config_from_dict(d, path.parent, str(path))
    cfg.set = [*cfg.set, *pipeline_items]
    return cfg


# ----------------------------------------------------------------------------- plan


def _plain(value: Any) -> Any:
    """Builtins only (numpy scalars from Tune's samplers -> Python numbers)."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def override_item(key: str, value: Any) -> str:
    """``KEY=VALUE`` for :func:`dsnet.config.apply_overrides` (JSON is valid YAML)."""
    return f"{key}={json.dumps(_plain(value))}"


def _check_space_values(space: Mapping[str, Dist], pipeline: PipelineConfig,
                        supernet_given: bool) -> None:
    """Every value of the space applied to a copy of the pipeline, as ``--set`` would."""
    for key, dist in space.items():
        stage, _, field_name = key.partition(".")
        if stage not in STAGES or not field_name:
            raise ConfigError(f"space '{key}': keys are STAGE.KEY with STAGE one of "
                              f"{', '.join(STAGES)}{_suggest(stage, STAGES)}, e.g. "
                              "'gate.complexity_weight'")
        if supernet_given and stage in SUPERNET_STAGES:
            raise ConfigError(f"space '{key}': --supernet gives a trained supernet; drop the "
                              f"{stage} keys from the space or omit --supernet")
        if stage in SUPERNET_STAGES and not dist.finite:
            raise ConfigError(f"space '{key}': supernet keys need a finite list (grid or "
                              f"choice): each distinct supernet is trained before the trials")
        for value in dist.values:  # grid/choice values, or the bounds
            try:
                apply_overrides(copy.deepcopy(pipeline), [override_item(key, value)])
            except ConfigError as e:
                raise ConfigError(f"space '{key}' value {value!r}: {e}") from None
        if not dist.finite and not _takes_float(field_name):
            raise ConfigError(f"space '{key}': {dist.kind} samples floats but '{field_name}' "
                              "is not a float key; use grid or choice")


def _takes_float(name: str) -> bool:
    tp = typing.get_type_hints(StageConfig).get(name)
    return tp is float or float in typing.get_args(tp)


@dataclass
class SweepPlan:
    """Everything a sweep runs, resolved before Ray starts."""

    cfg: SweepConfig
    pipeline: PipelineConfig
    trial_ray: RayConfig
    sweep_dir: Path
    supernet: str | None  # --supernet: a recalibrated checkpoint, no supernet training
    command: list[str]

    @property
    def tune_dir(self) -> Path:
        """Tune's experiment folder (its presence means: resume)."""
        return self.sweep_dir / "tune"


def _absolute_inputs(pipeline: PipelineConfig) -> None:
    """Existing relative ``data``/``resume`` paths made absolute: Train workers run in a
    folder of their own."""
    for cfg in pipeline.stages.values():
        for key in ("data", "resume"):
            value = getattr(cfg, key)
            if value and not Path(value).is_absolute() and Path(value).exists():
                setattr(cfg, key, str(Path(value).resolve()))


def make_plan(args: argparse.Namespace, command: Sequence[str]) -> SweepPlan:
    """Load and check the sweep config with the flags applied (no Ray)."""
    cfg = load_sweep_config(args.config, args.overrides)
    if args.num_samples is not None:
        cfg.num_samples = _typed("--num-samples", "num_samples", args.num_samples, int, 1)
    if args.max_concurrent is not None:
        cfg.max_concurrent = _typed("--max-concurrent", "max_concurrent",
                                    args.max_concurrent, int, 1)
    pipeline = load_pipeline_config(cfg.pipeline, cfg.set)
    _absolute_inputs(pipeline)
    supernet = None
    if args.supernet:
        supernet = str(Path(args.supernet).resolve())
        if not Path(supernet).is_file():
            raise UsageError(f"supernet checkpoint not found: {args.supernet} (--supernet)")
    _check_space_values(cfg.space, pipeline, supernet is not None)
    _check_search(cfg)
    trial_ray = ray_config_from_dict({**config_to_dict(pipeline.ray), **cfg.ray},
                                     source=f"{args.config} [ray]")
    name = args.name or cfg.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    sweep_dir = (Path(args.output or cfg.output) / name).resolve()
    return SweepPlan(cfg, pipeline, trial_ray, sweep_dir, supernet, list(command))


def _check_search(cfg: SweepConfig) -> None:
    """Search/space combinations that cannot work, and optuna's presence."""
    if cfg.search == "grid":
        for key, dist in cfg.space.items():
            if not dist.finite:
                raise ConfigError(f"space '{key}': search 'grid' enumerates values; "
                                  f"{dist.kind} needs search: random or optuna")
    if cfg.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise UsageError("search: optuna needs the optuna package: pip install optuna "
                             "(or pip install -e '.[optuna]'), or use search: random") from None


# ----------------------------------------------------------------------------- supernets


def supernet_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The supernet-side part of a trial's values (``supernet.*`` and ``reset_bn.*``)."""
    return {k: _plain(v) for k, v in sorted(values.items())
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
        return {"given": {"values": {}, "checkpoint": plan.supernet, "subnets": None}}
    out = {}
    for sid, values in supernet_variants(plan.cfg.space).items():
        pipeline = copy.deepcopy(plan.pipeline)
        apply_overrides(pipeline, [override_item(k, v) for k, v in values.items()])
        stages = {s: pipeline.stages[s] for s in SUPERNET_STAGES}
        if pipeline.ray.num_workers > 0:
            session.ensure()
            check_resources(pipeline.ray)
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


try:  # Train V2's interface of the callbacks it builds from RAY_TRAIN_CALLBACKS
    from ray.train.v2._internal.execution.callback import ReportCallback
except ImportError:  # pragma: no cover - another Ray version: no per-epoch reports
    ReportCallback = object  # type: ignore[misc,assignment]


class SweepReportCallback(ReportCallback):  # type: ignore[misc,valid-type]
    """Forwards every Train report (one per epoch) to Tune, adding the combined ``score``.

    ``fit_stage`` builds its ``RunConfig`` itself, so this reaches the trial's trainer
    through ``RAY_TRAIN_CALLBACKS``: Train constructs it (without arguments) in the trial
    process, where Tune's own forwarder can be made; the score's weights come from
    ``DSNET_SWEEP_SCORE``. Train calls such callbacks with its internal ``after_report``
    signature, hence this adapter around :class:`TuneReportCallback`.
    """

    def __init__(self) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        self.forward = TuneReportCallback()
        weight, unit = os.environ.get(_SCORE_ENV, "0,1e6").split(",")
        self.madds_weight, self.madds_unit = float(weight), float(unit)

    def after_report(self, training_report: Any, metrics: list[dict[str, Any]]) -> None:
        """Called on the Train controller once all workers reported an epoch."""
        scored = []
        for m in metrics:
            m = dict(m)
            if "top1" in m and "madds" in m:
                m["score"] = combined_score(m["top1"], m["madds"], self.madds_weight,
                                            self.madds_unit)
            scored.append(m)
        self.forward.after_report(None, scored, training_report.checkpoint)


class _TrainCallbackEnv:
    """Sets ``RAY_TRAIN_CALLBACKS`` (and the score weights) while a trial builds its
    TorchTrainer, restoring the old values after."""

    def __init__(self, madds_weight: float, madds_unit: float) -> None:
        self.values = {TRAIN_CALLBACKS_ENV: "pipelines.sweep.SweepReportCallback",
                       _SCORE_ENV: f"{madds_weight!r},{madds_unit!r}"}
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    values = {k: _plain(v) for k, v in config.items()}
    sid = "given" if "given" in setup["supernets"] else supernet_id(values)
    record: dict[str, Any] = {"trial_id": trial_id, "values": values, "supernet": sid,
                              "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_trial(run_dir, record)
    t0 = time.perf_counter()
    try:
        cfg = trial_gate_config(setup["gate"], values)
        ray_cfg = ray_config_from_dict(setup["ray"])
        with _TrainCallbackEnv(setup["madds_weight"], cfg.madds_unit):
            out = fit_stage(cfg, ray_cfg, str(run_dir), setup["supernets"][sid])
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
                      free: Mapping[str, float]) -> int:
    """Concurrent trials: at most the free CPUs (and GPUs) over what one trial's workers
    take, at least one; the trial function itself reserves nothing."""
    workers = max(ray_cfg.num_workers, 1)
    bound = int(free.get("CPU", 0.0) // (workers * ray_cfg.cpus_per_worker) + 1e-9)
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
        scheduler=_scheduler(plan.cfg, plan.pipeline.stages["gate"].epochs),
        num_samples=plan.cfg.num_samples,
        trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_dirname)
    return tune.Tuner(trainable, param_space=param_space(plan.cfg), tune_config=tune_config,
                      run_config=run_config)


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
        row.update({k: _plain((r.config or {}).get(k)) for k in plan.cfg.space})
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
    """The static subnets of each supernet (from its BN recalibration, or from a finished
    trial's table: the gate leaves the supernet's weights untouched)."""
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
        "front_madds_ratio": _madds_ratio(rows, front), "rank_correlation": corr})
    return SweepOutcome(rows, front, corr, interrupted, wall)


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
        check_resources(plan.trial_ray)
        concurrency = trial_concurrency(plan.cfg.max_concurrent, plan.trial_ray,
                                        _free_resources())
        resuming = plan.tune_dir.exists()
        log(f"{'resuming' if resuming else 'starting'} Tune: up to {concurrency} concurrent "
            f"trial(s) x {max(plan.trial_ray.num_workers, 1)} worker(s)")
        tuner = build_tuner(plan, trial_setup(plan, supernets), concurrency, callbacks)
        results = tuner.fit()
        rows = trial_rows(plan, results, tune_statuses(results.experiment_path))
    return write_outputs(plan, rows, supernets, started, concurrency)


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
    lines.append(f"wall time {outcome.wall_s:.0f} s; outputs in {plan.sweep_dir}")
    for r in outcome.rows:
        if r["status"] == "error":
            lines.append(f"trial {r['trial_id']} failed: {r['error']}")
    return "\n".join(lines)


def _fmt_corr(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:+.3f}"


def parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    from pipelines.cli import _Parser

    p = _Parser(prog=PROG, description="Ray Tune sweep of DS-Net gate training: "
                "accuracy-vs-MAdds Pareto front.")
    p.add_argument("-c", "--config", default=str(DEFAULT_SWEEP),
                   help="sweep YAML (default: configs/sweep_default.yml)")
    p.add_argument("--output", metavar="DIR", help="parent folder of sweep folders")
    p.add_argument("--name", help="sweep folder name; re-using one resumes that sweep")
    p.add_argument("--supernet", metavar="CHECKPOINT",
                   help="a BN-recalibrated supernet: sweep gate training only")
    p.add_argument("--num-samples", type=int, metavar="K", help="Tune num_samples")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="at most N trials at once (also capped by free CPUs)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a sweep or pipeline key (repeatable)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _resume_command(argv: Sequence[str], sweep_dir: Path | None) -> str:
    argv = list(argv)
    if sweep_dir is not None and not any(a == "--name" or a.startswith("--name=")
                                         for a in argv):
        argv += ["--name", sweep_dir.name]
    return f"{PROG} {shlex.join(argv)}".strip()


@dataclass
class _Run:
    plan: SweepPlan | None = None


def _execute(argv: list[str], run: _Run, callbacks: Sequence[Any]) -> int:
    args = parser().parse_args(argv)
    run.plan = make_plan(args, [*PROG.split(), *argv])
    old = trap_sigterm()
    try:
        outcome = run_sweep(run.plan, callbacks=callbacks)
    finally:
        if old is not None:
            import signal

            signal.signal(signal.SIGTERM, old)
    print(summary(outcome, run.plan), flush=True)
    if outcome.interrupted:
        raise KeyboardInterrupt
    if not any(r["status"] == "done" for r in outcome.rows):
        print("error: no trial finished (see trials.csv)", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Sequence[str] | None = None, callbacks: Sequence[Any] = ()) -> int:
    """Run a sweep; returns the exit code (0 ok, 1 failed, 2 usage, 130 interrupted).

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
        callbacks: extra ``ray.tune.Callback`` objects for a new Tuner (tests).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, run = "--debug" in argv, _Run()
    try:
        return _execute(argv, run, callbacks)
    except KeyboardInterrupt:
        sweep_dir = run.plan.sweep_dir if run.plan else None
        print(f"interrupted; resume with: {_resume_command(argv, sweep_dir)}",
              file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # a bad input, Tune could not start, ...
        return report_failure(e, debug)


if __name__ == "__main__":
    # Run the importable module's main, so that Tune pickles ``pipelines.sweep.gate_trial``
    # by reference rather than ``__main__``'s copy by value.
    from pipelines.sweep import main as _main

    sys.exit(_main())
