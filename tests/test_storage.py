"""Run folders on S3: a real S3-compatible server (moto) on loopback, started and stopped
by these tests by PID; the endpoint and credentials reach pyarrow and Ray through the
standard AWS environment variables, as they would on a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from dsnet.config import STAGES
from pipelines import full
from pipelines.faults import FAULT_ENV, FAULT_MARKER_ENV
from pipelines.storage import RunStorage, StorageError, is_uri
from tests.conftest import FAST_OVERRIDES, RAY_TEST_ENV
from tests.helpers import TINY
from tests.procs import free_ports, stop_group, wait_http

BUCKET = "dsnet-runs"


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server on a free loopback port with one bucket; the AWS variables that
    point pyarrow (and boto3) at it. Stopped by PID at the end."""
    port, = free_ports(1)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_http(env["AWS_ENDPOINT_URL"], timeout=60)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop_group(server)


def _s3() -> pafs.S3FileSystem:
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")
    return fs


def _read_json(path: str) -> dict:
    with _s3().open_input_stream(path) as f:
        return json.loads(f.read())


# ----------------------------------------------------------------------------- no Ray


def test_resolve_local_and_uri(tmp_path: Path, s3_env: dict[str, str]) -> None:
    """Local paths (and file://) stay local; s3:// keeps its scheme in refs; a scheme
    pyarrow does not know is one clear StorageError."""
    local = RunStorage.resolve(str(tmp_path), "a")
    assert local.is_local and str(local) == str(tmp_path / "a")
    assert RunStorage.resolve(f"file://{tmp_path}", "a") == local
    remote = RunStorage.resolve(f"s3://{BUCKET}/runs/", "b")
    assert not remote.is_local and remote.root == f"{BUCKET}/runs/b"
    ref = remote.ref(remote.path("supernet", "checkpoint.pt"))
    assert ref == f"s3://{BUCKET}/runs/b/supernet/checkpoint.pt" and is_uri(ref)
    assert remote.locate(ref) == f"{BUCKET}/runs/b/supernet/checkpoint.pt"
    assert remote.holder(ref) is remote and remote.holder("/tmp/x.pt").is_local
    with pytest.raises(StorageError, match="pyarrow cannot open it"):
        RunStorage.resolve("nosuchfs://bucket/x", "c")


def test_remote_file_operations(s3_env: dict[str, str], tmp_path: Path) -> None:
    """Write, read, hash (streamed), upload, download and delete on the S3 server."""
    from dsnet.models.checkpoint import file_sha256

    storage = RunStorage.resolve(f"s3://{BUCKET}/ops", "r")
    storage.check_writable()
    storage.write_text(storage.path("run.json"), '{"a": 1}')
    assert storage.read_text(storage.path("run.json")) == '{"a": 1}'
    assert storage.read_text(storage.path("missing.json")) is None
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "blob.bin").write_bytes(os.urandom(3 << 20))  # > one 1 MiB chunk
    storage.upload_dir(tmp_path / "up", storage.path("results"))
    blob = storage.ref(storage.path("results", "blob.bin"))
    assert storage.is_file(blob) and storage.size(blob) == 3 << 20
    assert storage.sha256(blob) == file_sha256(tmp_path / "up" / "blob.bin")
    with storage.local_copy(blob) as local:
        assert local.read_bytes() == (tmp_path / "up" / "blob.bin").read_bytes()
    assert not local.exists()  # the download was temporary
    storage.delete_dir(storage.root)
    assert not storage.is_file(blob)


def test_unwritable_bucket_fails_before_ray(s3_env: dict[str, str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket that does not exist: exit 2 with one line naming the run folder and the
    AWS variables, before Ray starts; nothing written locally."""
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    code = full.main(["-c", str(TINY), "--output", "s3://no-such-bucket/runs", "--name", "x"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the run folder s3://no-such-bucket/runs/x" in err[0]
    assert "AWS_ENDPOINT_URL" in err[0]
    assert time.perf_counter() - t0 < 20
    assert not any(tmp_path.iterdir())  # no local folder named "s3:"


def test_in_process_run_needs_local_output(s3_env: dict[str, str],
                                           capsys: pytest.CaptureFixture) -> None:
    code = full.main(["-c", str(TINY), "--output", f"s3://{BUCKET}/runs", "--name", "y",
                      "--num-workers", "0"])
    assert code == 2
    assert "ray.num_workers 0 runs in this process" in capsys.readouterr().err


# ----------------------------------------------------------------------------- on Ray


@pytest.mark.ray
def test_tiny_pipeline_on_s3_resumes_and_skips(s3_env: dict[str, str], tmp_path: Path) -> None:
    """``--output s3://...``: a worker fails after supernet epoch 1 of 2, Ray restarts the
    group, which resumes from the checkpoint it reads back from S3; the next stages start
    from S3 checkpoints; run.json, checkpoints and results/ are in the bucket (nothing
    local); a re-run skips every stage."""
    env = {**os.environ, **RAY_TEST_ENV, **s3_env, FAULT_ENV: "0",
           FAULT_MARKER_ENV: str(tmp_path / "fault.marker")}
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "pipelines.full", "-c", str(TINY), "--output",
            f"s3://{BUCKET}/runs", "--name", "tiny", "--num-workers", "1",
            "--set", "supernet.epochs=2", "--set", "ray.max_failures=1", *FAST_OVERRIDES]
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "fault.marker").exists()  # the fault did fire
    assert "run folder: s3://dsnet-runs/runs/tiny" in run.stdout
    rec = _read_json(f"{BUCKET}/runs/tiny/run.json")
    fs, prev = _s3(), None
    for stage in STAGES:
        st = rec["stages"][stage]
        assert st["status"] == "done" and st["init_from"] == prev
        ckpt = st["checkpoint"]
        assert ckpt.startswith(f"s3://{BUCKET}/runs/tiny/{stage}/checkpoint_epoch")
        info = fs.get_file_info(ckpt.removeprefix("s3://"))
        assert info.size == st["checkpoint_bytes"]
        prev = ckpt
    sup = rec["stages"]["supernet"]
    assert sup["epochs_run"] == [1] and sup["attempts"] == 1  # epoch 0 came from S3
    assert sup["resumed_from"].startswith(f"s3://{BUCKET}/runs/tiny/supernet/")
    storage = RunStorage.resolve(f"s3://{BUCKET}/runs", "tiny")
    final = storage.path("results", "dsnet_final.pt")
    assert storage.sha256(final) == rec["stages"]["gate"]["checkpoint_sha256"]
    for name in ("subnets.csv", "dynamic.csv", "accuracy_madds.png"):
        assert storage.is_file(storage.path("results", name)), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fault.marker"]  # nothing local

    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done") == 3
    rec2 = _read_json(f"{BUCKET}/runs/tiny/run.json")
    assert all(rec2["stages"][s]["checkpoint"] == rec["stages"][s]["checkpoint"]
               for s in STAGES)
