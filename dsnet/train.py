"""Single-process command: the three stages in this process, no Ray.

    python -m dsnet.train [-c configs/default.yml] [--output DIR] [--name NAME]
                          [--stages supernet,reset_bn,gate] [--set key=value ...]

Each stage writes ``<output>/<name>/<stage>/checkpoint.pt`` after every epoch and hands
it to the next stage; the results (tables, plot, final checkpoint) go to
``<output>/<name>/results/``. The Ray pipeline (``python -m pipelines.full``) runs the
same library code on Ray Train workers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dsnet.config import PipelineConfig, load_pipeline_config
from dsnet.engine import (
    STAGE_ORDER,
    CheckpointHook,
    ConsoleHook,
    StageResult,
    run_stage,
    validation_images,
)
from dsnet.evaluate import format_table, write_results

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsnet.train", description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", default=str(DEFAULT_CONFIG), help="pipeline YAML")
    p.add_argument("--output", default=None, help="output folder (default: config's)")
    p.add_argument("--name", default=None, help="run name (default: config's)")
    p.add_argument("--stages", default=",".join(STAGE_ORDER),
                   help="comma-separated stages to run, in order")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key (repeatable)")
    return p.parse_args(argv)


def run_pipeline_in_process(cfg: PipelineConfig, run_dir: Path,
                            stages: list[str]) -> StageResult:
    """Run ``stages`` in order, chaining each stage's checkpoint into the next."""
    previous, result = None, None
    for stage in stages:
        t0 = time.perf_counter()
        folder = run_dir / stage
        result = run_stage(cfg.stages[stage], hooks=[ConsoleHook(), CheckpointHook(folder)],
                           init_from=previous)
        previous = folder / "checkpoint.pt"
        print(f"[{stage}] done in {time.perf_counter() - t0:.1f}s -> {previous}", flush=True)
    if result is not None and result.subnets:
        write_results(run_dir / "results", result, previous,
                      validation_images(cfg.stages[stages[-1]]))
        print(format_table(result.subnets, result.dynamic))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_pipeline_config(args.config, args.overrides)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        print(f"error: unknown stage(s) {unknown}; choose from {list(STAGE_ORDER)}",
              file=sys.stderr)
        return 2
    run_dir = Path(args.output or cfg.output) / (args.name or cfg.name or "run")
    run_pipeline_in_process(cfg, run_dir, stages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
