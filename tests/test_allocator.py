"""vlsearch.core.allocator: freed memory is reused inside the block, and given back outside it;
huge pages for torch are the process's opt-in, and importing vlsearch leaves the environment alone."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlsearch.core import allocator

glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="glibc malloc only")
ROOT = Path(__file__).resolve().parents[1]

SIZE = 64 << 20  # above glibc's largest mmap threshold (32 MiB): served by mmap outside the block


def _faults_of_a_fresh_buffer() -> int:
    """Minor page faults while allocating, filling and freeing one SIZE-byte buffer."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = np.empty(SIZE, np.uint8)
    buf.fill(1)
    del buf
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc_only
def test_a_freed_buffer_is_reused_inside_the_block_and_not_outside(monkeypatch):
    monkeypatch.delenv("VLSEARCH_MALLOC", raising=False)
    _faults_of_a_fresh_buffer()
    outside = _faults_of_a_fresh_buffer()
    assert outside >= SIZE // (2 << 20)  # fresh pages every time (at least one fault per 2 MB huge page)
    with allocator.reusing_freed_memory() as active:
        assert active
        _faults_of_a_fresh_buffer()  # grows the heap once
        inside = [_faults_of_a_fresh_buffer() for _ in range(3)]
    assert max(inside) * 4 < outside
    assert _faults_of_a_fresh_buffer() >= SIZE // (2 << 20)  # settings restored, memory given back


@glibc_only
def test_blocks_nest_and_restore_once(monkeypatch):
    monkeypatch.delenv("VLSEARCH_MALLOC", raising=False)
    calls = []
    real = allocator._glibc()

    class Recorder:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return real.mallopt(param, value)

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return real.malloc_trim(pad)

    monkeypatch.setattr(allocator, "_glibc", lambda: Recorder())
    with allocator.reusing_freed_memory(), allocator.reusing_freed_memory():
        assert calls == [("mallopt", allocator.M_MMAP_MAX, 0),
                         ("mallopt", allocator.M_TRIM_THRESHOLD, allocator.KEEP_FREE_BYTES)]
    assert calls[2:] == [("mallopt", allocator.M_MMAP_MAX, allocator.DEFAULT_MMAP_MAX),
                         ("mallopt", allocator.M_TRIM_THRESHOLD, allocator.DEFAULT_TRIM_THRESHOLD), ("trim", 0)]
    assert allocator._depth == 0


@glibc_only
def test_system_malloc_can_be_kept(monkeypatch):
    monkeypatch.setenv("VLSEARCH_MALLOC", "system")
    assert not allocator.enabled()
    with allocator.reusing_freed_memory() as active:
        assert not active


@glibc_only
def test_decode_workers_forked_inside_the_block_get_glibcs_settings(tmp_path, monkeypatch):
    import torch
    from PIL import Image

    from indexing.decode import decode_batches
    from vlsearch.data.sources import ImageRecord

    monkeypatch.delenv("VLSEARCH_MALLOC", raising=False)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    recs = [ImageRecord(0, "a.png", str(tmp_path / "a.png"))]

    def faults_of_a_second_buffer(img):
        _faults_of_a_fresh_buffer()
        return torch.tensor([float(_faults_of_a_fresh_buffer())])

    with allocator.reusing_freed_memory():
        (here,) = decode_batches(recs, faults_of_a_second_buffer, batch_size=1, workers=0)
        (worker,) = decode_batches(recs, faults_of_a_second_buffer, batch_size=1, workers=1)
    assert here.pixels.item() * 4 < worker.pixels.item()  # reused in this process, fresh pages in the worker
    assert worker.pixels.item() >= SIZE // (2 << 20)


def _run_python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


#: In a fresh interpreter: import vlsearch, then every subpackage, then every module, recording
#: each write to os.environ with the file that made it. vlsearch must make none; torch and open_clip
#: set variables of their own when some modules import them.
_IMPORT_EVERYTHING = """
import importlib, json, os, pkgutil, sys
writers = []
def recording(real):
    def write(self, key, *args):
        frame = sys._getframe(1)
        while frame.f_code.co_filename.endswith(("/os.py", "/_collections_abc.py")):
            frame = frame.f_back
        writers.append([key, frame.f_code.co_filename])
        return real(self, key, *args)
    return write
os._Environ.__setitem__ = recording(os._Environ.__setitem__)
os._Environ.__delitem__ = recording(os._Environ.__delitem__)
before = dict(os.environ)
def changed():
    return sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
import vlsearch, indexing
after_import = changed()
walk = [m for p in (vlsearch, indexing) for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]
for m in walk:
    if m.ispkg:
        importlib.import_module(m.name)
after_packages = changed()
for m in walk:
    importlib.import_module(m.name)
print(json.dumps({"after_import": after_import, "after_packages": after_packages, "writers": writers,
                  "modules": len(walk)}))
"""


def test_importing_vlsearch_and_every_module_leaves_the_environment_alone():
    env = {k: v for k, v in os.environ.items() if k != allocator.HUGE_PAGES_ENV}
    out = json.loads(_run_python(_IMPORT_EVERYTHING, env))
    assert out["after_import"] == [] and out["after_packages"] == []
    assert out["modules"] > 40  # the walk found the package's modules
    packages = (ROOT / "vlsearch", ROOT / "indexing")  # not ROOT: a virtualenv may live inside the checkout
    ours = [(key, path) for key, path in out["writers"] if any(Path(path).resolve().is_relative_to(p) for p in packages)]
    assert ours == []


def test_huge_pages_are_the_processs_opt_in_and_a_users_choice_stands():
    code = ("import os; from vlsearch.core import allocator; before = os.environ.get('THP_MEM_ALLOC_ENABLE'); "
            "allocator.enable_huge_pages(); print(before, os.environ['THP_MEM_ALLOC_ENABLE'])")
    env = {k: v for k, v in os.environ.items() if k != allocator.HUGE_PAGES_ENV}
    assert _run_python(code, env).split() == ["None", "1"]
    assert _run_python(code, {**env, allocator.HUGE_PAGES_ENV: "0"}).split() == ["0", "0"]
