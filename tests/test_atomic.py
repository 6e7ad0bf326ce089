"""dsnet.utils.atomic: outputs appear whole or not at all, with ordinary permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dsnet.eval.evaluate import write_results
from dsnet.models.checkpoint import atomic_torch_save, read_checkpoint
from dsnet.utils.atomic import atomic_copy, atomic_write, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_get_umask_permissions_not_private(tmp_path: Path, umask_022: None) -> None:
    """mkstemp's 0600 would hide results from the rest of a team on a shared disk."""
    text = atomic_write_text(tmp_path / "a" / "t.csv", "x,y\n1,2\n")
    atomic_torch_save({"epoch": 1}, tmp_path / "c.pt")
    copy = atomic_copy(tmp_path / "c.pt", tmp_path / "copy.pt")
    for p in (text, tmp_path / "c.pt", copy):
        assert p.stat().st_mode & 0o777 == 0o644, p
    assert text.read_text() == "x,y\n1,2\n"
    assert read_checkpoint(copy)["epoch"] == 1


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "run.json", "old")

    def half_then_crash(f):
        f.write("new, but only ha")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_results_folder_is_complete_and_readable(tmp_path: Path, umask_022: None) -> None:
    """write_results: CSVs, the PNG and the final checkpoint copy, all 0644, no temp files."""
    ckpt = tmp_path / "gate.pt"
    atomic_torch_save({"epoch": 0, "state_dict": {"w": torch.zeros(1)}}, ckpt)
    subnets = [{"subnet": c, "madds": 1e6 * (c + 1), "top1": 90.0 + c, "top5": 99.0}
               for c in range(3)]
    dynamic = {"top1": 91.0, "top5": 99.0, "madds": 1.5e6, "choices": {0: 3, 1: 1}}
    write_results(tmp_path / "results", {"subnets": subnets, "dynamic": dynamic}, ckpt)
    files = sorted((tmp_path / "results").iterdir())
    assert [p.name for p in files] == ["accuracy_madds.png", "dsnet_final.pt", "dynamic.csv",
                                       "subnets.csv"]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in files)
    assert files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
