"""Tests of dsnet.config, pipelines.config and the validator they share
(dsnet.utils.schema): loading, validation, overrides and precedence (no torch, no ray)."""

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

import dsnet.config
import pipelines.config
import pipelines.sweep_config
from dsnet.config import (
    DATASETS,
    STAGES,
    ConfigError,
    StageConfig,
    apply_overrides,
    config_to_dict,
    load_stage_config,
    stage_config_from_dict,
    validate_stage,
)
from dsnet.configs import CONFIG_DIR
from dsnet.utils.schema import alternatives, choices, field_types, unwrap
from pipelines.config import (
    PipelineConfig,
    RayConfig,
    load_pipeline_config,
    load_stage_command,
    override_pipeline,
    pipeline_config_from_dict,
)
from pipelines.sweep_config import load_sweep_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(CONFIG_DIR.glob("*.yml"))
AUTHORS = {
    "mobilenetv1_bn_uniform.yml": "supernet",
    "mobilenetv1_bn_uniform_reset_bn.yml": "reset_bn",
    "mobilenetv1_bn_uniform_gate.yml": "gate",
}


def _write(tmp_path: Path, text: str, name: str = "cfg.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _pipeline(**extra) -> dict:
    return {"supernet": {}, "reset_bn": {}, "gate": {}, **extra}


# --- every shipped file loads ---------------------------------------------------------


def test_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"default.yml", "tiny.yml", "imagenet_ds_mbnet.yml",
                                         *AUTHORS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    data = yaml.safe_load(path.read_text())
    if "space" in data:  # a sweep config (pipelines.sweep): its values, resolved
        cfg = load_sweep_config(path)
        assert cfg.name == data.get("name", path.stem)
        assert cfg.search == data.get("search", "grid") and cfg.set == (data.get("set") or [])
        assert set(cfg.space) == set(data["space"])
        assert cfg.ray == (data.get("ray") or {})
        assert Path(cfg.pipeline).is_absolute() and Path(cfg.pipeline).is_file()
        assert load_pipeline_config(cfg.pipeline, cfg.set).stages["gate"].stage == "gate"
    elif any(slot in data for slot in ("supernet", "gate", "stages")):
        cfg = load_pipeline_config(path)
        assert set(cfg.stages) == set(STAGES)
        assert all(cfg.stages[s].stage == s for s in STAGES)
        json.dumps(config_to_dict(cfg))
    else:
        cfg = load_stage_config(path)
        assert cfg.stage == AUTHORS.get(path.name, cfg.stage)


@pytest.mark.parametrize("name,stage", AUTHORS.items())
def test_authors_files_keep_their_values(name, stage):
    cfg = load_stage_config(CONFIG_DIR / name)
    assert cfg.stage == stage
    assert cfg.model == "slimmable_mbnet_v1_bn_uniform"
    assert cfg.dataset == "imagenet"
    assert (cfg.lr, cfg.drop, cfg.model_ema_decay, cfg.batch_size) == (0.08, 0.2, 0.997, 64)
    assert cfg.warmup_lr == 1e-5  # "1e-5" is a string to PyYAML; accepted as a float
    assert cfg.drop_path == 0.0 and cfg.aa == "rand-m9-mstd0.5" and cfg.reprob == 0.2
    if stage == "supernet":
        assert (cfg.epochs, cfg.warmup_epochs, cfg.num_choice, cfg.weight_decay) == (
            150, 5, 14, 1e-4)
    else:
        assert (cfg.epochs, cfg.warmup_epochs, cfg.num_choice, cfg.weight_decay) == (
            30, 0, 4, 0.01)
        assert cfg.dist_bn == "reduce" and cfg.start_epoch == 0


def test_default_pipeline_values():
    cfg = load_pipeline_config(CONFIG_DIR / "default.yml")
    sn, rb, gate = (cfg.stages[s] for s in STAGES)
    assert cfg.name == "default" and cfg.ray.num_workers == 2 and not cfg.ray.use_gpu
    assert (sn.dataset, sn.model, sn.seed) == ("fashion_mnist", "ds_mbnet_tiny", 42)
    assert (sn.epochs, sn.lr, sn.batch_size, sn.warmup_epochs, sn.weight_decay) == (
        5, 0.2, 64, 0, 5e-5)
    assert (sn.drop, sn.model_ema, sn.model_ema_decay, sn.smoothing) == (0.1, True, 0.99, 0.1)
    assert (sn.aa, sn.reprob, sn.color_jitter, sn.num_random, sn.distill, sn.workers) == (
        "", 0.0, 0.0, 1, "ieb", 0)
    assert (rb.reset_bn_batches, rb.batch_size) == (10, 128)
    assert (gate.epochs, gate.lr, gate.weight_decay, gate.num_choice) == (6, 0.01, 0.01, 4)
    assert (gate.estimator, gate.opt) == ("expected", "adamw")
    assert gate.routing_space == [0, 4, 8, 13]
    assert (gate.madds_unit, gate.complexity_weight, gate.sgs_weight) == (1e6, 0.01, 0.0)


def test_imagenet_pipeline_uses_authors_files():
    cfg = load_pipeline_config(CONFIG_DIR / "imagenet_ds_mbnet.yml")
    assert cfg.ray.num_workers == 8 and cfg.ray.use_gpu
    assert [cfg.stages[s].epochs for s in STAGES] == [150, 30, 30]
    assert all(cfg.stages[s].data == "/path/to/imagenet" for s in STAGES)
    assert cfg.stages["gate"].num_choice == 4


# --- error messages -------------------------------------------------------------------


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'lr_rate'; did you mean 'lr'\?"):
        load_stage_config(_write(tmp_path, "lr_rate: 0.1\n"))
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        stage_config_from_dict({"batchsize": 3})


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*nope.yml"):
        load_stage_config(tmp_path / "nope.yml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "lr: 0.1\nepochs: 3\n  bad: [1\n")
    with pytest.raises(ConfigError, match=r"cfg\.yml:3:\d+: malformed YAML"):
        load_stage_config(path)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_stage_config(_write(tmp_path, "- 1\n- 2\n"))


@pytest.mark.parametrize("d,pattern", [
    ({"lr": "fast"}, r"key 'lr': expected float, got 'fast'"),
    ({"batch_size": True}, r"key 'batch_size': expected int, got True"),
    ({"epochs": 1.5}, r"key 'epochs': expected int"),
    ({"model_ema": "yes please"}, r"key 'model_ema': expected bool"),
    ({"routing_space": [0, "a"]}, r"key 'routing_space': expected list of int or None"),
])
def test_wrong_type(d, pattern):
    with pytest.raises(ConfigError, match=pattern):
        stage_config_from_dict(d)


def test_int_accepted_for_float():
    cfg = stage_config_from_dict({"lr": 1, "complexity_weight": 0})
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0
    assert isinstance(cfg.complexity_weight, float)


@pytest.mark.parametrize("d,pattern", [
    ({"lr": -0.1}, r"'lr' must be > 0"),
    ({"epochs": -1}, r"'epochs' must be >= 0"),
    ({"batch_size": 0}, r"'batch_size' must be >= 1"),
    ({"drop": 1.0}, r"'drop' must be in \[0, 1\)"),
    ({"smoothing": 1.5}, r"'smoothing' must be in \[0, 1\)"),
    ({"model_ema_decay": 1.0}, r"'model_ema_decay' must be in \(0, 1\)"),
    ({"optimizer_step": 0}, r"'optimizer_step' must be >= 1"),
    ({"num_random": -1}, r"'num_random' must be >= 0"),
    ({"gumbel_tau": 0}, r"'gumbel_tau' must be > 0"),
    ({"complexity_weight": -1}, r"'complexity_weight' must be >= 0"),
    ({"reset_bn_batches": 0}, r"'reset_bn_batches' must be >= 1"),
    ({"start_chn_idx": -1}, r"'start_chn_idx' must be >= 0"),
    ({"hflip": 1.5}, r"'hflip' must be in \[0, 1\]"),
    ({"num_val": 0}, r"'num_val' must be"),
    ({"epochs": 3, "warmup_epochs": 4}, r"'warmup_epochs' must be <= epochs"),
    ({"sched": "linear"}, r"'sched' must be one of 'cosine', 'step', 'constant'"),
    ({"opt": "adam"}, r"'opt' must be one of .*did you mean 'adamw'"),
    ({"stage": "finetune"}, r"'stage' must be one of"),
    ({"dataset": "mnist"}, r"'dataset' must be one of"),
    ({"device": "gpu"}, r"'device' must be"),
    ({"complexity_form": "target"}, r"needs target_madds"),
    ({"complexity_form": "target", "target_madds": 0}, r"'target_madds' must be > 0"),
])
def test_out_of_range_and_conflicts(d, pattern):
    with pytest.raises(ConfigError, match=pattern):
        stage_config_from_dict(d)


def test_valid_edge_values():
    cfg = stage_config_from_dict({"epochs": 0, "warmup_epochs": 5, "complexity_form": "target",
                                  "target_madds": 2e8, "device": "cuda:1", "aa": None})
    assert cfg.target_madds == 2e8 and cfg.device == "cuda:1"
    # start_chn_idx >= the number of widths (14) is the model's to check, not the config's
    assert stage_config_from_dict({"start_chn_idx": 14}).start_chn_idx == 14


def test_ray_ranges():
    with pytest.raises(ConfigError, match=r"\[ray\]: key 'num_workers' must be >= 0"):
        pipeline_config_from_dict(_pipeline(ray={"num_workers": -1}))
    with pytest.raises(ConfigError, match="did you mean 'use_gpu'"):
        pipeline_config_from_dict(_pipeline(ray={"use_gpus": True}))
    with pytest.raises(ConfigError, match=r"\[ray\]: key 'min_free_mb' must be >= 0"):
        pipeline_config_from_dict(_pipeline(ray={"min_free_mb": -5}))
    with pytest.raises(ConfigError, match=r"\[ray\]: key 'num_to_keep' must be >= 1"):
        pipeline_config_from_dict(_pipeline(ray={"num_to_keep": 0}))
    with pytest.raises(ConfigError, match=r"key 'placement_strategy' must be one of .*"
                                          r"got 'SPRED' \(did you mean 'SPREAD'\?\)"):
        pipeline_config_from_dict(_pipeline(ray={"placement_strategy": "SPRED"}))
    spread = pipeline_config_from_dict(_pipeline(ray={"placement_strategy": "STRICT_SPREAD"}))
    assert spread.ray.placement_strategy == "STRICT_SPREAD"
    cfg = pipeline_config_from_dict(_pipeline(ray={"num_workers": 0, "cpus_per_worker": 2}))
    assert cfg.ray == RayConfig(num_workers=0, cpus_per_worker=2.0)


def test_validate_stage_direct():
    cfg = StageConfig()
    assert validate_stage(cfg) is cfg
    cfg.lr = 0
    with pytest.raises(ConfigError, match="'lr' must be > 0"):
        validate_stage(cfg)


# --- stage inference, dash spelling ---------------------------------------------------


def test_stage_inference_and_dash_keys():
    assert stage_config_from_dict({}).stage == "supernet"
    assert stage_config_from_dict({"gate_train": True}).stage == "gate"
    both = {"gate_train": True, "test_mode": True, "reset_bn": True}
    assert stage_config_from_dict(both).stage == "reset_bn"
    assert stage_config_from_dict({**both, "stage": "gate"}).stage == "gate"
    assert stage_config_from_dict({"drop-path": 0.0}).drop_path == 0.0
    with pytest.raises(ConfigError, match="given twice"):
        stage_config_from_dict({"drop-path": 0.0, "drop_path": 0.0})


# --- pipelines ------------------------------------------------------------------------


def test_pipeline_missing_and_unknown_stage():
    with pytest.raises(ConfigError, match="missing stage.*reset_bn"):
        pipeline_config_from_dict({"supernet": {}, "gate": {}})
    with pytest.raises(ConfigError, match="unknown stage 'gating'; did you mean 'gate'"):
        pipeline_config_from_dict(_pipeline(gating={}))
    with pytest.raises(ConfigError, match="unknown stage 'finetune'"):
        pipeline_config_from_dict({"stages": {**_pipeline(), "finetune": {}}})


def test_pipeline_stage_file_relative_and_missing(tmp_path):
    _write(tmp_path, "lr: 0.3\nepochs: 2\nwarmup_epochs: 0\n", "gate_stage.yml")
    cfg = load_pipeline_config(_write(tmp_path, yaml.safe_dump(
        _pipeline(gate="gate_stage.yml"))))
    assert (cfg.stages["gate"].lr, cfg.stages["gate"].stage) == (0.3, "gate")
    assert cfg.name == "cfg"  # defaults to the file's stem
    with pytest.raises(ConfigError, match="stage 'gate' file not found"):
        load_pipeline_config(_write(tmp_path, yaml.safe_dump(_pipeline(gate="nope.yml"))))


def test_precedence(tmp_path):
    """StageConfig defaults < shared top-level keys < stage mapping/file < --set."""
    _write(tmp_path, "lr: 0.3\nbatch_size: 16\n", "sn.yml")
    path = _write(tmp_path, yaml.safe_dump({
        "lr": 0.2, "batch_size": 32, "seed": 7,
        "supernet": "sn.yml", "reset_bn": {"stage": "gate"}, "gate": {"batch_size": 8},
    }))
    cfg = load_pipeline_config(path, ["supernet.batch_size=4"])
    sn, rb, gate = (cfg.stages[s] for s in STAGES)
    assert (sn.lr, sn.batch_size, sn.seed) == (0.3, 4, 7)
    assert (rb.lr, rb.batch_size, rb.stage) == (0.2, 32, "reset_bn")  # slot forces stage
    assert (gate.lr, gate.batch_size) == (0.2, 8)
    assert gate.epochs == StageConfig().epochs


def test_load_stage_config_defaults_precedence(tmp_path):
    path = _write(tmp_path, "lr: 0.3\n")
    cfg = load_stage_config(path, ["epochs=2"], lr=0.9, seed=3, epochs=10, warmup_epochs=0)
    assert (cfg.lr, cfg.seed, cfg.epochs) == (0.3, 3, 2)
    assert load_stage_config(seed=5).seed == 5


# --- overrides ------------------------------------------------------------------------


def test_overrides_pipeline():
    cfg = pipeline_config_from_dict(_pipeline(name="p"))
    out = override_pipeline(cfg, ["supernet.epochs=3", "ray.num_workers=1", "lr=0.05",
                                  "data=/x", "output=out", "eval_subnets=[0, 3]",
                                  "supernet.warmup-epochs=1"])
    assert out is cfg
    assert cfg.stages["supernet"].epochs == 3 and cfg.stages["gate"].epochs == 150
    assert cfg.stages["supernet"].warmup_epochs == 1
    assert cfg.ray.num_workers == 1 and cfg.output == "out"
    assert all(cfg.stages[s].lr == 0.05 and cfg.stages[s].data == "/x" for s in STAGES)
    assert cfg.stages["gate"].eval_subnets == [0, 3]


def test_overrides_typed_parse():
    cfg = stage_config_from_dict({})
    apply_overrides(cfg, ["model_ema=false", "lr=1e-3", "routing_space=[1, 2, 3]",
                          "num_choice=3", "resume=", "aa=null", "target_madds=3e8"])
    assert cfg.model_ema is False and cfg.lr == 1e-3 and cfg.routing_space == [1, 2, 3]
    assert cfg.resume == "" and cfg.aa is None and cfg.target_madds == 3e8
    pipe = pipeline_config_from_dict(_pipeline())
    assert override_pipeline(pipe, ["name=2024"]).name == "2024"  # kept as text
    assert apply_overrides(cfg, ["dist_bn=reduce", "dist_bn="]).dist_bn == ""


@pytest.mark.parametrize("item,pattern", [
    ("epochs", r"malformed override 'epochs': expected KEY=VALUE"),
    ("=3", r"malformed override '=3'"),
    ("lr_rate=1", r"override 'lr_rate=1': unknown stage key 'lr_rate'; did you mean 'lr'"),
    ("supernet.lr_rate=1", r"unknown stage key 'lr_rate'"),
    ("gating.lr=1", r"unknown section 'gating'"),
    ("ray.num_worker=1", r"unknown ray key 'num_worker'; did you mean 'num_workers'"),
    ("supernet.epochs=three", r"override 'supernet.epochs=three': key 'epochs': expected int"),
    ("batch_size=true", r"key 'batch_size': expected int, got True"),
    ("lr=-1", r"\[supernet\]: key 'lr' must be > 0"),
])
def test_overrides_errors(item, pattern):
    cfg = pipeline_config_from_dict(_pipeline())
    before = config_to_dict(cfg)
    with pytest.raises(ConfigError, match=pattern):
        override_pipeline(cfg, [item])
    assert config_to_dict(cfg) == before  # all-or-nothing


def test_overrides_on_stage_config_errors():
    with pytest.raises(ConfigError, match="unknown stage key 'supernet.lr'"):
        apply_overrides(StageConfig(), ["supernet.lr=1"])
    with pytest.raises(ConfigError, match="needs target_madds"):
        apply_overrides(StageConfig(), ["complexity_form=target"])


# --- serialisation --------------------------------------------------------------------


def test_config_to_dict_round_trip():
    cfg = load_stage_config(CONFIG_DIR / "mobilenetv1_bn_uniform_gate.yml",
                            ["routing_space=[0, 1, 2, 3]", "eval_subnets=[0, 13]"])
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert stage_config_from_dict(d) == cfg


def test_pipeline_round_trip():
    cfg = load_pipeline_config(CONFIG_DIR / "default.yml")
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert set(d) == {"name", "output", "ray", "stages"}
    assert pipeline_config_from_dict(d) == cfg
    assert isinstance(cfg, PipelineConfig)


# --- the schema: ranges and choices declared by the types -----------------------------

CONFIG_MODULES = (dsnet.config, pipelines.config, pipelines.sweep_config)


def _config_classes() -> list[type]:
    """Every dataclass defined in the config modules."""
    return [c for m in CONFIG_MODULES for c in vars(m).values()
            if dataclasses.is_dataclass(c) and isinstance(c, type) and c.__module__ == m.__name__]


def _numbers_without_range(cls: type) -> list[str]:
    """Fields of ``cls`` that take an int or a float but declare no Range."""
    return [name for name, tp in field_types(cls).items() for alt in alternatives(tp)
            if unwrap(alt)[0] in (int, float) and unwrap(alt)[1] is None]


def test_every_numeric_field_declares_a_range():
    classes = _config_classes()
    assert {c.__name__ for c in classes} >= {"StageConfig", "RayConfig", "PipelineConfig",
                                             "SweepConfig", "AshaConfig", "Dist"}
    assert {c.__name__: _numbers_without_range(c) for c in classes} == {
        c.__name__: [] for c in classes}


def test_range_check_finds_a_bare_number():
    """The check above could fail: an int field without a Range is reported."""

    @dataclasses.dataclass
    class Bare:
        ok: dsnet.config.Count = 1
        bare: int | None = None

    assert _numbers_without_range(Bare) == ["bare"]


LITERAL_FIELDS = [name for name, tp in field_types(StageConfig).items() if choices(tp)]


def test_choices_are_read_from_the_types():
    assert STAGES == typing.get_args(dsnet.config.StageName) == ("supernet", "reset_bn", "gate")
    assert DATASETS == choices(field_types(StageConfig)["dataset"])
    assert len(LITERAL_FIELDS) >= 15 and "placement_strategy" in {
        n for n, tp in field_types(RayConfig).items() if choices(tp)}


@pytest.mark.parametrize("name", LITERAL_FIELDS)
def test_every_enumeration_refuses_other_values(name):
    with pytest.raises(ConfigError, match=f"key '{name}' must be one of"):
        stage_config_from_dict({name: "no-such-choice"})


def test_stage_command_splits_ray_items():
    path = CONFIG_DIR / "mobilenetv1_bn_uniform_gate.yml"
    cfg, ray_cfg = load_stage_command(path, ["ray.num_workers=0", "lr=0.3"], "gate")
    assert (cfg.stage, cfg.lr, ray_cfg.num_workers) == ("gate", 0.3, 0)
    with pytest.raises(ConfigError, match="unknown ray key 'num_worker'; did you mean"):
        load_stage_command(path, ["ray.num_worker=1"], "gate")
    with pytest.raises(ConfigError, match=r"--set \[ray\]: key 'num_to_keep' must be >= 1"):
        load_stage_command(path, ["ray.num_to_keep=0"], "gate")
