"""What every run, checkpoint and result file records about where it came from.

One home for the three things every writer needs: :func:`versions` (package versions and
which copy of dsnet ran), :func:`now` (a timezone-aware ISO 8601 timestamp, so run.json,
sweep.json and checkpoints never mix naive and aware times) and :func:`to_builtins` (plain
Python values for JSON, pickles loaded with ``weights_only=True`` and Ray's object store).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from datetime import datetime
from importlib import metadata
from typing import Any

import torch

from dsnet.version import __version__

# Read from package metadata, never imported: the library must not import Ray.
_RECORDED_PACKAGES = ("torchvision", "timm", "numpy", "ray")


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str]:
    """Versions recorded with every checkpoint, run and sweep.

    ``dsnet_source`` says which copy ran: an installed package, a checkout, or the copy Ray
    unpacked from a job's ``working_dir`` (the version number alone cannot tell them apart).
    """
    # torch as it reports itself: the metadata version lacks the build tag (+cpu, +cu130)
    out = {"dsnet": __version__, "python": platform.python_version(),
           "torch": str(torch.__version__)}
    for name in _RECORDED_PACKAGES:
        version = _installed_version(name)
        if version is not None:
            out[name] = version
    out["dsnet_source"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return out


def now() -> str:
    """The local time with its UTC offset, e.g. ``2026-12-03T11:30:41+01:00``."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def to_builtins(obj: Any, *, keep_tensors: bool = False, nan_to_none: bool = False) -> Any:
    """``obj`` as dicts (string keys), lists, numbers, strings, bools and None.

    Tensors and numpy scalars become numbers (or stay tensors with ``keep_tensors``, for
    checkpoints); anything else unknown becomes its ``str``. ``nan_to_none`` maps NaN and
    infinities to None, since strict JSON has no spelling for them.
    """
    def convert(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        if isinstance(value, float):
            return None if nan_to_none and not math.isfinite(value) else value
        if value is None or isinstance(value, bool | int | str):
            return value
        if keep_tensors and type(value).__module__.startswith("torch"):
            return value
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            return convert(value.item())
        if hasattr(value, "tolist"):
            return convert(value.tolist())
        return str(value)

    return convert(obj)


def json_text(data: Mapping[str, Any]) -> str:
    """Strict JSON (NaN and infinities as null), indented, with a final newline."""
    return json.dumps(to_builtins(data, nan_to_none=True), indent=2, allow_nan=False) + "\n"
