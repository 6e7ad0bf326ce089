"""Losses of both stages: timm's label smoothing and soft-target cross entropy (the
release's), and dsnet's own SGS and complexity penalty, which timm has no equivalent of."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

_SOFT_TARGET_CE = SoftTargetCrossEntropy()


def label_smoothing_ce(logits: torch.Tensor, target: torch.Tensor,
                       smoothing: float = 0.1) -> torch.Tensor:
    """Cross entropy against labels smoothed towards the uniform distribution (timm's)."""
    if smoothing <= 0:
        return F.cross_entropy(logits, target)
    return LabelSmoothingCrossEntropy(smoothing)(logits, target)


def soft_target_ce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross entropy against a soft distribution (a teacher's, or mixup's targets) (timm's)."""
    return _SOFT_TARGET_CE(logits, target_probs)


def sgs_targets(smallest_correct: torch.Tensor, num_choices: int) -> torch.Tensor:
    """Sandwich Gate Sparsification targets: slimmest choice (0) if the smallest subnet is
    right, widest choice (K-1) otherwise. (B,) bool -> (B,) long."""
    return torch.where(smallest_correct, 0, num_choices - 1).long()


def sgs_loss(gate_logits: torch.Tensor, targets: torch.Tensor,
             gumbel_soft: torch.Tensor | None = None, smoothing: float = 0.1) -> torch.Tensor:
    """Cross entropy of the slimming head against SGS targets.

    Args:
        gate_logits: (B, K) slimming-head logits: dsnet's default takes plain cross entropy
            of them.
        targets: (B,) SGS targets.
        gumbel_soft: (B, K) the Gumbel-softmax sample ``softmax((logits + g) / tau)``: given,
            the release's form is reproduced, label-smoothed cross entropy applied to these
            *probabilities* as if they were logits (a softmax twice, which flattens the
            gradient; ``sgs_on_probs: true``).
        smoothing: label smoothing of the release's form.
    """
    if gumbel_soft is not None:
        return label_smoothing_ce(gumbel_soft, targets, smoothing)
    return F.cross_entropy(gate_logits, targets)


def expected_task_loss(probs: torch.Tensor, tail_logits: torch.Tensor, y: torch.Tensor,
                       smoothing: float = 0.1) -> torch.Tensor:
    """Task loss expected under the gate's routing distribution.

    Args:
        probs: (B, K) the slimming head's softmax.
        tail_logits: (B, K, classes) every routed subnet's logits on every sample.
        y: (B,) labels.
        smoothing: label smoothing of each choice's cross entropy.
    """
    k = tail_logits.size(1)
    per_choice = F.cross_entropy(tail_logits.transpose(1, 2), y[:, None].expand(-1, k),
                                 reduction="none", label_smoothing=smoothing)  # (B, K)
    return (probs * per_choice).sum(1).mean()


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
