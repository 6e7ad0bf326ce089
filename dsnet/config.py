"""Typed, validated configuration of one DS-Net stage (``supernet``, ``reset_bn`` or ``gate``).

:class:`StageConfig` holds every key of the authors' three YAML files
(``dsnet/configs/mobilenetv1_bn_uniform*.yml``; a key spelled with ``-`` such as ``drop-path``
is the field ``drop_path``) plus dsnet's own. Its annotations carry the checks
(:mod:`dsnet.utils.schema`): an enumeration is a ``Literal`` (:data:`StageName`,
:data:`DatasetName`, ...) and every number declares its range. Later wins:
``StageConfig`` defaults < ``load_stage_config(**defaults)`` < the YAML file < ``--set``
overrides. The Ray layer's configs (Ray settings, the three-stage pipeline) are in
``pipelines.config``.

YAML is read with ``yaml.safe_load`` only. Every problem raises :class:`ConfigError` with
a one- or two-line message naming the file, key or override at fault.

This module imports only the standard library and PyYAML.
"""

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from dsnet.utils.schema import (
    ConfigError,
    Count,
    Fraction,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    Probability,
    Range,
    apply_items,
    build,
    check_fields,
    check_known,
    field_types,
    read_yaml,
    set_item,
    split_item,
)

StageName = Literal["supernet", "reset_bn", "gate"]
STAGES: tuple[str, ...] = get_args(StageName)  # in the order they run
DatasetName = Literal["fashion_mnist", "mnist5k", "imagenet", "imagefolder", "cifar10",
                      "cifar100", "synthetic"]
DATASETS: tuple[str, ...] = get_args(DatasetName)
# ``ieb`` is the release's older name of ``ensemble_ib`` (its gate and reset_bn YAMLs)
_ALIASES = {"label_smoothing": "smoothing", "ieb": "ensemble_ib"}
# common names from other trainers, for "did you mean" only
_HINTS = {"learning_rate": "lr", "wd": "weight_decay", "dropout": "drop", "ema": "model_ema",
          "ema_decay": "model_ema_decay", "num_epochs": "epochs", "arch": "model",
          "num_workers": "workers", "gpu": "device", "optimizer": "opt", "scheduler": "sched"}
# keys of a pipeline file: a stage loader names the right loader instead of "did you mean"
_PIPELINE_ONLY_KEYS = ("supernet", "gate", "stages", "ray")


@dataclass
class StageConfig:
    """Settings of one DS-Net stage.

    Fields marked "authors'" come from the release's YAML files and keep its Stage-I values
    as defaults, except ``model`` which defaults to dsnet's small MNIST supernet.
    """

    # which stage; loaders infer it for the authors' files
    stage: StageName = "supernet"
    # data
    dataset: DatasetName = "mnist5k"
    data: str | None = None  # dataset folder
    download: bool = False
    img_size: Count | None = None  # None = the dataset's default
    num_val: Count | None = None  # grey sets' val images (None: mnist5k 1000, fashion all)
    corrupt_images: Literal["fail", "skip"] = "fail"
    synthetic_size: Count = 1024
    random_shift: NonNegInt = 0  # grey sets' training: random translation of up to N pixels
    hflip: Probability | None = None  # grey sets' flip probability (None: fashion 0.5, mnist 0)
    # model
    model: str = "ds_mbnet_small"  # authors'
    num_classes: Count | None = None  # None = the dataset's
    in_chans: Count | None = None  # None = the dataset's
    routing_space: list[int] | None = None  # subnet indices the gate routes over
    num_choice: Count = 14  # authors': number of widths; in a gate stage, routing-space size
    # authors' key; a path: a plain network's state dict (a torchvision/timm ResNet-50 for
    # ds_resnet50) as Stage I's start (dsnet.load_pretrained); true is refused (no downloads)
    pretrained: bool | str = False
    drop: Fraction = 0.2  # authors': classifier dropout (largest subnet)
    drop_path: Fraction = 0.0  # authors' ``drop-path``; non-zero refused (no stochastic depth)
    # optimisation (authors'; timm's optimizer and scheduler factories)
    opt: Literal["sgd", "adamw", "rmsprop"] = "sgd"
    sched: Literal["cosine", "step", "constant"] = "cosine"
    epochs: NonNegInt = 150  # 0: no training (reset_bn; evaluation only)
    start_epoch: NonNegInt | None = None  # first epoch to run (default: 0, or after a resumed one)
    warmup_epochs: NonNegInt = 5
    warmup_lr: NonNegFloat = 1e-5
    min_lr: NonNegFloat = 1e-5  # the cosine schedule's floor and the cooldown's lr
    cooldown_epochs: NonNegInt = 10  # epochs at min_lr after ``epochs`` (the release: 150+10)
    decay_epochs: PositiveFloat = 30.0  # sched: step: decay the lr every N epochs ...
    decay_rate: NonNegFloat = 0.1  # ... by this factor
    sched_on_updates: bool = False  # step the schedule every update (release: every epoch)
    lr: PositiveFloat = 0.08
    weight_decay: NonNegFloat = 1e-4
    batch_size: Count = 64
    optimizer_step: Count = 1  # gradient accumulation steps
    validation_batch_size_multiplier: Count = 4
    smoothing: Fraction = 0.1  # label smoothing
    model_ema: bool = True
    model_ema_decay: Annotated[float, Range(0, 1, open_low=True, open_high=True)] = 0.997
    model_ema_warmup: bool = True  # decay min(decay, (1+n)/(10+n)); false = the release
    amp: bool = False  # mixed precision (torch.autocast) in training and evaluation
    # auto: bfloat16 on CPU, float16 + GradScaler on CUDA
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    sync_bn: bool = False  # true is refused: no synchronized per-width BatchNorm
    # BN statistics across ranks after each epoch ("" = none)
    dist_bn: Literal["", "broadcast", "reduce"] = ""
    # augmentation (authors'; timm's create_transform and Mixup)
    aa: str | None = "rand-m9-mstd0.5"  # RandAugment policy; "" or None = off
    remode: Literal["const", "rand", "pixel"] = "pixel"
    reprob: Probability = 0.2
    mixup: NonNegFloat = 0.0  # mixup alpha (supernet stage; 0 = off)
    cutmix: NonNegFloat = 0.0  # cutmix alpha (supernet stage; 0 = off)
    cutmix_minmax: list[float] | None = None
    mixup_prob: Probability = 1.0
    mixup_switch_prob: Probability = 0.5
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    mixup_off_epoch: NonNegInt = 0  # stop mixing from this epoch on (0 = never)
    color_jitter: NonNegFloat = 0.06
    # ImageNet / folders
    train_interpolation: Literal["random", "bilinear", "bicubic"] = "random"
    # loading and resuming (authors')
    workers: NonNegInt = 10  # DataLoader processes (0 = load in the training process)
    pin_mem: bool = True
    resume: str = ""
    no_resume_opt: bool = False
    # the release's mode flags (authors'; dsnet reads ``stage``, and refuses a mismatch)
    train_mode: Literal["all", "gate"] | None = None  # all: supernet, gate: gate; None = own
    test_mode: bool = False
    slim_train: bool = True  # false: the supernet stage trains the largest network alone
    inplace_bootstrap: bool = True
    ensemble_ib: bool = False  # also ``ieb``: the smallest subnet learns from the ensemble
    gate_train: bool = False
    reset_bn: bool = True
    # run
    seed: NonNegInt = 42
    threads: NonNegInt = 0  # torch intra-op threads in this process (0 = torch's default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # supernet stage
    num_random: NonNegInt = 2  # random subnets per step (sandwich rule; 0 = ends only)
    distill: Literal["ieb", "inplace", "none"] = "ieb"
    # reset_bn stage
    reset_bn_batches: Count = 1000
    reset_bn_subnets: Literal["all", "routing"] = "all"
    # gate stage
    start_chn_idx: NonNegInt = 0  # authors': first subnet of the routing space
    sgs_weight: NonNegFloat = 1.0
    sgs_on_probs: bool = False  # release: smoothed CE on the Gumbel-perturbed softmax
    # gate's gradient: straight-through Gumbel one-hot over every routed tail (tails) or
    # through the release's masks (masked); expected: the exact expected loss and MAdds
    # under the head's softmax, no sampling (see GateRunner.gate_step)
    estimator: Literal["tails", "masked", "expected"] = "tails"
    complexity_weight: NonNegFloat = 0.5
    complexity_form: Literal["square", "target"] = "square"
    target_madds: PositiveFloat | None = None  # required by complexity_form: target
    madds_unit: PositiveFloat = 1e9  # the penalty reads MAdds in this unit (release: GMAdds)
    gumbel_tau: PositiveFloat = 1.0
    gate_ema: bool = True
    # logging and evaluation
    log_interval: Count = 50
    eval_subnets: list[int] | Literal["all"] = "all"

    @property
    def total_epochs(self) -> int:
        """Epochs a training stage runs: ``epochs`` then ``cooldown_epochs`` at ``min_lr``."""
        return self.epochs + self.cooldown_epochs if self.epochs > 0 else 0


# the release's ``train_mode`` of each stage (reset_bn does not train)
_TRAIN_MODES = {"supernet": ("all",), "reset_bn": ("all", "gate"), "gate": ("gate",)}


# ----------------------------------------------------------------------------- validation


def _check_index_list(key: str, value: list[int] | None) -> None:
    """A list of subnet indices is non-empty, distinct and non-negative."""
    if value is None:
        return
    if not value or len(set(value)) != len(value) or min(value) < 0:
        raise ConfigError(f"key '{key}' must be a non-empty list of distinct subnet indices "
                          f">= 0, got {value!r}")


def _check_conflicts(cfg: StageConfig) -> None:
    """Cross-field rules, and the device's spelling."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"key 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                          f"got {cfg.device!r}")
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
    _check_mixing(cfg)


def _check_mixing(cfg: StageConfig) -> None:
    """Mixup/cutmix settings that cannot work."""
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


def _check_rules(cfg: StageConfig) -> None:
    """The rules that involve more than one field's type and range."""
    _check_conflicts(cfg)
    _check_refused(cfg)


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
    check_fields(cfg)
    _check_rules(cfg)
    return cfg


# ----------------------------------------------------------------------------- loading


def normalize_keys(d: Mapping[str, Any], source: str) -> dict[str, Any]:
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


def _infer_stage(d: Mapping[str, Any]) -> str:
    """Stage of an authors' file: ``test_mode`` and ``reset_bn`` -> reset_bn, else
    ``gate_train`` -> gate, else supernet (the release's reset_bn file sets all three)."""

    def flag(key: str) -> Any:
        return d.get(key, getattr(StageConfig, key))

    if flag("test_mode") is True and flag("reset_bn") is True:
        return "reset_bn"
    return "gate" if flag("gate_train") is True else "supernet"


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
    d = normalize_keys(d, source)
    pipeline_keys = [k for k in d if k in _PIPELINE_ONLY_KEYS]
    if pipeline_keys:
        raise ConfigError(f"{source}: unknown key '{pipeline_keys[0]}'; this looks like a "
                          "pipeline file: use pipelines.config.load_pipeline_config")
    d.setdefault("stage", _infer_stage(d))
    return build(StageConfig, d, source, hints=_HINTS, check=_check_rules)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (for run.json and checkpoints); the matching
    ``*_from_dict`` rebuilds an equal config."""
    return dataclasses.asdict(cfg)


def check_stage_keys(d: Mapping[str, Any], source: str, also: Sequence[str] = ()) -> None:
    """ConfigError for the first key of ``d`` that is neither a StageConfig key nor in
    ``also``, with a "did you mean" suggestion."""
    check_known(d, [*field_types(StageConfig), *also], source, _HINTS)


def set_stage_key(d: dict[str, Any], key: str, raw: str, item: str) -> None:
    """Set one StageConfig key of the mapping ``d`` from the ``--set`` item ``item``
    (``key``/``raw`` as :func:`dsnet.utils.schema.split_item` splits it)."""
    set_item(d, StageConfig, _ALIASES.get(key, key), raw, item, what="stage key", hints=_HINTS)


def apply_overrides(cfg: StageConfig, overrides: Sequence[str]) -> StageConfig:
    """Apply ``KEY=VALUE`` overrides (values parsed as YAML), then validate.

    All-or-nothing: ``cfg`` is updated in place only when every override is valid.

    Args:
        cfg: the config to update.
        overrides: items such as ``"lr=0.05"``.

    Returns:
        ``cfg``, updated.

    Raises:
        ConfigError: a malformed item, unknown key, wrong type or invalid result.
    """
    return apply_items(cfg, overrides, lambda d, item: set_stage_key(d, *split_item(item), item),
                       lambda d, source: stage_config_from_dict(d, source=source))


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
    merged = normalize_keys(defaults, "load_stage_config() arguments")
    if path is not None:
        merged.update(normalize_keys(read_yaml(path), source))
    cfg = stage_config_from_dict(merged, source=source)
    return apply_overrides(cfg, overrides)


__all__ = [
    "ConfigError", "DATASETS", "DatasetName", "STAGES", "StageConfig", "StageName",
    "apply_overrides", "check_stage_keys", "config_to_dict", "load_stage_config", "normalize_keys",
    "set_stage_key", "stage_config_from_dict", "validate_stage",
]
