"""Losses of both stages: label smoothing, soft targets, SGS, complexity penalty."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_smoothing_ce(logits: torch.Tensor, target: torch.Tensor,
                       smoothing: float = 0.1) -> torch.Tensor:
    """Cross entropy against labels smoothed towards the uniform distribution."""
    return F.cross_entropy(logits, target, label_smoothing=smoothing)


def soft_target_ce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross entropy against a soft distribution (the teacher's), averaged over the batch."""
    return torch.sum(-target_probs * F.log_softmax(logits, dim=-1), dim=-1).mean()


def sgs_targets(smallest_correct: torch.Tensor, num_choices: int) -> torch.Tensor:
    """Sandwich Gate Sparsification targets: slimmest choice (0) if the smallest subnet is
    right, widest choice (K-1) otherwise. (B,) bool -> (B,) long."""
    return torch.where(smallest_correct, 0, num_choices - 1).long()


def sgs_loss(gate_logits: torch.Tensor, targets: torch.Tensor,
             on_probs: bool = False) -> torch.Tensor:
    """Cross entropy of the slimming head against SGS targets.

    Args:
        gate_logits: (B, K) slimming-head logits.
        targets: (B,) SGS targets.
        on_probs: reproduce the release, which applies cross entropy to softmax
            *probabilities* (softmax twice). Off by default: it flattens the gradient.
    """
    scores = gate_logits.softmax(dim=1) if on_probs else gate_logits
    return F.cross_entropy(scores, targets)


def complexity_loss(madds: torch.Tensor, weight: float, form: str = "square",
                    target: float | None = None, unit: float = 1e9) -> torch.Tensor:
    """Penalty on the batch's expected MAdds (``madds``: (B,) per-sample expected MAdds).

    ``square``: ``weight * (mean / unit) ** 2`` (the release: unit 1e9, weight 0.5).
    ``target``: ``weight * ((mean - target) / unit) ** 2``, pulling towards a budget.
    """
    mean = madds.mean() / unit
    if form == "square":
        return weight * mean ** 2
    if form == "target":
        if target is None:
            raise ValueError("complexity_form 'target' needs target_madds")
        return weight * (mean - target / unit) ** 2
    raise ValueError(f"unknown complexity_form {form!r} (square | target)")
