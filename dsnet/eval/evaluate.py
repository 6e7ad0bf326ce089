"""Evaluation: per-subnet and dynamic accuracy, MAdds, result files and the plot."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from dsnet.models.arch import Subnet
from dsnet.models.madds import count_madds, routing_madds
from dsnet.train.distributed import DistContext
from dsnet.utils.atomic import atomic_copy, atomic_write, atomic_write_text


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


@torch.no_grad()
def evaluate_routing(model: torch.nn.Module, loader: Any, num_classes: int,
                     dist: DistContext | None = None, input_size: int | None = None,
                     keep: int = 16) -> dict[str, Any]:
    """Where the gate sends each class, how every routing choice would do, the oracle.

    Every validation image runs the trunk once and *every* routed tail, so besides the
    gate's own choice we know which choices classify it correctly. The oracle sends each
    image to the cheapest choice that is right (the slimmest when none is): the best any
    gate could do on this supernet.

    Args:
        model: the supernet (eval mode is set here).
        loader: validation loader; its sampler gives the images' dataset indices.
        num_classes: number of classes (rows of the per-class tables).
        dist: sums the tables over ranks.
        input_size: input resolution for MAdds.
        keep: dataset indices kept, per routing choice, of images the gate sent there.

    Returns:
        JSON-able dict: ``routing_space``, ``choice_madds`` (K,), per class (C rows) the
        ``images``, ``sent`` (C, K) counts, ``correct`` (C, K) counts of each choice run on
        every image, ``gate_correct``, ``oracle_correct`` and ``oracle_madds`` (sum); and
        ``examples``: {subnet: [dataset indices]} for every routing choice (a JSON key:
        the subnet as a string).
    """
    device = next(model.parameters()).device
    per_choice = routing_madds(model, input_size)                           # (K,)
    k = len(model.routing_space)
    table = torch.zeros(num_classes, 2 * k + 3, dtype=torch.float64)
    world, rank = (dist.world_size, dist.rank) if dist is not None else (1, 0)
    examples = torch.zeros(world, k, keep, dtype=torch.float64)  # index + 1; 0 = empty
    model.eval()
    order, pos = list(iter(loader.sampler)), 0
    for x, y in loader:
        idx = torch.tensor(order[pos:pos + len(y)], dtype=torch.float64)
        pos += len(y)
        choice, correct = _routing_batch(model, x.to(device), y.to(device))  # (B,), (B, K)
        _add_routing_rows(table, y, choice, correct, per_choice)
        _keep_examples(examples[rank], idx, choice)
    if dist is not None:
        dist.all_reduce_sum_([table, examples])
    return _routing_dict(model.routing_space, per_choice, table, examples)


def _routing_batch(model: torch.nn.Module, x: torch.Tensor,
                   y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's choice index (B,) and whether each routed tail is right (B, K), on CPU."""
    feats, gate_logits = model.forward_trunk(x)                          # (B, C, h, w), (B, K)
    correct = torch.stack([model.forward_tail(feats, c).argmax(1) == y
                           for c in model.routing_space], 1)              # (B, K)
    return gate_logits.argmax(1).cpu(), correct.cpu()


def _add_routing_rows(table: torch.Tensor, y: torch.Tensor, choice: torch.Tensor,
                      correct: torch.Tensor, per_choice: torch.Tensor) -> None:
    """Add a batch to the (C, 2K + 3) table: sent, correct, gate/oracle right, oracle MAdds."""
    k, y = correct.size(1), y.cpu()
    rows = torch.zeros(len(y), 2 * k + 3, dtype=torch.float64)
    rows[torch.arange(len(y)), choice] = 1.0                              # sent
    rows[:, k:2 * k] = correct.double()
    rows[:, 2 * k] = correct[torch.arange(len(y)), choice].double()      # gate right
    any_right = correct.any(1)
    rows[:, 2 * k + 1] = any_right.double()                              # oracle right
    cheapest = torch.where(any_right, correct.int().argmax(1), 0)        # first right choice
    rows[:, 2 * k + 2] = per_choice[cheapest]                            # oracle MAdds
    table.index_add_(0, y, rows)


def _keep_examples(slots: torch.Tensor, idx: torch.Tensor, choice: torch.Tensor) -> None:
    """Fill the (K, keep) slots: row c gets dataset indices (+1) of images sent to choice c."""
    keep = slots.size(1)
    for c in range(slots.size(0)):
        free = int((slots[c] == 0).sum())
        picked = idx[choice == c][:free] + 1
        slots[c, keep - free:keep - free + len(picked)] = picked


def _routing_dict(space: Sequence[int], per_choice: torch.Tensor, table: torch.Tensor,
                  examples: torch.Tensor) -> dict[str, Any]:
    k = len(space)
    flat = examples.permute(1, 0, 2).reshape(k, -1)                      # (K, world * keep)
    picks = [[int(i) - 1 for i in row.tolist() if i > 0] for row in flat]
    return {
        "routing_space": [int(c) for c in space],
        "choice_madds": per_choice.tolist(),
        "images": table[:, :k].sum(1).round().long().tolist(),
        "sent": table[:, :k].round().long().tolist(),
        "correct": table[:, k:2 * k].round().long().tolist(),
        "gate_correct": table[:, 2 * k].round().long().tolist(),
        "oracle_correct": table[:, 2 * k + 1].round().long().tolist(),
        "oracle_madds": table[:, 2 * k + 2].tolist(),
        "examples": {str(c): p for c, p in zip(space, picks)},
    }


def oracle_point(routing: dict[str, Any]) -> dict[str, float]:
    """Top-1 (%) and mean MAdds of the oracle router (see :func:`evaluate_routing`)."""
    n = max(sum(routing["images"]), 1)
    return {"top1": 100 * sum(routing["oracle_correct"]) / n,
            "madds": sum(routing["oracle_madds"]) / n}


def headroom(subnets: Sequence[dict], dynamic: dict, oracle: dict) -> dict[str, float]:
    """The gate's and the oracle's top-1 above the static curve at their own mean MAdds,
    and the share of the oracle's gain that the gate captures (NaN if the oracle has none)."""
    gate_gain = dynamic["top1"] - interpolate_static(subnets, dynamic["madds"])
    oracle_gain = oracle["top1"] - interpolate_static(subnets, oracle["madds"])
    share = gate_gain / oracle_gain if oracle_gain > 0 else float("nan")
    return {"static_top1_at_madds": dynamic["top1"] - gate_gain, "gain": gate_gain,
            "oracle_gain": oracle_gain, "headroom_captured": share}


def _static_points(rows: Sequence[dict]) -> list[tuple[float, float]]:
    """(MAdds, top-1) of the uniform subnets (not ``largest``), by ascending MAdds."""
    return sorted((r["madds"], r["top1"]) for r in rows if isinstance(r["subnet"], int))


def interpolate_static(rows: Sequence[dict], madds: float) -> float:
    """Static subnets' top-1 linearly interpolated at ``madds`` (clamped to the ends)."""
    pts = _static_points(rows)
    if madds <= pts[0][0]:
        return pts[0][1]
    for (m0, a0), (m1, a1) in zip(pts, pts[1:]):
        if madds <= m1:
            return a0 + (a1 - a0) * (madds - m0) / (m1 - m0)
    return pts[-1][1]


def static_madds_at(rows: Sequence[dict], top1: float) -> float | None:
    """The least MAdds at which the static curve (linear between subnets) reaches ``top1``;
    None if no static subnet is that accurate."""
    pts = _static_points(rows)
    if pts[0][1] >= top1:
        return pts[0][0]
    for (m0, a0), (m1, a1) in zip(pts, pts[1:]):
        if a1 >= top1 > a0:
            return m0 + (m1 - m0) * (top1 - a0) / (a1 - a0)
    return None


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
        if dynamic.get("oracle"):
            oracle = dynamic["oracle"]
            ax.plot([oracle["madds"] / 1e6], [oracle["top1"]], "kD", markersize=7,
                    label="oracle router (bound)")
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


def write_results(results_dir: str | Path, result: Any, final_checkpoint: str | Path,
                  images: Callable[[Sequence[int]], torch.Tensor] | None = None) -> None:
    """Write ``subnets.csv``, ``dynamic.csv``, ``accuracy_madds.png``, ``routing.csv``,
    ``routing.png`` and ``dsnet_final.pt``.

    Args:
        results_dir: target folder (created).
        result: a :class:`dsnet.train.engine.StageResult` (or its dict) with ``subnets`` and
            ``dynamic`` (whose ``routing`` comes from :func:`evaluate_routing`).
        final_checkpoint: the checkpoint copied to ``dsnet_final.pt``.
        images: validation images (N, C, H, W) by dataset index, for the grids of
            ``routing.png`` (None: the picture has no grids).
    """
    import pandas as pd

    results_dir = Path(results_dir)
    subnets = _field(result, "subnets") or []
    dynamic = _field(result, "dynamic")
    atomic_write_text(results_dir / "subnets.csv",
                       pd.DataFrame(subnets, columns=["subnet", "madds", "top1", "top5"])
                       .to_csv(index=False))
    if dynamic is not None:
        atomic_write_text(results_dir / "dynamic.csv",
                          pd.DataFrame([dynamic_row(subnets, dynamic)]).to_csv(index=False))
    if subnets:
        plot_accuracy_madds(results_dir / "accuracy_madds.png", subnets, dynamic)
    routing = (dynamic or {}).get("routing")
    if routing:
        table = pd.DataFrame(routing_rows(routing))
        # 10 significant digits: 80.6, not 80.60000000000001
        atomic_write_text(results_dir / "routing.csv",
                          table.to_csv(index=False, float_format="%.10g"))
        plot_routing(results_dir / "routing.png", routing, images)
    atomic_copy(final_checkpoint, results_dir / "dsnet_final.pt")


def dynamic_row(subnets: Sequence[dict], dynamic: dict) -> dict[str, Any]:
    """One ``dynamic.csv`` row: the gate's point, the oracle bound and the headroom."""
    row = {k: dynamic[k] for k in ("top1", "top5", "madds")}
    row["choices"] = json.dumps(dynamic.get("choices", {}))
    oracle = dynamic.get("oracle")
    if oracle and any(isinstance(r["subnet"], int) for r in subnets):
        row.update(oracle_top1=oracle["top1"], oracle_madds=oracle["madds"])
        row.update(headroom(subnets, dynamic, oracle))
    return row


def routing_rows(routing: dict[str, Any]) -> list[dict[str, Any]]:
    """``routing.csv``: per class (and ``all``), the share (%) of its images the gate sends
    to each routing choice, the top-1 (%) of each choice run on all of them, the gate's and
    the oracle's top-1."""
    names = routing.get("classes") or [str(c) for c in range(len(routing["images"]))]
    space, rows = routing["routing_space"], []
    totals = {key: [sum(col) for col in zip(*routing[key])] for key in ("sent", "correct")}
    per_class = [(str(c), names[c], routing["images"][c], routing["sent"][c],
                  routing["correct"][c], routing["gate_correct"][c],
                  routing["oracle_correct"][c]) for c in range(len(names))]
    per_class.append(("all", "all", sum(routing["images"]), totals["sent"],
                      totals["correct"], sum(routing["gate_correct"]),
                      sum(routing["oracle_correct"])))
    for label, name, n, sent, correct, gate, oracle in per_class:
        pct = 100.0 / max(n, 1)
        row = {"class": label, "name": name, "images": n, "gate_top1": gate * pct}
        row.update({f"share_{c}": v * pct for c, v in zip(space, sent)})
        row.update({f"top1_{c}": v * pct for c, v in zip(space, correct)})
        row["oracle_top1"] = oracle * pct
        rows.append(row)
    return rows


def plot_routing(path: Path, routing: dict[str, Any],
                 images: Callable[[Sequence[int]], torch.Tensor] | None = None) -> None:
    """Per class: the gate's shares (stacked bars) and each choice's top-1 (heat map); with
    ``images``, grids of images the gate sent to the slimmest and to the widest choice it
    used (the routing space's ends may get no image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = routing_rows(routing)[:-1]
    grids = _example_grids(routing, images) if images is not None else {}
    fig, axes = plt.subplots(1, 2 + len(grids), figsize=(12 + 3 * len(grids), 4.5),
                             gridspec_kw={"width_ratios": [3, 2] + [2] * len(grids)})
    _plot_shares(axes[0], rows, routing["routing_space"])
    _plot_choice_accuracy(fig, axes[1], rows, routing["routing_space"])
    for ax, (title, grid) in zip(axes[2:], grids.items()):
        ax.imshow(grid, cmap="gray")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    save_figure(fig, path)


def _plot_shares(ax: Any, rows: list[dict], space: Sequence[int]) -> None:
    left = [0.0] * len(rows)
    for c in space:
        shares = [r[f"share_{c}"] for r in rows]
        ax.barh([r["name"] for r in rows], shares, left=left, label=f"subnet {c}")
        left = [a + b for a, b in zip(left, shares)]
    ax.invert_yaxis()
    ax.set_xlabel("share of the class's validation images (%)")
    ax.set_title("where the gate sends each class", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


def _plot_choice_accuracy(fig: Any, ax: Any, rows: list[dict], space: Sequence[int]) -> None:
    values = [[r[f"top1_{c}"] for c in space] for r in rows]
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(space)), [str(c) for c in space])
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w")
    ax.set_xlabel("routing choice (subnet)")
    ax.set_title("top-1 (%) of each choice, per class", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)


def _example_grids(routing: dict[str, Any],
                   images: Callable[[Sequence[int]], torch.Tensor]) -> dict[str, Any]:
    """(H', W', 3) numpy grids, min-max scaled, of the images kept for the slimmest and the
    widest routing choice that the gate used."""
    from torchvision.utils import make_grid

    used = [c for c in routing["routing_space"] if routing["examples"].get(str(c))]
    ends = {"slimmest": used[0], "widest": used[-1]} if len(used) > 1 else {}
    grids = {}
    for key, subnet in ends.items():
        x = images(routing["examples"][str(subnet)]).float()             # (N, C, H, W)
        x = (x - x.amin()) / (x.amax() - x.amin()).clamp_min(1e-8)
        grid = make_grid(x, nrow=4, padding=1, pad_value=1.0)             # (3, H', W')
        grids[f"sent to subnet {subnet} ({key} used)"] = grid.permute(1, 2, 0).numpy()
    return grids


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
        row = dynamic_row(subnets, dynamic)
        if "oracle_top1" in row:
            lines.append(f"{'oracle':>8} {row['oracle_madds']:>12,.0f} "
                         f"{row['oracle_top1']:>7.2f}  (every image to the cheapest right "
                         "choice)")
            lines.append(f"gate vs static curve at equal MAdds: {row['gain']:+.2f} points "
                         f"(oracle {row['oracle_gain']:+.2f}; headroom captured "
                         f"{row['headroom_captured']:.0%})")
    return "\n".join(lines)
