"""``SearcherOptions``: how a :class:`~vlsearch.query.searcher.Searcher` runs (query model, cache
budgets, search defaults, the filtered-search policy, re-ranking features), in one frozen value.

    from dataclasses import replace
    s = Searcher.open("my-collection", options=SearcherOptions(exact_cache_mb=0))
    s2 = Searcher.open("my-collection", options=replace(s.options, device="cuda"))
"""

from __future__ import annotations

from dataclasses import dataclass

from vlsearch.query.exact import DEFAULT_CHUNK_SIZE
from vlsearch.query.subset import SubsetPolicy

MB = 1 << 20


@dataclass(frozen=True)
class SearcherOptions:
    """Every knob of a Searcher; the defaults suit a collection of a few million images."""

    #: Where the query model runs, and its precision (see :mod:`vlsearch.models.precision`).
    device: str = "auto"
    precision: str = "auto"
    #: Query-text embeddings kept (2 MiB: 1,024 texts of a 512-d model).
    text_cache_mb: float = 2
    #: Decoded Parquet row groups of hit metadata (no embedding column) kept.
    metadata_cache_mb: float = 256
    #: Filter results, their FAISS selectors and the vectors gathered for selective filters kept.
    filter_cache_mb: float = 256
    #: Exact search holds the image vectors in memory, read once, when they take at most this
    #: much; else it streams the shards at every query.
    exact_cache_mb: float = 256
    #: Rows scored per chunk by exact search.
    exact_chunk_size: int = DEFAULT_CHUNK_SIZE
    #: Search defaults when a call gives none (None: the manifest's tuned ``nprobe_default`` /
    #: ``k_factor_default``, else the index file's own).
    nprobe_default: int | None = None
    k_factor_default: float | None = None
    #: When a filtered search is exact, and how far ANN widens its probe.
    subset_policy: SubsetPolicy = SubsetPolicy()
    #: Where candidates' re-rank features come from: auto (stored where present), stored or recompute.
    rerank_features: str = "auto"


def budget(mb: float) -> int:
    """A cache budget in bytes from megabytes (MiB)."""
    return int(mb * MB)
