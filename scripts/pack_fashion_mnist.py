"""Regenerate dsnet's embedded Fashion-MNIST subset from the four official IDX files.

The embedded ``fashion_mnist`` data set is a fixed, class-balanced subset of Zalando's
Fashion-MNIST: 2,000 images per class from the official *train* split (20,000 training
images) and 500 per class from the official *test* split (5,000 validation images). It is
stored as the same four gzip-compressed IDX files the official release uses, so the packed
folder is itself a valid ``data:`` folder.

Usage (the Debian package ``dataset-fashion-mnist`` installs the source files)::

    python scripts/pack_fashion_mnist.py [--source /usr/share/datasets/fashion-mnist]

The selection is deterministic (``numpy.random.default_rng(seed)`` per class, then the
original order), and the gzip streams carry no timestamp, so the same source files give
byte-identical output.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsnet.data.datasets import FASHION_MNIST_DIR, find_idx_files, read_idx  # noqa: E402

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` images of every class, drawn at random, in file order."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class]
             for c in range(int(labels.max()) + 1)]
    if min(len(p) for p in picks) < per_class:
        raise SystemExit(f"a class has fewer than {per_class} images")
    return np.sort(np.concatenate(picks))


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file (magic 0x0000 08 ndim, big-endian dims, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_gz(path: Path, payload: bytes) -> str:
    """Write a reproducible gzip file (mtime 0); return its SHA-256."""
    data = gzip.compress(payload, compresslevel=9, mtime=0)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help="folder with the four official IDX files (.gz or plain)")
    parser.add_argument("--out", default=str(FASHION_MNIST_DIR), help="output folder")
    parser.add_argument("--train-per-class", type=int, default=2000)
    parser.add_argument("--val-per-class", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    files = find_idx_files(args.source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", args.train_per_class), ("t10k", args.val_per_class)):
        images = read_idx(files[f"{split}-images-idx3-ubyte"]).numpy()
        labels = read_idx(files[f"{split}-labels-idx1-ubyte"]).numpy()
        keep = balanced_subset(labels, per_class, args.seed)
        for name, array in ((f"{split}-images-idx3-ubyte", images[keep]),
                            (f"{split}-labels-idx1-ubyte", labels[keep])):
            sha = write_gz(out / f"{name}.gz", idx_bytes(array))
            print(f"{name}.gz  {array.shape}  sha256 {sha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
