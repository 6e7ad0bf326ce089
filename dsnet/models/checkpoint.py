"""Checkpoints: this project's self-describing files, the release's layout, bare state dicts.

Everything is read with ``torch.load(weights_only=True)``; the only non-tensor class ever
allowed is ``argparse.Namespace`` (the release stores its command-line ``args`` as one).
Writes are atomic (temporary file + rename), so a crash never leaves a truncated file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnet.utils.atomic import atomic_write
from dsnet.utils.provenance import to_builtins, versions

FORMAT = "dsnet-checkpoint"
FORMAT_VERSION = 1
SAFE_GLOBALS = [argparse.Namespace]  # what the release's DS_MBNet-70_1.pth.tar needs


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, not a checkpoint or does not fit the model."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically and durably (``dsnet.utils.atomic.atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True, fsync=True)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (recorded next to checkpoints to detect corruption)."""
    with open(path, "rb") as f:
        return stream_sha256(f)


def stream_sha256(f: Any) -> str:
    """Hex SHA-256 of what a binary stream (a file, a remote object) still holds, read
    in 1 MiB chunks."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _brief(exc: BaseException) -> str:
    """``Type: first sentence`` of an error (torch's zip errors run on for five more)."""
    text = str(exc).strip()
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# torch.save writes a zip archive; files of torch < 1.6 (and the release's era) a raw pickle,
# whose first opcode is PROTO (0x80).
_ZIP_MAGIC, _PICKLE_PROTO = b"PK\x03\x04", 0x80


def _check_magic(path: Path) -> None:
    """Refuse a file that is neither format (a text file, an image) with a plain message
    instead of the unpickler's, which suggests loading it unsafely."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes); re-download or re-create it")
    if head != _ZIP_MAGIC and head[0] != _PICKLE_PROTO:
        raise CheckpointError(f"{path} is not a checkpoint file (neither a PyTorch zip "
                              f"archive nor a pickle: it starts with {head!r})")


def _unpickling_reason(exc: pickle.UnpicklingError) -> str:
    """The useful line of torch's weights-only error (the rest advises loading unsafely)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if "WeightsUnpickler error:" in ln), lines[0] if lines
                  else type(exc).__name__)
    reason = reason.split("WeightsUnpickler error:")[-1].strip()
    return reason.split(". Please use")[0]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file safely and return it as a dict.

    Raises:
        CheckpointError: missing, truncated/corrupt, or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (check the path)")
    _check_magic(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} is not a loadable checkpoint: {_unpickling_reason(e)}; "
                              "dsnet loads weights only and will not run pickled code") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({_brief(e)}); "
                              "re-download or re-create it") from e
    except Exception as e:  # whatever else torch.load raises on damaged bytes past the magic
        raise CheckpointError(f"{path} is not a checkpoint file ({_brief(e)})") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return dict(obj)


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`rotate_save` keeps the previous checkpoint: ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _next_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.next{path.suffix}")


def rotate_save(save: Callable[[Path], Any], path: str | os.PathLike) -> Path:
    """Write a new checkpoint at ``path`` and keep the old one as :func:`previous_path`.

    ``save(p)`` must write a complete file at ``p`` atomically. The new file is written
    beside (``checkpoint.next.pt``), then the old one is renamed to ``.prev`` and the new
    one into place: a crash at any moment leaves at least one complete checkpoint, and
    :func:`rotation_candidates` lists what is there, newest first.
    """
    path = Path(path)
    nxt = _next_path(path)
    save(nxt)
    if path.exists():
        os.replace(path, previous_path(path))
    os.replace(nxt, path)
    return path


def rotation_candidates(path: str | os.PathLike) -> list[Path]:
    """Existing files of a :func:`rotate_save` checkpoint, newest first.

    ``.next`` only survives a crash between the two renames, and is then the newest.
    """
    path = Path(path)
    return [p for p in (_next_path(path), path, previous_path(path)) if p.is_file()]


def first_readable(candidates: Iterable[str | os.PathLike]
                   ) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, str]]]:
    """The first candidate that :func:`read_checkpoint` loads, in the order given.

    Returns:
        ``(path, checkpoint, skipped)``: the readable file and its contents (``None, None``
        when none is), and the unreadable files tried before it with the reason.
    """
    skipped: list[tuple[Path, str]] = []
    for candidate in candidates:
        try:
            return Path(candidate), read_checkpoint(candidate), skipped
        except CheckpointError as e:
            skipped.append((Path(candidate), str(e)))
    return None, None, skipped


def extract_state_dict(ckpt: Mapping[str, Any], use_ema: bool = False,
                       source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint dict (release, dsnet or bare layout).

    ``module.`` prefixes from DistributedDataParallel are stripped.
    """
    if use_ema:
        if "state_dict_ema" not in ckpt or ckpt["state_dict_ema"] is None:
            raise CheckpointError(f"{source} has no EMA weights ('state_dict_ema'); "
                                  "load it with use_ema=False")
        state = ckpt["state_dict_ema"]
    elif "state_dict" in ckpt:
        state = ckpt["state_dict"]
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt  # a bare state dict
    else:
        raise CheckpointError(f"{source} has no 'state_dict' and is not a state dict "
                              f"(keys: {', '.join(list(ckpt)[:8])})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _mismatch_report(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    parts = []
    # Shapes first: a different width list shows there; three examples each keep it short.
    for title, items in (("shape mismatch", shapes), ("missing", missing),
                         ("unexpected", unexpected)):
        if items:
            more = f" ... (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{len(items)} {title}: {'; '.join(items[:3])}{more}")
    return " | ".join(parts)


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor],
                            strict: bool = True, source: str = "checkpoint") -> None:
    """``load_state_dict`` with one error listing missing/unexpected keys and shape mismatches."""
    report = _mismatch_report(model, state)
    own = model.state_dict()
    has_shape_errors = any(k in own and state[k].shape != own[k].shape for k in state)
    if report and (strict or has_shape_errors):
        name = getattr(model, "model_name", type(model).__name__)
        raise CheckpointError(f"{source} does not fit model {name}: {report}")
    model.load_state_dict(state, strict=strict)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, use_ema: bool = False,
                    strict: bool = True) -> dict[str, Any]:
    """Load weights into ``model`` from the release's, this project's or a bare checkpoint.

    Args:
        model: the model to fill (``dsnet.create_model(...)``).
        path: checkpoint file.
        use_ema: load the EMA weights (``state_dict_ema``) instead of ``state_dict``.
        strict: require the keys to match exactly (shapes must always match).

    Returns:
        The checkpoint dict (metadata such as ``epoch``, ``config``, ``metrics``).
    """
    ckpt = read_checkpoint(path)
    state = extract_state_dict(ckpt, use_ema, source=str(path))
    _apply_routing_space(model, ckpt, state)
    load_state_dict_checked(model, state, strict, source=str(path))
    return ckpt


def _apply_routing_space(model: nn.Module, ckpt: Mapping[str, Any],
                         state: Mapping[str, torch.Tensor]) -> None:
    """Resize the slimming head to the checkpoint's routing space before loading."""
    space = ckpt.get("routing_space")
    if space is not None and hasattr(model, "routing_space"):
        model.routing_space = tuple(space)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, stage: str, epoch: int,
                    config: Mapping[str, Any] | None = None,
                    metrics: Mapping[str, Any] | None = None,
                    ema_model: nn.Module | None = None,
                    optimizer_state: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write a self-describing checkpoint atomically.

    It records the model name and arguments (so :func:`model_from_checkpoint` can rebuild
    the model), the routing space, the stage and epoch, the resolved config, metrics and
    versions, next to the weights (and EMA / optimizer state when given).
    """
    model = getattr(model, "module", model)
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model_name": getattr(model, "model_name", None),
        "model_kwargs": to_builtins(getattr(model, "model_kwargs", {})),
        "routing_space": list(getattr(model, "routing_space", ()) or ()) or None,
        "stage": stage, "epoch": int(epoch),
        "config": to_builtins(config or {}), "metrics": to_builtins(metrics or {}),
        "versions": versions(),
        "state_dict": model.state_dict(),
        "state_dict_ema": ema_model.state_dict() if ema_model is not None else None,
        "optimizer": optimizer_state, "extra": to_builtins(extra or {}, keep_tensors=True),
    }
    atomic_torch_save(payload, path)
    return Path(path)


def model_from_checkpoint(path: str | os.PathLike, use_ema: bool = False,
                          **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a dsnet checkpoint and load its weights.

    Returns:
        ``(model, checkpoint_dict)``.
    """
    from dsnet.models.registry import create_model

    ckpt = read_checkpoint(path)
    if ckpt.get("format") != FORMAT or not ckpt.get("model_name"):
        raise CheckpointError(f"{path} is not a self-describing dsnet checkpoint; build the "
                              "model with dsnet.create_model(...) and use load_checkpoint")
    kwargs = dict(ckpt.get("model_kwargs") or {})
    kwargs.update(overrides)
    if ckpt.get("routing_space"):
        kwargs["routing_space"] = tuple(ckpt["routing_space"])
    model = create_model(ckpt["model_name"], **kwargs)
    state = extract_state_dict(ckpt, use_ema, source=str(path))
    load_state_dict_checked(model, state, True, source=str(path))
    return model, ckpt
