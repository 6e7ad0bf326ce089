"""Random number generators of a stage, seeded per epoch so that resume is exact.

A resumed epoch must repeat the uninterrupted one, so every generator an epoch draws
from is re-seeded at the epoch's start from ``(seed, rank, epoch)`` instead of carried
over from the epochs before:

* Python's ``random`` (timm's augmentations), NumPy's global state (timm's Mixup) and
  torch's CPU generator (dropout, Gumbel noise, the grey sets' shifts and flips) in the
  training process, and every CUDA device's generator (``torch.manual_seed`` seeds them
  all; nothing to do on a CPU-only machine): :func:`seed_epoch`;
* the same three in each DataLoader worker process, from ``(seed, rank, epoch, worker)``
  at the worker's first sample of the epoch: :class:`EpochSeededDataset`. Torch seeds a
  worker once, when it starts, from a number drawn at iterator creation; a persistent
  worker then carries its state across epochs, so a resumed run (fresh workers) would
  augment differently from the uninterrupted one. Batches go to the workers round-robin,
  so each worker's sequence of samples, and its draws, are fixed by the epoch.

Why re-seed rather than save and restore the states: in data-parallel training only
rank 0 writes the checkpoint, and the other ranks' states (each rank draws its own
streams) cannot be collected without a gather of pickled states per epoch, nor can a
loader worker's. Derived states need nothing stored and are exact for a restarted group
of the same world size. The one other per-rank state, the BN statistics (with
``dist_bn`` empty each rank's drift apart within an epoch), is handled alike: every
epoch starts from rank 0's (:meth:`dsnet.train.stages.StageRunner.begin_epoch`), as a
resume does. The checkpoint carries the rest that an epoch depends on
(:meth:`~dsnet.train.stages.StageRunner.save`): weights, EMA, optimizer, grad scaler and
``step``, from which the sandwich's random subnets
(:func:`~dsnet.train.sampling.sandwich_subnets`), the EMA warm-up and a per-update lr
schedule follow (an epoch's lr follows from the epoch); the loader's order is
epoch-seeded already (``DistributedSampler``).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info


def seed_all(*entropy: int) -> None:
    """Seed Python's ``random``, NumPy's global state and torch (CPU and every CUDA
    device) of this process from ``entropy`` (non-negative ints), through NumPy's
    ``SeedSequence`` so that nearby tuples give unrelated streams."""
    words = np.random.SeedSequence([int(e) for e in entropy]).generate_state(6)  # uint32
    random.seed(int(words[0]) << 32 | int(words[1]))
    np.random.seed(words[2:4])
    torch.manual_seed(int(words[4]) << 32 | int(words[5]))  # also every CUDA device


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Re-seed this rank's training process for ``epoch`` (see the module docstring)."""
    seed_all(seed, rank, epoch)


class EpochSeededDataset(Dataset):
    """A training set whose DataLoader workers re-seed for every epoch (module docstring).

    Set the epoch with :meth:`set_epoch` before the epoch's pass over the loader; it
    lives in shared memory, so persistent workers see it. In the main process
    (``workers: 0``) samples pass through: :func:`seed_epoch` has seeded it.
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int) -> None:
        self.dataset, self.seed, self.rank = dataset, seed, rank
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._seeded_for = -1  # in a worker's copy: the epoch it last seeded for

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        worker = get_worker_info()
        if worker is not None and int(self.epoch) != self._seeded_for:
            self._seeded_for = int(self.epoch)
            # worker ids count from 1 here: 0 would collide with the main process's tuple
            seed_all(self.seed, self.rank, self._seeded_for, 1 + worker.id)
        return self.dataset[index]
