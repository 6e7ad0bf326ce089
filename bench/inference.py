"""Inference benchmark: slicing overhead, grouped vs masked dynamic batches, MAdds vs latency.

Run from the repository root::

    .venv/bin/python bench/inference.py                       # default, a few minutes on 2 cores
    .venv/bin/python bench/inference.py --quick --models ds_mbnet_small --batch-sizes 2
    .venv/bin/python bench/inference.py --models ds_resnet50 --curve-subnets 0,3,6,13

For every model (ds_mbnet_v1 at 224 px, ds_mbnet_small at 28 px by default; any registered
model at its own size), device (CPU, and CUDA when available) and batch size it measures,
under ``torch.inference_mode()``:

1. *Slicing overhead*: the supernet ``model(x, subnet=c)`` against ``export_subnet(model, c)``
   (plain ``nn`` layers holding copies) for c in 0, 6, 13, largest. Goal: ratio <= 1.05.
2. *Dynamic batches*: the model's eval-mode dynamic forward (samples grouped by choice, each
   group at its own width), the exported :class:`~dsnet.models.export.DynamicStaticNet`, the
   release's masked execution (:func:`~dsnet.models.masked.masked_dynamic_forward`), the largest
   network, subnet 13 and the widest routed subnet (3). The gate is *forced*: a forward hook
   on the slimming-head conv replaces its logits with a fixed per-sample one-hot, so a
   controlled 70/20/10/0 % of the samples go to routing choices 0/1/2/3. With a batch too
   small to hold those fractions
   (within 5 points; batch 1 and 2), each choice is timed with the whole batch routed to it
   and the per-choice medians are averaged with the fractions as weights. Goal: the
   wall-clock speed-up reaches >= 0.8 of the MAdds ratio. The *trunk bound* column is the
   speed-up if everything after the gate cost nothing (slow time / the fast variant's own
   trunk time): where it is below the goal, no routing can reach the goal on that machine.
3. *MAdds vs latency*: all 14 uniform subnets (``--curve-subnets`` to time fewer: a
   ResNet-50 round at batch 64 is minutes on 2 cores), per-image time vs MAdds, Pearson r.

Every timed function of one (model, device, batch) runs in one interleaved group: each round
calls every function once (rotating the order), so load from other processes hits all of
them alike; the reported time is the median over the rounds after the warm-up rounds. The
number of rounds is ``--repeats``, cut to fit ``--group-budget-s`` but never below
``--min-repeats`` (5). Random weights with BatchNorm statistics re-estimated on random
inputs (so activations stay O(1) and no denormal slow path distorts the timings).
Every variant runs in the same memory format (``--memory-format``, channels-last by default)
and, on Linux, with :func:`dsnet.utils.allocator.keep_freed_memory` (``--no-keep-freed-memory``
leaves glibc's default, which maps and page-faults every large activation afresh).

Output: a table on stdout, ``<out>/inference.json`` and ``<out>/madds_vs_latency_<model>.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# OpenMP's default spin-waiting turns every parallel op into a stall whenever another process
# holds a core (2-thread batch-2 medians went from 4 ms to 100+ ms on a shared machine).
# Passive waiting must be chosen before torch loads its OpenMP runtime; the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import dsnet  # noqa: E402
from dsnet.eval.evaluate import save_figure  # noqa: E402
from dsnet.models.export import export_dynamic, export_subnet  # noqa: E402
from dsnet.models.madds import count_madds, routing_madds  # noqa: E402
from dsnet.models.masked import masked_dynamic_forward  # noqa: E402
from dsnet.train.bn_calibration import recalibrate_bn  # noqa: E402
from dsnet.utils.allocator import allocator_settings, keep_freed_memory  # noqa: E402
from dsnet.utils.atomic import atomic_write_text  # noqa: E402

IMG_SIZES = {"ds_mbnet_v1": 224, "ds_mbnet_small": 28}
SLICING_SUBNETS: tuple[int | str, ...] = (0, 6, 13, "largest")
ROUTING_FRACTIONS = (0.7, 0.2, 0.1, 0.0)
SLICING_GOAL, DYNAMIC_GOAL = 1.05, 0.8
MAX_FRACTION_ERROR = 0.05
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclass
class Settings:
    """Timing settings shared by every group."""

    repeats: int = 30
    min_repeats: int = 5
    warmup: int = 1
    group_budget_s: float = 60.0
    calib_batch: int = 4


# ----------------------------------------------------------------------------- timing


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function waiting for queued device work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _round(fns: dict[str, Callable[[], Any]], order: Sequence[str],
           sync: Callable[[], None]) -> dict[str, float]:
    """Call every function once in ``order``; seconds per call."""
    times = {}
    for name in order:
        sync()
        start = time.perf_counter()
        fns[name]()
        sync()
        times[name] = time.perf_counter() - start
    return times


def time_group(fns: dict[str, Callable[[], Any]], settings: Settings,
               sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per call of every function in every timed round, timed round-robin."""
    names = list(fns)
    last: dict[str, float] = {}
    for _ in range(settings.warmup):
        last = _round(fns, names, sync)
    round_s = sum(last.values()) if last else 0.0
    fit = int(settings.group_budget_s / round_s) if round_s > 0 else settings.repeats
    rounds = max(settings.min_repeats, min(settings.repeats, fit))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)   # rotate so no function always runs first (or after another)
        for name, t in _round(fns, names[shift:] + names[:shift], sync).items():
            samples[name].append(t)
    return samples


def spread_ms(samples: list[float]) -> dict[str, float]:
    """Median, quartiles and minimum in milliseconds (the quartiles show the noise)."""
    q1, q3 = samples[0], samples[0]
    if len(samples) > 1:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median": 1e3 * statistics.median(samples), "q1": 1e3 * q1, "q3": 1e3 * q3,
            "min": 1e3 * min(samples)}


# ----------------------------------------------------------------------------- routing


@contextlib.contextmanager
def forced_routing(head: nn.Module, index: torch.Tensor) -> Iterator[None]:
    """Make the slimming-head module ``head`` output a one-hot of ``index`` as its logits.

    A forward hook replaces the head's (B, K, 1, 1) output with ``10 * one_hot(index)``, so
    the argmax routes sample i to choice ``index[i]`` whatever the features are. The head
    itself still runs (its cost, ``model.gate_madds``, stays in the measurement).
    """
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if output.size(0) != index.numel():
            raise RuntimeError(f"forced routing for {index.numel()} samples got a batch of "
                               f"{output.size(0)}")
        return 10.0 * F.one_hot(index, output.size(1)).to(output.dtype).view_as(output)

    handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def assignment(batch: int, fractions: Sequence[float], seed: int = 0) -> torch.Tensor | None:
    """Per-sample choices (B,) holding ``fractions`` (largest-remainder rounding), shuffled.

    Returns None when the batch cannot hold the fractions within ``MAX_FRACTION_ERROR``
    (then each choice is timed alone and weighted, see :func:`dynamic_fns`).
    """
    exact = [f * batch for f in fractions]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda k: counts[k] - exact[k])
    for k in by_remainder[:batch - sum(counts)]:
        counts[k] += 1
    if max(abs(c / batch - f) for c, f in zip(counts, fractions)) > MAX_FRACTION_ERROR:
        return None
    index = torch.cat([torch.full((c,), k, dtype=torch.long) for k, c in enumerate(counts)])
    # Shuffled, so each group is gathered from scattered rows as in real traffic.
    return index[torch.randperm(batch, generator=torch.Generator().manual_seed(seed))]


# ----------------------------------------------------------------------------- subjects


@dataclass
class Subject:
    """A supernet prepared on one device, with its exported static networks."""

    name: str
    model: nn.Module
    img_size: int
    device: torch.device
    exports: dict[str, nn.Module]
    dynamic_export: nn.Module
    memory_format: torch.memory_format = torch.contiguous_format
    curve: tuple[int, ...] = ()   # uniform subnets of the MAdds-latency curve (() = all)

    def input(self, batch: int) -> torch.Tensor:
        """A random input batch (B, C, H, W) on the device, in the models' memory format."""
        x = torch.randn(batch, self.model.in_chans, self.img_size, self.img_size,
                        device=self.device)
        return x.contiguous(memory_format=self.memory_format)

    @property
    def last(self) -> int:
        """The widest uniform subnet (13 for DS-MBNet)."""
        return self.model.num_subnets - 1

    @property
    def widest_routed(self) -> int:
        """The widest subnet of the routing space (3 by default)."""
        return max(self.model.routing_space)

    @property
    def largest_is_last(self) -> bool:
        """Whether the largest network is the widest uniform subnet (a one-width trunk, as in
        the DS-ResNets): then it is timed once, as that subnet."""
        arch = self.model.arch
        return arch.resolve("largest") == arch.resolve(self.last)

    def timed_subnets(self) -> list[int | str]:
        """Every static subnet some section reads, each once."""
        ints = set(self.curve or range(self.model.num_subnets)) | {self.last, self.widest_routed}
        ints |= {int(k) for k in self.exports if k != "largest"}
        return sorted(ints) + ([] if self.largest_is_last else ["largest"])

    def static_key(self, subnet: int | str) -> str:
        """The timing name of a static subnet (the largest network may be the last one)."""
        if subnet == "largest" and self.largest_is_last:
            subnet = self.last
        return f"subnet:{subnet}"


def calibrated_model(name: str, calib_batch: int) -> nn.Module:
    """Random weights, seeded; BN statistics of every subnet estimated on random inputs."""
    torch.manual_seed(0)
    model = dsnet.create_model(name).eval()
    size = IMG_SIZES.get(name, model.arch.img_size)
    calib = torch.randn(calib_batch, model.in_chans, size, size)
    recalibrate_bn(model, [calib], [*range(model.num_subnets), "largest"])
    return model


def prepare(model: nn.Module, name: str, device: torch.device,
            memory_format: torch.memory_format = torch.contiguous_format,
            curve: Sequence[int] = ()) -> Subject:
    """Move ``model`` to ``device`` and export its static subnets and dynamic network, all
    in ``memory_format`` (weights and inputs alike: every timed variant gets the same)."""
    model = model.to(device, memory_format=memory_format).eval()
    subnets = [s for s in SLICING_SUBNETS if s == "largest" or s < model.num_subnets]
    exports = {str(s): export_subnet(model, s).to(memory_format=memory_format)
               for s in subnets}
    return Subject(name, model, IMG_SIZES.get(name, model.arch.img_size), device, exports,
                   export_dynamic(model).to(memory_format=memory_format), memory_format,
                   tuple(curve))


def _forced(fn: Callable[[], Any], head: nn.Module, index: torch.Tensor) -> Callable[[], Any]:
    """``fn`` run under :func:`forced_routing` (the hook lives only for the call)."""
    def call() -> Any:
        with forced_routing(head, index):
            return fn()
    return call


def dynamic_variants(s: Subject, x: torch.Tensor,
                     index: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The three dynamic executions of batch ``x``, routed by ``index`` (B,)."""
    index = index.to(s.device)
    head = s.model.gate_head.gate
    return {
        "dynamic": _forced(lambda: s.model(x, subnet="dynamic"), head, index),
        "export_dynamic": _forced(lambda: s.dynamic_export(x), s.dynamic_export.slimming_head,
                                  index),
        "masked": _forced(lambda: masked_dynamic_forward(s.model, x), head, index),
    }


def static_fns(s: Subject, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """Every uniform subnet and the largest network (supernet), and the exported networks."""
    fns: dict[str, Callable[[], Any]] = {}
    for c in s.timed_subnets():
        fns[f"subnet:{c}"] = lambda c=c: s.model(x, subnet=c)
    for key, net in s.exports.items():
        fns[f"export:{key}"] = lambda net=net: net(x)
    # Stem .. gate head, shared by every routed subnet: the part routing cannot shrink.
    fns["trunk"] = lambda: s.model.forward_trunk(x)
    fns["export_trunk"] = lambda: s.dynamic_export.trunk(x)
    return fns


def dynamic_fns(s: Subject, x: torch.Tensor, fractions: Sequence[float]
                ) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """Timed dynamic executions and how the batch is routed.

    With a batch that holds the fractions: one assignment, names ``dynamic`` etc. Otherwise
    one all-``k`` batch per choice with a non-zero fraction, names ``dynamic@k`` etc.,
    combined later with the fractions as weights (the expected time per batch).
    """
    index = assignment(x.size(0), fractions)
    if index is not None:
        counts = torch.bincount(index, minlength=len(fractions)).tolist()
        return dynamic_variants(s, x, index), {"mode": "batch", "counts": counts,
                                               "weights": [c / len(index) for c in counts]}
    fns = {}
    for k, frac in enumerate(fractions):
        if frac > 0:
            full = torch.full((x.size(0),), k, dtype=torch.long)
            fns.update({f"{n}@{k}": f for n, f in dynamic_variants(s, x, full).items()})
    return fns, {"mode": "per-choice", "counts": None, "weights": list(fractions)}


@torch.inference_mode()
def parity_checks(s: Subject) -> dict[str, float]:
    """Max |difference| of every timed alternative against the supernet, on a small batch.

    Run before timing so the benchmark can never compare functions that compute different
    things (a wrong routing hook, a wrong export).
    """
    torch.manual_seed(1)
    k = len(s.model.routing_space)
    index = torch.arange(4) % k                                   # every choice present
    x = s.input(4)
    diffs = {}
    for key, net in s.exports.items():
        sub: int | str = key if key == "largest" else int(key)
        diffs[f"export:{key}"] = (net(x) - s.model(x, subnet=sub)).abs().max().item()
    fns = dynamic_variants(s, x, index)
    with forced_routing(s.model.gate_head.gate, index.to(s.device)):
        ref, choices = s.model(x, subnet="dynamic", return_choices=True)
    expected = torch.tensor(s.model.routing_space)[index]
    if not torch.equal(choices.cpu(), expected):
        raise RuntimeError(f"forced routing failed: {choices.tolist()} != {expected.tolist()}")
    for name in ("export_dynamic", "masked"):
        diffs[name] = (fns[name]() - ref).abs().max().item()
    return diffs


# ----------------------------------------------------------------------------- analysis


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation coefficient of two equal-length sequences."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    cov = sum((a - mx) * (b - my) for a, b in zip(xs, ys))
    var = math.sqrt(sum((a - mx) ** 2 for a in xs) * sum((b - my) ** 2 for b in ys))
    # A constant series has no linear relation; 0 rather than NaN, which JSON cannot hold.
    return cov / var if var > 0 else 0.0


def slicing_section(s: Subject, med: dict[str, float]) -> list[dict[str, Any]]:
    """Supernet vs exported static network for each exported subnet."""
    rows = []
    for key in s.exports:
        sub: int | str = key if key == "largest" else int(key)
        supernet, static = med[s.static_key(sub)], med[f"export:{key}"]
        rows.append({"subnet": key, "supernet_ms": 1e3 * supernet, "export_ms": 1e3 * static,
                     "ratio": supernet / static, "goal_met": supernet / static <= SLICING_GOAL})
    return rows


def _expected_time(med: dict[str, float], name: str, info: dict[str, Any]) -> float:
    """Seconds per batch of a dynamic variant (weighted over choices in per-choice mode)."""
    if info["mode"] == "batch":
        return med[name]
    return sum(w * med[f"{name}@{k}"] for k, w in enumerate(info["weights"]) if w > 0)


def trunk_madds(model: nn.Module, img_size: int) -> float:
    """MAdds per image of the trunk (stem .. the gate's attention head), gate head excluded:
    the part every routed subnet shares (each family counts its own, ``model.trunk_madds``)."""
    return float(model.trunk_madds(img_size))


def _speedup(slow: tuple[float, float, float], fast: tuple[float, float, float],
             trunk_madds: float) -> dict[str, Any]:
    """Speed-up of ``fast`` over ``slow`` and the share of the MAdds ratio it reaches.

    Each side is (seconds, MAdds, seconds of its own trunk). The ``tail_*`` entries leave the
    trunk out: how much faster the part after the gate is, the only part routing can shrink.
    """
    speedup, madds_ratio = slow[0] / fast[0], slow[1] / fast[1]
    out = {"speedup": speedup, "madds_ratio": madds_ratio,
           "fraction_of_madds_ratio": speedup / madds_ratio,
           "goal_met": speedup / madds_ratio >= DYNAMIC_GOAL,
           # Amdahl: even routed parts costing nothing leave ``fast``'s own trunk to run, so
           # no routing reaches more than this on this machine.
           "trunk_bound_speedup": slow[0] / fast[2],
           "trunk_bound_fraction": slow[0] / fast[2] / madds_ratio}
    tail_s, tail_m = fast[0] - fast[2], fast[1] - trunk_madds
    if tail_s > 0 and tail_m > 0:   # timing noise can make the trunk look slower
        out["tail_speedup"] = (slow[0] - slow[2]) / tail_s
        out["tail_madds_ratio"] = (slow[1] - trunk_madds) / tail_m
        out["tail_fraction_of_madds_ratio"] = out["tail_speedup"] / out["tail_madds_ratio"]
    return out


def dynamic_section(s: Subject, med: dict[str, float], info: dict[str, Any],
                    fractions: Sequence[float]) -> dict[str, Any]:
    """Grouped vs masked vs static, with the MAdds each one computes per image."""
    per_choice = routing_madds(s.model, s.img_size).tolist()    # (K,) gate head included
    madds = {
        "dynamic": sum(w * m for w, m in zip(info["weights"], per_choice)),
        # The masked batch runs the routed part at its widest routed width for everyone.
        "masked": max(per_choice),
    }
    secs = {n: _expected_time(med, n, info) for n in ("dynamic", "export_dynamic", "masked")}
    # static references: the widest routed subnet (what a batch costs without routing), the
    # widest uniform subnet and the largest network
    statics = dict.fromkeys([f"subnet_{s.widest_routed}", f"subnet_{s.last}", "largest"])
    for name in statics:
        subnet: int | str = name if name == "largest" else int(name.split("_")[1])
        madds[name] = float(count_madds(s.model, subnet, s.img_size))
        secs[name] = med[s.static_key(subnet)]
    madds["export_dynamic"] = madds["dynamic"]
    secs["trunk"], secs["export_trunk"] = med["trunk"], med["export_trunk"]
    madds["trunk"] = madds["export_trunk"] = trunk_madds(s.model, s.img_size)
    compare = {}
    for fast in ("dynamic", "export_dynamic"):
        for slow in ("masked", *list(statics)[:2]):
            own_trunk = secs["export_trunk" if fast == "export_dynamic" else "trunk"]
            compare[f"{fast}_vs_{slow}"] = _speedup(
                (secs[slow], madds[slow], secs["trunk"]), (secs[fast], madds[fast], own_trunk),
                madds["trunk"])
    return {"routing": {"fractions": list(fractions), "routing_space": list(s.model.routing_space),
                        **info},
            "ms_per_batch": {n: 1e3 * t for n, t in secs.items()},
            "madds_per_image": madds, "comparisons": compare}


def madds_latency_section(s: Subject, med: dict[str, float], batch: int) -> dict[str, Any]:
    """Per-image MAdds and time of the curve's uniform subnets, and their Pearson r."""
    subnets = list(s.curve or range(s.model.num_subnets))
    madds = [count_madds(s.model, c, s.img_size) for c in subnets]
    ms = [1e3 * med[f"subnet:{c}"] / batch for c in subnets]
    return {"subnets": subnets, "madds": madds, "ms_per_image": ms, "pearson": pearson(madds, ms)}


# ----------------------------------------------------------------------------- running


@torch.inference_mode()
def run_group(s: Subject, batch: int, fractions: Sequence[float],
              settings: Settings) -> dict[str, Any]:
    """Time everything for one (model, device, batch size) in one interleaved group."""
    torch.manual_seed(2)
    x = s.input(batch)
    dyn, info = dynamic_fns(s, x, fractions)
    fns = {**static_fns(s, x), **dyn}
    load_before, start = os.getloadavg()[0], time.perf_counter()
    samples = time_group(fns, settings, synchronizer(s.device))
    med = {n: statistics.median(v) for n, v in samples.items()}
    return {
        "model": s.name, "img_size": s.img_size, "device": str(s.device), "batch_size": batch,
        "rounds": len(samples["trunk"]), "warmup_rounds": settings.warmup,
        "timed_subnets": [str(c) for c in s.timed_subnets()],
        "seconds": time.perf_counter() - start,
        "loadavg_1min": [load_before, os.getloadavg()[0]],
        "timings_ms": {n: spread_ms(v) for n, v in samples.items()},
        "slicing": slicing_section(s, med),
        "dynamic": dynamic_section(s, med, info, fractions),
        "madds_latency": madds_latency_section(s, med, batch),
    }


def devices(spec: str) -> list[torch.device]:
    """``auto`` = CPU plus CUDA when available; else a comma-separated list."""
    if spec == "auto":
        names = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        names = [d.strip() for d in spec.split(",") if d.strip()]
    for name in names:
        if name == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --devices cuda but CUDA is not available")
    return [torch.device(n) for n in names]


# ----------------------------------------------------------------------------- reporting


def _met(ok: bool) -> str:
    """Goal verdict for the table."""
    return "met" if ok else "NOT met"


def format_group(r: dict[str, Any]) -> str:
    """The human-readable table of one group."""
    load = r["loadavg_1min"]
    # Noise: the typical interquartile range relative to the median, over the functions.
    noise = statistics.median((t["q3"] - t["q1"]) / t["median"] for t in r["timings_ms"].values())
    lines = [f"== {r['model']} @{r['img_size']}px {r['device']} batch {r['batch_size']}: "
             f"{r['rounds']} timed rounds, 1-min load {load[0]:.1f} -> {load[1]:.1f}, "
             f"{r['seconds']:.0f} s, noise (IQR/median) {100 * noise:.1f} %",
             f"slicing overhead (supernet / export, goal <= {SLICING_GOAL})",
             f"  {'subnet':<9}{'supernet ms':>12}{'export ms':>12}{'ratio':>8}  goal"]
    for row in r["slicing"]:
        lines.append(f"  {row['subnet']:<9}{row['supernet_ms']:>12.2f}{row['export_ms']:>12.2f}"
                     f"{row['ratio']:>8.3f}  {_met(row['goal_met'])}")
    d = r["dynamic"]
    routing = d["routing"]
    counts = "/".join(map(str, routing["counts"])) if routing["counts"] else "per-choice"
    pct = "/".join(f"{100 * f:.0f}" for f in routing["fractions"])
    lines += [f"dynamic, routing {pct} % over subnets {routing['routing_space']} ({counts})",
              f"  {'variant':<16}{'ms/batch':>10}{'MAdds/img':>12}"]
    for name, ms in d["ms_per_batch"].items():
        lines.append(f"  {name:<16}{ms:>10.2f}{d['madds_per_image'][name] / 1e6:>11.1f}M")
    lines.append(f"  {'speed-up':<30}{'wall':>7}{'MAdds':>7}{'achieved':>10}  "
                 f"{'goal >= ' + str(DYNAMIC_GOAL):<10}{'tail: wall':>11}{'MAdds':>7}"
                 f"{'trunk bound':>13}")
    for name, c in d["comparisons"].items():
        tail = (f"{c['tail_speedup']:>10.2f}x{c['tail_madds_ratio']:>6.2f}x"
                if "tail_speedup" in c else f"{'n/a':>11}{'':>7}")
        lines.append(f"  {name:<30}{c['speedup']:>6.2f}x{c['madds_ratio']:>6.2f}x"
                     f"{c['fraction_of_madds_ratio']:>10.2f}  {_met(c['goal_met']):<10}{tail}"
                     f"{c['trunk_bound_speedup']:>8.2f}x ({c['trunk_bound_fraction']:.2f})")
    m = r["madds_latency"]
    lines.append(f"MAdds vs latency ({len(m['subnets'])} subnets): Pearson r = "
                 f"{m['pearson']:.3f}; ms/image "
                 f"{m['ms_per_image'][0]:.3f} (subnet 0) .. {m['ms_per_image'][-1]:.3f} "
                 f"(subnet {m['subnets'][-1]})")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], model: str, path: Path) -> None:
    """MAdds per image vs ms per image, one panel per batch size, one series per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [r for r in results if r["model"] == model]
    batches = sorted({r["batch_size"] for r in groups})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for r in (g for g in groups if g["batch_size"] == batch):
            m, d = r["madds_latency"], r["dynamic"]
            ax.plot([v / 1e6 for v in m["madds"]], m["ms_per_image"], "o-",
                    label=f"{r['device']} subnets {m['subnets'][0]}-{m['subnets'][-1]} "
                          f"(r = {m['pearson']:.3f})")
            for name, marker in (("dynamic", "*"), ("masked", "x")):
                ax.plot(d["madds_per_image"][name] / 1e6, d["ms_per_batch"][name] / batch,
                        marker, markersize=11, label=f"{r['device']} {name} (70/20/10/0)")
        ax.set(title=f"{model}, batch {batch}", xlabel="MAdds per image (M)",
               ylabel="ms per image")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)   # atomic, closes the figure


def write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically (:func:`dsnet.utils.atomic.atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


# ----------------------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _index_list(text: str) -> list[int]:
    """argparse type: comma-separated subnet indices (>= 0)."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated subnet indices, got {text!r}") from None
    if not values or values[0] < 0:
        raise argparse.ArgumentTypeError(f"expected subnet indices >= 0, got {text!r}")
    return values


def _fractions(text: str) -> list[float]:
    """argparse type: comma-separated non-negative fractions summing to 1."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions, got {text!r}") from None
    if min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"fractions must be >= 0 and sum to 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="ds_mbnet_v1,ds_mbnet_small",
                   help="comma-separated registered models")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 64], metavar="B,B")
    p.add_argument("--repeats", type=int, default=30,
                   help="timed rounds per group at most (cut to --group-budget-s)")
    p.add_argument("--min-repeats", type=int, default=5, help="timed rounds per group at least")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--group-budget-s", type=float, default=60.0,
                   help="target seconds of timed rounds per group")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--devices", default="auto", help="auto (cpu + cuda if present), cpu, cuda")
    p.add_argument("--fractions", type=_fractions, default=list(ROUTING_FRACTIONS),
                   help="share of samples routed to each routing choice (default 0.7,0.2,0.1,0)")
    p.add_argument("--memory-format", choices=sorted(MEMORY_FORMATS), default="channels_last",
                   help="layout of weights and inputs for every variant (default "
                        "channels_last: measured 1.5-1.7x faster on the trunk on CPU)")
    p.add_argument("--curve-subnets", type=_index_list, default=None, metavar="C,C",
                   help="uniform subnets timed for the MAdds-latency curve (default: all)")
    p.add_argument("--quick", action="store_true", help="2 timed rounds: a smoke test")
    p.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                   help="leave glibc's malloc as it is (default: dsnet.utils.allocator."
                        "keep_freed_memory(), as pipelines.predict does; see that module)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    """Timing settings from the flags (``--quick`` overrides them all)."""
    if args.quick:
        return Settings(repeats=2, min_repeats=2, warmup=1, group_budget_s=1.0, calib_batch=2)
    if args.min_repeats < 1 or args.repeats < args.min_repeats:
        raise SystemExit("error: need 1 <= --min-repeats <= --repeats")
    return Settings(repeats=args.repeats, min_repeats=args.min_repeats,
                    warmup=max(0, args.warmup), group_budget_s=args.group_budget_s)


def meta(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Machine, versions and settings recorded with the results."""
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "allocator": allocator_settings() or "glibc default",
            "memory_format": args.memory_format,
            "quick": args.quick, "settings": asdict(settings),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg_start": os.getloadavg(),
            "gate_forcing": "forward hook on the slimming-head conv returns 10 * one_hot("
                            "assigned choice) as logits (bench/inference.py forced_routing)"}


def run_model(name: str, args: argparse.Namespace, settings: Settings,
              results: list[dict[str, Any]], checks: dict[str, Any]) -> None:
    """Every device and batch size of one model; results appended as they finish."""
    base = calibrated_model(name, settings.calib_batch)
    if len(args.fractions) != len(base.routing_space):
        raise SystemExit(f"error: --fractions needs {len(base.routing_space)} values for "
                         f"{name}'s routing space {base.routing_space}")
    curve = args.curve_subnets or []
    if curve and curve[-1] >= base.num_subnets:
        raise SystemExit(f"error: --curve-subnets: {name} has subnets 0..{base.num_subnets - 1}")
    for device in devices(args.devices):
        s = prepare(base, name, device, MEMORY_FORMATS[args.memory_format], curve)
        diffs = parity_checks(s)
        checks[f"{name}/{device}"] = diffs
        worst = max(diffs.values())
        if worst > 1e-3:
            print(f"WARNING {name} {device}: alternatives differ from the supernet by up to "
                  f"{worst:.2e}: {diffs}", file=sys.stderr)
        for batch in args.batch_sizes:
            results.append(run_group(s, batch, args.fractions, settings))
            print(format_group(results[-1]) + "\n", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write the JSON and the plots."""
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    if args.keep_freed_memory and not keep_freed_memory():
        print("note: not glibc: the allocator is left as it is", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"meta": meta(args, settings), "parity_max_abs_diff": {},
                              "results": []}
    start = time.perf_counter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        run_model(name, args, settings, report["results"], report["parity_max_abs_diff"])
    report["meta"].update(loadavg_end=os.getloadavg(), seconds=time.perf_counter() - start)
    write_json(report, args.out / "inference.json")
    for name in sorted({r["model"] for r in report["results"]}):
        plot(report["results"], name, args.out / f"madds_vs_latency_{name}.png")
    print(f"wrote {args.out / 'inference.json'} in {report['meta']['seconds']:.0f} s "
          f"(1-min load {report['meta']['loadavg_start'][0]:.1f} -> "
          f"{report['meta']['loadavg_end'][0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
