"""vlsearch.core.allocator: freed memory is reused inside the block, and given back outside it."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from vlsearch.core import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="glibc malloc only")

SIZE = 64 << 20  # above glibc's largest mmap threshold (32 MiB): served by mmap outside the block


def _faults_of_a_fresh_buffer() -> int:
    """Minor page faults while allocating, filling and freeing one SIZE-byte buffer."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = np.empty(SIZE, np.uint8)
    buf.fill(1)
    del buf
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


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


def test_system_malloc_can_be_kept(monkeypatch):
    monkeypatch.setenv("VLSEARCH_MALLOC", "system")
    assert not allocator.enabled()
    with allocator.reusing_freed_memory() as active:
        assert not active


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
