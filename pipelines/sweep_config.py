"""Sweep configuration: the sweep YAML's typed schema, its validation and ``--set`` routing.

A sweep file (``dsnet/configs/sweep_default.yml``) names a base pipeline YAML, overrides of it,
the Ray settings of each trial, the search (grid | random | optuna), ASHA early stopping
and the ``space``: ``STAGE.KEY: {DIST: ARGS}``. :func:`load_sweep_config` reads and checks it
all in one place, before any Ray work, with the validator of every config
(:mod:`dsnet.utils.schema`: unknown keys with a suggestion, types, ranges, choices). Used by
:mod:`pipelines.sweep`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from dsnet.config import ConfigError
from dsnet.configs import CONFIG_DIR
from dsnet.utils.schema import (
    Count,
    NonNegFloat,
    NonNegInt,
    Range,
    build,
    check_known,
    coerce,
    field_types,
    read_yaml,
    set_item,
    split_item,
    suggest,
)
from pipelines.config import RayConfig

SearchKind = Literal["grid", "random", "optuna"]
DistKind = Literal["grid", "choice", "uniform", "loguniform"]
DISTRIBUTIONS: tuple[str, ...] = get_args(DistKind)


# ----------------------------------------------------------------------------- config


@dataclass
class Dist:
    """One dimension of the search space: ``kind`` and its values or ``[low, high]``."""

    kind: DistKind
    values: list[Any]

    @property
    def finite(self) -> bool:
        """Whether the dimension has a finite list of values (grid or choice)."""
        return self.kind in ("grid", "choice")


@dataclass
class AshaConfig:
    """ASHA early stopping on ``score = top1 - madds_weight * madds / gate.madds_unit``."""

    enabled: bool = False
    grace_period: Count = 1
    reduction_factor: Annotated[float, Range(1, open_low=True)] = 2.0
    max_t: Count | None = None  # None = the gate's epochs + 1 (one report per epoch + final)
    madds_weight: NonNegFloat = 1.0  # top-1 points traded for one madds_unit of mean MAdds


@dataclass
class SweepConfig:
    """A validated sweep YAML (paths resolved)."""

    name: str | None = None
    output: str = "results"
    pipeline: str = str(CONFIG_DIR / "default.yml")
    set: list[str] = field(default_factory=list)
    # RayConfig keys of each trial, over the pipeline's own
    ray: dict[str, Any] = field(default_factory=dict)
    search: SearchKind = "grid"
    num_samples: Count = 1
    max_concurrent: Count | None = None  # None = as many as the free CPUs hold
    seed: NonNegInt = 0
    asha: AshaConfig = field(default_factory=AshaConfig)
    space: dict[str, Dist] = field(default_factory=dict)


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


def _trial_ray(d: Any, where: str) -> dict[str, Any]:
    """The sweep's ``ray`` mapping, each key a RayConfig key of the right type and range
    (the GPU-share rule is checked on the merged config, in :mod:`pipelines.sweep`)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: 'ray' must be a mapping of RayConfig keys, got {d!r}")
    fields = field_types(RayConfig)
    check_known(d, list(fields), f"{where} [ray]")
    try:
        return {k: coerce(k, v, fields[k]) for k, v in d.items()}
    except ConfigError as e:
        raise ConfigError(f"{where} [ray]: {e}") from None


def sweep_config_from_dict(d: Mapping[str, Any], base_dir: Path, where: str) -> SweepConfig:
    """Validate a sweep mapping (see the module docstring); ``pipeline`` is resolved against
    ``base_dir``. Raises ConfigError with the offending key."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping of sweep keys, got {type(d).__name__}")
    check_known(d, list(field_types(SweepConfig)), where)
    # an empty section in the YAML (``set:``, ``asha:``) means its default
    d = {k: v for k, v in d.items() if not (v is None and k in ("set", "ray", "asha"))}
    space = d.get("space")
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(f"{where}: 'space' must be a non-empty mapping of STAGE.KEY: "
                          f"{{DIST: ARGS}}, e.g. 'gate.complexity_weight: {{grid: [0.1, 1]}}'")
    d["space"] = {str(k): parse_dist(str(k), v, where) for k, v in space.items()}
    d["ray"] = _trial_ray(d.get("ray", {}), where)
    cfg = build(SweepConfig, {"pipeline": "default.yml", **d}, where)
    cfg.pipeline = str((base_dir / cfg.pipeline).resolve())
    return cfg


def _split_set(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--set`` items for the sweep (its own keys, ``ray.``, ``asha.``, ``space.``) and
    for the pipeline (``pipeline.KEY`` with the prefix removed, or any other key)."""
    sweep_items, pipeline_items = [], []
    own = set(field_types(SweepConfig)) - {"set"}
    for item in items:
        head, dot, _ = split_item(item)[0].partition(".")
        if head == "pipeline" and dot:
            pipeline_items.append(item.split(".", 1)[1])
        elif head in own:
            sweep_items.append(item)
        else:
            pipeline_items.append(item)
    return sweep_items, pipeline_items


def load_sweep_config(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep YAML, apply the sweep's ``--set`` items and validate.

    The pipeline overrides among ``overrides`` are appended to the config's ``set`` list.
    """
    path = Path(path)
    d = dict(read_yaml(path))
    d.setdefault("name", path.stem)
    sweep_items, pipeline_items = _split_set(overrides)
    for item in sweep_items:
        set_item(d, SweepConfig, *split_item(item), item)
    cfg = sweep_config_from_dict(d, path.parent, str(path))
    cfg.set = [*cfg.set, *pipeline_items]
    return cfg


__all__ = ["AshaConfig", "DISTRIBUTIONS", "Dist", "SweepConfig", "load_sweep_config",
           "parse_dist", "sweep_config_from_dict"]
