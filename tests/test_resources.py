"""Resources without Ray: each worker's CPU bundle covers its DataLoader processes, the
pre-flight checks count it, and an autoscaling cluster gets a warning instead of an error.

The cluster is a fake resource view (``pipelines.runtime.cluster_nodes`` replaced), so
nothing here starts Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dsnet.config import StageConfig
from dsnet.configs import CONFIG_DIR
from pipelines import cli, full, runtime
from pipelines.config import RayConfig, load_pipeline_config
from pipelines.runtime import (
    AUTOSCALING_ENV,
    RaySession,
    ResourceError,
    check_local_cpus,
    check_resources,
    cpu_request,
    local_ray_env,
    worker_cpus,
)
from pipelines.stage import scaling_config
from tests.helpers import TINY

IMAGENET = CONFIG_DIR / "imagenet_ds_mbnet.yml"


def _stages(**loaders: int) -> dict[str, StageConfig]:
    return {name: StageConfig(stage=name, workers=n) for name, n in loaders.items()}


def _fake_cluster(monkeypatch: pytest.MonkeyPatch, *nodes: dict[str, float]) -> None:
    monkeypatch.setattr(runtime, "cluster_nodes", lambda: [dict(n) for n in nodes])


@pytest.fixture(autouse=True)
def _no_autoscaling_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(AUTOSCALING_ENV, raising=False)


# ----------------------------------------------------------------------------- bundles


def test_bundle_is_the_larger_of_cpus_per_worker_and_one_plus_loaders() -> None:
    assert worker_cpus(RayConfig(cpus_per_worker=1.0), 0) == 1.0
    assert worker_cpus(RayConfig(cpus_per_worker=1.0), 10) == 11.0
    assert worker_cpus(RayConfig(cpus_per_worker=16.0), 10) == 16.0
    per, why, lower = cpu_request(RayConfig(), _stages(supernet=2, reset_bn=4, gate=0))
    assert per == 5.0 and "4 DataLoader processes of the reset_bn stage" in why
    assert "reset_bn stage's workers" in lower
    assert cpu_request(RayConfig(cpus_per_worker=2.0), _stages(gate=1))[0] == 2.0


def test_scaling_config_reserves_the_loaders() -> None:
    ray_cfg = RayConfig(num_workers=2)
    assert scaling_config(ray_cfg, StageConfig(workers=3)).resources_per_worker == {"CPU": 4.0}
    assert scaling_config(ray_cfg).resources_per_worker == {"CPU": 1.0}
    gpu = RayConfig(num_workers=2, use_gpu=True, cpus_per_worker=8.0, gpus_per_worker=1.0)
    assert scaling_config(gpu, StageConfig(workers=3)).resources_per_worker == {
        "CPU": 8.0, "GPU": 1.0}


def test_imagenet_job_reserves_what_its_loaders_use() -> None:
    """dsnet/configs/imagenet_ds_mbnet.yml: 10 loaders per worker need 11-CPU bundles, and the
    config says so itself (the reservation is not a silent bump)."""
    cfg = load_pipeline_config(IMAGENET)
    for stage in cfg.stages.values():
        assert stage.workers == 10
        res = scaling_config(cfg.ray, stage).resources_per_worker
        assert res == {"CPU": cfg.ray.cpus_per_worker, "GPU": 1.0} == {"CPU": 11.0, "GPU": 1.0}


# ----------------------------------------------------------------------------- checks


def test_cluster_check_raises_without_autoscaling(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cluster(monkeypatch, {"CPU": 2.0})
    with pytest.raises(ResourceError) as e:
        check_resources(RayConfig(num_workers=8))
    assert str(e.value).startswith("needs 8 CPUs for 8 workers x 1 CPU but the cluster has "
                                   "2; lower --num-workers or ray.cpus_per_worker")
    assert "--autoscaling" in str(e.value)
    with pytest.raises(ResourceError, match=r"needs 22 CPUs for 2 workers x 11 CPU \(1 \+ 10 "
                                            r"DataLoader processes of the supernet stage\)"):
        check_resources(RayConfig(num_workers=2), _stages(supernet=10))
    with pytest.raises(ResourceError, match="needs 2 GPUs .* the cluster has 0"):
        check_resources(RayConfig(num_workers=2, use_gpu=True))
    check_resources(RayConfig(num_workers=2), _stages(supernet=0))  # fits: no error


def test_cluster_check_warns_with_autoscaling(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    _fake_cluster(monkeypatch, {"CPU": 2.0})
    check_resources(RayConfig(num_workers=8, use_gpu=True), autoscaling=True)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: needs ") for line in err)
    assert "autoscaler may add nodes" in err[0] and "GPUs" in err[1]
    monkeypatch.setenv(AUTOSCALING_ENV, "1")  # the environment says it too
    check_resources(RayConfig(num_workers=8))
    assert capsys.readouterr().err.startswith("warning: needs 8 CPUs")
    with pytest.raises(ResourceError):  # an explicit False wins over the environment
        check_resources(RayConfig(num_workers=8), autoscaling=False)


def test_a_bundle_must_fit_on_one_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 workers x 11 CPUs over twelve 8-CPU nodes: enough CPUs in all, but Ray places a
    bundle on one node, so it would never start."""
    _fake_cluster(monkeypatch, *[{"CPU": 8.0, "GPU": 1.0}] * 12)
    ray_cfg = load_pipeline_config(IMAGENET).ray
    with pytest.raises(ResourceError, match="one worker needs 11 CPUs but the largest node "
                                            "has 8"):
        check_resources(ray_cfg)
    _fake_cluster(monkeypatch, *[{"CPU": 96.0, "GPU": 8.0}])
    check_resources(ray_cfg, load_pipeline_config(IMAGENET).stages)


def test_local_check_counts_the_loaders(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray this command starts has no autoscaler: always an error, even with the flag."""
    monkeypatch.setattr(runtime, "attaching", lambda address: False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 4)
    monkeypatch.setenv(AUTOSCALING_ENV, "1")
    check_local_cpus(RayConfig(num_workers=2), None, _stages(supernet=1))
    with pytest.raises(ResourceError) as e:
        check_local_cpus(RayConfig(num_workers=2), None, _stages(supernet=1, gate=3))
    assert str(e.value) == (
        "needs 8 CPUs for 2 workers x 4 CPU (1 + 3 DataLoader processes of the gate stage) "
        "but this machine has 4; lower --num-workers or the gate stage's workers "
        "(DataLoader processes)")


def test_cli_refuses_before_ray_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(runtime, "attaching", lambda address: False)
    monkeypatch.setattr(cli, "attaching", lambda address: False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runtime, "init_ray", _no_ray)
    code = full.main(["-c", str(TINY), "--output", str(tmp_path), "--name", "x",
                      "--set", "supernet.workers=2"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: needs 6 CPUs for 2 workers x 3 CPU (1 + 2 DataLoader processes "
                   "of the supernet stage) but this machine has 2; lower --num-workers or "
                   "the supernet stage's workers (DataLoader processes)")


def _no_ray(*args: object, **kwargs: object) -> bool:
    raise AssertionError("Ray must not start")


def test_autoscaling_flag_and_env_reach_the_session(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    args = cli.full_parser().parse_args(["-c", str(TINY), "--autoscaling"])
    assert cli.plan_full(args).autoscaling is True
    args = cli.full_parser().parse_args(["-c", str(TINY)])
    assert cli.plan_full(args).autoscaling is False
    monkeypatch.setenv(AUTOSCALING_ENV, "true")
    assert cli.plan_full(args).autoscaling is True
    monkeypatch.delenv(AUTOSCALING_ENV)

    # An attached cluster (init_ray reports "already connected"): the session checks the
    # stages' bundles and honours autoscaling ...
    _fake_cluster(monkeypatch, {"CPU": 2.0})
    monkeypatch.setattr(runtime, "init_ray", lambda address, cfg: False)
    monkeypatch.setattr(runtime, "attaching", lambda address: True)
    RaySession(RayConfig(num_workers=2), stages=_stages(gate=1), autoscaling=True).ensure()
    assert "warning: needs 4 CPUs for 2 workers x 2 CPU" in capsys.readouterr().err
    with pytest.raises(ResourceError, match="needs 4 CPUs"):
        RaySession(RayConfig(num_workers=2), stages=_stages(gate=1)).ensure()
    # ... but a Ray this command starts itself never grows.
    monkeypatch.setattr(runtime, "attaching", lambda address: False)
    with pytest.raises(ResourceError):
        RaySession(RayConfig(num_workers=2), stages=_stages(gate=1), autoscaling=True).ensure()


# ----------------------------------------------------------------------------- quiet


def test_local_ray_env_keeps_user_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (runtime.PREEMPTION_WATCHER_ENV, "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.delenv(key, raising=False)
    env = local_ray_env(8123)
    assert env[runtime.PREEMPTION_WATCHER_ENV] == "0"
    assert env["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:8123"
    assert "RAY_AUTH_MODE" not in env  # authentication is Ray's (and the user's) choice
    monkeypatch.setenv(runtime.PREEMPTION_WATCHER_ENV, "1")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://elsewhere:8265")
    env = local_ray_env(8123)
    assert env[runtime.PREEMPTION_WATCHER_ENV] == "1"
    assert env["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:8123"  # must be this Ray's


def test_auth_notice_hidden_only_while_a_local_ray_starts() -> None:
    """The handlers of the ``ray`` logger drop the token notice inside the block and
    nothing else; after it the notice passes again."""
    import logging

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("ray.x", logging.WARNING, __file__, 1, msg, None, None)

    notice = record("Token authentication is enabled for this Ray cluster. Set ...")
    handlers = logging.getLogger("ray").handlers
    assert handlers  # Ray installs its handler at import
    with runtime._quiet_auth_notice():
        assert not any(h.filter(notice) for h in handlers)
        assert all(h.filter(record("/dev/shm is small")) for h in handlers)
    assert all(h.filter(notice) for h in handlers)
