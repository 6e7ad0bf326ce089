"""Tests for dsnet.data: datasets, errors, corrupt files and per-rank loaders (CPU, offline)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from dsnet.data.datasets import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IDX_FILES,
    DataBundle,
    DataError,
    build_datasets,
    dataset_num_classes,
)
from dsnet.data.loader import build_loader, set_loader_epoch


@pytest.fixture(scope="module")
def mnist() -> DataBundle:
    return build_datasets("mnist5k")


def _make_tree(root: Path, classes=("cat", "dog", "fox"), per_class: int = 3,
               splits=("train", "val")) -> Path:
    """Write a tiny ImageFolder tree of 8x8 PNGs."""
    gen = torch.Generator().manual_seed(0)
    for split in splits:
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (8, 8, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def _all_labels(dataset) -> torch.Tensor:
    return torch.tensor([dataset[i][1] for i in range(len(dataset))])


# --------------------------------------------------------------------------- mnist5k


def test_mnist5k_sizes_shapes_and_dtype(mnist):
    assert (len(mnist.train), len(mnist.val)) == (4000, 1000)
    assert (mnist.num_classes, mnist.in_chans, mnist.img_size) == (10, 1, 28)
    image, label = mnist.train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int)


def test_mnist5k_is_normalised(mnist):
    images = mnist.train.images
    assert abs(images.mean().item()) < 0.1
    assert abs(images.std().item() - 1.0) < 0.1


def test_mnist5k_split_deterministic_disjoint_and_balanced(mnist):
    again = build_datasets("mnist5k", seed=42)
    assert torch.equal(again.val.images, mnist.val.images)
    other = build_datasets("mnist5k", seed=7)
    assert not torch.equal(other.val.images, mnist.val.images)
    # Disjoint: no validation image also appears in training (compare flattened rows).
    train_rows = {tuple(r.tolist()) for r in mnist.train.images.flatten(1)[:, ::7]}
    assert not any(tuple(r.tolist()) in train_rows for r in mnist.val.images.flatten(1)[:, ::7])
    assert set(mnist.train.targets.tolist()) == set(range(10))
    assert set(mnist.val.targets.tolist()) == set(range(10))


def test_mnist5k_resize_and_num_val():
    bundle = build_datasets("mnist5k", img_size=32, num_val=500)
    assert (len(bundle.train), len(bundle.val)) == (4500, 500)
    assert bundle.train[0][0].shape == (1, 32, 32) and bundle.img_size == 32


# --------------------------------------------------------------------------- loaders


def _indices(loader) -> list[int]:
    return list(iter(loader.sampler))


def test_train_ranks_are_disjoint_and_cover(mnist):
    loaders = [build_loader(mnist.train, 64, train=True, rank=r, world_size=2, seed=3)
               for r in range(2)]
    first, second = (_indices(lo) for lo in loaders)
    assert len(first) == len(second) == 2000
    assert not set(first) & set(second)
    assert set(first) | set(second) == set(range(len(mnist.train)))


def test_train_padding_keeps_equal_counts():
    dataset = build_datasets("synthetic", synthetic_size=10).train
    parts = [_indices(build_loader(dataset, 2, train=True, rank=r, world_size=3))
             for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]
    assert set().union(*parts) == set(range(10))


def test_set_epoch_reshuffles_deterministically(mnist):
    loader = build_loader(mnist.train, 64, train=True, seed=5)
    epoch0 = _indices(loader)
    set_loader_epoch(loader, 1)
    epoch1 = _indices(loader)
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
    twin = build_loader(mnist.train, 64, train=True, seed=5)
    assert _indices(twin) == epoch0
    set_loader_epoch(twin, 1)
    assert _indices(twin) == epoch1
    assert _indices(build_loader(mnist.train, 64, train=True, seed=6)) != epoch0


def test_eval_loader_order_and_sharding(mnist):
    loader = build_loader(mnist.val, 100, train=False)
    assert not loader.drop_last
    images, labels = next(iter(loader))
    assert images.shape == (100, 1, 28, 28)
    assert torch.equal(labels, mnist.val.targets[:100])
    set_loader_epoch(loader, 3)  # no sampler.set_epoch: must be a no-op
    shards = [_indices(build_loader(mnist.val, 100, train=False, rank=r, world_size=3))
              for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(1000))  # every sample exactly once


def test_train_loader_drops_last_and_rejects_bad_rank(mnist):
    loader = build_loader(mnist.train, 300, train=True)
    assert loader.drop_last and len(loader) == 4000 // 300
    with pytest.raises(DataError, match="rank"):
        build_loader(mnist.train, 8, train=True, rank=2, world_size=2)


# --------------------------------------------------------------------------- image folders


def test_imagefolder_batch_shape(tmp_path):
    bundle = build_datasets("imagefolder", str(_make_tree(tmp_path)), img_size=16,
                            aa="rand-m9-mstd0.5", reprob=0.25, color_jitter=0.4)
    assert (bundle.num_classes, bundle.in_chans, bundle.img_size) == (3, 3, 16)
    assert (len(bundle.train), len(bundle.val)) == (9, 9)
    images, labels = next(iter(build_loader(bundle.train, 4, train=True)))
    assert images.shape == (4, 3, 16, 16) and labels.shape == (4,)
    images, _ = next(iter(build_loader(bundle.val, 9, train=False)))
    assert images.shape == (9, 3, 16, 16)


def test_missing_path_errors(tmp_path):
    for path in (None, str(tmp_path / "nowhere")):
        with pytest.raises(DataError, match="pass --data PATH"):
            build_datasets("imagenet", path)


def test_missing_split_folder(tmp_path):
    _make_tree(tmp_path, splits=("train",))
    with pytest.raises(DataError, match=r"val.*train/ and val/"):
        build_datasets("imagefolder", str(tmp_path), img_size=16)


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no class folders in .*train"):
        build_datasets("imagefolder", str(tmp_path), img_size=16)


def test_class_folder_without_images(tmp_path):
    _make_tree(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "val" / "empty").mkdir()
    with pytest.raises(DataError, match="no images found in .*train"):
        build_datasets("imagefolder", str(tmp_path), img_size=16)


def test_class_mismatch_names_difference(tmp_path):
    _make_tree(tmp_path)
    (tmp_path / "val" / "fox").rename(tmp_path / "val" / "wolf")
    with pytest.raises(DataError, match=r"only in train \['fox'\], only in val \['wolf'\]"):
        build_datasets("imagefolder", str(tmp_path), img_size=16)


def _tree_with_corrupt_file(root: Path) -> Path:
    _make_tree(root, per_class=2)
    (root / "train" / "cat" / "bad.png").write_bytes(os.urandom(64))
    return root


def _bad_index(dataset) -> int:
    return [os.path.basename(p) for p, _ in dataset.samples].index("bad.png")


def test_corrupt_image_fail_names_file(tmp_path):
    bundle = build_datasets("imagefolder", str(_tree_with_corrupt_file(tmp_path)),
                            img_size=16)
    with pytest.raises(DataError, match="bad.png.*corrupt_images: skip"):
        bundle.train[_bad_index(bundle.train)]


def test_corrupt_image_skip_warns_once(tmp_path, caplog):
    bundle = build_datasets("imagefolder", str(_tree_with_corrupt_file(tmp_path)),
                            img_size=16, corrupt_images="skip")
    bad = _bad_index(bundle.train)
    with caplog.at_level(logging.WARNING, logger="dsnet.data.datasets"):
        image, label = bundle.train[bad]
        bundle.train[bad]
    # The next sample is served: "bad.png" sorts last in "cat", so it is a "dog" (1).
    assert image.shape == (3, 16, 16) and label == 1
    assert bundle.train.skipped == 2
    assert sum("bad.png" in r.getMessage() for r in caplog.records) == 1
    batches = list(build_loader(bundle.train, 7, train=False))
    assert sum(len(b[1]) for b in batches) == len(bundle.train)


def test_bad_options_raise(tmp_path):
    root = str(_make_tree(tmp_path))
    with pytest.raises(DataError, match="corrupt_images"):
        build_datasets("imagefolder", root, corrupt_images="ignore")
    with pytest.raises(DataError, match="aa="):
        build_datasets("imagefolder", root, aa="autoaugment")
    with pytest.raises(DataError, match="interpolation"):
        build_datasets("imagefolder", root, interpolation="lanczos7")
    with pytest.raises(DataError, match="num_classes is 5"):
        build_datasets("imagefolder", root, img_size=16, num_classes=5)


# --------------------------------------------------------------------------- cifar, synthetic


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_offline_error(tmp_path, name):
    with pytest.raises(DataError, match=r"download: true.*data:"):
        build_datasets(name, str(tmp_path), download=False)


def test_synthetic_shapes_and_determinism():
    bundle = build_datasets("synthetic", img_size=24, synthetic_size=64, num_classes=7)
    assert (len(bundle.train), len(bundle.val)) == (64, 16)
    assert (bundle.num_classes, bundle.in_chans, bundle.img_size) == (7, 3, 24)
    image, label = bundle.train[5]
    assert image.shape == (3, 24, 24) and 0 <= label < 7
    assert torch.equal(build_datasets("synthetic", img_size=24, synthetic_size=64,
                                      num_classes=7).train[5][0], image)
    default = build_datasets("synthetic")
    assert default.train[0][0].shape == (3, 32, 32) and default.num_classes == 10


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="choose one of") as info:
        build_datasets("mnist60k")
    assert all(name in str(info.value) for name in DATASETS)


def test_mnist5k_random_shift_translates_training_images_only():
    torch.manual_seed(0)
    plain = build_datasets("mnist5k", num_val=1000)
    shifted = build_datasets("mnist5k", num_val=1000, random_shift=2)
    x0, y0 = plain.train[3]
    views = [shifted.train[3][0] for _ in range(8)]
    assert all(v.shape == x0.shape for v in views)
    assert any(not torch.equal(v, x0) for v in views)
    # A translation keeps the digit: same pixels, moved (the border holds background).
    assert all(abs(v.max().item() - x0.max().item()) < 1e-6 for v in views)
    assert torch.equal(shifted.val[3][0], plain.val[3][0])
    assert shifted.train[3][1] == y0


# --------------------------------------------------------------------------- fashion_mnist


def _write_idx(path: Path, array: torch.Tensor) -> None:
    """An unsigned-byte IDX file (gzip when the name ends in .gz), as the official ones."""
    import gzip

    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.to(torch.uint8).contiguous().numpy().tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _tiny_idx_folder(folder: Path, n_train: int = 30, n_val: int = 20,
                     suffix: str = ".gz") -> tuple[torch.Tensor, ...]:
    """Four IDX files of random 28x28 images with labels 0-9; returns what they hold."""
    gen = torch.Generator().manual_seed(1)
    arrays = (torch.randint(0, 256, (n_train, 28, 28), generator=gen),
              torch.arange(n_train) % 10,
              torch.randint(0, 256, (n_val, 28, 28), generator=gen),
              torch.arange(n_val) % 10)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(IDX_FILES, arrays):
        _write_idx(folder / (name + suffix), array)
    return arrays


def test_fashion_mnist_embedded_loads_offline_with_balanced_classes():
    bundle = build_datasets("fashion_mnist")
    assert (len(bundle.train), len(bundle.val)) == (20000, 5000)
    assert (bundle.num_classes, bundle.in_chans, bundle.img_size) == (10, 1, 28)
    assert bundle.classes == FASHION_MNIST_CLASSES and bundle.classes[6] == "Shirt"
    assert torch.bincount(bundle.train.targets).tolist() == [2000] * 10
    assert torch.bincount(bundle.val.targets).tolist() == [500] * 10
    x, y = bundle.val[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10
    # Normalised with the official training split's statistics: near zero mean, unit std.
    images = bundle.train.images
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05
    # The packed files sit in the installed package (package data), not in a download cache.
    assert all((FASHION_MNIST_DIR / f"{n}.gz").is_file() for n in IDX_FILES)
    assert (FASHION_MNIST_DIR / "LICENSE").is_file()


def test_fashion_mnist_flips_only_training_images_and_num_val_subsets():
    torch.manual_seed(0)
    bundle = build_datasets("fashion_mnist", hflip=1.0)
    plain = build_datasets("fashion_mnist", hflip=0.0)
    assert torch.equal(bundle.train[7][0], plain.train[7][0].flip(-1))
    assert torch.equal(bundle.val[7][0], plain.val[7][0])
    small = build_datasets("fashion_mnist", num_val=300, seed=3)
    assert len(small.val) == 300 and len(small.train) == 20000
    with pytest.raises(DataError, match="num_val must be between 1 and 5000"):
        build_datasets("fashion_mnist", num_val=6000)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_fashion_mnist_reads_idx_folder_debian_layout(tmp_path, suffix):
    arrays = _tiny_idx_folder(tmp_path, suffix=suffix)
    bundle = build_datasets("fashion_mnist", str(tmp_path), hflip=0.0)
    assert (len(bundle.train), len(bundle.val)) == (30, 20)
    expect = (arrays[0][4].float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    assert torch.allclose(bundle.train[4][0][0], expect)
    assert bundle.train[4][1] == 4 and bundle.val[13][1] == 3


def test_fashion_mnist_reads_torchvision_layout(tmp_path):
    arrays = _tiny_idx_folder(tmp_path / "FashionMNIST" / "raw", suffix="")
    bundle = build_datasets("fashion_mnist", str(tmp_path), hflip=0.0)
    assert (len(bundle.train), len(bundle.val)) == (30, 20)
    expect = (arrays[2][5].float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    assert torch.allclose(bundle.val[5][0][0], expect)


def test_fashion_mnist_bad_data_path_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets("fashion_mnist", str(tmp_path / "nope"))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"no Fashion-MNIST IDX files in .*t10k-labels-idx1"):
        build_datasets("fashion_mnist", str(tmp_path))
    with pytest.raises(DataError, match="no Fashion-MNIST IDX files"):
        dataset_num_classes("fashion_mnist", str(tmp_path))
    _tiny_idx_folder(tmp_path / "bad", suffix="")
    truncated = tmp_path / "bad" / "t10k-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated or corrupt"):
        build_datasets("fashion_mnist", str(tmp_path / "bad"))
    (tmp_path / "bad" / "t10k-images-idx3-ubyte").write_bytes(b"GIF89a....")
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        build_datasets("fashion_mnist", str(tmp_path / "bad"))
