"""recalibrate every subnet's BatchNorm statistics from a supernet checkpoint.

Usage: ``python -m pipelines.reset_bn -c CONFIG [DATA_PATH] [--resume CKPT] ...``

Mirrors the authors' command line: their YAML is accepted unchanged, DATA_PATH sets
``data`` and ``--resume`` (or ``resume:`` in the YAML) is the input checkpoint.
Other flags as in :mod:`pipelines.full`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipelines.cli import main_single_stage


def main(argv: Sequence[str] | None = None) -> int:
    """Run the reset_bn stage; returns the exit code."""
    return main_single_stage("reset_bn", argv)


if __name__ == "__main__":
    sys.exit(main())
