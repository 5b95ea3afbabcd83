"""One place that sets CPU thread counts: torch's and FAISS's (OpenMP), restored on exit.

::

    with cpu_threads(4):          # torch and FAISS use 4 threads inside the block
        ...
    with cpu_threads(None):       # None: leave both as they are
        ...
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def cpu_threads(n: int | None, *, faiss: bool = True) -> Iterator[None]:
    """Set torch's (and, with ``faiss=True``, FAISS's OpenMP) thread count to ``n`` inside the
    block and restore the previous counts afterwards; ``n=None`` (or 0) changes nothing."""
    if not n:
        yield
        return
    import torch

    n = int(n)
    before_torch = torch.get_num_threads()
    before_faiss = _faiss_threads() if faiss else None
    torch.set_num_threads(n)
    if before_faiss is not None:
        _set_faiss_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before_torch)
        if before_faiss is not None:
            _set_faiss_threads(before_faiss)


def set_process_threads(n: int = 1) -> None:
    """Set torch's thread count for the rest of this process (a DataLoader worker, or a caller that
    asked for it, e.g. ``load_model(threads=...)``): not restored."""
    import torch

    torch.set_num_threads(int(n))


def _faiss_threads() -> int | None:
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency
        return None
    return int(faiss.omp_get_max_threads())


def _set_faiss_threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(int(n))
