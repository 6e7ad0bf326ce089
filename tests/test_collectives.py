"""Collectives of a GPU run, checked on a machine without a GPU.

A GPU worker's process group may be NCCL alone, which has no CPU collectives: a CPU
tensor handed to ``all_reduce`` kills the run (the first validation died this way). These
tests run the library's real evaluation and training paths with ``world_size=2`` through
:class:`RecordingDist`, a stand-in for ``torch.distributed`` that records every tensor
given to a collective; a test fails if any of them is not on the context's device.

The device is a pretend accelerator. ``torch.device("meta")`` would be the natural
stand-in, but meta tensors have no data: the counters copied back after a reduction, and
the ``.item()`` calls on them, would fail. So :class:`OnAccelerator` is a wrapper tensor
subclass that *reports* device ``meta`` while holding CPU data, with a GPU's rules:
``.to(device)`` and ``copy_`` cross between host and device; any other op that mixes
device tensors with (non-scalar) CPU tensors raises, as CUDA does. Under
:class:`PretendAccelerator`, a call that names the device (``.to(ctx.device)``,
``torch.zeros(..., device=ctx.device)``) makes such tensors. Nothing of the library is
patched but ``torch.distributed``: it cannot tell the pretend device from a real one.

The model stays on the CPU (its tensors are host tensors here), so gradients and BN
statistics reach :class:`DistContext` off its device, like the evaluation counters. That
checks the contract every caller relies on: whatever device a tensor lives on,
``DistContext`` hands collectives only tensors on its own device, and puts the result back
where the tensor lives, in its dtype.

``RecordingDist`` acts as two identical ranks: ``all_reduce`` doubles (a sum of two equal
tensors), ``broadcast`` keeps rank 0's values. So sums double and means, accuracies and
trained weights equal a one-process run's, which checks the copying back.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, TensorDataset

import dsnet.train.distributed
from dsnet.config import ConfigError
from dsnet.eval.evaluate import evaluate_dynamic, evaluate_routing, evaluate_subnet
from dsnet.train.distributed import DistContext
from dsnet.train.stages import make_runner
from pipelines.config import RayConfig, ray_config_from_dict, validate_ray
from tests.helpers import small_model, stage_cfg, toy_bundle

ACCEL = torch.device("meta")  # what the pretend accelerator's tensors report
_aten = torch.ops.aten
# dtypes ProcessGroupNCCL maps to an NCCL type (float64 included: ncclDouble)
NCCL_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8,
               torch.uint8, torch.int32, torch.int64, torch.bool}


# ----------------------------------------------------------------------------- the device


def _is_accel(d: Any) -> bool:
    if isinstance(d, str):
        return d.split(":")[0] == ACCEL.type
    return isinstance(d, torch.device) and d.type == ACCEL.type


def _data(t: Any) -> Any:
    return t.inner if isinstance(t, OnAccelerator) else t


def _host(tree: Any) -> Any:
    """``tree`` with device tensors replaced by their data and ``ACCEL`` by the CPU."""
    return tree_map(lambda a: torch.device("cpu") if _is_accel(a) else _data(a), tree)


class OnAccelerator(torch.Tensor):
    """A tensor on the pretend accelerator: reports ``ACCEL``, keeps its data in ``inner``.

    Its ops run on ``inner``; like CUDA it refuses to mix with (non-scalar) CPU tensors,
    except in ``copy_`` and ``.to()``, which cross devices.
    """

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> OnAccelerator:
        t = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=ACCEL)
        t.inner = inner
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten.copy_.default:
            _data(args[0]).copy_(_data(args[1]), *args[2:], **kwargs)
            return args[0]
        flat, _ = tree_flatten((args, kwargs))
        on_dev = [a for a in flat if isinstance(a, OnAccelerator)]
        if func is _aten._to_copy.default:  # keeps the device when none is given
            to_dev = _is_accel(kwargs.get("device", ACCEL))
        else:
            if any(isinstance(a, torch.Tensor) and not isinstance(a, OnAccelerator)
                   and a.dim() > 0 for a in flat):
                raise RuntimeError(f"{func}: Expected all tensors to be on the same device, "
                                   f"but found {ACCEL.type} and cpu")
            to_dev = True
        out = func(*_host(args), **_host(kwargs))
        if not to_dev:
            return out
        same = {id(a.inner): a for a in on_dev}  # in-place ops return their input
        return tree_map(lambda o: same.get(id(o), OnAccelerator(o))
                        if isinstance(o, torch.Tensor) else o, out)


class PretendAccelerator(TorchFunctionMode):
    """Makes ``ACCEL`` reachable: a call naming it (``.to(ACCEL)``, ``torch.zeros(...,
    device=ACCEL)``) runs for the CPU and its tensors move to the pretend accelerator.

    A function mode, not a dispatch mode: it sees only Python-level calls, so the
    model's own CPU work (and all of autograd) runs at full speed.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Top-level arguments only: devices are passed there, and a deep walk would cost
        # seconds per call on the memo dict of deepcopy (ModelEma).
        if not any(_is_accel(a) for a in (*args, *kwargs.values())):
            return func(*args, **kwargs)
        args = tuple(torch.device("cpu") if _is_accel(a) else a for a in args)
        kwargs = {k: torch.device("cpu") if _is_accel(v) else v for k, v in kwargs.items()}
        return tree_map(lambda o: o if isinstance(o, OnAccelerator) or
                        not isinstance(o, torch.Tensor) else OnAccelerator(o),
                        func(*args, **kwargs))


# ----------------------------------------------------------------------------- the group


@dataclasses.dataclass
class Call:
    op: str
    device: torch.device
    dtype: torch.dtype
    shape: tuple[int, ...]


class RecordingDist:
    """``torch.distributed`` of rank 0 of two identical ranks; records every collective."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.calls: list[Call] = []

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 2

    def _record(self, op: str, tensor: torch.Tensor) -> None:
        self.calls.append(Call(op, tensor.device, tensor.dtype, tuple(tensor.shape)))

    def all_reduce(self, tensor: torch.Tensor, op: Any = None, group: Any = None,
                   async_op: bool = False) -> None:
        self._record("all_reduce", tensor)
        _data(tensor).mul_(2)  # the sum over two ranks holding the same values

    def broadcast(self, tensor: torch.Tensor, src: int, group: Any = None,
                  async_op: bool = False) -> None:
        self._record("broadcast", tensor)  # rank 0 keeps its own values

    def wrong(self) -> list[Call]:
        """Calls that an NCCL-only group on ``device`` would refuse."""
        return [c for c in self.calls
                if c.device.type != self.device.type or c.dtype not in NCCL_DTYPES]

    def assert_all_on_device(self) -> None:
        """Some collective ran, and every one was given tensors NCCL on ``device`` takes."""
        assert self.calls, "no collective ran"
        bad = Counter((c.op, str(c.device), str(c.dtype)) for c in self.wrong())
        assert not bad, (f"{sum(bad.values())} of {len(self.calls)} collectives were given "
                         f"tensors that NCCL on {self.device.type} refuses, as "
                         f"(op, device, dtype): count: {dict(bad)}")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def gpu_world(monkeypatch) -> Iterator[tuple[DistContext, RecordingDist]]:
    """Rank 0 of two on the pretend accelerator, with the recording group installed."""
    fake = RecordingDist(ACCEL)
    monkeypatch.setattr(dsnet.train.distributed, "tdist", fake)
    with PretendAccelerator():
        yield DistContext(0, 2, ACCEL), fake


# ----------------------------------------------------------------------------- the checks


def test_the_recorder_flags_a_cpu_tensor():
    """The detector itself: a CPU tensor handed straight to a collective is flagged."""
    fake = RecordingDist(ACCEL)
    fake.all_reduce(torch.zeros(3, dtype=torch.float64))
    with PretendAccelerator():
        fake.all_reduce(torch.zeros(3, dtype=torch.float64).to(ACCEL))
        with pytest.raises(RuntimeError, match="same device"):
            torch.zeros(3).to(ACCEL) + torch.zeros(3)  # what CUDA says too
    assert [c.device.type for c in fake.wrong()] == ["cpu"]


def test_reductions_run_on_the_device_and_keep_each_tensors_dtype(gpu_world):
    ctx, fake = gpu_world
    counts = torch.tensor([3, 2**40 + 1], dtype=torch.int64)  # past float32's exact range
    halves = torch.tensor([0.5, 1.5])
    on_dev = torch.tensor([1.0, 2.0], dtype=torch.float64).to(ACCEL)
    ctx.all_reduce_sum_([counts, halves, on_dev])
    fake.assert_all_on_device()
    assert counts.tolist() == [6, 2**41 + 2] and counts.dtype == torch.int64
    assert halves.tolist() == [1.0, 3.0] and halves.dtype == torch.float32
    assert on_dev.device == ACCEL and on_dev.cpu().tolist() == [2.0, 4.0]
    ctx.all_reduce_mean_([halves])
    assert halves.tolist() == [1.0, 3.0]
    assert len(fake.calls) == 2 and {c.dtype for c in fake.calls} == {torch.float64}


def test_broadcast_reaches_every_tensor_and_bumps_versions(gpu_world):
    ctx, fake = gpu_world
    host, dev = torch.ones(4), torch.ones(4).to(ACCEL)
    before = host._version
    ctx.broadcast_([host, dev])
    fake.assert_all_on_device()
    assert host._version > before and host.tolist() == [1.0] * 4
    assert [c.op for c in fake.calls] == ["broadcast"] * 2


def _val_loader(n: int = 48) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,),
                                                                            generator=g))
    return DataLoader(ds, batch_size=16)


def test_evaluation_counters_reach_collectives_on_the_device(gpu_world):
    """The issue's crash: evaluation sums built on the CPU went to all_reduce as they were."""
    ctx, fake = gpu_world
    model, loader = small_model(), _val_loader()
    static = [evaluate_subnet(model, loader, 0, d, 28) for d in (None, ctx)]
    dynamic = [evaluate_dynamic(model, loader, d, 28) for d in (None, ctx)]
    routing = evaluate_routing(model, loader, 10, ctx, 28)
    fake.assert_all_on_device()
    assert {c.op for c in fake.calls} == {"all_reduce"}
    assert static[1] == static[0]  # two identical ranks: the same percentages
    assert dynamic[1]["top1"] == dynamic[0]["top1"]
    assert dynamic[1]["madds"] == pytest.approx(dynamic[0]["madds"])
    assert dynamic[1]["choices"] == {k: 2 * v for k, v in dynamic[0]["choices"].items()}
    assert sum(routing["images"]) == 2 * 48


def _stage_run(stage: str, dist: DistContext) -> dict[str, torch.Tensor]:
    """One epoch, validation and the final evaluation of ``stage``; the weights after.

    The runner is built with a one-process context on the CPU (where its model and batches
    live) and handed ``dist`` after: a runner's device is also where it puts its batches.
    """
    cfg = stage_cfg(stage, dist_bn="" if stage == "reset_bn" else "reduce", reset_bn_batches=2)
    torch.manual_seed(0)
    runner = make_runner(cfg, small_model(), toy_bundle(32), DistContext(), None)
    runner.dist = dist
    dist.broadcast_(runner.model.state_dict().values())  # what a runner of two ranks does
    runner.train_epoch(0)  # gradient averaging, BN statistics sync / recalibration
    runner.validate()
    runner.finish()
    return {k: v.clone() for k, v in runner.model.state_dict().items()}


@pytest.mark.parametrize("stage", ["supernet", "reset_bn", "gate"])
def test_training_collectives_run_on_the_device(stage, gpu_world):
    ctx, fake = gpu_world
    alone = _stage_run(stage, DistContext())
    both = _stage_run(stage, ctx)
    fake.assert_all_on_device()
    assert {c.op for c in fake.calls} == {"all_reduce", "broadcast"}
    for key, value in alone.items():  # two identical ranks train as one
        torch.testing.assert_close(both[key], value, rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("gpus", [0.5, 1.5, 0.25])
def test_fractional_gpus_are_refused_for_several_gpu_workers(gpus):
    with pytest.raises(ConfigError, match="NCCL refuses two ranks on the same GPU"):
        validate_ray(RayConfig(num_workers=2, use_gpu=True, gpus_per_worker=gpus))
    with pytest.raises(ConfigError, match=r"\[ray\].*gpus_per_worker"):
        ray_config_from_dict({"num_workers": 2, "use_gpu": True, "gpus_per_worker": gpus})


@pytest.mark.parametrize("kw", [
    {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 0},  # 0: one GPU each
    {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 1},
    {"num_workers": 4, "use_gpu": True, "gpus_per_worker": 2},
    {"num_workers": 1, "use_gpu": True, "gpus_per_worker": 0.5},  # one rank: no NCCL peer
    {"num_workers": 2, "use_gpu": False, "gpus_per_worker": 0.5},  # CPU: gloo, no GPUs used
])
def test_whole_gpus_or_one_worker_are_accepted(kw):
    validate_ray(RayConfig(**kw))


def test_gpu_process_group_serves_cpu_and_cuda_tensors():
    stage = pytest.importorskip("pipelines.stage")
    assert stage.torch_config(RayConfig(use_gpu=True)).backend == "cpu:gloo,cuda:nccl"
    assert stage.torch_config(RayConfig(use_gpu=False)).backend == "gloo"
