"""The ImageNet / image-folder recipe is timm's: transforms, mixup and persistent loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import RandAugment
from torch.utils.data import TensorDataset
from torchvision import transforms

from dsnet.data.datasets import DataError, build_datasets
from dsnet.data.loader import build_loader, build_mixup, set_loader_epoch

# The authors' YAML keys (timm train.py arguments) for the folder recipe.
AUTHORS = dict(aa="rand-m9-mstd0.5", reprob=0.2, remode="pixel", color_jitter=0.06,
               train_interpolation="random")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """train/ and val/ with two class folders of three 32x32 RGB PNGs each."""
    root = tmp_path_factory.mktemp("folder")
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / cls / f"{i}.png")
    return str(root)


def _timm_train(aa: str | None, **overrides) -> transforms.Compose:
    """The call the release's timm train.py makes, with the authors' keys."""
    keys = {**AUTHORS, **overrides}
    return create_transform(
        224, is_training=True, auto_augment=aa, re_prob=keys["reprob"],
        re_mode=keys["remode"], color_jitter=keys["color_jitter"],
        interpolation=keys["train_interpolation"], mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD)


def _types(tf: transforms.Compose) -> list[type]:
    return [type(t) for t in tf.transforms]


def _rand_augment(tf: transforms.Compose) -> RandAugment:
    return next(t for t in tf.transforms if isinstance(t, RandAugment))


def test_train_transform_is_timms_for_the_authors_keys(folder: str) -> None:
    ours = build_datasets("imagefolder", folder, img_size=224, **AUTHORS).train.transform
    theirs = _timm_train(AUTHORS["aa"])
    assert repr(ours) == repr(theirs)
    assert _types(ours) == _types(theirs)
    # repr hides RandAugment's hparams (translate size, fill colour, interpolation).
    ops = _rand_augment(ours).ops
    assert [o.hparams for o in ops] == [o.hparams for o in _rand_augment(theirs).ops]
    assert {(o.prob, o.magnitude, o.magnitude_std) for o in ops} == {(0.5, 9, 0.5)}
    crop = ours.transforms[0]
    assert isinstance(crop.interpolation, (list, tuple)) and len(crop.interpolation) == 2
    # timm drops colour jitter under RandAugment; erasing comes after normalisation.
    assert transforms.ColorJitter not in _types(ours)
    names = [t.__name__ for t in _types(ours)]
    assert names.index("RandomErasing") == names.index("Normalize") + 1


def test_without_aa_colour_jitter_is_on(folder: str) -> None:
    ours = build_datasets("imagefolder", folder, img_size=224,
                          **{**AUTHORS, "aa": ""}).train.transform
    assert repr(ours) == repr(_timm_train(None))
    jitter = [t for t in ours.transforms if isinstance(t, transforms.ColorJitter)]
    assert len(jitter) == 1 and jitter[0].brightness == pytest.approx((0.94, 1.06))
    assert not any(isinstance(t, RandAugment) for t in ours.transforms)


def test_train_interpolation_is_passed_through(folder: str) -> None:
    ours = build_datasets("imagefolder", folder, img_size=224,
                          **{**AUTHORS, "train_interpolation": "bicubic"}).train.transform
    assert repr(ours) == repr(_timm_train(AUTHORS["aa"], train_interpolation="bicubic"))
    assert "interpolation=bicubic" in repr(ours.transforms[0])
    with pytest.raises(DataError, match="train_interpolation.*'lanczos'"):
        build_datasets("imagefolder", folder, train_interpolation="lanczos")


def test_eval_transform_is_timms_resize_256_crop_224(folder: str) -> None:
    ours = build_datasets("imagefolder", folder, img_size=224, **AUTHORS).val.transform
    theirs = create_transform(224, is_training=False, interpolation="bicubic", crop_pct=0.875)
    assert repr(ours) == repr(theirs)
    resize, crop = ours.transforms[:2]
    assert resize.size == 256 and resize.interpolation.value == "bicubic"
    assert tuple(crop.size) == (224, 224)
    image, label = build_datasets("imagefolder", folder, img_size=224).val[0]
    assert image.shape == (3, 224, 224) and label == 0


@pytest.mark.parametrize("aa", ["rand-zz", "autoaugment", "rand-m9x", "rand-m9-tfoo3"])
def test_bad_aa_is_a_data_error_naming_it(folder: str, aa: str) -> None:
    with pytest.raises(DataError, match=f"aa='{aa}'"):
        build_datasets("imagefolder", folder, aa=aa)


# --------------------------------------------------------------------------- mixup


def _mix_args(**overrides) -> dict:
    args = dict(mixup=0.0, cutmix=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                mode="batch", smoothing=0.1, num_classes=5)
    return {**args, **overrides}


def test_build_mixup_is_off_unless_asked() -> None:
    assert build_mixup(**_mix_args()) is None
    assert isinstance(build_mixup(**_mix_args(cutmix=1.0)), Mixup)
    assert isinstance(build_mixup(**_mix_args(cutmix_minmax=[0.2, 0.8])), Mixup)


def test_mixup_gives_soft_targets_and_mixes_images() -> None:
    np.random.seed(0)  # timm draws lambda with numpy
    mix = build_mixup(**_mix_args(mixup=0.8))
    assert isinstance(mix, Mixup) and mix.label_smoothing == 0.1
    images = torch.cat([torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)])
    labels = torch.tensor([0, 0, 1, 1])
    mixed, soft = mix(images.clone(), labels)
    assert soft.shape == (4, 5)
    assert torch.allclose(soft.sum(1), torch.ones(4))
    # Each image is blended with its mirror (x.flip(0)): constant, strictly between 0 and 1.
    assert not torch.equal(mixed, images)
    assert ((mixed > 0) & (mixed < 1)).all()
    assert (soft[:, :2] > soft[:, 2:].max()).all()  # mass on the two true classes


def test_mixup_odd_batch_names_the_size() -> None:
    mix = build_mixup(**_mix_args(mixup=0.8))
    with pytest.raises(ValueError, match="batch size 3"):
        mix(torch.zeros(3, 3, 8, 8), torch.tensor([0, 1, 0]))


# --------------------------------------------------------------------------- loaders


def _epoch_order(loader) -> list[int]:
    return torch.cat([x for x, _ in loader]).tolist()


def test_persistent_workers_keep_processes_and_reshuffle_per_epoch() -> None:
    dataset = TensorDataset(torch.arange(32), torch.zeros(32))
    loader = build_loader(dataset, 4, train=True, seed=3, workers=2,
                          persistent_workers=True)
    assert loader.persistent_workers and loader.drop_last
    epoch0 = _epoch_order(loader)
    workers = loader._iterator  # the live worker pool, reused while persistent
    set_loader_epoch(loader, 1)
    epoch1 = _epoch_order(loader)
    assert loader._iterator is workers
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1) == list(range(32))
    twin = build_loader(dataset, 4, train=True, seed=3, workers=2, persistent_workers=True)
    set_loader_epoch(twin, 1)
    assert _epoch_order(twin) == epoch1
    set_loader_epoch(twin, 0)
    assert _epoch_order(twin) == epoch0
    assert not build_loader(dataset, 4, train=True, persistent_workers=True).persistent_workers


def test_training_loader_drops_the_last_partial_batch_for_mixup() -> None:
    dataset = TensorDataset(torch.arange(10), torch.zeros(10))
    sizes = [len(x) for x, _ in build_loader(dataset, 4, train=True)]
    assert sizes == [4, 4]
