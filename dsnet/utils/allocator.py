"""CPU allocator tuning for inference: keep freed tensor memory instead of unmapping it.

glibc's ``malloc`` serves every block above its mmap threshold (128 KiB, adapting up to
32 MiB) with a fresh ``mmap`` and returns it with ``munmap`` on free. A CNN forward
allocates and frees dozens of activations per layer; at batch 64 and 224 px most are larger
than 32 MiB (a (64, 32, 112, 112) float map is 100 MiB), so every one of them is mapped,
page-faulted in 4 KiB at a time and unmapped again. Measured on the 2-core CI machine
(DS-MBNet, batch 64): half the forward time was kernel time, the shared trunk took
690 ms instead of 207 ms and subnet 13 1095 ms instead of 575 ms.

:func:`keep_freed_memory` turns that off for the whole process: no mmap for large blocks
and no trimming of the heap below ``trim_threshold_mb``, so the memory of one forward is
reused by the next. The cost is that the process keeps its peak heap (roughly one forward's
activations) instead of handing it back between calls: right for a serving or benchmark
process, which is why only ``bench/inference.py`` and ``python -m pipelines.predict`` call
it, and why the library never does so on import.

It is not a guarantee: torch allocates with ``posix_memalign``, which asks glibc for the size
plus the alignment slop, so a freed block of exactly one activation's size is too small for
the next one when a small allocation made in between keeps it from merging into the heap's
top; that repeat then grows the heap and faults its pages in again. tests/test_allocator.py
measured 0 to 8 of 11 repeats of one 64 MiB result refaulting (strace: one 64 MiB ``brk``
each).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_tuned: dict[str, int] = {}


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (the only one whose ``mallopt`` this module knows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def keep_freed_memory(trim_threshold_mb: int = 1024) -> bool:
    """Make glibc reuse freed large blocks instead of ``munmap``-ing them (process-wide).

    Args:
        trim_threshold_mb: free heap memory above this stays with the process only up to
            this much; more is returned to the system.

    Returns:
        True if the allocator was tuned (Linux with glibc), False where this does not apply
        (macOS, musl, Windows): nothing is changed there.

    Raises:
        ValueError: ``trim_threshold_mb`` is negative.
    """
    if trim_threshold_mb < 0:
        raise ValueError(f"trim_threshold_mb must be >= 0, got {trim_threshold_mb}")
    libc = _glibc()
    if libc is None:
        return False
    trim = int(trim_threshold_mb) << 20
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1
    if ok:
        _tuned.update(mmap_max=0, trim_threshold=trim)
    return ok


def allocator_settings() -> dict[str, int]:
    """What :func:`keep_freed_memory` set in this process (empty if it was not called)."""
    return dict(_tuned)


__all__ = ["allocator_settings", "keep_freed_memory"]
