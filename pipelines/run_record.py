"""``run.json``: the ledger of a run directory, rewritten atomically at every change.

It records what ran (the resolved config of every stage, versions, seeds, the command),
each stage's status (``pending`` | ``running`` | ``done`` | ``failed``), its input and
output checkpoints (path, size, SHA-256), wall time and final metrics. A re-run with the
same name reads it to skip finished stages whose checkpoint is still intact.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dsnet.config import ConfigError, StageConfig, config_to_dict
from dsnet.utils.provenance import json_text, now, versions
from pipelines.config import RayConfig
from pipelines.storage import RunStorage, as_storage

RUN_FILE = "run.json"
STATUSES = ("pending", "running", "done", "failed")


class RunRecord:
    """The in-memory ``run.json`` of one run folder (local or remote, see
    :class:`pipelines.storage.RunStorage`); every update is saved at once."""

    def __init__(self, storage: RunStorage, data: dict[str, Any]) -> None:
        self.storage = storage
        self.data = data

    @property
    def run_dir(self) -> Path:
        """The run folder as a local path (meaningful on local storage only)."""
        return Path(self.storage.root)

    @property
    def path(self) -> str:
        """The ``run.json`` file's ref (a path, or a URI on remote storage)."""
        return self.storage.ref(self.storage.path(RUN_FILE))

    @classmethod
    def open(cls, run_dir: RunStorage | Path, stages: Mapping[str, StageConfig],
             ray_cfg: RayConfig, command: Sequence[str]) -> RunRecord:
        """Load ``run.json`` of the run folder or start a new one; check the configs match.

        Raises:
            ConfigError: the run directory was made with a different stage config.
        """
        storage = as_storage(run_dir)
        text = storage.read_text(storage.path(RUN_FILE))
        if text is not None:
            rec = cls(storage, json.loads(text))
            rec._check_configs(stages)
        else:
            rec = cls(storage, {"name": storage.name, "created": now(),
                                "stages": {s: {"status": "pending"} for s in stages}})
        rec.data.update(command=shlex.join(command), cwd=os.getcwd(), run_dir=str(storage),
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
            raise ConfigError(f"{self.storage} was run with another {name} config "
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
        self.data["updated"] = now()
        self.storage.write_text(self.storage.path(RUN_FILE), json_text(self.data))

    def done_checkpoint(self, name: str) -> str | None:
        """The stage's checkpoint ref if the stage is done and the file is intact, else None."""
        rec = self.stage(name)
        ckpt = rec.get("checkpoint")
        if rec.get("status") != "done" or not ckpt or not self.storage.is_file(ckpt):
            return None
        if self.storage.sha256(ckpt) != rec.get("checkpoint_sha256"):
            return None
        return ckpt


def checkpoint_fields(storage: RunStorage, ref: str | Path) -> dict[str, Any]:
    """``checkpoint``, ``checkpoint_bytes`` and ``checkpoint_sha256`` of a stored file."""
    return {"checkpoint": str(ref), "checkpoint_bytes": storage.size(ref),
            "checkpoint_sha256": storage.sha256(ref)}
