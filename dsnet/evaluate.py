"""Evaluation: per-subnet and dynamic accuracy, MAdds, result files and the plot."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from dsnet.arch import Subnet
from dsnet.atomic import atomic_copy, atomic_write, atomic_write_text
from dsnet.distributed import DistContext
from dsnet.madds import count_madds, routing_madds


def topk_correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) bool: is the target among the top-k predictions."""
    k = min(k, logits.size(1))
    return (logits.topk(k, dim=1).indices == target.unsqueeze(1)).any(dim=1)


@torch.no_grad()
def _accumulate(batches: Iterable, forward, dist: DistContext | None,
                device: torch.device) -> dict[str, float]:
    """Sum correct counts (and extras) over batches and ranks; return percentages."""
    sums = torch.zeros(4, dtype=torch.float64)  # n, top1, top5, madds
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits, madds = forward(x)
        sums += torch.tensor([len(y), topk_correct(logits, y, 1).sum().item(),
                              topk_correct(logits, y, 5).sum().item(), float(madds.sum())],
                             dtype=torch.float64)
    if dist is not None:
        dist.all_reduce_sum_([sums])
    n = max(sums[0].item(), 1.0)
    return {"n": int(sums[0].item()), "top1": 100 * sums[1].item() / n,
            "top5": 100 * sums[2].item() / n, "madds": sums[3].item() / n}


def evaluate_subnet(model: torch.nn.Module, loader: Iterable, subnet: Subnet,
                    dist: DistContext | None = None, input_size: int | None = None) -> dict:
    """Top-1/top-5 (%) and MAdds of one static subnet (model in eval mode)."""
    device = next(model.parameters()).device
    madds = count_madds(model, subnet, input_size)
    model.eval()

    def forward(x):
        return model(x, subnet=subnet), torch.full((len(x),), float(madds))

    row = _accumulate(loader, forward, dist, device)
    return {"subnet": subnet, "madds": madds, "top1": row["top1"], "top5": row["top5"]}


def evaluate_subnets(model: torch.nn.Module, loader: Iterable, subnets: Sequence[Subnet],
                     dist: DistContext | None = None,
                     input_size: int | None = None) -> list[dict]:
    """Rows (subnet, madds, top1, top5) for every subnet, the release's table."""
    return [evaluate_subnet(model, loader, s, dist, input_size) for s in subnets]


def evaluate_dynamic(model: torch.nn.Module, loader: Iterable, dist: DistContext | None = None,
                     input_size: int | None = None) -> dict[str, Any]:
    """Dynamic top-1/top-5, mean MAdds per sample and the histogram of gate choices."""
    device = next(model.parameters()).device
    per_choice = routing_madds(model, input_size)
    counts = torch.zeros(len(model.routing_space), dtype=torch.float64)
    model.eval()

    def forward(x):
        out = model.forward_dynamic(x)
        counts.add_(out.gate_weights.sum(0).double().cpu())
        return out.logits, out.gate_weights.double().cpu() @ per_choice

    row = _accumulate(loader, forward, dist, device)
    if dist is not None:
        dist.all_reduce_sum_([counts])
    row["choices"] = {int(s): int(c) for s, c in zip(model.routing_space, counts.tolist())}
    return row


def interpolate_static(rows: Sequence[dict], madds: float) -> float:
    """Static subnets' top-1 linearly interpolated at ``madds`` (clamped to the ends)."""
    pts = sorted((r["madds"], r["top1"]) for r in rows if isinstance(r["subnet"], int))
    if madds <= pts[0][0]:
        return pts[0][1]
    for (m0, a0), (m1, a1) in zip(pts, pts[1:]):
        if madds <= m1:
            return a0 + (a1 - a0) * (madds - m0) / (m1 - m0)
    return pts[-1][1]


def plot_accuracy_madds(path: Path, subnets: Sequence[dict], dynamic: dict | None) -> None:
    """The paper's figure: static subnets' accuracy-vs-MAdds curve and the dynamic point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in subnets if isinstance(r["subnet"], int)), key=lambda r: r["madds"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["madds"] / 1e6 for r in rows], [r["top1"] for r in rows], "o-",
            label="static subnets (uniform)")
    for r in rows:
        ax.annotate(str(r["subnet"]), (r["madds"] / 1e6, r["top1"]), fontsize=7,
                    xytext=(2, -8), textcoords="offset points")
    if dynamic is not None:
        ax.plot([dynamic["madds"] / 1e6], [dynamic["top1"]], "r*", markersize=14,
                label="dynamic (gate)")
    ax.set_xlabel("MAdds (M)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    finally:
        plt.close(fig)


def write_results(results_dir: str | Path, result: Any, final_checkpoint: str | Path) -> None:
    """Write ``subnets.csv``, ``dynamic.csv``, ``accuracy_madds.png`` and ``dsnet_final.pt``.

    Args:
        results_dir: target folder (created).
        result: a :class:`dsnet.engine.StageResult` (or its dict) with ``subnets`` and
            ``dynamic``.
        final_checkpoint: the checkpoint copied to ``dsnet_final.pt``.
    """
    import pandas as pd

    results_dir = Path(results_dir)
    subnets = _field(result, "subnets") or []
    dynamic = _field(result, "dynamic")
    atomic_write_text(results_dir / "subnets.csv",
                       pd.DataFrame(subnets, columns=["subnet", "madds", "top1", "top5"])
                       .to_csv(index=False))
    if dynamic is not None:
        row = {k: dynamic[k] for k in ("top1", "top5", "madds")}
        row["choices"] = json.dumps(dynamic.get("choices", {}))
        atomic_write_text(results_dir / "dynamic.csv", pd.DataFrame([row]).to_csv(index=False))
    if subnets:
        plot_accuracy_madds(results_dir / "accuracy_madds.png", subnets, dynamic)
    atomic_copy(final_checkpoint, results_dir / "dsnet_final.pt")


def _field(result: Any, name: str) -> Any:
    return result.get(name) if isinstance(result, dict) else getattr(result, name, None)


def format_table(subnets: Sequence[dict], dynamic: dict | None = None) -> str:
    """A plain-text table of the subnets and the dynamic result."""
    lines = [f"{'subnet':>8} {'MAdds':>12} {'top1':>7} {'top5':>7}"]
    for r in subnets:
        lines.append(f"{r['subnet']!s:>8} {r['madds']:>12,.0f} {r['top1']:>7.2f} "
                     f"{r['top5']:>7.2f}")
    if dynamic is not None:
        lines.append(f"{'dynamic':>8} {dynamic['madds']:>12,.0f} {dynamic['top1']:>7.2f} "
                     f"{dynamic['top5']:>7.2f}  choices {dynamic.get('choices')}")
    return "\n".join(lines)
