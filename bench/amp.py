"""Mixed precision against float32: the tiny config's supernet stage, trained both ways.

Run from the repository root::

    .venv/bin/python bench/amp.py                 # 3 epochs each, ~3 minutes on 2 CPU cores
    .venv/bin/python bench/amp.py --epochs 1 --device cuda

Trains Stage I of ``dsnet/configs/tiny.yml`` in this process (no Ray) twice from the same seed,
``amp: false`` and ``amp: true`` (bfloat16 on CPU, float16 + GradScaler on CUDA), and
reports each run's final loss, the largest and the smallest subnet's top-1, wall time and
training throughput. Goal: the loss stays finite and the largest network's top-1 is within
1 point of float32's. One epoch is too short to judge: two float32 runs with different
seeds already differ by ~3 points after one epoch on this config, so the default is 3.

Output: a table on stdout and ``bench/out/amp.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from dsnet.config import apply_overrides
from dsnet.configs import CONFIG_DIR
from dsnet.train.engine import run_stage
from dsnet.utils.atomic import atomic_write_text
from pipelines.config import load_pipeline_config

ROOT = Path(__file__).resolve().parents[1]


def train_once(amp: bool, epochs: int, device: str) -> dict:
    """One supernet run of the tiny config; its final metrics and wall time."""
    cfg = load_pipeline_config(CONFIG_DIR / "tiny.yml").stages["supernet"]
    apply_overrides(cfg, [f"amp={str(amp).lower()}", f"epochs={epochs}", f"device={device}"])
    t0 = time.perf_counter()
    metrics = run_stage(cfg).metrics
    return {"amp": amp, "loss": metrics["loss"], "top1": metrics["top1"],
            "top1_smallest": metrics["top1_smallest"], "img_per_s": metrics["img_per_s"],
            "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args(argv)
    runs = [train_once(amp, args.epochs, args.device) for amp in (False, True)]
    fp32, amp = runs
    result = {"epochs": args.epochs, "device": args.device, "runs": runs,
              "top1_gap": amp["top1"] - fp32["top1"],
              "finite": all(math.isfinite(r["loss"]) for r in runs)}
    result["goal_met"] = result["finite"] and abs(result["top1_gap"]) <= 1.0
    for r in runs:
        print(f"amp={r['amp']!s:5} loss {r['loss']:.4f} top1 {r['top1']:.2f} "
              f"smallest {r['top1_smallest']:.2f} img/s {r['img_per_s']:.0f} "
              f"wall {r['wall_s']:.0f}s")
    print(f"top-1 gap {result['top1_gap']:+.2f} (goal |gap| <= 1): "
          f"{'met' if result['goal_met'] else 'NOT met'}")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "amp.json", json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
