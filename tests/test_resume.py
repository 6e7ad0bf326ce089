"""Resume repeats the uninterrupted run (issue 15): a stage stopped after an epoch and
resumed from that epoch's checkpoint reaches bitwise the same per-epoch metrics and final
weights as the run that was never stopped (CPU, one thread), in process and through a
Ray worker killed mid-stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsnet.config import stage_config_from_dict
from dsnet.data.loader import build_loader, set_loader_epoch
from dsnet.models.checkpoint import read_checkpoint
from dsnet.train.engine import CheckpointHook, EpochReport, Hook, run_stage
from dsnet.train.rng import EpochSeededDataset

# Wall-clock measurements differ between any two runs; everything else must not.
TIMING = ("img_per_s", "epoch_s", "eta_s")
# Every generator matters here: dropout and Gumbel noise (torch), mixup (NumPy), the
# sandwich's random subnets (step), the IEB teacher (EMA), and lr on updates (step).
RNG_HEAVY = {"dataset": "synthetic", "synthetic_size": 64, "img_size": 16, "batch_size": 16,
             "model": "ds_mbnet_small", "workers": 0, "threads": 1, "device": "cpu",
             "seed": 3, "epochs": 3,
             "warmup_epochs": 0, "cooldown_epochs": 0, "aa": "", "reprob": 0.0,
             "color_jitter": 0.0, "lr": 0.1, "drop": 0.3, "num_random": 1,
             "model_ema_decay": 0.9, "sched_on_updates": True, "eval_subnets": [0, 3]}


class Stop(Exception):
    """Raised by :class:`StopAfter`: the stage is cut short as by a killed worker."""


class StopAfter(Hook):
    """Stops the stage after epoch ``epoch`` (0-based), once its checkpoint is written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, report: EpochReport, save: object) -> None:
        if report.epoch == self.epoch:
            raise Stop


class Metrics(Hook):
    """Every epoch's metrics but the timings, by epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, float]] = {}

    def on_epoch_end(self, report: EpochReport, save: object) -> None:
        self.by_epoch[report.epoch] = {k: v for k, v in report.metrics.items()
                                       if k not in TIMING}


def _same_tensors(a: dict, b: dict) -> list[str]:
    """Keys of two state dicts whose tensors differ in any bit (or that one lacks)."""
    return sorted(k for k in a.keys() | b.keys()
                  if k not in a or k not in b or not torch.equal(a[k], b[k]))


def _assert_resume_repeats(cfg_dict: dict, folder: Path, init_from: Path | None = None) -> None:
    """Run 3 epochs; run again stopped after epoch 0 and resumed: epochs 1-2 and the final
    checkpoint (weights, EMA, optimizer, step) must be bitwise the same."""
    cfg = stage_config_from_dict(cfg_dict)
    whole, cut, resumed = Metrics(), Metrics(), Metrics()
    run_stage(cfg, hooks=[whole, CheckpointHook(folder / "whole")], init_from=init_from)
    with pytest.raises(Stop):
        run_stage(cfg, hooks=[cut, CheckpointHook(folder / "cut"), StopAfter(0)],
                  init_from=init_from)
    assert cut.by_epoch == {0: whole.by_epoch[0]}
    run_stage(cfg, hooks=[resumed, CheckpointHook(folder / "cut")], init_from=init_from,
              resume_from=folder / "cut" / "checkpoint.pt")
    assert resumed.by_epoch == {1: whole.by_epoch[1], 2: whole.by_epoch[2]}
    a = read_checkpoint(folder / "whole" / "checkpoint.pt")
    b = read_checkpoint(folder / "cut" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["extra"]["step"] == b["extra"]["step"]
    assert _same_tensors(a["state_dict"], b["state_dict"]) == []
    if a["state_dict_ema"] is not None:
        assert _same_tensors(a["state_dict_ema"], b["state_dict_ema"]) == []
    momentum = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    again = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(momentum) == len(again) > 0
    assert all(torch.equal(x, y) for x, y in zip(momentum, again, strict=True))


@pytest.mark.usefixtures("one_thread")  # the stages set threads=1; restored after
def test_resumed_supernet_and_gate_repeat_the_uninterrupted_run(tmp_path: Path) -> None:
    """Supernet with dropout, mixup, IEB and the sandwich; then the gate (Gumbel noise,
    SGS, gate EMA) from its checkpoint: a run stopped after epoch 1 of 3 and resumed
    measures what the uninterrupted one did, to the bit."""
    _assert_resume_repeats({**RNG_HEAVY, "stage": "supernet", "mixup": 0.8},
                           tmp_path / "supernet")
    _assert_resume_repeats({**RNG_HEAVY, "stage": "gate", "num_choice": 4, "lr": 0.05,
                            "gate_ema": True, "complexity_weight": 0.5},
                           tmp_path / "gate", tmp_path / "supernet" / "whole" / "checkpoint.pt")


class Draws(torch.utils.data.Dataset):
    """Each sample: one draw from torch, Python's random and NumPy (what augmentations use)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> torch.Tensor:
        import random

        import numpy as np

        return torch.tensor([torch.rand(()).item(), random.random(), np.random.rand()],
                            dtype=torch.float64)


def _epoch_draws(loader: torch.utils.data.DataLoader, data: EpochSeededDataset,
                 epoch: int) -> torch.Tensor:
    set_loader_epoch(loader, epoch)
    data.set_epoch(epoch)
    return torch.cat(list(loader))  # (16, 3)


def test_persistent_loader_workers_reseed_per_epoch() -> None:
    """Persistent workers carry their RNG across epochs; wrapped, a worker re-seeds at its
    first sample of each epoch, so epoch 1 of a fresh loader (a resumed run) draws what
    epoch 1 of the loader that ran epoch 0 (the uninterrupted run) drew."""
    def loader() -> tuple[torch.utils.data.DataLoader, EpochSeededDataset]:
        data = EpochSeededDataset(Draws(), seed=5, rank=0)
        return build_loader(data, 4, train=True, seed=5, workers=2,
                            persistent_workers=True), data

    whole, whole_data = loader()
    first = _epoch_draws(whole, whole_data, 0)
    workers = whole._iterator
    second = _epoch_draws(whole, whole_data, 1)
    assert whole._iterator is workers  # the same worker processes ran both epochs
    resumed, resumed_data = loader()
    assert torch.equal(_epoch_draws(resumed, resumed_data, 1), second)
    assert not torch.equal(first, second)
    assert len(torch.unique(second[:, 0])) == 16  # the two workers draw different streams


# Mixup and dropout on, so that every generator matters; 3 epochs of 4 batches per rank.
RAY_STAGE_YAML = """\
dataset: synthetic
synthetic_size: 64
img_size: 16
model: ds_mbnet_small
workers: 0
threads: 1
seed: 3
aa: ''
reprob: 0.0
color_jitter: 0.0
epochs: 3
warmup_epochs: 0
cooldown_epochs: 0
batch_size: 8
num_random: 1
drop: 0.3
mixup: 0.8
sched_on_updates: true
eval_subnets: [0, 3]
"""


def _ray_checkpoints(run_dir: Path) -> dict[int, dict]:
    """The run folder's (Ray-kept) supernet checkpoints by epoch."""
    found = [read_checkpoint(p) for p in (run_dir / "supernet").glob("checkpoint_*/checkpoint.pt")]
    return {c["epoch"]: c for c in found}


@pytest.mark.ray
def test_killed_ray_worker_resumes_to_the_uninterrupted_run(
        ray_session: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Ray workers train 3 epochs; again, and rank 1 dies (``os._exit(1)``) after
    epoch 1: Ray restarts the group (max_failures 1), which resumes from epoch 1's
    checkpoint in the same fit. Epochs 2 and 3 measure the same and end in the same
    weights as the uninterrupted run, to the bit: both ranks re-seed from (seed, rank,
    epoch), so nothing of rank 1 needs to be in rank 0's checkpoint."""
    from pipelines import supernet
    from pipelines.faults import FAULT_ENV, FAULT_MARKER_ENV, FAULT_MODE_ENV, FAULT_RANK_ENV

    cfg = tmp_path / "supernet.yml"
    cfg.write_text(RAY_STAGE_YAML)
    base = ["-c", str(cfg), "--output", str(tmp_path), "--num-workers", "2",
            "--set", "ray.max_failures=1"]
    assert supernet.main([*base, "--name", "whole"]) == 0
    marker = tmp_path / "kill.marker"
    for key, value in ((FAULT_ENV, "0"), (FAULT_MARKER_ENV, str(marker)),
                       (FAULT_MODE_ENV, "exit"), (FAULT_RANK_ENV, "1")):
        monkeypatch.setenv(key, value)
    assert supernet.main([*base, "--name", "killed"]) == 0
    assert marker.exists()  # the worker was killed
    killed = json.loads((tmp_path / "killed" / "run.json").read_text())["stages"]["supernet"]
    assert killed["status"] == "done" and killed["attempts"] == 1  # restarted inside the fit
    assert killed["epochs_run"] == [1, 2]  # epoch 0 came from its checkpoint
    assert Path(killed["resumed_from"]).parent.parent == tmp_path / "killed" / "supernet"
    assert killed["corrupt_checkpoints"] == []
    whole, again = _ray_checkpoints(tmp_path / "whole"), _ray_checkpoints(tmp_path / "killed")
    assert 2 in whole and whole.keys() == again.keys()  # the last ray.num_to_keep epochs
    for epoch in whole:
        a, b = whole[epoch], again[epoch]
        assert {k: v for k, v in a["metrics"].items() if k not in TIMING} == \
            {k: v for k, v in b["metrics"].items() if k not in TIMING}
        assert _same_tensors(a["state_dict"], b["state_dict"]) == []
        assert _same_tensors(a["state_dict_ema"], b["state_dict_ema"]) == []
