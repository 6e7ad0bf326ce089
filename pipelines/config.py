"""The Ray layer's configs: how a stage is spread over workers, and the three-stage pipeline.

* :class:`RayConfig`: workers, their resources, fault tolerance and placement.
* :class:`PipelineConfig`: a name, an output folder, a :class:`RayConfig` and the three
  stages' :class:`~dsnet.config.StageConfig`. In a pipeline YAML any stage key at top level
  is a default shared by all three stages; each stage is a mapping of its own keys or the
  path of a stage YAML (relative to the pipeline file's folder). Per stage, later wins:
  ``StageConfig`` defaults < shared top-level keys < the stage's mapping or file < ``--set``.

``--set`` items (:func:`override_pipeline`): ``supernet.epochs=3`` sets one stage,
``ray.num_workers=1`` the Ray settings, ``name=``/``output=`` the pipeline, and an undotted
stage key (``lr=0.05``) all three stages. Validation is :mod:`dsnet.utils.schema`'s, as
for a stage, and runs before Ray starts. Imports neither Ray nor torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from dsnet.config import (
    STAGES,
    ConfigError,
    StageConfig,
    check_stage_keys,
    load_stage_config,
    normalize_keys,
    set_stage_key,
    stage_config_from_dict,
)
from dsnet.utils.schema import (
    Count,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    Range,
    apply_items,
    build,
    check_fields,
    field_types,
    read_yaml,
    set_item,
    split_item,
    suggest,
)


@dataclass
class RayConfig:
    """How the Ray layer runs a stage."""

    num_workers: NonNegInt = 2  # 0 = run in-process, without Ray workers
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: NonNegFloat = 0.0  # with use_gpu, 0 = one GPU each
    max_failures: Annotated[int, Range(-1)] = 1  # -1 = retry forever
    num_to_keep: Count = 2  # checkpoints kept
    address: str | None = None  # None = start or join a local cluster
    # how often Ray Train's controller polls the workers: also how soon it sees a worker
    # group up, so a short interval cuts each stage's start-up (Ray's default: 2 s)
    health_check_interval_s: PositiveFloat = 0.1
    min_free_mb: NonNegFloat = 200.0  # free disk space the output folder needs before a run
    # how Ray places the workers: PACK fills a node first, SPREAD one per node where it can
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


@dataclass
class PipelineConfig:
    """The three-stage job: supernet training, BN recalibration, gate training."""

    name: str | None = None
    output: str = "results"
    ray: RayConfig = field(default_factory=RayConfig)
    stages: dict[str, StageConfig] = field(
        default_factory=lambda: {s: StageConfig(stage=s) for s in STAGES})


def _check_gpu_share(cfg: RayConfig) -> None:
    """Several GPU workers need whole GPUs each (``gpus_per_worker: 0`` means one): a
    fraction lets Ray put two ranks on one GPU, and NCCL refuses a group like that."""
    gpus = cfg.gpus_per_worker
    if not cfg.use_gpu or cfg.num_workers <= 1 or gpus == 0:
        return
    if gpus < 1 or gpus != int(gpus):
        raise ConfigError(
            f"key 'gpus_per_worker' must be a whole number of GPUs (0 = one each) with "
            f"use_gpu and {cfg.num_workers} workers, got {gpus!r}: a fraction lets Ray put "
            "two workers on one GPU and NCCL refuses two ranks on the same GPU; use "
            "gpus_per_worker: 1 or num_workers: 1")


def validate_ray(cfg: RayConfig) -> RayConfig:
    """Check types, ranges and the GPU share of a Ray config; returns it. Raises ConfigError."""
    check_fields(cfg)
    _check_gpu_share(cfg)
    return cfg


def ray_config_from_dict(d: Mapping[str, Any] | None, *, source: str = "ray") -> RayConfig:
    """Build and validate a RayConfig from a mapping (None = all defaults)."""
    if d is not None and not isinstance(d, Mapping):
        raise ConfigError(f"{source}: 'ray' must be a mapping, got {type(d).__name__}")
    where = f"{source} [ray]"
    return build(RayConfig, normalize_keys(d or {}, where), where, check=_check_gpu_share)


# ----------------------------------------------------------------------------- pipeline


def _stage_entry(slot: str, entry: Any, base_dir: Path, source: str) -> tuple[dict, str]:
    """A pipeline's stage entry (mapping, path or None) as normalized keys and its source."""
    if entry is None:
        return {}, f"{source} [{slot}]"
    if isinstance(entry, str | Path):
        path = base_dir / entry
        if not path.is_file():
            raise ConfigError(f"{source}: stage '{slot}' file not found: {path}")
        where = f"{path} (stage '{slot}')"
        return normalize_keys(read_yaml(path), where), where
    if isinstance(entry, Mapping):
        where = f"{source} [{slot}]"
        return normalize_keys(entry, where), where
    raise ConfigError(f"{source}: stage '{slot}' must be a mapping of stage keys or the path "
                      f"of a stage YAML, got {entry!r}")


def _unknown_stage(source: str, slot: str) -> ConfigError:
    return ConfigError(f"{source}: unknown stage '{slot}'{suggest(slot, STAGES)} "
                       f"(a pipeline has exactly {', '.join(STAGES)})")


def _stage_entries(d: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The three stage entries, from top-level slots and/or a ``stages:`` mapping."""
    nested = d.get("stages") or {}
    if not isinstance(nested, Mapping):
        raise ConfigError(f"{source}: 'stages' must be a mapping of {', '.join(STAGES)}")
    for slot in nested:
        if slot not in STAGES:
            raise _unknown_stage(source, slot)
    twice = [s for s in STAGES if s in d and s in nested]
    if twice:
        raise ConfigError(f"{source}: stage '{twice[0]}' is given both at top level and "
                          f"under 'stages'; keep one")
    entries = {**nested, **{s: d[s] for s in STAGES if s in d}}
    missing = [s for s in STAGES if s not in entries]
    if missing:
        raise ConfigError(f"{source}: the pipeline is missing stage(s) {', '.join(missing)}; "
                          f"add e.g. '{missing[0]}: {{}}' (a mapping) or a stage YAML path")
    return entries


def _shared_keys(d: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The top-level stage keys (defaults of all three stages), checked to be stage keys."""
    own = list(field_types(PipelineConfig))
    shared = {k: v for k, v in d.items() if k not in own and k not in STAGES}
    stage_keys = field_types(StageConfig)
    for key, value in shared.items():
        looks_like_stage = isinstance(value, Mapping) or str(value).endswith((".yml", ".yaml"))
        if key not in stage_keys and looks_like_stage:
            raise _unknown_stage(source, key)
    check_stage_keys(shared, source, also=own)
    return shared


def pipeline_config_from_dict(d: Mapping[str, Any], base_dir: str | Path = ".", *,
                              source: str = "pipeline config") -> PipelineConfig:
    """Build and validate a PipelineConfig from a mapping.

    Args:
        d: ``name``, ``output``, ``ray``, the three stages (top-level ``supernet:``,
            ``reset_bn:``, ``gate:`` or a ``stages:`` mapping of them) and any stage keys
            shared by all stages.
        base_dir: folder that relative stage YAML paths are resolved against.
        source: what to name in error messages (a file path).

    Returns:
        The validated config; each stage's ``stage`` is its slot name.

    Raises:
        ConfigError: missing or unknown stage, unknown key, wrong type or range.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping, got {type(d).__name__}")
    d = normalize_keys(d, source)
    entries = _stage_entries(d, source)
    shared = _shared_keys(d, source)
    stages = {}
    for slot in STAGES:
        own, where = _stage_entry(slot, entries[slot], Path(base_dir), source)
        stages[slot] = stage_config_from_dict({**shared, **own, "stage": slot}, source=where)
    top = {k: d[k] for k in ("name", "output") if k in d}
    return build(PipelineConfig, {**top, "stages": stages,
                                  "ray": ray_config_from_dict(d.get("ray"), source=source)},
                 source)


def _override(d: dict[str, Any], item: str) -> None:
    """Apply one ``--set`` item to the dict form of a PipelineConfig."""
    key, raw = split_item(item)
    head, _, rest = key.removeprefix("stages.").partition(".")
    if rest and head in STAGES:
        set_stage_key(d["stages"][head], rest, raw, item)
    elif rest and head == "ray":
        set_item(d["ray"], RayConfig, rest, raw, item, what="ray key")
    elif rest:
        raise ConfigError(f"override {item!r}: unknown section '{head}'; use one of "
                          f"{', '.join(STAGES)}, ray, or no prefix for all stages")
    elif key in ("name", "output"):
        set_item(d, PipelineConfig, key, raw, item)
    else:
        for slot in STAGES:
            set_stage_key(d["stages"][slot], key, raw, item)


def override_pipeline(cfg: PipelineConfig, overrides: Sequence[str]) -> PipelineConfig:
    """Apply ``KEY=VALUE`` items (see the module docstring), then validate.

    All-or-nothing: ``cfg`` is updated in place only when every item is valid.

    Returns:
        ``cfg``, updated.

    Raises:
        ConfigError: a malformed item, unknown key, wrong type or invalid result.
    """
    return apply_items(cfg, overrides, _override,
                       lambda d, source: pipeline_config_from_dict(d, source=source))


def load_pipeline_config(path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Load a pipeline YAML (stage paths relative to its folder), then apply overrides.

    Args:
        path: the pipeline YAML; its ``name`` defaults to the file's stem.
        overrides: ``KEY=VALUE`` items (see :func:`override_pipeline`).

    Returns:
        The validated config.

    Raises:
        ConfigError: see :func:`pipeline_config_from_dict` and :func:`override_pipeline`.
    """
    d = read_yaml(path)
    d.setdefault("name", Path(path).stem)
    cfg = pipeline_config_from_dict(d, Path(path).parent, source=str(path))
    return override_pipeline(cfg, overrides)


def load_stage_command(path: str | Path, overrides: Sequence[str],
                       stage: str) -> tuple[StageConfig, RayConfig]:
    """A single-stage command's configs: the stage YAML (``stage`` forced) with its
    ``--set`` items, and the Ray settings from the ``ray.KEY=VALUE`` ones."""
    ray_d: dict[str, Any] = {}
    stage_items = []
    for item in overrides:
        key, raw = split_item(item)
        if key.startswith("ray."):
            set_item(ray_d, RayConfig, key.removeprefix("ray."), raw, item, what="ray key")
        else:
            stage_items.append(item)
    ray_cfg = ray_config_from_dict(ray_d, source="--set")
    return load_stage_config(path, stage_items, stage=stage), ray_cfg


__all__ = [
    "PipelineConfig", "RayConfig", "load_pipeline_config", "load_stage_command",
    "override_pipeline", "pipeline_config_from_dict", "ray_config_from_dict", "validate_ray",
]


def absolute_input_paths(stages: dict[str, StageConfig]) -> dict[str, StageConfig]:
    """Existing relative ``data``/``resume`` paths made absolute (in place; returned): Ray
    Train workers run in a session folder of their own, not in the driver's directory."""
    for cfg in stages.values():
        for key in ("data", "resume"):
            value = getattr(cfg, key)
            if value and not Path(value).is_absolute() and Path(value).exists():
                setattr(cfg, key, str(Path(value).resolve()))
    return stages
