"""A sweep's plan: the sweep YAML, its base pipeline and the flags, resolved and checked
before Ray starts (:func:`make_plan`). Both the sweep runner (:mod:`pipelines.sweep`) and its
results (:mod:`pipelines.sweep_results`) read the :class:`SweepPlan`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsnet.config import STAGES, ConfigError, StageConfig, config_to_dict
from dsnet.train.stages import recorded_subnet_table
from dsnet.utils.provenance import to_builtins
from dsnet.utils.schema import field_value, suggest
from pipelines.cli import check_input_checkpoint
from pipelines.command import UsageError
from pipelines.config import (
    PipelineConfig,
    RayConfig,
    absolute_input_paths,
    load_pipeline_config,
    override_pipeline,
    ray_config_from_dict,
)
from pipelines.storage import is_uri
from pipelines.sweep_config import Dist, SweepConfig, load_sweep_config

SUPERNET_STAGES = ("supernet", "reset_bn")  # space keys of these define the shared supernet


def override_item(key: str, value: Any) -> str:
    """``KEY=VALUE`` for :func:`pipelines.config.override_pipeline` (JSON is valid YAML)."""
    return f"{key}={json.dumps(to_builtins(value))}"


def _check_space_values(space: Mapping[str, Dist], pipeline: PipelineConfig,
                        supernet_given: bool) -> None:
    """Every value of the space applied to a copy of the pipeline, as ``--set`` would."""
    for key, dist in space.items():
        stage, _, field_name = key.partition(".")
        if stage not in STAGES or not field_name:
            raise ConfigError(f"space '{key}': keys are STAGE.KEY with STAGE one of "
                              f"{', '.join(STAGES)}{suggest(stage, STAGES)}, e.g. "
                              "'gate.complexity_weight'")
        if supernet_given and stage in SUPERNET_STAGES:
            raise ConfigError(f"space '{key}': --supernet gives a trained supernet; drop the "
                              f"{stage} keys from the space or omit --supernet")
        if stage in SUPERNET_STAGES and not dist.finite:
            raise ConfigError(f"space '{key}': supernet keys need a finite list (grid or "
                              f"choice): each distinct supernet is trained before the trials")
        for value in dist.values:  # grid/choice values, or the bounds
            try:
                override_pipeline(copy.deepcopy(pipeline), [override_item(key, value)])
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
    # The static subnets' table that --supernet's BN recalibration wrote into it (None: an
    # older checkpoint, or none given): the curve the trials' gates are compared with.
    supernet_subnets: list[dict[str, Any]] | None = None

    @property
    def tune_dir(self) -> Path:
        """Tune's experiment folder (its presence means: resume)."""
        return self.sweep_dir / "tune"


def make_plan(args: argparse.Namespace, command: Sequence[str]) -> SweepPlan:
    """Load and check the sweep config with the flags applied (no Ray)."""
    cfg = load_sweep_config(args.config, args.overrides)
    if args.num_samples is not None:
        cfg.num_samples = field_value(SweepConfig, "num_samples", args.num_samples,
                                      "--num-samples")
    if args.max_concurrent is not None:
        cfg.max_concurrent = field_value(SweepConfig, "max_concurrent", args.max_concurrent,
                                         "--max-concurrent")
    pipeline = load_pipeline_config(cfg.pipeline, cfg.set)
    absolute_input_paths(pipeline.stages)
    supernet = None
    if args.supernet:
        supernet = str(Path(args.supernet).resolve())
        if not Path(supernet).is_file():
            raise UsageError(f"supernet checkpoint not found: {args.supernet} (--supernet)")
    _check_space_values(cfg.space, pipeline, supernet is not None)
    _check_search(cfg)
    subnets = None
    if supernet:  # read now: a damaged or later-stage file should not wait for Ray
        ckpt = check_input_checkpoint(dataclasses.replace(pipeline.stages["gate"],
                                                          resume=supernet))
        subnets = recorded_subnet_table(ckpt, pipeline.stages["gate"])
        if subnets is None:
            print(f"note: {args.supernet} records no subnet table of this sweep's validation "
                  "set; the static curve comes from the trials' own tables", file=sys.stderr)
    trial_ray = ray_config_from_dict({**config_to_dict(pipeline.ray), **cfg.ray},
                                     source=str(args.config))
    name = args.name or cfg.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    output = args.output or cfg.output
    if is_uri(output):
        raise UsageError(f"--output {output}: a sweep folder is local or on a shared file "
                         "system (Tune keeps its experiment state there and the driver "
                         "writes the Pareto files); pipelines.full takes URIs")
    sweep_dir = (Path(output) / name).resolve()
    return SweepPlan(cfg, pipeline, trial_ray, sweep_dir, supernet, list(command), subnets)


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
