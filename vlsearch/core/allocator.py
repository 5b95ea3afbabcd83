"""Reusing freed memory across the batches of an encoding job (glibc malloc only).

glibc serves each allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh
pages from ``mmap`` and unmaps them on ``free``. A vision tower's activations at batch 64 are far
larger (up to ~150 MB per tensor for vlsearch-small), so every batch gets new pages that the kernel
must fault in and zero: on 2 CPU cores vlsearch-small spent about a fifth of its CPU time clearing
pages (``benchmarks/bench_precision.py``, issue 21). Inside :func:`reusing_freed_memory` malloc
takes no new mmaps and keeps up to :data:`KEEP_FREE_BYTES` free at the top of its heap, so each
batch reuses the previous batch's pages. On leaving the outermost block the settings return to
glibc's and free heap pages go back to the system (``malloc_trim``), so memory is kept for reuse
only while a job runs.

Set ``VLSEARCH_MALLOC=system`` to leave malloc alone. Elsewhere than glibc the block does nothing.

Huge pages for torch's own allocator are an opt-in of the process, not of the library:
:func:`enable_huge_pages` sets ``THP_MEM_ALLOC_ENABLE=1``, which torch reads at its first
allocation. The ``vlsearch`` command calls it before any command runs; a program using the library
calls it first thing (before it imports torch, or at least before torch allocates anything), or
exports ``THP_MEM_ALLOC_ENABLE=1`` itself. Importing vlsearch changes no environment variable.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import threading
from contextlib import contextmanager
from typing import Iterator

#: ``mallopt`` parameters (glibc ``malloc.h``).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
#: glibc's defaults, restored on leaving the outermost block.
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
#: Free memory malloc keeps at the top of its heap inside the block (more is trimmed as usual).
KEEP_FREE_BYTES = 1 << 30
#: The variable torch's CPU allocator reads (once, at its first allocation) to put tensors of 2 MB
#: and more on transparent huge pages.
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"

_lock = threading.Lock()
_depth = 0


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # pragma: no cover - a static or unusual interpreter
        return None


def enabled() -> bool:
    """Whether :func:`reusing_freed_memory` changes anything in this process."""
    return _glibc() is not None and os.environ.get("VLSEARCH_MALLOC", "reuse") != "system"


@contextmanager
def reusing_freed_memory() -> Iterator[bool]:
    """Keep freed memory for reuse inside the block (nestable, thread-safe); yields whether it does.

    Use it around a loop of forward passes (``indexing.embed`` and training do). The settings are
    process-wide: forked decode workers inherit them, and other threads share them while the block
    runs.
    """
    global _depth
    libc = _glibc() if enabled() else None
    if libc is None:
        yield False
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREE_BYTES)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                restore_defaults()


def restore_defaults() -> None:
    """glibc's settings back, and free heap pages handed to the system. Decode workers call it
    first: they are forked inside the block, and a worker holding up to 1 GiB of freed camera-sized
    images would be memory wasted, not time saved."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def enable_huge_pages() -> None:
    """Let torch's CPU allocator put large tensors on transparent huge pages in this process
    (``THP_MEM_ALLOC_ENABLE=1``, unless the user set it), for the process and what it starts.

    Without it every batch's activations (up to ~150 MB for vlsearch-small at batch 64) are fresh
    4 KB pages: ~5,000 page faults per encoded image, ~40 % of the CPU time in the kernel
    (benchmarks/RESULTS.md, issue 21). Effective only before torch's first allocation: call it
    before importing torch. Changes the process's environment, so only entry points call it.
    """
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
