"""The pipeline commands' plan, checks and execution (``pipelines.full`` and the
single-stage commands); parsing, signals and exit codes are :mod:`pipelines.command`'s.

Everything that can be checked without Ray (arguments, configs, input files) is checked
before Ray starts. Exit codes (:data:`PIPELINE_ERRORS`):

* 2: usage or configuration (bad flag, unknown ``--set`` key, missing config file or
  input checkpoint, a resource request the cluster can never meet, an output folder
  that cannot be written or whose disk has less than ``ray.min_free_mb`` free, remote
  storage that this machine or a node cannot reach or write);
* 1: a runtime failure (a stage failed: the failing workers' errors are summarised);
* 130: interrupted (Ctrl-C or SIGTERM); the message gives the command that resumes.
"""

from __future__ import annotations

import argparse
import functools
import posixpath
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from dsnet.config import ConfigError, StageConfig
from dsnet.configs import CONFIG_DIR, find_config
from dsnet.data.datasets import DataError, check_num_classes, dataset_num_classes
from dsnet.eval.evaluate import format_table, write_results
from dsnet.models.checkpoint import CheckpointError, read_checkpoint
from dsnet.models.registry import create_model
from dsnet.train.engine import check_stage_order, validation_images
from dsnet.train.stages import routing_space_for
from pipelines.command import (
    EXIT_OK,
    CommandParser,
    ErrorKinds,
    UsageError,
    add_debug_option,
    add_set_option,
    run_main,
)
from pipelines.config import (
    RayConfig,
    absolute_input_paths,
    load_pipeline_config,
    load_stage_command,
    validate_ray,
)
from pipelines.run_record import RunRecord
from pipelines.runtime import (
    RaySession,
    ResourceError,
    attaching,
    autoscaling_from_env,
    check_local_cpus,
    check_local_gpu,
    check_output_dir,
)
from pipelines.stage import StageFailed, error_summary, run_stages
from pipelines.storage import RunStorage, StorageError

DEFAULT_CONFIG = CONFIG_DIR / "default.yml"
# Datasets read from ``data``; the others are built in memory.
_FOLDER_DATASETS = ("imagenet", "imagefolder", "cifar10", "cifar100")
# exit 2: found before anything runs; exit 1: a stage failed (workers' errors summarised)
PIPELINE_ERRORS = ErrorKinds(usage=(ConfigError, ResourceError, StorageError),
                             failure=(DataError, CheckpointError, StageFailed),
                             describe=error_summary)


@dataclass
class Plan:
    """What a command will run: the stages in order, Ray settings, and where.

    ``autoscaling``: the cluster's autoscaler can add nodes (``--autoscaling`` or
    ``DSNET_AUTOSCALING=1``), so a shortfall warns instead of failing: a property of the
    cluster, not of the job (Ray has no public API to detect an autoscaler).
    """

    stages: dict[str, StageConfig]
    ray: RayConfig
    storage: RunStorage
    autoscaling: bool = False


# ----------------------------------------------------------------------------- parsers


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", metavar="DIR|URI",
                   help="parent of run folders: a local folder or a URI such as "
                        "s3://bucket/prefix (default: the config's output)")
    p.add_argument("--name", help="run folder name; re-using one resumes that run")
    p.add_argument("--num-workers", type=int, metavar="N",
                   help="Ray Train workers per stage (0 = in-process, no Ray)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--autoscaling", action="store_true",
                   help="the cluster's autoscaler can add nodes: warn, not fail, when it is "
                        "too small now (also DSNET_AUTOSCALING=1)")
    add_set_option(p)
    add_debug_option(p)


def full_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m pipelines.full``."""
    p = CommandParser(prog="python -m pipelines.full",
                description="DS-Net's three stages (supernet -> reset_bn -> gate) on Ray.")
    p.add_argument("-c", "--config", default=str(DEFAULT_CONFIG), type=find_config,
                   help="pipeline YAML, a path or a shipped config's name such as 'tiny' "
                        "(default: dsnet/configs/default.yml)")
    p.add_argument("--data", metavar="PATH", help="dataset folder, for every stage")
    _add_common(p)
    return p


def stage_parser(stage: str) -> argparse.ArgumentParser:
    """The parser of ``python -m pipelines.<stage>`` (the authors' command line)."""
    p = CommandParser(prog=f"python -m pipelines.{stage}",
                description=f"DS-Net's {stage} stage on Ray (the authors' YAMLs work as-is).")
    p.add_argument("-c", "--config", required=True, type=find_config,
                   help="stage YAML: a path or a shipped config's name")
    p.add_argument("data", nargs="?", metavar="DATA_PATH", help="dataset folder")
    p.add_argument("--resume", metavar="CKPT",
                   help="input checkpoint (the previous stage's, or the authors' release)")
    _add_common(p)
    return p


# ----------------------------------------------------------------------------- plans


def _ray_from_flags(ray_cfg: RayConfig, args: argparse.Namespace) -> RayConfig:
    if args.num_workers is not None:
        ray_cfg.num_workers = args.num_workers
    if args.use_gpu:
        ray_cfg.use_gpu = True
    return validate_ray(ray_cfg)


def _autoscaling(args: argparse.Namespace) -> bool:
    """``--autoscaling``, or ``DSNET_AUTOSCALING`` for jobs whose command line is fixed."""
    return bool(args.autoscaling) or autoscaling_from_env()


def plan_full(args: argparse.Namespace, filesystem: pafs.FileSystem | None = None) -> Plan:
    """Load the pipeline config with ``--set`` and the flags applied (``filesystem``: the
    run folder's, for ``--output`` paths inside it)."""
    cfg = load_pipeline_config(args.config, args.overrides)
    if args.data is not None:
        for stage in cfg.stages.values():
            stage.data = args.data
    name = args.name or cfg.name or time.strftime("%Y%m%d-%H%M%S")
    storage = RunStorage.resolve(args.output or cfg.output, name, filesystem)
    return Plan(absolute_input_paths(dict(cfg.stages)), _ray_from_flags(cfg.ray, args), storage,
                _autoscaling(args))


def plan_single(stage: str, args: argparse.Namespace,
                filesystem: pafs.FileSystem | None = None) -> Plan:
    """Load one stage's YAML (``stage`` forced), DATA_PATH and ``--resume`` applied."""
    cfg, ray_cfg = load_stage_command(args.config, args.overrides, stage)
    if args.data is not None:
        cfg.data = args.data
    if args.resume is not None:
        cfg.resume = args.resume
    name = args.name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = RunStorage.resolve(args.output or "results", name, filesystem)
    return Plan(absolute_input_paths({stage: cfg}), _ray_from_flags(ray_cfg, args), storage,
                _autoscaling(args))


def check_inputs(plan: Plan) -> None:
    """Checks that need no Ray: input checkpoint, data folders, a local GPU if asked, and
    last (it creates the run folder) a writable output folder with enough free space."""
    first = next(iter(plan.stages.values()))
    if first.resume:
        check_input_checkpoint(first)
    if first.stage != "supernet" and not first.resume:
        raise UsageError(f"the {first.stage} stage needs the previous stage's checkpoint: "
                         "pass --resume CKPT or set resume: in the config")
    address = plan.ray.address
    for cfg in plan.stages.values():
        local = plan.ray.num_workers == 0 or not attaching(address)
        needs = cfg.dataset in _FOLDER_DATASETS and not cfg.download
        if local and needs and not cfg.data:
            raise UsageError(f"{cfg.stage}: dataset {cfg.dataset} needs a data folder: "
                             "pass --data PATH (single stages: DATA_PATH) or set data:")
        if local and needs and not Path(cfg.data).exists():
            raise UsageError(f"{cfg.stage}: data folder {cfg.data} does not exist")
        if local or cfg.dataset not in _FOLDER_DATASETS:  # else the folder is the cluster's
            check_data(cfg)
    check_models(plan.stages)
    check_local_cpus(plan.ray, address, plan.stages)
    check_local_gpu(plan.ray, address)
    check_output(plan)


def check_output(plan: Plan) -> None:
    """The run folder: a local one writable with enough free space; remote storage
    reachable and writable from here (each node is probed once Ray is up)."""
    storage = plan.storage
    if storage.is_local:
        check_output_dir(Path(storage.root), plan.ray.min_free_mb)
        return
    if plan.ray.num_workers == 0:
        raise UsageError(f"--output {storage}: ray.num_workers 0 runs in this process and "
                         "writes a local folder; pass a local --output or --num-workers 1")
    storage.check_writable()


def check_data(cfg: StageConfig) -> None:
    """A folder dataset's layout, and ``num_classes`` against the data's classes, without
    reading an image: a wrong folder or count should not wait for the stage to start."""
    try:
        classes = dataset_num_classes(cfg.dataset, cfg.data)
        if classes is not None:
            check_num_classes(cfg.num_classes, cfg.dataset, classes)
    except DataError as e:
        raise UsageError(f"{cfg.stage}: {e}") from None


def check_input_checkpoint(cfg: StageConfig) -> dict[str, Any]:
    """Read the first stage's input checkpoint now: a missing, truncated or foreign file, or
    one of a later stage, should not wait for Ray's start-up (or a queue) to be found out.

    Returns:
        The checkpoint, as :func:`dsnet.models.checkpoint.read_checkpoint` returns it.

    Raises:
        UsageError: naming the file and what is wrong with it.
    """
    path = Path(cfg.resume)
    if not path.is_file():
        raise UsageError(f"input checkpoint not found: {path} (--resume / resume:)")
    try:
        ckpt = read_checkpoint(path)
        check_stage_order(cfg.stage, ckpt, path)
    except CheckpointError as e:
        raise UsageError(f"input checkpoint: {e}") from None
    return ckpt


def check_models(stages: dict[str, StageConfig]) -> None:
    """Model names, and subnet indices against the model's width list, before any stage
    runs: the gate stage would otherwise find a bad ``start_chn_idx`` after hours of
    supernet training. Builds each model once (well under a second)."""
    num_subnets: dict[str, int] = {}
    for cfg in stages.values():
        try:
            if cfg.model not in num_subnets:
                num_subnets[cfg.model] = create_model(cfg.model).num_subnets
            n = num_subnets[cfg.model]
            if cfg.stage == "gate":
                routing_space_for(cfg, n)
        except ValueError as e:
            raise UsageError(f"{cfg.stage}: {e}") from None
        bad = [c for c in (cfg.eval_subnets if isinstance(cfg.eval_subnets, list) else [])
               if not 0 <= c < n]
        if bad:
            raise UsageError(f"{cfg.stage}: eval_subnets {bad} outside the model's subnets "
                             f"0-{n - 1}")


# ----------------------------------------------------------------------------- running


def execute(plan: Plan, command: Sequence[str], log: Callable[[str], None] = print) -> RunRecord:
    """Run the plan's stages in its run folder, write ``results/`` and print a summary."""
    record = RunRecord.open(plan.storage, plan.stages, plan.ray, command)
    log(f"run folder: {plan.storage}")
    with RaySession(plan.ray, stages=plan.stages, autoscaling=plan.autoscaling,
                    storage=plan.storage) as session:
        last = run_stages(record, plan.stages, plan.ray, session, log)
    if "gate" in plan.stages:
        _write_results(record, last, plan.stages["gate"])
    log(summary(record))
    return record


def _write_results(record: RunRecord, final_ckpt: str, gate_cfg: StageConfig) -> None:
    """``results/`` from the gate stage (again only if it re-ran or files are missing);
    on remote storage written here, then uploaded."""
    storage = record.storage
    results = storage.path("results")
    gate = record.stage("gate")
    stale = record.data.get("results_from") != gate.get("checkpoint_sha256")
    if not stale and storage.is_file(posixpath.join(results, "dsnet_final.pt")):
        return
    with storage.local_copy(final_ckpt) as ckpt, tempfile.TemporaryDirectory() as tmp:
        folder = Path(results) if storage.is_local else Path(tmp) / "results"
        write_results(folder, gate.get("result") or {}, ckpt, validation_images(gate_cfg))
        if not storage.is_local:
            storage.upload_dir(folder, results)
    record.data.update(results=storage.ref(results), results_from=gate.get("checkpoint_sha256"))
    record.save()


def summary(record: RunRecord) -> str:
    """Per-stage status table, then the last stage's subnet/dynamic table."""
    lines = [f"{'stage':<9} {'status':<8} {'wall s':>8} {'top1':>7}  checkpoint"]
    table = ""
    for name, rec in record.data["stages"].items():
        metrics = rec.get("metrics") or {}
        top1 = metrics.get("top1")
        lines.append(f"{name:<9} {rec.get('status', '?'):<8} {rec.get('wall_s', 0):>8.1f} "
                     f"{'' if top1 is None else f'{top1:.2f}':>7}  {rec.get('checkpoint', '')}")
        result = rec.get("result") or {}
        if result.get("subnets"):
            table = format_table(result["subnets"], result.get("dynamic"))
    return "\n".join(lines + ([table] if table else []))


# ----------------------------------------------------------------------------- commands


def run_command(prog: str, argv: Sequence[str] | None,
                plan_fn: Callable[[argparse.Namespace], Plan],
                parser: argparse.ArgumentParser) -> int:
    """Parse, plan, check and execute a pipeline command; returns its exit code."""
    planned: list[Plan] = []

    def body(args: list[str]) -> int:
        planned.append(plan_fn(parser.parse_args(args)))
        check_inputs(planned[0])
        execute(planned[0], [*prog.split(), *args])
        return EXIT_OK

    return run_main(prog, argv, body, PIPELINE_ERRORS,
                    resume_name=lambda: planned[0].storage.name if planned else None)


def main_single_stage(stage: str, argv: Sequence[str] | None = None,
                      storage_filesystem: pafs.FileSystem | None = None) -> int:
    """Entry point of ``python -m pipelines.<stage>``; returns the exit code.
    ``storage_filesystem``: see :func:`main_full`."""
    return run_command(f"python -m pipelines.{stage}", argv,
                       lambda args: plan_single(stage, args, storage_filesystem),
                       stage_parser(stage))


def main_full(argv: Sequence[str] | None = None,
              storage_filesystem: pafs.FileSystem | None = None) -> int:
    """Entry point of ``python -m pipelines.full``; returns the exit code.

    ``storage_filesystem``: a pyarrow filesystem to keep run folders on (Ray Train's
    ``RunConfig(storage_filesystem=...)``), ``--output`` then being a path inside it.
    """
    return run_command("python -m pipelines.full", argv,
                       functools.partial(plan_full, filesystem=storage_filesystem),
                       full_parser())


__all__ = ["PIPELINE_ERRORS", "Plan", "check_data", "check_input_checkpoint", "check_inputs",
           "check_models", "execute", "full_parser", "main_full", "main_single_stage",
           "plan_full", "plan_single", "run_command", "stage_parser", "summary"]
