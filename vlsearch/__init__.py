"""vlsearch: large-scale image-text retrieval — embed, index, search and benchmark.

Heavy modules (torch, open_clip, faiss) load on first use of the names below.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# torch's CPU allocator gives tensors of 2 MB and more transparent huge pages when this is set
# before its first allocation. Without it every batch's activations (up to ~150 MB for
# vlsearch-small at batch 64) are fresh 4 KB pages: ~5,000 page faults per encoded image, ~40 % of
# the CPU time in the kernel (benchmarks/RESULTS.md, issue 21). No effect once torch has allocated.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

_LAZY = {
    "load_model": "vlsearch.models.factory",
    "save_checkpoint": "vlsearch.models.factory",
    "Encoder": "vlsearch.models.encoder",
    "ModelInfo": "vlsearch.core.modelinfo",
    "Collection": "vlsearch.store.collection",
    "Manifest": "vlsearch.store.collection",
    "Searcher": "vlsearch.query.searcher",
    "SearcherOptions": "vlsearch.query.options",
    "Hit": "vlsearch.query.results",
    "Client": "vlsearch.client",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vlsearch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
