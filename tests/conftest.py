"""Shared fixtures: everything offline, on the tiny built-in model, in temp dirs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the precision benchmark cache (vlsearch.models.precision) goes to a temp dir, never ~/.cache
os.environ.setdefault("VLSEARCH_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="vlsearch-test-cache-"))

from pathlib import Path

import pytest
from prerequisites import shared_data_dir

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A seeded random-init checkpoint of the tiny model, saved with save_checkpoint."""
    import torch

    from vlsearch.models.factory import TINY_MODEL, create_model, save_checkpoint

    torch.manual_seed(0)
    model, _ = create_model(TINY_MODEL)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt", name=TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint):
    from vlsearch.models.factory import TINY_MODEL, load_model

    # auto, like the subprocesses, servers and Ray workers that tests compare it with (bf16 weights
    # on a CPU with bf16 units).
    return load_model(TINY_MODEL, pretrained=tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder; a test needing it skips without it, or fails where CI requires it."""
    return shared_data_dir(SHARED_DATA)


@pytest.fixture
def one_torch_thread():
    """One torch thread: tiny models gain nothing from more, and on a shared, loaded machine
    multi-threaded kernels spin-wait (10x the CPU time per step measured here)."""
    from vlsearch.core.threads import cpu_threads

    with cpu_threads(1, faiss=False):
        yield


def kill_9_when(command: list[str], reached, what: str, env: dict | None = None) -> None:
    """Run ``command`` in a real process and ``kill -9`` it as soon as ``reached()`` is true."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # generous: a starved CPU can take minutes to import torch
    try:
        while not reached():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, f"{what} not reached in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def one_faiss_thread():
    """Small searches and trainings: OpenMP threads only add spin-waiting on a shared CPU."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
