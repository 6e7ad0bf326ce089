"""``python -m pipelines.full``: DS-Net's three stages on Ray, in one run folder.

Usage::

    python -m pipelines.full [-c CONFIG] [--output DIR] [--name NAME] [--data PATH]
                             [--num-workers N] [--use-gpu] [--set KEY=VALUE ...] [--debug]

The run folder ``<output>/<name>/`` holds ``run.json``, each stage's Ray Train run
(``supernet/``, ``reset_bn/``, ``gate/``) and ``results/``. Running the same command
again skips finished stages and resumes an interrupted one from its last checkpoint.
``--output`` may be a URI (``s3://bucket/runs``, ``gs://...``): everything then goes
there, and every node is checked to reach it before training. ``--num-workers 0`` runs
every stage in this process without Ray. On a cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.full -c dsnet/configs/default.yml --output /shared/runs
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import pyarrow.fs as pafs

from pipelines.cli import main_full


def main(argv: Sequence[str] | None = None,
         storage_filesystem: pafs.FileSystem | None = None) -> int:
    """Run the pipeline; returns the exit code (0 ok, 1 failed, 2 usage, 130 interrupted).

    ``storage_filesystem``: keep run folders on this pyarrow filesystem (``--output`` is
    then a path inside it), as Ray Train's ``RunConfig(storage_filesystem=...)``.
    """
    return main_full(argv, storage_filesystem)


if __name__ == "__main__":
    sys.exit(main())
