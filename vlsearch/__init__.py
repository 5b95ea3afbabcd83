"""vlsearch: large-scale image-text retrieval — embed, index, search and benchmark.

Heavy modules (torch, open_clip, faiss) load on first use of the names below.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "vlsearch.models.factory",
    "save_checkpoint": "vlsearch.models.factory",
    "Encoder": "vlsearch.models.encoder",
    "ModelInfo": "vlsearch.core.modelinfo",
    "Collection": "vlsearch.store.collection",
    "Manifest": "vlsearch.store.manifest",
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
