"""Atomic file writes: a crash or a full disk never leaves a truncated output behind.

Everything dsnet writes for a user (checkpoints, ``run.json``, CSVs, plots, copies of the
final checkpoint) goes through :func:`atomic_write`: the content is written to a hidden
temporary file in the target's folder, then renamed over the target (``os.replace`` is
atomic within a file system). The finished file gets the permissions a plain ``open()``
would give it (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``: results on a
shared cluster disk stay readable by the team.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from dsnet.utils.provenance import json_text


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set, then restore at once
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], Any], *,
                 binary: bool = False, fsync: bool = False) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file, which then replaces it.

    Args:
        path: the target (its folder is created).
        write: called with the open temporary file.
        binary: open it in binary mode (else text, UTF-8).
        fsync: flush it to the disk before the rename (checkpoints: survive a power loss).

    Returns:
        ``path`` as a Path. On any error (or interrupt) the temporary file is removed and
        the previous ``path``, if any, is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w",
                       **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    return atomic_write(path, lambda f: f.write(text))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy the file ``src`` to ``dst`` atomically."""
    with open(src, "rb") as source:
        return atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 1 << 20), binary=True)


__all__ = ["atomic_copy", "atomic_write", "atomic_write_text"]


def atomic_write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write strict JSON (:func:`dsnet.utils.provenance.json_text`) atomically."""
    text = json_text(data)
    atomic_write(path, lambda f: f.write(text))
