"""Stage I: train the slimmable supernet (sandwich rule, in-place ensemble bootstrapping).

Usage: ``python -m pipelines.supernet -c CONFIG [DATA_PATH] [--resume CKPT] ...``

Mirrors the authors' command line: their YAML is accepted unchanged, DATA_PATH sets
``data`` and ``--resume`` (or ``resume:`` in the YAML) is the input checkpoint.
Other flags as in :mod:`pipelines.full`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipelines.cli import main_single_stage


def main(argv: Sequence[str] | None = None) -> int:
    """Run the supernet stage; returns the exit code."""
    return main_single_stage("supernet", argv)


if __name__ == "__main__":
    sys.exit(main())
