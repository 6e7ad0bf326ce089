"""Optional distributed context (plain ``torch.distributed``; Ray Train sets it up).

Gradients are averaged by hand once per optimizer step instead of wrapping the model in
DistributedDataParallel: the sandwich rule runs several forward/backward passes per step,
the slimming head is unused in Stage I, and DDP's per-forward broadcast of rank 0's buffers
would overwrite the per-width BatchNorm statistics. One flattened all-reduce per step is
what DDP with ``no_sync`` would do, with fewer collectives.

Every collective runs on :attr:`DistContext.device`: a GPU run's process group may be
NCCL alone, and NCCL has no CPU collectives, so tensors that live elsewhere (evaluation
counters are built on the CPU) travel to the device for the collective and back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch.autograd.graph import increment_version


@dataclass
class DistContext:
    """Rank, world size and device of this process.

    Attributes:
        rank: this process's rank.
        world_size: number of processes.
        device: the device this process computes on.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_environment(cls, device: torch.device | None = None) -> DistContext:
        """Read rank/world size from an initialised process group (else a single process)."""
        device = device or torch.device("cpu")
        if tdist.is_available() and tdist.is_initialized():
            return cls(tdist.get_rank(), tdist.get_world_size(), device)
        return cls(0, 1, device)

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that writes files and prints)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    def all_reduce_mean_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Average tensors across ranks in place, in one flattened collective."""
        self._all_reduce_(tensors, average=True)

    def all_reduce_sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sum tensors across ranks in place, in one flattened collective."""
        self._all_reduce_(tensors, average=False)

    def _all_reduce_(self, tensors: Iterable[torch.Tensor], average: bool) -> None:
        tensors = [t for t in tensors if t is not None]
        if not self.distributed or not tensors:
            return
        with torch.no_grad():
            # float64 keeps counts exact to 2**53 (float32: 2**24); gloo and NCCL both
            # reduce it, and NCCL only sees tensors on the device.
            flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64)
                              for t in tensors])
            tdist.all_reduce(flat)
            if average:
                flat /= self.world_size
            offset = 0
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t))  # back to t's device and dtype
                offset += n

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank's tensors (start from identical weights).

        Outside autograd (a parameter would otherwise carry an autograd-less c10d op into
        its next backward, with a warning). c10d writes behind autograd's back, so each
        tensor's version counter is bumped as an in-place op would: caches keyed on it
        (:class:`dsnet.models.layers.SliceCache`) see the new values. A tensor off the device is
        broadcast through a copy on it.
        """
        if not self.distributed:
            return
        with torch.no_grad():
            for t in tensors:
                if self.on_device(t):
                    tdist.broadcast(t.detach(), src=0)
                    increment_version(t)
                else:
                    buf = t.detach().to(self.device)
                    tdist.broadcast(buf, src=0)
                    t.copy_(buf)  # an in-place op: bumps the version itself

    def on_device(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives on this process's device (any index when it names none)."""
        d = self.device
        return t.device.type == d.type and (d.index is None or t.device.index == d.index)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average ``.grad`` of the given parameters across ranks."""
        self.all_reduce_mean_(p.grad for p in params if p.grad is not None)
