"""The supernet base class: what every DS-Net family (DS-MBNet, DS-ResNet) shares.

:class:`DSSupernet` holds the subnets of its architecture, the slimming head's routing
space and the static / dynamic (grouped by choice) / head forwards. A family subclass
builds its modules and knows its own topology (Once-for-All style): its forwards, its MAdds,
how to export itself as plain static modules and how to run the release's masked batch.
``dsnet.count_madds``, ``export_subnet``, ``export_dynamic`` and the
``dsnet.models.masked`` functions dispatch to those methods, so they work for every model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsnet.models.arch import ArchSpec, Subnet
from dsnet.models.layers import AttentionHead, DSLinear, RoutedPart
from dsnet.models.madds import Width


@dataclass
class DynamicOutput:
    """Everything a dynamic forward computes (both gate-training estimators return it).

    Attributes:
        logits: (B, num_classes) class logits.
        gate_logits: (B, K) slimming-head logits, K = ``len(routing_space)``.
        gate_weights: (B, K) the one-hot actually applied: straight-through Gumbel-softmax
            in train mode (carries gradients to the head), plain one-hot in eval mode.
        choices: (B,) chosen subnet index per sample (values of the routing space).
        tail_logits: train mode only: (B, T, num_classes), ``[:, t]`` the logits of routed
            subnet t for t < T <= K, so ``[:, 0]`` is always the slimmest routed subnet's
            (gate training's SGS targets). The tails estimator fills all T = K (with
            gradients); the masked one (:func:`dsnet.models.masked.masked_train_forward`) only
            T = 1, computed without gradients. None in eval mode.
        gate_soft: train mode only: (B, K) the soft Gumbel-softmax sample
            ``softmax((gate_logits + g) / tau)`` behind ``gate_weights`` (same noise g),
            with gradients; the release's SGS "on probabilities" is applied to it.
            None in eval mode.
    """

    logits: torch.Tensor
    gate_logits: torch.Tensor
    gate_weights: torch.Tensor
    choices: torch.Tensor
    tail_logits: torch.Tensor | None = None
    gate_soft: torch.Tensor | None = None


def gumbel_sample(logits: torch.Tensor, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gumbel-softmax sample of (B, K) logits: (straight-through hard one-hot, soft).

    The hard one-hot's forward value is the argmax of the soft sample and its gradient is
    the soft sample's; ``soft`` is ``softmax((logits + g) / tau)`` for the same noise g.
    """
    gumbels = -torch.empty_like(logits).exponential_().log()   # ~ Gumbel(0, 1)
    soft = ((logits + gumbels) / tau).softmax(dim=1)            # (B, K)
    hard = torch.zeros_like(soft).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)
    return hard - soft.detach() + soft, soft


def straight_through_gumbel(logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Hard one-hot of a Gumbel-softmax sample whose gradient is the soft sample's."""
    return gumbel_sample(logits, tau)[0]


class DSSupernet(nn.Module):
    """A dynamic slimmable supernet: what every family (DS-MBNet, DS-ResNet) shares.

    Call it as ``model(x)`` (largest), ``model(x, subnet=c)`` (uniform subnet c),
    ``model(x, subnet="smallest")`` or ``model(x, subnet="dynamic")`` (the slimming head
    routes each sample to a subnet of ``routing_space``). The slimming head samples a
    straight-through Gumbel one-hot when it is in train mode and takes the argmax in eval
    mode: ``model.eval(); model.gate_head.train()`` is the gate-training setting.

    A family subclass builds its modules, ends its ``__init__`` with
    ``self.routing_space = routing_space`` (which builds the slimming head) and supplies its
    topology: :meth:`forward_widths`, :meth:`forward_trunk`, :meth:`forward_tail`,
    :attr:`gate_head`, :attr:`classifier_layer`, and the Once-for-All-style hooks
    :meth:`widths_madds`, :meth:`trunk_madds`, :meth:`export_static`, :meth:`export_trunk`,
    :meth:`export_tail` and :meth:`masked_tail`.

    Args:
        arch: the architecture.
        num_classes: classifier outputs.
        in_chans: input channels.
        drop_rate: dropout before the classifier, applied to the largest network only.
    """

    def __init__(self, arch: ArchSpec, num_classes: int, in_chans: int,
                 drop_rate: float) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self._routing_space: tuple[int, ...] = ()

    # ------------------------------------------------------------------ properties
    @property
    def num_subnets(self) -> int:
        """Number of uniform subnets (14 for DS-MBNet)."""
        return self.arch.num_subnets

    @property
    def gate_head(self) -> AttentionHead:
        """The attention head holding the slimming head (``gate_head.gate``)."""
        raise NotImplementedError

    @property
    def classifier_layer(self) -> DSLinear:
        """The final linear layer."""
        raise NotImplementedError

    @property
    def routing_space(self) -> tuple[int, ...]:
        """Uniform subnets the slimming head routes to, ascending."""
        return self._routing_space

    @routing_space.setter
    def routing_space(self, subnets: Sequence[int]) -> None:
        subnets = tuple(int(s) for s in subnets)
        if len(subnets) < 2 or list(subnets) != sorted(set(subnets)) or not (
                0 <= subnets[0] and subnets[-1] < self.num_subnets):
            raise ValueError(f"routing_space must be >= 2 ascending distinct subnets in "
                             f"[0, {self.num_subnets - 1}], got {subnets}")
        if len(subnets) != len(self._routing_space):
            self.gate_head.set_num_gate_choices(len(subnets))  # the head's size follows it
        self._routing_space = subnets

    def gate_parameters(self) -> list[nn.Parameter]:
        """The slimming head's parameters (the only ones gate training optimises)."""
        return list(self.gate_head.gate.parameters())

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, subnet: Subnet | None = "largest",
                return_choices: bool = False, gumbel_tau: float = 1.0):
        """Run a subnet on ``x`` (B, in_chans, H, W) and return logits (B, num_classes).

        With ``return_choices=True`` returns ``(logits, choices)``, the subnet index each
        sample ran (``-1`` for the largest network, which is not a uniform subnet).
        """
        if subnet == "dynamic":
            out = self.forward_dynamic(x, gumbel_tau)
            return (out.logits, out.choices) if return_choices else out.logits
        widths = self.arch.resolve(subnet)
        logits = self.forward_widths(x, widths)
        if not return_choices:
            return logits
        index = -1 if widths == self.arch.largest_widths() else self._uniform_index(subnet)
        return logits, torch.full((x.size(0),), index, dtype=torch.long, device=x.device)

    def _uniform_index(self, subnet: Subnet | None) -> int:
        return 0 if subnet == "smallest" else int(subnet)

    def forward_widths(self, x: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
        """Run the static subnet with one width per part (stem first)."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, dropout: bool = False) -> torch.Tensor:
        """Global average pool, dropout (largest only, as the release), classifier."""
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)           # (B, C_active)
        if dropout and self.drop_rate > 0.0:
            x = F.dropout(x, self.drop_rate, self.training)
        return self.classifier_layer(x)

    # ------------------------------------------------------------------ dynamic
    def forward_trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared part of every routed subnet, up to the gate.

        Returns (features (B, C, h, w) the routed part starts from, slimming-head logits
        (B, K)).
        """
        raise NotImplementedError

    def forward_tail(self, feats: torch.Tensor, subnet: int) -> torch.Tensor:
        """Rest of uniform subnet ``subnet`` from the trunk's features to the logits."""
        raise NotImplementedError

    def forward_dynamic(self, x: torch.Tensor, gumbel_tau: float = 1.0) -> DynamicOutput:
        """Route every sample to one subnet of the routing space.

        Eval mode (gate head): argmax, and samples are grouped by choice so each group runs
        the rest of the network at its own width (no masks, no full-width compute).

        Train mode (gate head) is the *tails* estimator of the gate's straight-through
        path: a straight-through Gumbel one-hot; every routed subnet's tail runs on the
        whole batch and the one-hot mixes their logits, so each sample gets exactly its
        subnet's logits and the head's gradient is d(loss)/d(logits) . (tail logits), one
        term per choice. The release's estimator, :func:`dsnet.models.masked.masked_train_forward`,
        gives the same forward values but runs the widest routed width once, with the
        one-hot building per-sample channel masks and BN statistics after every sliced
        layer, so the head's gradient flows through every masked layer instead.
        """
        feats, gate_logits = self.forward_trunk(x)
        space = torch.tensor(self.routing_space, device=x.device)
        if self.gate_head.training:
            weights, soft = gumbel_sample(gate_logits, gumbel_tau)         # (B, K) each
            tails = torch.stack([self.forward_tail(feats, c) for c in self.routing_space], 1)
            logits = (weights.unsqueeze(-1) * tails).sum(1)                 # (B, classes)
            return DynamicOutput(logits, gate_logits, weights, space[weights.argmax(1)],
                                 tails, soft)
        index = gate_logits.argmax(dim=1)                                  # (B,)
        weights = F.one_hot(index, len(self.routing_space)).to(gate_logits.dtype)
        logits = self._grouped_tails(feats, index)
        return DynamicOutput(logits, gate_logits, weights, space[index])

    def _grouped_tails(self, feats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits = feats.new_empty(feats.size(0), self.num_classes)
        for k, subnet in enumerate(self.routing_space):
            rows = (index == k).nonzero(as_tuple=True)[0]
            if rows.numel():
                logits[rows] = self.forward_tail(feats[rows], subnet)
        return logits

    # ------------------------------------------------------------------ topology hooks
    def widths_madds(self, widths: Sequence[Width], input_size: int) -> Width:
        """MAdds of one image through the static subnet of these per-part widths.

        A part's width may be a float64 tensor (B,) of running widths: the count (B,) then
        broadcasts the same rule (the release's quadratic gate-training complexity).
        """
        raise NotImplementedError

    def trunk_madds(self, input_size: int) -> int:
        """MAdds of :meth:`forward_trunk` per image, the slimming head excluded."""
        raise NotImplementedError

    def gate_madds(self, input_size: int) -> int:
        """MAdds a dynamic forward adds to its routed subnet's static count: the slimming
        head's (the release's: one 1x1 conv, r x K on a 1x1 map)."""
        return self.gate_head.slimming_madds(self.gate_map_size(input_size))

    def gate_map_size(self, input_size: int) -> int:
        """Side of the feature map the slimming head reads."""
        raise NotImplementedError

    def export_static(self, widths: Sequence[int], silu: bool = False) -> nn.Module:
        """The static subnet of these widths as plain ``nn`` modules holding copies."""
        raise NotImplementedError

    def export_trunk(self, silu: bool = False) -> nn.Module:
        """:meth:`forward_trunk` as plain modules: ``x -> (features, reduced features)``."""
        raise NotImplementedError

    def export_tail(self, subnet: int, silu: bool = False) -> nn.Module:
        """:meth:`forward_tail` of ``subnet`` as plain modules: ``features -> logits``."""
        raise NotImplementedError

    def routed_parts(self, onehot: torch.Tensor, full_width: bool = False
                     ) -> list[RoutedPart]:
        """One :class:`~dsnet.models.layers.RoutedPart` per stage from the gate stage on.

        Args:
            onehot: (B, K) routing one-hot.
            full_width: compute at each stage's widest supernet width as the release's
                unsliced weights do, instead of the widest routed width (the default, a
                faster and therefore more demanding baseline).
        """
        parts = []
        for spec in self.arch.stages[self.arch.gate_stage:]:
            widths = [spec.widths[c] for c in self.routing_space]
            width = spec.widths[-1] if full_width else max(widths)
            parts.append(RoutedPart(onehot, widths, width))
        return parts

    def masked_tail(self, feats: torch.Tensor, onehot: torch.Tensor,
                    full_width: bool = False) -> torch.Tensor:
        """The release's masked execution from the trunk's features to the logits: one
        common width per part, a per-sample channel mask and per-sample BN statistics
        after every sliced layer (see :mod:`dsnet.models.masked`)."""
        raise NotImplementedError


def init_weights(model: nn.Module) -> None:
    """The release's EfficientNet ("goog") initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.weight.size(0))
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
