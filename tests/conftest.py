"""Shared fixtures: one local Ray for every test marked ``ray`` in the session, and a
one-thread torch for modules of tiny CPU models."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Every Ray process of the test session (the local Ray below, `ray start` heads, job
# drivers) must agree on auth; a short temp dir keeps socket paths under ~107 characters.
RAY_TEST_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_TMPDIR": "/tmp/rayt",
    # Train controller polls workers every 0.1 s: a 2-worker fit starts ~1-5 s sooner.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
}

# A tiny budget for every stage of a pipeline run (64 synthetic 16 px images), for tests
# that need the stages to run but not to learn.
FAST_OVERRIDES = ["--set", "dataset=synthetic", "--set", "synthetic_size=64",
                  "--set", "img_size=16", "--set", "batch_size=32",
                  "--set", "eval_subnets=[0,3]"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile dsnet and pipelines once, before any test starts a process.

    Ray workers, job drivers and CLI subprocesses import the package afresh. Where
    PYTHONDONTWRITEBYTECODE is set (as on the CI machines) none of them writes a .pyc, so
    each compiled the sources again: measured ~3 s more per process (10-11 s instead of
    7-8 s to import pipelines.stage on 2 cores). compileall writes them regardless.
    """
    import compileall
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for package in ("dsnet", "pipelines"):
        compileall.compile_dir(root / package, quiet=1)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """A local 2-CPU Ray started once per session (no dashboard), shut down at the end.

    Code under test that calls ``pipelines.runtime.init_ray`` reuses it.
    """
    import ray

    saved = {k: os.environ.get(k) for k in RAY_TEST_ENV}
    os.environ.update(RAY_TEST_ENV)
    os.makedirs(RAY_TEST_ENV["RAY_TMPDIR"], exist_ok=True)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the test, restored after.

    Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP's
    spinning workers stall whenever another process holds a core (seconds per test instead
    of milliseconds). Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
