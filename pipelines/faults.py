"""Fault injection for the tests of restarts and resume: one home for every hook.

With ``DSNET_FAULT_AFTER_EPOCH=N`` and ``DSNET_FAULT_MARKER=PATH`` in the driver's
environment, rank ``DSNET_FAULT_RANK`` (default 0) fails after reporting epoch N (0-based)
once, creating PATH so that the retry or re-run goes through. ``DSNET_FAULT_MODE`` is
``raise`` (default: an exception) or ``exit`` (``os._exit(1)``: the process dies as in a
crash or an OOM kill; in-process runs kill the driver itself). The driver reads the
environment (:func:`fault_from_env`) and hands the fault to the workers in their config,
so it reaches Ray workers on any node.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dsnet.train.engine import EpochReport, Hook

FAULT_ENV, FAULT_MARKER_ENV = "DSNET_FAULT_AFTER_EPOCH", "DSNET_FAULT_MARKER"
FAULT_MODE_ENV, FAULT_RANK_ENV = "DSNET_FAULT_MODE", "DSNET_FAULT_RANK"
FAULT_MODES = ("raise", "exit")


class InjectedFault(RuntimeError):
    """Raised by :class:`FaultHook` (tests of resuming)."""


class FaultHook(Hook):
    """Fails on rank ``fault["rank"]`` after epoch ``fault["after_epoch"]`` once, leaving
    ``fault["marker"]`` behind: raises (mode ``raise``) or kills the process (``exit``).

    ``sync``, if given, is called on every rank before a kill (Ray workers:
    :func:`reports_collected_barrier`), so that the kill lands after a known checkpoint.
    """

    def __init__(self, rank: int, fault: Mapping[str, Any] | None,
                 sync: Callable[[], None] | None = None) -> None:
        self.rank = rank
        self.fault = fault
        self.sync = sync

    def on_epoch_end(self, report: EpochReport, save: Callable[[Path], None]) -> None:
        fault = self.fault
        if not fault or report.epoch != fault["after_epoch"]:
            return
        marker = Path(fault["marker"])
        # Every rank decides before the failing rank creates the marker (after the sync).
        armed = not marker.exists()
        exits = fault.get("mode", "raise") == "exit"
        if armed and exits and self.sync is not None:
            self.sync()
        if not armed or self.rank != fault.get("rank", 0):
            return
        marker.touch()
        if exits:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # no exception, no clean-up: what a segfault or the OOM killer does
        raise InjectedFault(f"injected fault after epoch {report.epoch} ({FAULT_ENV})")


def fault_from_env() -> dict[str, Any] | None:
    """The fault to inject, read from the driver's environment (see the module docstring)."""
    after, marker = os.environ.get(FAULT_ENV), os.environ.get(FAULT_MARKER_ENV)
    if after is None or not marker:
        return None
    mode = os.environ.get(FAULT_MODE_ENV) or "raise"
    if mode not in FAULT_MODES:
        raise ValueError(f"{FAULT_MODE_ENV}={mode!r}: expected one of {', '.join(FAULT_MODES)}")
    return {"after_epoch": int(after), "marker": marker, "mode": mode,
            "rank": int(os.environ.get(FAULT_RANK_ENV) or 0)}
