"""``run.json``: the ledger of a run directory, rewritten atomically at every change.

It records what ran (the resolved config of every stage, versions, seeds, the command),
each stage's status (``pending`` | ``running`` | ``done`` | ``failed``), its input and
output checkpoints (path, size, SHA-256), wall time and final metrics. A re-run with the
same name reads it to skip finished stages whose checkpoint is still intact.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import torch

import dsnet
from dsnet.atomic import atomic_write
from dsnet.checkpoint import file_sha256
from dsnet.config import ConfigError, RayConfig, StageConfig, config_to_dict

RUN_FILE = "run.json"
STATUSES = ("pending", "running", "done", "failed")


def versions() -> dict[str, str]:
    """Versions recorded with a run."""
    return {"dsnet": dsnet.__version__, "torch": str(torch.__version__),
            "ray": ray.__version__, "python": platform.python_version()}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _finite(obj: Any) -> Any:
    """NaN and infinities -> None: strict JSON has no spelling for them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write strict JSON to a temporary file in the same folder, then rename it over ``path``."""
    text = json.dumps(_finite(data), indent=2, allow_nan=False, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text))


class RunRecord:
    """The in-memory ``run.json`` of one run directory; every update is saved at once."""

    def __init__(self, run_dir: Path, data: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.data = data

    @property
    def path(self) -> Path:
        """The ``run.json`` file."""
        return self.run_dir / RUN_FILE

    @classmethod
    def open(cls, run_dir: Path, stages: Mapping[str, StageConfig], ray_cfg: RayConfig,
             command: Sequence[str]) -> RunRecord:
        """Load ``run_dir/run.json`` or start a new one; check the configs still match.

        Raises:
            ConfigError: the run directory was made with a different stage config.
        """
        run_dir = run_dir.resolve()
        path = run_dir / RUN_FILE
        if path.is_file():
            rec = cls(run_dir, json.loads(path.read_text(encoding="utf-8")))
            rec._check_configs(stages)
        else:
            rec = cls(run_dir, {"name": run_dir.name, "created": _now(),
                                "stages": {s: {"status": "pending"} for s in stages}})
        rec.data.update(command=shlex.join(command), cwd=os.getcwd(), run_dir=str(run_dir),
                        versions=versions(),
                        ray=config_to_dict(ray_cfg),
                        seeds={s: cfg.seed for s, cfg in stages.items()})
        for name, cfg in stages.items():
            rec.data["stages"].setdefault(name, {"status": "pending"})
            rec.data["stages"][name]["config"] = config_to_dict(cfg)
        rec.save()
        return rec

    def _check_configs(self, stages: Mapping[str, StageConfig]) -> None:
        """A run directory holds one experiment: refuse to continue it with other settings."""
        for name, cfg in stages.items():
            old = self.stage(name).get("config")
            new = config_to_dict(cfg)
            if old is None or old == new:
                continue
            diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new[k]]
            raise ConfigError(f"{self.run_dir} was run with another {name} config "
                              f"({'; '.join(diff[:3])}); use a new --name, or delete the folder")

    def stage(self, name: str) -> dict[str, Any]:
        """The record of one stage (a live dict; call :meth:`update` to change it)."""
        return self.data["stages"].setdefault(name, {"status": "pending"})

    def update(self, name: str, **fields: Any) -> None:
        """Set fields of a stage's record and save ``run.json``."""
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown status {fields['status']!r}")
        self.stage(name).update(fields)
        self.save()

    def save(self) -> None:
        """Write ``run.json`` atomically."""
        self.data["updated"] = _now()
        atomic_write_json(self.path, self.data)

    def done_checkpoint(self, name: str) -> Path | None:
        """The stage's checkpoint if the stage is done and the file is intact, else None."""
        rec = self.stage(name)
        ckpt = rec.get("checkpoint")
        if rec.get("status") != "done" or not ckpt or not Path(ckpt).is_file():
            return None
        if file_sha256(ckpt) != rec.get("checkpoint_sha256"):
            return None
        return Path(ckpt)


def checkpoint_fields(path: Path) -> dict[str, Any]:
    """``checkpoint``, ``checkpoint_bytes`` and ``checkpoint_sha256`` of a file."""
    return {"checkpoint": str(path), "checkpoint_bytes": path.stat().st_size,
            "checkpoint_sha256": file_sha256(path)}
