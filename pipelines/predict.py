"""Classify image files with a dsnet checkpoint.

Usage::

    python -m pipelines.predict --checkpoint CKPT [--subnet N|largest|smallest|dynamic]
        [--csv OUT.csv] [--batch-size 64] [--img-size S] [--device cpu|cuda|auto]
        INPUTS...

INPUTS are image files or folders (searched recursively for .png .jpg .jpeg .bmp .webp).
Images are preprocessed as the checkpoint's dataset was evaluated: ``fashion_mnist`` /
``mnist5k`` -> grayscale, resized to 28 px (or ``img_size``), the set's mean/std;
``cifar10``/``cifar100`` -> resized, CIFAR mean/std; anything else -> the ImageNet eval
transform (resize to size / 0.875, centre crop, ImageNet mean/std), converted to the model's
``in_chans``. One line per input::

    path  class  confidence  subnet

``subnet`` is the uniform subnet that classified the image (the routed one with
``--subnet dynamic``, the default), or ``largest``. ``--csv`` writes the same rows
atomically. Errors print one line on stderr (a traceback with ``--debug``): exit 2 for a
usage problem (bad flag or --subnet, a missing or unusable checkpoint, a missing input, no
images found), 1 for a runtime failure (an unreadable image, anything unexpected), 130 when
interrupted (:mod:`pipelines.command`). Ray is never imported.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from pipelines.command import (
    EXIT_OK,
    CommandParser,
    ErrorKinds,
    UsageError,
    add_debug_option,
    run_main,
)

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image
    from torch import nn

    Transform = Callable[[Image], torch.Tensor]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PROG = "python -m pipelines.predict"


class PredictError(Exception):
    """A runtime failure such as an unreadable image (exit 1)."""


@dataclass
class Prediction:
    """One classified input."""

    path: str
    label: str
    confidence: float
    subnet: str


def build_parser() -> argparse.ArgumentParser:
    """The command line (errors raise :class:`UsageError`)."""
    p = CommandParser(prog=PROG, description="Classify images with a dsnet checkpoint.")
    p.add_argument("inputs", nargs="+", metavar="INPUTS", help="image files or folders")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="self-describing dsnet checkpoint (dsnet.save_checkpoint)")
    p.add_argument("--subnet", default="dynamic",
                   help="N (uniform subnet index), largest, smallest or dynamic (default)")
    p.add_argument("--csv", metavar="OUT.csv", help="also write the rows to this CSV file")
    p.add_argument("--batch-size", type=int, default=64, metavar="N")
    p.add_argument("--img-size", type=int, metavar="S",
                   help="input resolution (default: the checkpoint config's, else the model's)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--use-ema", action="store_true", help="use the checkpoint's EMA weights")
    add_debug_option(p)
    return p


def parse_subnet(text: str) -> int | str:
    """``--subnet`` as an int or one of the mode names; the range is checked later."""
    if text in ("largest", "smallest", "dynamic"):
        return text
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--subnet must be an integer, largest, smallest or dynamic, "
                         f"got {text!r}") from None


def find_images(inputs: Sequence[str]) -> list[Path]:
    """Image files named or found (recursively, sorted) under the inputs, in order."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)  # named explicitly: trust it, the reader reports bad ones
        else:
            raise UsageError(f"input {item} does not exist")
    if not found:
        raise UsageError(f"no images ({' '.join(IMAGE_SUFFIXES)}) found in "
                         f"{' '.join(inputs)}")
    return found


def _dataset_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the dataset's eval transform normalises with."""
    from dsnet.data.datasets import CIFAR_STATS, GREY_STATS, IMAGENET_MEAN, IMAGENET_STD

    if dataset in GREY_STATS:
        mean, std = GREY_STATS[dataset]
        return (mean,), (std,)
    if dataset in CIFAR_STATS:
        return CIFAR_STATS[dataset]
    return IMAGENET_MEAN, IMAGENET_STD


def _fit_channels(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """Normalisation constants for ``in_chans`` channels."""
    # A model with other channels than its dataset's (say RGB MNIST): use the mean value.
    if len(values) == in_chans:
        return values
    return (sum(values) / len(values),) * in_chans


def build_transform(dataset: str, in_chans: int, img_size: int) -> Transform:
    """PIL image -> (in_chans, img_size, img_size) tensor, as the dataset's eval transform."""
    from torchvision import transforms

    from dsnet.data.datasets import EVAL_CROP_PCT, GREY_STATS

    if in_chans not in (1, 3):
        raise PredictError(f"the model takes {in_chans} input channels; only 1 (grayscale) "
                           "and 3 (RGB) can be made from image files")
    mean, std = _dataset_stats(dataset)
    if dataset in GREY_STATS or dataset.startswith("cifar"):
        # Small-image sets are served whole (no crop): resize to the square size.
        ops = [transforms.Resize((img_size, img_size))]
    else:
        ops = [transforms.Resize(int(math.floor(img_size / EVAL_CROP_PCT)),
                                 interpolation=transforms.InterpolationMode.BICUBIC),
               transforms.CenterCrop(img_size)]
    mode = "L" if in_chans == 1 else "RGB"
    pipeline = transforms.Compose([
        transforms.Lambda(lambda img: img.convert(mode)), *ops, transforms.ToTensor(),
        transforms.Normalize(_fit_channels(mean, in_chans), _fit_channels(std, in_chans))])
    return pipeline


def load_image(path: Path, transform: Transform) -> torch.Tensor:
    """Read and preprocess one image; :class:`PredictError` naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return transform(img)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise PredictError(f"cannot read image {path}: {e}") from e


_DEFAULT_SIZES = {"mnist5k": 28, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32,
                  "synthetic": 32}


def resolve_img_size(args_size: int | None, config: dict, model: nn.Module) -> int:
    """--img-size, else the checkpoint config's, else the dataset's, else the model's."""
    if args_size is not None:
        return args_size
    if config.get("img_size"):
        return int(config["img_size"])
    return _DEFAULT_SIZES.get(config.get("dataset"), model.arch.img_size)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a usage error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but CUDA is not available")
    return torch.device(name)


def load_model(path: str, subnet: int | str, use_ema: bool,
               device: torch.device) -> tuple[nn.Module, dict]:
    """Rebuild the model from a self-describing checkpoint and check ``subnet`` against it."""
    import torch

    from dsnet.models.checkpoint import CheckpointError, model_from_checkpoint

    if not Path(path).is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        model, ckpt = model_from_checkpoint(path, use_ema=use_ema)
    except CheckpointError as e:  # a bad input, as in the pipeline commands: exit 2
        raise UsageError(str(e)) from e
    if subnet != "dynamic":
        try:
            model.arch.resolve(subnet)
        except ValueError as e:
            raise UsageError(f"--subnet: {e}") from None
    # Channels-last is the layout CPU convolutions run fastest in (DS-MBNet's trunk 1.5-1.7x,
    # bench/inference.py); the weight slices keep it (dsnet.models.layers.SliceCache).
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    return model.to(device, memory_format=layout).eval(), ckpt


def class_names(ckpt: dict, num_classes: int) -> list[str] | None:
    """Class names stored in the checkpoint's ``extra`` (``class_names``), if they fit."""
    names = (ckpt.get("extra") or {}).get("class_names")
    if isinstance(names, list) and len(names) == num_classes:
        return [str(n) for n in names]
    return None


def classify(model: nn.Module, images: Sequence[Path], transform: Transform, subnet: int | str,
             batch_size: int, device: torch.device,
             names: list[str] | None = None) -> Iterator[Prediction]:
    """Yield one :class:`Prediction` per image, batch by batch, in input order."""
    import torch

    for start in range(0, len(images), batch_size):
        paths = images[start:start + batch_size]
        x = torch.stack([load_image(p, transform) for p in paths]).to(device)  # (B, C, S, S)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)  # as load_model's weights
        with torch.inference_mode():
            logits, choices = model(x, subnet=subnet, return_choices=True)      # (B, N), (B,)
            confidence, label = logits.float().softmax(1).max(1)
        for path, c, p, s in zip(paths, label.tolist(), confidence.tolist(), choices.tolist()):
            yield Prediction(str(path), names[c] if names else str(c), p,
                             "largest" if s < 0 else str(s))


def write_csv(path: str | os.PathLike, rows: Sequence[Prediction]) -> None:
    """Write the rows to ``path`` atomically (:func:`dsnet.utils.atomic.atomic_write`)."""
    from dsnet.utils.atomic import atomic_write

    def write(f: IO[str]) -> None:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "confidence", "subnet"])
        for r in rows:
            writer.writerow([r.path, r.label, f"{r.confidence:.6f}", r.subnet])

    atomic_write(path, write)


def run(args: argparse.Namespace) -> list[Prediction]:
    """Everything after parsing: check inputs, load, classify, print, write the CSV."""
    # Every usage check runs before torch is imported, so a typo fails in a blink.
    subnet = parse_subnet(args.subnet)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.img_size is not None and args.img_size < 8:
        raise UsageError(f"--img-size must be >= 8, got {args.img_size}")
    if not Path(args.checkpoint).is_file():
        raise UsageError(f"checkpoint {args.checkpoint} does not exist")
    images = find_images(args.inputs)
    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, subnet, args.use_ema, device)
    config = ckpt.get("config") or {}
    size = resolve_img_size(args.img_size, config, model)
    transform = build_transform(str(config.get("dataset", "")), model.in_chans, size)
    rows = []
    for row in classify(model, images, transform, subnet, args.batch_size, device,
                        class_names(ckpt, model.num_classes)):
        print(f"{row.path}\t{row.label}\t{row.confidence:.4f}\t{row.subnet}", flush=True)
        rows.append(row)
    if args.csv:
        write_csv(args.csv, rows)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 runtime failure, 2 usage, 130
    interrupted; see :mod:`pipelines.command`)."""

    def body(args: list[str]) -> int:
        run(build_parser().parse_args(args))
        return EXIT_OK

    return run_main(PROG, argv, body, ErrorKinds(failure=(PredictError,)))


if __name__ == "__main__":
    # A process of its own: keep freed activation memory for the next batch (glibc only;
    # see dsnet.utils.allocator). Not in main(), which tests and other programs call in-process.
    from dsnet.utils.allocator import keep_freed_memory

    keep_freed_memory()
    sys.exit(main())
