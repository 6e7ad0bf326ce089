"""Sweep configuration: the sweep YAML's typed schema, its validation and ``--set`` keys.

A sweep file (``dsnet/configs/sweep_default.yml``) names a base pipeline YAML, overrides of it,
the Ray settings of each trial, the search (grid | random | optuna), ASHA early stopping
and the ``space``: ``STAGE.KEY: {DIST: ARGS}``. :func:`load_sweep_config` reads and checks it
all in one place (unknown keys with a suggestion, types, ranges, distributions), before
any Ray work. Used by :mod:`pipelines.sweep`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsnet.config import ConfigError
from dsnet.configs import CONFIG_DIR

SEARCHES = ("grid", "random", "optuna")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
_SWEEP_KEYS = ("name", "output", "pipeline", "set", "ray", "search", "num_samples",
               "max_concurrent", "seed", "asha", "space")
_ASHA_KEYS = ("enabled", "grace_period", "reduction_factor", "max_t", "madds_weight")


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
    pipeline: str = str(CONFIG_DIR / "default.yml")
    set: list[str] = field(default_factory=list)
    ray: dict[str, Any] = field(default_factory=dict)
    search: str = "grid"
    num_samples: int = 1
    max_concurrent: int | None = None
    seed: int = 0
    asha: AshaConfig = field(default_factory=AshaConfig)
    space: dict[str, Dist] = field(default_factory=dict)


def suggest(key: str, valid: Sequence[str]) -> str:
    """``; did you mean 'X'?`` for the closest valid name, or ``""``."""
    import difflib

    # the start of a valid name (grace -> grace_period), else the closest spelling
    close = [v for v in valid if v.startswith(key)] if len(key) >= 3 else []
    close = close or difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_known(d: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    for key in d:
        if key not in valid:
            raise ConfigError(f"{where}: unknown key '{key}'{suggest(str(key), valid)} "
                              f"(valid: {', '.join(valid)})")


def typed_value(where: str, key: str, value: Any, kind: type, low: float | None = None,
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
                          f"{suggest(str(kind), DISTRIBUTIONS)} (use one of "
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
    a.enabled = typed_value(w, "enabled", d.get("enabled", a.enabled), bool)
    a.grace_period = typed_value(w, "grace_period", d.get("grace_period", a.grace_period), int, 1)
    a.reduction_factor = typed_value(w, "reduction_factor",
                                d.get("reduction_factor", a.reduction_factor), float, 1.000001)
    a.max_t = typed_value(w, "max_t", d.get("max_t"), int, 1, optional=True)
    a.madds_weight = typed_value(w, "madds_weight", d.get("madds_weight", a.madds_weight), float, 0)
    return a


def sweep_config_from_dict(d: Mapping[str, Any], base_dir: Path, where: str) -> SweepConfig:
    """Validate a sweep mapping (see the module docstring); ``pipeline`` is resolved against
    ``base_dir``. Raises ConfigError with the offending key."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping of sweep keys, got {type(d).__name__}")
    _check_known(d, _SWEEP_KEYS, where)
    c = SweepConfig()
    c.name = typed_value(where, "name", d.get("name"), str, optional=True)
    c.output = typed_value(where, "output", d.get("output", c.output), str)
    pipeline = typed_value(where, "pipeline", d.get("pipeline", "default.yml"), str)
    c.pipeline = str((base_dir / pipeline).resolve())
    c.set = list(d.get("set") or [])
    if not all(isinstance(s, str) for s in c.set):
        raise ConfigError(f"{where}: 'set' must be a list of 'KEY=VALUE' strings")
    c.ray = dict(typed_value(where, "ray", d.get("ray") or {}, dict))
    c.search = d.get("search", c.search)
    if c.search not in SEARCHES:
        raise ConfigError(f"{where}: 'search' must be one of {', '.join(SEARCHES)}, got "
                          f"{c.search!r}{suggest(str(c.search), SEARCHES)}")
    c.num_samples = typed_value(where, "num_samples", d.get("num_samples", 1), int, 1)
    c.max_concurrent = typed_value(where, "max_concurrent", d.get("max_concurrent"), int, 1,
                              optional=True)
    c.seed = typed_value(where, "seed", d.get("seed", 0), int, 0)
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
    from dsnet.config import read_yaml  # one YAML reader, one set of error messages

    path = Path(path)
    d = dict(read_yaml(path))
    d.setdefault("name", path.stem)
    sweep_items, pipeline_items = _split_set(overrides)
    for item in sweep_items:
        _set_sweep_key(d, item)
    cfg = sweep_config_from_dict(d, path.parent, str(path))
    cfg.set = [*cfg.set, *pipeline_items]
    return cfg
