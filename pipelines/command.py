"""What every command shares: the parser, ``--set``, signals, exit codes and error lines.

``pipelines.full``, the single-stage commands, ``pipelines.sweep`` and ``pipelines.predict``
all run through :func:`run_main`. A failure prints one ``error:`` line on stderr (the
traceback first with ``--debug``) and sets the exit code:

* 0 (:data:`EXIT_OK`): done;
* 2 (:data:`EXIT_USAGE`): a usage, configuration or input problem (:class:`UsageError` and
  the command's own usage errors, such as ``ConfigError``), found before any work starts;
* 1 (:data:`EXIT_FAILED`): a runtime failure (a stage failed, an unreadable image, ...);
* 130 (:data:`EXIT_INTERRUPTED`): Ctrl-C or SIGTERM; a resumable command prints the
  command line that resumes it.

Standard library only: ``pipelines.predict`` checks its command line before torch loads.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A bad command line or input (argparse's errors are turned into this): exit 2."""


class CommandParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing the usage block and
    exiting, so that every error is one line and the exit code is :func:`run_main`'s."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def add_set_option(p: argparse.ArgumentParser,
                   help_text: str = "override a config key (repeatable)") -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``: the items that
    :func:`dsnet.utils.schema.set_item` applies."""
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help=help_text)


def add_debug_option(p: argparse.ArgumentParser) -> None:
    """``--debug``: print tracebacks (:func:`run_main` reads it before parsing)."""
    p.add_argument("--debug", action="store_true", help="show tracebacks")


# ----------------------------------------------------------------------------- signals


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def trap_sigterm() -> Any:
    """Make SIGTERM (``ray job stop``, a scheduler) raise KeyboardInterrupt, like Ctrl-C, so
    the command cancels its stage and records it; returns the previous handler.

    Does nothing (returns None) outside the main thread, where signals cannot be handled.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while a command runs; restore the old handler after."""
    old = trap_sigterm()
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


# ----------------------------------------------------------------------------- failures


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception's message on one line (at most ``limit`` characters)."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


@dataclass(frozen=True)
class ErrorKinds:
    """How a command reports an exception: ``usage`` types exit 2 and ``failure`` types
    exit 1, both with their message; anything else exits 1 as ``Type: describe(exc)``."""

    usage: tuple[type[BaseException], ...] = ()
    failure: tuple[type[BaseException], ...] = ()
    describe: Callable[[BaseException], str] = one_line


def _fail(message: str, code: int, exc: BaseException, debug: bool) -> int:
    """Print ``error: message`` (after the traceback with ``debug``); return ``code``."""
    if debug:
        traceback.print_exception(exc)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def report_failure(exc: Exception, debug: bool, kinds: ErrorKinds = ErrorKinds()) -> int:
    """Print a command's failure as one ``error:`` line and return its exit code (see the
    module docstring)."""
    if isinstance(exc, (UsageError, *kinds.usage)):
        return _fail(str(exc), EXIT_USAGE, exc, debug)
    if isinstance(exc, kinds.failure):
        return _fail(str(exc), EXIT_FAILED, exc, debug)
    return _fail(f"{type(exc).__name__}: {kinds.describe(exc)}", EXIT_FAILED, exc, debug)


def resume_command(prog: str, argv: Sequence[str], name: str | None) -> str:
    """The same command, with ``--name`` pinned so it continues the same run folder."""
    argv = list(argv)
    if name is not None and not any(a == "--name" or a.startswith("--name=") for a in argv):
        argv += ["--name", name]
    return f"{prog} {shlex.join(argv)}".strip()


def run_main(prog: str, argv: Sequence[str] | None, body: Callable[[list[str]], int],
             kinds: ErrorKinds = ErrorKinds(),
             resume_name: Callable[[], str | None] | None = None) -> int:
    """Run a command's ``body(argv)`` with SIGTERM as Ctrl-C; map errors to exit codes.

    Args:
        prog: the command as typed (``python -m pipelines.full``), for the resume hint.
        argv: its arguments (default ``sys.argv[1:]``).
        body: parses ``argv``, runs the command and returns its exit code.
        kinds: the command's usage and failure exception types.
        resume_name: for a resumable command, the run folder's name once known (None
            before): an interrupt then prints the command that resumes the run.

    Returns:
        The exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with sigterm_as_interrupt():
            return body(argv)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        hint = "" if resume_name is None else \
            f"; resume with: {resume_command(prog, argv, resume_name())}"
        print(f"interrupted{hint}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bad input, or the work failed
        return report_failure(e, debug, kinds)


__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "CommandParser",
           "ErrorKinds", "UsageError", "add_debug_option", "add_set_option", "one_line",
           "report_failure", "resume_command", "run_main", "sigterm_as_interrupt",
           "trap_sigterm"]
