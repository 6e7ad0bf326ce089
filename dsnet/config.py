"""Typed, validated configuration of DS-Net runs: one stage, or the three-stage pipeline.

Three dataclasses hold every setting:

* :class:`StageConfig`: one stage (``supernet``, ``reset_bn`` or ``gate``). It holds every
  key of the authors' three YAML files (``dsnet/configs/mobilenetv1_bn_uniform*.yml``; a key
  spelled with ``-`` such as ``drop-path`` is the field ``drop_path``) plus dsnet's own.
* :class:`RayConfig`: how the Ray layer spreads a stage over workers.
* :class:`PipelineConfig`: a name, an output folder, a :class:`RayConfig` and the three
  stages. In a pipeline YAML any stage key at top level is a default shared by all three
  stages; each stage is a mapping of its own keys or the path of a stage YAML (relative to
  the pipeline file's folder). Per stage, later wins: ``StageConfig`` defaults < shared
  top-level keys < the stage's mapping or file < ``--set`` overrides.

YAML is read with ``yaml.safe_load`` only. Every problem raises :class:`ConfigError` with
a one- or two-line message naming the file, key or override at fault.

This module imports only the standard library and PyYAML.
"""

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("supernet", "reset_bn", "gate")
DATASETS = ("fashion_mnist", "mnist5k", "imagenet", "imagefolder", "cifar10", "cifar100",
            "synthetic")
_PIPELINE_KEYS = ("name", "output", "ray", "stages")
# ``ieb`` is the release's older name of ``ensemble_ib`` (its gate and reset_bn YAMLs)
_ALIASES = {"label_smoothing": "smoothing", "ieb": "ensemble_ib"}
# common names from other trainers, for "did you mean" only
_HINTS = {"learning_rate": "lr", "wd": "weight_decay", "dropout": "drop", "ema": "model_ema",
          "ema_decay": "model_ema_decay", "num_epochs": "epochs", "arch": "model",
          "num_workers": "workers", "gpu": "device", "optimizer": "opt", "scheduler": "sched"}
# PyYAML (YAML 1.1) reads ``1e-5`` (no dot) as a string; float fields accept that spelling.
_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration file, mapping or override is invalid; the message says how to fix it."""


@dataclass
class StageConfig:
    """Settings of one DS-Net stage.

    Fields marked "authors'" come from the release's YAML files and keep its Stage-I values
    as defaults, except ``model`` which defaults to dsnet's small MNIST supernet.
    """

    # which stage; loaders infer it for the authors' files
    stage: str = "supernet"  # supernet | reset_bn | gate
    # data
    dataset: str = "mnist5k"  # one of DATASETS
    data: str | None = None  # dataset folder
    download: bool = False
    img_size: int | None = None  # None = the dataset's default
    num_val: int | None = None  # grey sets' val images (None: mnist5k 1000, fashion all)
    corrupt_images: str = "fail"  # fail | skip
    synthetic_size: int = 1024
    random_shift: int = 0  # grey sets' training: random translation of up to N pixels
    hflip: float | None = None  # grey sets' flip probability (None: fashion 0.5, mnist 0)
    # model
    model: str = "ds_mbnet_small"  # authors'
    num_classes: int | None = None  # None = the dataset's
    in_chans: int | None = None  # None = the dataset's
    routing_space: list[int] | None = None  # subnet indices the gate routes over
    num_choice: int = 14  # authors': number of widths; in a gate stage, routing-space size
    # authors' key; a path: a plain network's state dict (a torchvision/timm ResNet-50 for
    # ds_resnet50) as Stage I's start (dsnet.load_pretrained); true is refused (no downloads)
    pretrained: bool | str = False
    drop: float = 0.2  # authors': classifier dropout (largest subnet)
    drop_path: float = 0.0  # authors' ``drop-path``; non-zero refused (no stochastic depth)
    # optimisation (authors'; timm's optimizer and scheduler factories)
    opt: str = "sgd"  # sgd | adamw | rmsprop
    sched: str = "cosine"  # cosine | step | constant
    epochs: int = 150
    start_epoch: int | None = None  # first epoch to run (default: 0, or after a resumed one)
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5  # the cosine schedule's floor and the cooldown's lr
    cooldown_epochs: int = 10  # epochs at min_lr after ``epochs`` (the release trains 150+10)
    decay_epochs: float = 30.0  # sched: step: decay the lr every N epochs ...
    decay_rate: float = 0.1  # ... by this factor
    sched_on_updates: bool = False  # step the schedule every update (release: every epoch)
    lr: float = 0.08
    weight_decay: float = 1e-4
    batch_size: int = 64
    optimizer_step: int = 1  # gradient accumulation steps
    validation_batch_size_multiplier: int = 4
    smoothing: float = 0.1  # label smoothing
    model_ema: bool = True
    model_ema_decay: float = 0.997
    model_ema_warmup: bool = True  # decay min(decay, (1+n)/(10+n)); false = the release
    amp: bool = False  # mixed precision (torch.autocast) in training and evaluation
    amp_dtype: str = "auto"  # auto (bfloat16 on CPU, float16 + GradScaler on CUDA) | ...
    sync_bn: bool = False  # true is refused: no synchronized per-width BatchNorm
    dist_bn: str = ""  # "" | broadcast | reduce: BN statistics across ranks after each epoch
    # augmentation (authors'; timm's create_transform and Mixup)
    aa: str | None = "rand-m9-mstd0.5"  # RandAugment policy; "" or None = off
    remode: str = "pixel"  # const | rand | pixel
    reprob: float = 0.2
    mixup: float = 0.0  # mixup alpha (supernet stage; 0 = off)
    cutmix: float = 0.0  # cutmix alpha (supernet stage; 0 = off)
    cutmix_minmax: list[float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"  # batch | pair | elem
    mixup_off_epoch: int = 0  # stop mixing from this epoch on (0 = never)
    color_jitter: float = 0.06
    train_interpolation: str = "random"  # random | bilinear | bicubic (ImageNet / folders)
    # loading and resuming (authors')
    workers: int = 10
    pin_mem: bool = True
    resume: str = ""
    no_resume_opt: bool = False
    # the release's mode flags (authors'; dsnet reads ``stage``, and refuses a mismatch)
    train_mode: str | None = None  # all (supernet) | gate (gate); None = the stage's own
    test_mode: bool = False
    slim_train: bool = True  # false: the supernet stage trains the largest network alone
    inplace_bootstrap: bool = True
    ensemble_ib: bool = False  # also ``ieb``: the smallest subnet learns from the ensemble
    gate_train: bool = False
    reset_bn: bool = True
    # run
    seed: int = 42
    threads: int = 0  # torch intra-op threads in this process (0 = torch's default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # supernet stage
    num_random: int = 2  # random subnets per step (sandwich rule)
    distill: str = "ieb"  # ieb | inplace | none
    # reset_bn stage
    reset_bn_batches: int = 1000
    reset_bn_subnets: str = "all"  # all | routing
    # gate stage
    start_chn_idx: int = 0  # authors': first subnet of the routing space
    sgs_weight: float = 1.0
    sgs_on_probs: bool = False  # release: smoothed CE on the Gumbel-perturbed softmax
    estimator: str = "tails"  # gate's straight-through path: tails | masked (the release's)
    complexity_weight: float = 0.5
    complexity_form: str = "square"  # square | target
    target_madds: float | None = None  # required by complexity_form: target
    madds_unit: float = 1e9  # the penalty reads MAdds in this unit (release: 1e9 = GMAdds)
    gumbel_tau: float = 1.0
    gate_ema: bool = True
    # logging and evaluation
    log_interval: int = 50
    eval_subnets: list[int] | str = "all"

    @property
    def total_epochs(self) -> int:
        """Epochs a training stage runs: ``epochs`` then ``cooldown_epochs`` at ``min_lr``."""
        return self.epochs + self.cooldown_epochs if self.epochs > 0 else 0


@dataclass
class RayConfig:
    """How the Ray layer runs a stage."""

    num_workers: int = 2  # 0 = run in-process, without Ray workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 1  # -1 = retry forever
    num_to_keep: int = 2  # checkpoints kept
    address: str | None = None  # None = start or join a local cluster
    # how often Ray Train's controller polls the workers: also how soon it sees a worker
    # group up, so a short interval cuts each stage's start-up (Ray's default: 2 s)
    health_check_interval_s: float = 0.1
    min_free_mb: float = 200.0  # free disk space the output folder needs before a run starts
    # how Ray places the workers: PACK fills a node first, SPREAD one per node where it can
    placement_strategy: str = "PACK"


@dataclass
class PipelineConfig:
    """The three-stage job: supernet training, BN recalibration, gate training."""

    name: str | None = None
    output: str = "results"
    ray: RayConfig = field(default_factory=RayConfig)
    stages: dict[str, StageConfig] = field(
        default_factory=lambda: {s: StageConfig(stage=s) for s in STAGES})


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    """A range rule ``value >= low`` and its text."""
    return (lambda v: v >= low), f">= {low}"


_POSITIVE = ((lambda v: v > 0), "> 0")
_FRACTION = ((lambda v: 0 <= v < 1), "in [0, 1)")
_STAGE_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": _POSITIVE, "gumbel_tau": _POSITIVE, "target_madds": _POSITIVE,
    "madds_unit": _POSITIVE,
    "drop": _FRACTION, "drop_path": _FRACTION, "smoothing": _FRACTION,
    "model_ema_decay": ((lambda v: 0 < v < 1), "in (0, 1)"),
    "reprob": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "mixup_prob": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "mixup_switch_prob": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "decay_epochs": _POSITIVE,
    "hflip": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    **{k: _at_least(0) for k in (
        "epochs", "start_epoch", "warmup_epochs", "warmup_lr", "weight_decay", "mixup", "cutmix",
        "min_lr", "cooldown_epochs", "mixup_off_epoch", "decay_rate",
        "color_jitter", "workers", "random_shift", "threads", "num_random", "start_chn_idx",
        "sgs_weight", "complexity_weight", "seed")},
    **{k: _at_least(1) for k in (
        "batch_size", "optimizer_step", "validation_batch_size_multiplier", "num_val",
        "synthetic_size", "img_size", "num_classes", "in_chans", "num_choice",
        "reset_bn_batches", "log_interval")},
}
_RAY_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_workers": _at_least(0), "cpus_per_worker": _POSITIVE,
    "gpus_per_worker": _at_least(0), "max_failures": _at_least(-1),
    "num_to_keep": _at_least(1), "health_check_interval_s": _POSITIVE,
    "min_free_mb": _at_least(0),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "stage": STAGES, "dataset": DATASETS, "corrupt_images": ("fail", "skip"),
    "distill": ("ieb", "inplace", "none"), "reset_bn_subnets": ("all", "routing"),
    "complexity_form": ("square", "target"), "opt": ("sgd", "adamw", "rmsprop"),
    "sched": ("cosine", "step", "constant"), "dist_bn": ("", "broadcast", "reduce"),
    "remode": ("const", "rand", "pixel"), "amp_dtype": ("auto", "bfloat16", "float16"),
    "mixup_mode": ("batch", "pair", "elem"),
    "train_interpolation": ("random", "bilinear", "bicubic"),
    "estimator": ("tails", "masked"),
}
_RAY_CHOICES: dict[str, tuple[str, ...]] = {
    "placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}
# the release's ``train_mode`` of each stage (reset_bn does not train)
_TRAIN_MODES = {"supernet": ("all",), "reset_bn": ("all", "gate"), "gate": ("gate",)}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Field name -> annotated type of a config dataclass."""
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    """Readable name of an annotated type, e.g. ``int or None``, ``list of int``."""
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "None" if tp is type(None) else tp.__name__


def _match(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits the single (non-union) type ``tp``, and the coerced value."""
    if tp is type(None):
        return value is None, value
    if tp is str or tp is bool:
        return isinstance(value, tp), value
    if isinstance(value, bool):  # a bool is not an int or a float here
        return False, value
    if tp is int:
        return isinstance(value, int), value
    if tp is float:
        if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
            return True, float(value)
        ok = isinstance(value, int | float)
        return ok, float(value) if ok else value
    if typing.get_origin(tp) is list and isinstance(value, list | tuple):
        items = [_match(v, typing.get_args(tp)[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    return False, value


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float).

    Raises:
        ConfigError: naming the key, the expected type and the value got.
    """
    alts = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    for alt in alts:
        ok, out = _match(value, alt)
        if ok:
            return out
    raise ConfigError(f"key '{key}': expected {_type_name(tp)}, "
                      f"got {value!r} ({type(value).__name__})")


def _suggest(key: str, valid: Sequence[str]) -> str:
    """``; did you mean 'X'?`` for the closest valid name (``lr_rate`` -> ``lr``), or ``""``."""
    valid = list(valid)
    close = [_HINTS[key]] if _HINTS.get(key) in valid else []
    # a valid name plus a suffix (lr_rate), or the start of one (epoch, target)
    close = close or sorted((v for v in valid if key.startswith(v + "_") or v.startswith(key)),
                            key=len, reverse=True)
    close = close or difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_fields(obj: Any, ranges: Mapping[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Coerce every field of a config dataclass to its annotated type and check ranges."""
    for name, tp in _hints(type(obj)).items():
        value = _coerce(name, getattr(obj, name), tp)
        setattr(obj, name, value)
        if name in ranges and isinstance(value, int | float) and not ranges[name][0](value):
            raise ConfigError(f"key '{name}' must be {ranges[name][1]}, got {value!r}")


def _check_enums(obj: Any, table: Mapping[str, tuple[str, ...]]) -> None:
    """Enumerated string fields of a config dataclass take one of their accepted values."""
    for key, choices in table.items():
        value = getattr(obj, key)
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"key '{key}' must be one of {', '.join(map(repr, choices))}, "
                              f"got {value!r}{hint}")


def _check_choices(cfg: StageConfig) -> None:
    """A stage's enumerated fields, and its device spelling."""
    _check_enums(cfg, _CHOICES)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"key 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                          f"got {cfg.device!r}")


def _check_index_list(key: str, value: list[int] | None) -> None:
    """A list of subnet indices is non-empty, distinct and non-negative."""
    if value is None:
        return
    if not value or len(set(value)) != len(value) or min(value) < 0:
        raise ConfigError(f"key '{key}' must be a non-empty list of distinct subnet indices "
                          f">= 0, got {value!r}")


def _check_conflicts(cfg: StageConfig) -> None:
    """Cross-field rules."""
    if cfg.epochs > 0 and cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"key 'warmup_epochs' must be <= epochs ({cfg.epochs}), "
                          f"got {cfg.warmup_epochs}")
    if cfg.complexity_form == "target" and cfg.target_madds is None:
        raise ConfigError("complexity_form 'target' needs target_madds (MAdds of the budget, "
                          "e.g. target_madds: 2.0e8)")
    _check_index_list("routing_space", cfg.routing_space)
    if not isinstance(cfg.eval_subnets, str):
        _check_index_list("eval_subnets", cfg.eval_subnets)
    if cfg.stage == "gate" and cfg.routing_space is not None \
            and len(cfg.routing_space) != cfg.num_choice:
        raise ConfigError(f"routing_space has {len(cfg.routing_space)} subnets but num_choice "
                          f"is {cfg.num_choice}; set num_choice: {len(cfg.routing_space)}")


def _check_refused(cfg: StageConfig) -> None:
    """Release keys whose non-default values dsnet cannot honour, refused rather than ignored."""
    if cfg.sync_bn:
        raise ConfigError("key 'sync_bn': synchronized BatchNorm is not supported (each width "
                          "has its own BN statistics); set sync_bn: false (dist_bn: reduce "
                          "averages the statistics over workers after every epoch)")
    if cfg.drop_path > 0:
        raise ConfigError(f"key 'drop_path': {cfg.model} has no stochastic depth; "
                          f"set drop_path: 0.0 (got {cfg.drop_path})")
    _check_pretrained(cfg.pretrained)
    if cfg.train_mode is not None and cfg.train_mode not in _TRAIN_MODES[cfg.stage]:
        raise ConfigError(f"key 'train_mode': the {cfg.stage} stage trains "
                          f"'{_TRAIN_MODES[cfg.stage][0]}', got {cfg.train_mode!r} (dsnet "
                          "runs what 'stage' names: supernet = all weights, gate = the "
                          "slimming head only)")
    if cfg.stage != "supernet":
        for key, off in (("mixup", 0.0), ("cutmix", 0.0), ("slim_train", True)):
            if getattr(cfg, key) != off:
                raise ConfigError(f"key '{key}' applies to supernet training only; set it "
                                  f"under 'supernet:' (the {cfg.stage} stage got "
                                  f"{getattr(cfg, key)!r})")
    mixing = cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None
    if mixing and cfg.batch_size % 2:
        raise ConfigError(f"mixup/cutmix pair each image with another of its batch: "
                          f"batch_size must be even, got {cfg.batch_size}")
    if cfg.stage == "reset_bn" and cfg.dist_bn == "broadcast":
        raise ConfigError("key 'dist_bn': BN recalibration always averages the statistics "
                          "over workers; use dist_bn: reduce (or leave it empty)")
    if cfg.cutmix_minmax is not None and (len(cfg.cutmix_minmax) != 2
                                          or not 0 < cfg.cutmix_minmax[0]
                                          < cfg.cutmix_minmax[1] <= 1):
        raise ConfigError(f"key 'cutmix_minmax' must be [min, max] with 0 < min < max <= 1, "
                          f"got {cfg.cutmix_minmax!r}")


def _check_pretrained(value: bool | str) -> None:
    """``pretrained``: false, or the path of an existing weights file (nothing is downloaded)."""
    if value is True:
        raise ConfigError("key 'pretrained': dsnet downloads no weights; set pretrained: false, "
                          "give a checkpoint file with resume: PATH, or give the path of a "
                          "plain network's weights (pretrained: resnet50.pth)")
    if isinstance(value, str) and value and not Path(value).is_file():
        raise ConfigError(f"key 'pretrained': file {value!r} not found; give the path of a "
                          "plain network's state dict, e.g. torchvision's ResNet-50 saved with "
                          "torch.save(model.state_dict(), 'resnet50.pth'), or pretrained: false")


def validate_stage(cfg: StageConfig) -> StageConfig:
    """Check types, ranges, enumerations and conflicts of a stage config.

    Ints given for float fields are converted to float in place. Limits that depend on
    the model (``start_chn_idx + num_choice`` <= number of widths) are checked by the model.

    Args:
        cfg: the config to check.

    Returns:
        ``cfg`` itself.

    Raises:
        ConfigError: on the first problem found.
    """
    _check_fields(cfg, _STAGE_RANGES)
    _check_choices(cfg)
    _check_conflicts(cfg)
    _check_refused(cfg)
    return cfg


def validate_ray(cfg: RayConfig) -> RayConfig:
    """Check types and ranges of a Ray config; returns it. Raises ConfigError."""
    _check_fields(cfg, _RAY_RANGES)
    _check_enums(cfg, _RAY_CHOICES)
    _check_gpu_share(cfg)
    return cfg


def _check_gpu_share(cfg: RayConfig) -> None:
    """Several GPU workers need whole GPUs each (``gpus_per_worker: 0`` means one): a
    fraction lets Ray put two ranks on one GPU, and NCCL refuses a group like that."""
    gpus = cfg.gpus_per_worker
    if not cfg.use_gpu or cfg.num_workers <= 1 or gpus == 0:
        return
    if gpus < 1 or gpus != int(gpus):
        raise ConfigError(
            f"key 'gpus_per_worker' must be a whole number of GPUs (0 = one each) with "
            f"use_gpu and {cfg.num_workers} workers, got {gpus!r}: a fraction lets Ray put "
            "two workers on one GPU and NCCL refuses two ranks on the same GPU; use "
            "gpus_per_worker: 1 or num_workers: 1")


def _normalize(d: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Map ``drop-path`` to ``drop_path`` and aliases to their field; reject duplicates."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: keys must be strings, got {key!r}")
        name = key.replace("-", "_")
        name = _ALIASES.get(name, name)
        if name in out:
            raise ConfigError(f"{source}: key '{name}' is given twice (as '{key}' too)")
        out[name] = value
    return out


def _check_known(d: Mapping[str, Any], valid: Sequence[str], source: str) -> None:
    """Raise ConfigError for the first key of ``d`` not in ``valid``, with a suggestion."""
    for key in d:
        if key not in valid:
            hint = _suggest(key, valid)
            if key in ("supernet", "gate", "stages", "ray"):
                hint = "; this looks like a pipeline file: use load_pipeline_config"
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")


def _infer_stage(d: Mapping[str, Any]) -> str:
    """Stage of an authors' file: ``test_mode`` and ``reset_bn`` -> reset_bn, else
    ``gate_train`` -> gate, else supernet (the release's reset_bn file sets all three)."""

    def flag(key: str) -> Any:
        return d.get(key, getattr(StageConfig, key))

    if flag("test_mode") is True and flag("reset_bn") is True:
        return "reset_bn"
    return "gate" if flag("gate_train") is True else "supernet"


def _build_stage(d: Mapping[str, Any], source: str) -> StageConfig:
    """StageConfig from normalized keys (stage inferred when absent), validated."""
    _check_known(d, list(_hints(StageConfig)), source)
    d = dict(d)
    d.setdefault("stage", _infer_stage(d))
    try:
        return validate_stage(StageConfig(**d))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def stage_config_from_dict(d: Mapping[str, Any], *, source: str = "stage config") -> StageConfig:
    """Build and validate a StageConfig from a mapping of its keys.

    Args:
        d: keys of :class:`StageConfig` (``-`` spellings accepted). Without ``stage`` it is
            inferred from the authors' flags (see :func:`_infer_stage`).
        source: what to name in error messages (a file path).

    Returns:
        The validated config.

    Raises:
        ConfigError: unknown key, wrong type, value out of range or conflicting keys.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping of stage keys, got {type(d).__name__}")
    return _build_stage(_normalize(d, source), source)


def ray_config_from_dict(d: Mapping[str, Any] | None, *, source: str = "ray") -> RayConfig:
    """Build and validate a RayConfig from a mapping (None = all defaults)."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: 'ray' must be a mapping, got {type(d).__name__}")
    d = _normalize(d, source)
    _check_known(d, list(_hints(RayConfig)), f"{source} [ray]")
    try:
        return validate_ray(RayConfig(**d))
    except ConfigError as e:
        raise ConfigError(f"{source} [ray]: {e}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Mapping at the top of a YAML file (empty file -> {}).

    Raises:
        ConfigError: missing file, malformed YAML (with line) or a top level not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of 'key: value' lines, "
                          f"got a {type(data).__name__}")
    return data


def _stage_entry(slot: str, entry: Any, base_dir: Path, source: str) -> tuple[dict, str]:
    """A pipeline's stage entry (mapping, path or None) as normalized keys and its source."""
    if entry is None:
        return {}, f"{source} [{slot}]"
    if isinstance(entry, str | Path):
        path = base_dir / entry
        if not path.is_file():
            raise ConfigError(f"{source}: stage '{slot}' file not found: {path}")
        where = f"{path} (stage '{slot}')"
        return _normalize(read_yaml(path), where), where
    if isinstance(entry, Mapping):
        where = f"{source} [{slot}]"
        return _normalize(entry, where), where
    raise ConfigError(f"{source}: stage '{slot}' must be a mapping of stage keys or the path "
                      f"of a stage YAML, got {entry!r}")


def _stage_entries(d: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The three stage entries, from top-level slots and/or a ``stages:`` mapping."""
    nested = d.get("stages") or {}
    if not isinstance(nested, Mapping):
        raise ConfigError(f"{source}: 'stages' must be a mapping of {', '.join(STAGES)}")
    for slot in nested:
        if slot not in STAGES:
            raise ConfigError(f"{source}: unknown stage '{slot}'{_suggest(slot, STAGES)} "
                              f"(a pipeline has exactly {', '.join(STAGES)})")
    twice = [s for s in STAGES if s in d and s in nested]
    if twice:
        raise ConfigError(f"{source}: stage '{twice[0]}' is given both at top level and "
                          f"under 'stages'; keep one")
    entries = {**nested, **{s: d[s] for s in STAGES if s in d}}
    missing = [s for s in STAGES if s not in entries]
    if missing:
        raise ConfigError(f"{source}: the pipeline is missing stage(s) {', '.join(missing)}; "
                          f"add e.g. '{missing[0]}: {{}}' (a mapping) or a stage YAML path")
    return entries


def pipeline_config_from_dict(d: Mapping[str, Any], base_dir: str | Path = ".", *,
                              source: str = "pipeline config") -> PipelineConfig:
    """Build and validate a PipelineConfig from a mapping.

    Args:
        d: ``name``, ``output``, ``ray``, the three stages (top-level ``supernet:``,
            ``reset_bn:``, ``gate:`` or a ``stages:`` mapping of them) and any stage keys
            shared by all stages.
        base_dir: folder that relative stage YAML paths are resolved against.
        source: what to name in error messages (a file path).

    Returns:
        The validated config; each stage's ``stage`` is its slot name.

    Raises:
        ConfigError: missing or unknown stage, unknown key, wrong type or range.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping, got {type(d).__name__}")
    d = _normalize(d, source)
    entries = _stage_entries(d, source)
    shared = {k: v for k, v in d.items() if k not in _PIPELINE_KEYS and k not in STAGES}
    for key, value in shared.items():
        looks_like_stage = isinstance(value, Mapping) or str(value).endswith((".yml", ".yaml"))
        if key not in _hints(StageConfig) and looks_like_stage:
            raise ConfigError(f"{source}: unknown stage '{key}'{_suggest(key, STAGES)} "
                              f"(a pipeline has exactly {', '.join(STAGES)})")
    _check_known(shared, list(_hints(StageConfig)) + list(_PIPELINE_KEYS), source)
    stages = {}
    for slot in STAGES:
        own, where = _stage_entry(slot, entries[slot], Path(base_dir), source)
        stages[slot] = _build_stage({**shared, **own, "stage": slot}, where)
    cfg = PipelineConfig(name=d.get("name"), output=d.get("output", "results"),
                         ray=ray_config_from_dict(d.get("ray"), source=source), stages=stages)
    try:
        for key in ("name", "output"):
            _coerce(key, getattr(cfg, key), _hints(PipelineConfig)[key])
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def config_to_dict(cfg: StageConfig | RayConfig | PipelineConfig) -> dict[str, Any]:
    """A JSON-safe dict of a config (for run.json and checkpoints).

    ``stage_config_from_dict`` / ``pipeline_config_from_dict`` rebuild an equal config.
    """
    return dataclasses.asdict(cfg)


def _split_override(item: str) -> tuple[str, str]:
    """``"a.b=v"`` -> ``("a.b", "v")``; ConfigError when there is no ``=`` or no key."""
    if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
        raise ConfigError(f"malformed override {item!r}: expected KEY=VALUE, "
                          f"e.g. 'supernet.epochs=3' or 'lr=0.05'")
    key, raw = item.split("=", 1)
    return key.strip().replace("-", "_"), raw.strip()


def _parse_value(item: str, key: str, raw: str, tp: Any) -> Any:
    """Parse an override's value with ``yaml.safe_load`` and type-check it for ``key``.

    A scalar that YAML reads as another type is kept as text when the field takes a string
    (``name=2024``, ``resume=``).
    """
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    try:
        return _coerce(key, value, tp)
    except ConfigError as e:
        if _accepts_str(tp) and not isinstance(value, list | dict):
            return raw
        raise ConfigError(f"override {item!r}: {e}") from None


def _accepts_str(tp: Any) -> bool:
    """Whether the annotation ``tp`` admits a plain string."""
    return tp is str or (isinstance(tp, types.UnionType) and str in typing.get_args(tp))


def _set_stage_key(item: str, d: dict[str, Any], key: str, raw: str) -> None:
    """Set one StageConfig key of the dict ``d`` from an override."""
    key = _ALIASES.get(key, key)
    hints = _hints(StageConfig)
    if key not in hints:
        raise ConfigError(f"override {item!r}: unknown stage key '{key}'{_suggest(key, hints)}")
    d[key] = _parse_value(item, key, raw, hints[key])


def _override_pipeline(d: dict[str, Any], item: str) -> None:
    """Apply one override to the dict form of a PipelineConfig."""
    key, raw = _split_override(item)
    head, _, rest = key.removeprefix("stages.").partition(".")
    if rest and head in STAGES:
        _set_stage_key(item, d["stages"][head], rest, raw)
    elif rest and head == "ray":
        hints = _hints(RayConfig)
        if rest not in hints:
            raise ConfigError(f"override {item!r}: unknown ray key '{rest}'"
                              f"{_suggest(rest, hints)}")
        d["ray"][rest] = _parse_value(item, rest, raw, hints[rest])
    elif rest:
        raise ConfigError(f"override {item!r}: unknown section '{head}'; use one of "
                          f"{', '.join(STAGES)}, ray, or no prefix for all stages")
    elif key in ("name", "output"):
        d[key] = _parse_value(item, key, raw, _hints(PipelineConfig)[key])
    else:
        for slot in STAGES:
            _set_stage_key(item, d["stages"][slot], key, raw)


def apply_overrides(cfg: StageConfig | PipelineConfig,
                    overrides: Sequence[str]) -> StageConfig | PipelineConfig:
    """Apply ``KEY=VALUE`` overrides (values parsed by ``yaml.safe_load``), then validate.

    On a PipelineConfig, ``supernet.epochs=3`` sets one stage, ``ray.num_workers=1`` the Ray
    settings, ``name=``/``output=`` the pipeline, and an undotted stage key (``lr=0.05``)
    all three stages. On a StageConfig the key is a field. All-or-nothing: ``cfg`` is
    updated in place only when every override is valid.

    Args:
        cfg: the config to update.
        overrides: items such as ``"lr=0.05"``.

    Returns:
        ``cfg``, updated.

    Raises:
        ConfigError: a malformed item, unknown key, wrong type or invalid result.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    if not overrides:
        return cfg
    d = config_to_dict(cfg)
    for item in overrides:
        if isinstance(cfg, PipelineConfig):
            _override_pipeline(d, item)
        else:
            _set_stage_key(item, d, *_split_override(item))
    source = f"after overrides {list(overrides)}"
    new = (pipeline_config_from_dict(d, source=source) if isinstance(cfg, PipelineConfig)
           else stage_config_from_dict(d, source=source))
    for f in dataclasses.fields(new):
        setattr(cfg, f.name, getattr(new, f.name))
    return cfg


def load_stage_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                      **defaults: Any) -> StageConfig:
    """Load one stage's config: defaults < ``**defaults`` < the YAML file < overrides.

    Args:
        path: a stage YAML (the authors' files work as they are); None = no file.
        overrides: ``KEY=VALUE`` items (see :func:`apply_overrides`).
        **defaults: StageConfig keys that the file may override.

    Returns:
        The validated config; ``stage`` is inferred from the authors' flags when no
        layer sets it.

    Raises:
        ConfigError: see :func:`stage_config_from_dict` and :func:`apply_overrides`.
    """
    source = str(path) if path is not None else "stage config"
    merged = _normalize(defaults, "load_stage_config() arguments")
    if path is not None:
        merged.update(_normalize(read_yaml(path), source))
    cfg = stage_config_from_dict(merged, source=source)
    return apply_overrides(cfg, overrides)


def load_pipeline_config(path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Load a pipeline YAML (stage paths relative to its folder), then apply overrides.

    Args:
        path: the pipeline YAML; its ``name`` defaults to the file's stem.
        overrides: ``KEY=VALUE`` items (see :func:`apply_overrides`).

    Returns:
        The validated config.

    Raises:
        ConfigError: see :func:`pipeline_config_from_dict` and :func:`apply_overrides`.
    """
    d = read_yaml(path)
    d.setdefault("name", Path(path).stem)
    cfg = pipeline_config_from_dict(d, Path(path).parent, source=str(path))
    return apply_overrides(cfg, overrides)


__all__ = [
    "ConfigError", "PipelineConfig", "RayConfig", "StageConfig", "STAGES", "DATASETS",
    "apply_overrides", "config_to_dict", "load_pipeline_config", "load_stage_config",
    "pipeline_config_from_dict", "ray_config_from_dict", "read_yaml", "stage_config_from_dict",
    "validate_ray", "validate_stage",
]
