"""Retrieval benchmark of a captioned collection: quality both ways, and what ANN search costs.

:func:`run_benchmark` reads the collection's image and caption embeddings and measures

1. **exact** retrieval quality — text->image and image->text Recall@K, MRR, median and mean
   rank (definitions in :mod:`vlsearch.core.metrics`), ranks computed over the full galleries from
   the stored embeddings — plus the speed of brute-force top-k search (``exact_search`` over
   the image embeddings held in memory);
2. for each ``nprobe``, the same **text->image** metrics through the collection's ANN index
   (``Searcher.knn``, the id-returning core of ``Searcher.search_vector``), its recall@k against
   the exact top-k, queries per second (all captions in one batch) and single-query p50/p99
   latency.

Timings cover vector search only (query embedding vectors in, ids out), for exact and ANN alike:
no text encoding and no metadata lookup, so they compare the two search paths, not the model.

What the ANN rows mean: the index holds the *images*, so ANN applies to text->image search only;
image->text needs a caption index, which vlsearch does not build, so i2t is reported for exact
search only. ANN ranks are known down to depth ``k = max(ks)`` only: ANN rows report ``mrr@k``
(a caption whose image is not in its k results scores 0; exact rows report it too, to compare)
with ``mrr`` and ``mean_rank`` left ``None``, and ``median_rank`` only when it is <= k.
Timings use whatever threads FAISS and BLAS are given (``threads`` in the result).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vlsearch.store.layout import CAPTIONS_DIR, IMAGES_DIR
from vlsearch.store.collection import Collection
from vlsearch.core.errors import CollectionError, VlsearchError
from vlsearch.query.exact import exact_search
from vlsearch.core.metrics import DEFAULT_KS, ann_recall, embedding_ranks, metrics_from_ranks, ranks_from_ids
from vlsearch.core.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_NPROBES: tuple[int, ...] = (1, 4, 16, 64, 256)


@dataclass(frozen=True)
class BenchConfig:
    """What :func:`run_benchmark` measures.

    ``ks``: the K of Recall@K (the largest is also the ANN search depth and the k of
    ANN-vs-exact recall). ``nprobes``: IVF lists probed per query (values above the index's
    ``nlist`` are dropped; an index without lists gets one row). ``latency_queries``: how many
    captions are searched one at a time for p50/p99 latency. ``max_queries``: evaluate on a
    seeded random subset of at most this many captions (t2i) and images (i2t) — galleries stay
    complete — for collections too large for all-pairs scoring; ``None`` uses every query.
    """

    ks: tuple[int, ...] = DEFAULT_KS
    nprobes: tuple[int, ...] = DEFAULT_NPROBES
    latency_queries: int = 1000
    max_queries: int | None = None
    seed: int = 0
    #: re-rank depth K (0: off): also report t2i metrics with the top K re-scored by the
    #: collection model's re-ranker (``Searcher.search_text(rerank=K)``), from the same run
    rerank: int = 0
    reranker: str | None = None  #: re-ranker file (None: the one shipped for the collection's model)

    def __post_init__(self) -> None:
        if not self.ks or any(int(k) < 1 for k in self.ks):
            raise ValueError(f"ks must be positive integers, got {self.ks!r}")
        if not self.nprobes or any(int(n) < 1 for n in self.nprobes):
            raise ValueError(f"nprobes must be positive integers, got {self.nprobes!r}")
        if self.latency_queries < 0:
            raise ValueError(f"latency_queries must be >= 0, got {self.latency_queries}")
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"max_queries must be positive, got {self.max_queries}")
        if self.rerank and self.rerank < max(self.ks):
            raise ValueError(f"rerank={self.rerank} must be 0 or at least the largest K ({max(self.ks)})")


@dataclass(frozen=True)
class _Data:
    image_ids: np.ndarray      # (n_images,) collection image ids
    images: np.ndarray         # (n_images, d) float32
    captions: np.ndarray       # (n_texts, d) float32
    text_image: np.ndarray     # (n_texts,) row of each caption's image in ``images``


def _sample_queries(data: Any, config: BenchConfig, notes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded (text, image, latency) query subsets; a note when metrics cover a subset only."""
    rng = np.random.default_rng(config.seed)
    text_q = _subset(len(data.captions), config.max_queries, rng)
    image_q = _subset(len(data.images), config.max_queries, rng)
    latency_q = _subset(len(text_q), config.latency_queries, rng)
    if config.max_queries is not None and (len(text_q) < len(data.captions) or len(image_q) < len(data.images)):
        notes.append(f"metrics on a random subset of {len(text_q)} captions and {len(image_q)} images "
                     f"(seed {config.seed}); galleries are complete")
    return text_q, image_q, latency_q


def run_benchmark(
    collection_dir: str | os.PathLike,
    config: BenchConfig = BenchConfig(),
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Benchmark the collection at ``collection_dir``; returns a JSON-serialisable dict.

    Keys: ``collection``, ``model``, ``n_images``, ``n_captions``, ``ks``, ``k``, ``threads``,
    ``config``, ``exact`` (``t2i``, ``i2t`` metric dicts, ``qps``, ``latency_ms``),
    ``index`` (the manifest's index entry, or None), ``ann`` (one dict per nprobe: ``nprobe``,
    ``t2i``, ``ann_recall``, ``qps``, ``latency_ms``) and ``notes``. Raises
    :class:`~vlsearch.core.errors.CollectionError` when the collection has no captions.
    """
    coll = Collection.open(collection_dir)
    data = _load(coll)
    ks = tuple(sorted({int(k) for k in config.ks}))
    k = max(ks)
    notes: list[str] = []
    text_q, image_q, latency_q = _sample_queries(data, config, notes)
    queries = data.captions[text_q]

    nprobes = _usable_nprobes(coll.manifest.index, config.nprobes, notes) if coll.has_index() else []
    total = 1 + len(nprobes)
    exact_ids, exact = _exact_row(data, text_q, image_q, queries, latency_q, ks)
    result: dict[str, Any] = {
        "collection": str(Path(collection_dir)),
        "model": coll.manifest.model.to_dict(),
        "n_images": int(len(data.images)),
        "n_captions": int(len(data.captions)),
        "ks": list(ks),
        "k": k,
        "threads": _threads(),
        "config": asdict(config),
        "exact": exact,
        "index": coll.manifest.index if coll.has_index() else None,
        "ann": [],
        "notes": notes,
    }
    if progress is not None:
        progress(1, total, stage="exact")
    if config.rerank:
        result["rerank"] = _rerank_row(coll, data, text_q, latency_q, config, ks)
    if not nprobes:
        notes.append("no index: exact search only (build an index to benchmark ANN search)")
        return result
    searcher = _open_searcher(coll)
    targets = data.image_ids[data.text_image[text_q]]
    for i, nprobe in enumerate(nprobes):
        result["ann"].append(_ann_row(searcher, nprobe, queries, latency_q, targets, exact_ids, ks))
        if progress is not None:
            progress(i + 2, total, stage=f"nprobe={nprobe}")
    return result


def _exact_row(data: _Data, text_q: np.ndarray, image_q: np.ndarray, queries: np.ndarray, latency_q: np.ndarray,
               ks: tuple[int, ...]) -> tuple[np.ndarray, dict[str, Any]]:
    """Exact search's top-k ids of ``queries`` (what ANN recall is measured against) and its row:
    t2i / i2t metrics from the embeddings, and timings."""
    k = max(ks)
    t2i, i2t = embedding_ranks(data.captions, data.images, data.text_image, text_q, image_q)

    def exact_fn(q: np.ndarray) -> np.ndarray:
        return exact_search(q, data.images, k, ids=data.image_ids)[1]

    exact_ids, timing = _timed(exact_fn, queries, latency_q)
    return exact_ids, {"t2i": metrics_from_ranks(t2i, ks, depth=k),
                       "i2t": metrics_from_ranks(i2t[np.isfinite(i2t)], ks, depth=k), **timing}


def _ann_row(searcher: Any, nprobe: int | None, queries: np.ndarray, latency_q: np.ndarray,
             targets: np.ndarray, exact_ids: np.ndarray, ks: tuple[int, ...]) -> dict[str, Any]:
    """Metrics and timings of the ANN index at one nprobe (t2i; ranks known down to depth k)."""
    k = max(ks)

    def ann_fn(q: np.ndarray) -> np.ndarray:
        return searcher.knn(q, k=k, nprobe=nprobe)[1]

    ann_ids, timing = _timed(ann_fn, queries, latency_q)
    return {
        "nprobe": nprobe,
        "t2i": _depth_limited(metrics_from_ranks(ranks_from_ids(ann_ids, targets), ks, depth=k)),
        "ann_recall": {"k": k, "recall": ann_recall(ann_ids, exact_ids, k)},
        **timing,
    }


def _rerank_row(coll: Collection, data: _Data, text_q: np.ndarray, latency_q: np.ndarray, config: BenchConfig,
                ks: tuple[int, ...]) -> dict[str, Any]:
    """t2i metrics after re-ranking the exact top ``depth`` of each caption, and ms per query
    (re-ranking only: text token states + candidate features + ITM; not the first stage)."""
    from vlsearch.query.searcher import Searcher

    texts = coll.read_table(CAPTIONS_DIR, ["caption"]).column("caption").to_pylist()
    depth = config.rerank
    searcher = Searcher.open(coll.path, reranker=config.reranker)
    scores, ids = exact_search(data.captions[text_q], data.images, depth, ids=data.image_ids)
    out = np.empty((len(text_q), depth), np.int64)
    for start in range(0, len(text_q), 64):
        part = slice(start, start + 64)
        out[part] = searcher.rerank([texts[i] for i in text_q[part]], scores[part], ids[part], depth)[1]
    lat = []
    for i in latency_q:
        t0 = time.perf_counter()
        searcher.rerank([texts[text_q[i]]], scores[i:i + 1], ids[i:i + 1], depth)
        lat.append((time.perf_counter() - t0) * 1e3)
    ranks = ranks_from_ids(out, data.image_ids[data.text_image[text_q]])
    return {"k": depth, "t2i": _depth_limited(metrics_from_ranks(ranks, ks, depth=max(ks))),
            "features": f"{searcher.rerank_features.stored_shards} stored shard(s), the rest recomputed",
            "weight": searcher.reranker.weight, "hub_weight": searcher.reranker.hub_weight,
            "latency_ms": {"p50": float(np.percentile(lat, 50)) if lat else None,
                           "p99": float(np.percentile(lat, 99)) if lat else None, "n": len(lat)}}


def _depth_limited(m: dict[str, Any]) -> dict[str, Any]:
    """ANN lists stop at depth k: full MRR and mean rank are unknown (median only if <= k)."""
    return {**m, "mrr": None, "mean_rank": None}


def _load(coll: Collection) -> _Data:
    image_ids, images = coll.read_embeddings(IMAGES_DIR)
    caption_image_ids, captions = coll.read_embeddings(CAPTIONS_DIR)
    if len(images) == 0:
        raise CollectionError(f"collection {coll.path} has no image embeddings")
    if len(captions) == 0:
        raise CollectionError(
            f"collection {coll.path} has no captions: the benchmark needs caption shards "
            f"({CAPTIONS_DIR}/part-*.parquet), written when the source has captions"
        )
    order = np.argsort(image_ids, kind="stable")
    pos = np.searchsorted(image_ids, caption_image_ids, sorter=order)
    pos = np.minimum(pos, len(order) - 1)
    text_image = order[pos]
    unknown = image_ids[text_image] != caption_image_ids
    if unknown.any():
        raise CollectionError(
            f"{int(unknown.sum())} captions of {coll.path} refer to image ids that are not in the "
            f"collection (e.g. {int(caption_image_ids[unknown][0])})"
        )
    return _Data(image_ids, images, captions, text_image.astype(np.int64))


def _subset(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def _timed(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
           latency_idx: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Run ``search`` on all queries in one batch (QPS) and on ``latency_idx`` one by one."""
    search(queries[:1])  # warm up (first-call allocations, lazy loads)
    start = time.perf_counter()
    ids = search(queries)
    seconds = time.perf_counter() - start
    latencies = []
    for i in latency_idx:
        t0 = time.perf_counter()
        search(queries[i:i + 1])
        latencies.append(time.perf_counter() - t0)
    lat_ms = np.asarray(latencies) * 1e3
    timing = {
        "qps": float(len(queries) / seconds) if seconds > 0 else None,
        "batch_seconds": float(seconds),
        "latency_ms": {
            "p50": float(np.percentile(lat_ms, 50)) if len(lat_ms) else None,
            "p99": float(np.percentile(lat_ms, 99)) if len(lat_ms) else None,
            "n": int(len(lat_ms)),
        },
    }
    return ids, timing


def _usable_nprobes(index: dict[str, Any], nprobes: Sequence[int], notes: list[str]) -> list[int | None]:
    nlist = int(index.get("nlist") or 0)
    if nlist <= 0:
        notes.append(f"index {index.get('factory')} has no inverted lists: nprobe does not apply (one ANN row)")
        return [None]
    usable = sorted({int(n) for n in nprobes if int(n) <= nlist})
    dropped = sorted({int(n) for n in nprobes if int(n) > nlist})
    if dropped:
        notes.append(f"nprobe {dropped} > nlist={nlist} dropped" + ("" if usable else f"; using nprobe={nlist}"))
    return usable or [nlist]


def _open_searcher(coll: Collection) -> Any:
    from vlsearch.query.searcher import Searcher

    return Searcher.open(coll.path)


def _threads() -> dict[str, int]:
    import faiss

    return {"faiss_omp": int(faiss.omp_get_max_threads()), "cpu_count": int(os.cpu_count() or 0)}


# ---- reporting -------------------------------------------------------------------------------

def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"
    return str(value)


def benchmark_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The table of a :func:`run_benchmark` result as ``(headers, rows)`` of strings (recalls in
    %): exact t2i, exact i2t, then one ANN row per nprobe. :func:`format_table` prints it as
    text; ``benchmarks/bench_flickr.py`` as markdown."""
    ks = result["ks"]
    k = result["k"]
    head = (["search", "nprobe", "dir"] + [f"R@{x}" for x in ks]
            + ["MRR", f"MRR@{k}", "medR", f"ANN R@{k}", "QPS", "p50 ms", "p99 ms"])
    rows: list[list[str]] = []

    def row(name: str, nprobe: Any, direction: str, m: dict[str, Any], ann: Any, timing: dict[str, Any] | None) -> None:
        t = timing or {}
        lat = t.get("latency_ms") or {}
        rows.append([name, _fmt(nprobe), direction] + [_fmt(m[f"R@{x}"], pct=True) for x in ks]
                    + [_fmt(m["mrr"]), _fmt(m[f"mrr@{k}"]), _fmt(m["median_rank"]), _fmt(ann, pct=ann is not None),
                       _fmt(t.get("qps")), _fmt(lat.get("p50")), _fmt(lat.get("p99"))])

    ex = result["exact"]
    row("exact", None, "t2i", ex["t2i"], 1.0, ex)
    row("exact", None, "i2t", ex["i2t"], None, None)
    if result.get("rerank"):
        rr = result["rerank"]
        row(f"exact+rerank@{rr['k']}", None, "t2i", rr["t2i"], None, rr)
    for a in result["ann"]:
        row("ann", a["nprobe"], "t2i", a["t2i"], a["ann_recall"]["recall"], a)
    return head, rows


def format_table(result: dict[str, Any]) -> str:
    """Plain-text tables of a :func:`run_benchmark` result (recalls in %)."""
    head, rows = benchmark_rows(result)
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = [
        f"{result['collection']}: {result['n_images']} images, {result['n_captions']} captions, "
        f"model {result['model']['name']} (pretrained={result['model']['pretrained']})",
        "  ".join(h.rjust(w) for h, w in zip(head, widths)),
    ]
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def plot_results(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Recall vs QPS per nprobe (ANN-vs-exact recall@k and t2i R@k), exact as a reference star."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise VlsearchError("plotting needs matplotlib: pip install 'vlsearch[plot]'") from exc
    from vlsearch.core.fsutil import atomic_path

    k = result["k"]
    ann = result["ann"]
    ex = result["exact"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    panels = [(f"ANN recall@{k} vs exact top-{k}", lambda a: a["ann_recall"]["recall"], 1.0),
              (f"text->image R@{k}", lambda a: a["t2i"][f"R@{k}"], ex["t2i"][f"R@{k}"])]
    for ax, (title, get, exact_value) in zip(axes, panels):
        if ann:
            qps = [a["qps"] for a in ann]
            ax.plot(qps, [get(a) for a in ann], "o-", label="ANN index")
            for a in ann:
                ax.annotate(f"nprobe={a['nprobe']}" if a["nprobe"] is not None else "ann",
                            (a["qps"], get(a)), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.plot([ex["qps"]], [exact_value], "r*", markersize=12, label="exact")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("queries per second (batch)")
        ax.set_ylabel("recall")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(f"{result['model']['name']}: {result['n_images']} images, {result['n_captions']} captions")
    path = Path(path)
    suffix = path.suffix or ".png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=suffix.lstrip("."), dpi=120)
    plt.close(fig)
    return path
