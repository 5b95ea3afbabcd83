"""Keyword and hybrid search: retrieval quality on flickr8k-test, latency at scale, and the engine choice.

::

    python benchmarks/bench_hybrid.py --flickr            # R@1/5/10, MRR: vector, keyword, hybrid
    python benchmarks/bench_hybrid.py --latency 1000000   # p50/p99 of each mode on N synthetic rows
    python benchmarks/bench_hybrid.py --engines 100000    # tantivy vs bm25s: build, query, syntax
    python benchmarks/bench_hybrid.py --report-only       # rewrite the RESULTS.md section

**flickr**: ``flickr8k-test`` (1,000 images x 5 captions) embedded with vlsearch-small (the default
model) with **only each image's first caption stored**; its other four captions (4,000) are the
queries, so keyword search cannot simply find the query's own text. Text->image: a query is a hit
at K if its image is in the top K; MRR over the top 100 (0 when absent). Keyword queries are the
caption lower-cased with every character but letters, digits and spaces removed (a caption is
natural text, not query syntax: "A dog (black) ..."). Exact vector search (1,000 rows).

**latency**: ``benchmarks/synthetic.py``'s vectors (fitted to vlsearch-small, 384-d) with a
synthetic caption per row in a text metadata column: 8-14 words drawn from a 5,000-word Zipf(1.1)
vocabulary; queries are 3 words drawn the same way; vector queries are the synthetic held-out
query vectors; hybrid = both lists to depth 100 + RRF. One thread, warm caches, p50/p99 of 300 queries.

**engines**: the same synthetic captions in one tantivy index (the per-shard layout: shards of
10,000 rows, searched one by one and merged) and in ``bm25s``: build time and query latency,
and the top-10 agreement between per-shard and global BM25 statistics.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "flickr8k-test"
OUT = ROOT / "bench-data" / "hybrid"
KS = (1, 5, 10)
_WORD = re.compile(r"[^a-z0-9 ]+")


def plain(text: str) -> str:
    """A caption as a keyword query: lower case, letters, digits and spaces only."""
    return " ".join(_WORD.sub(" ", text.lower()).split())


# ---- flickr8k-test: quality -----------------------------------------------------------------------

def flickr(args: argparse.Namespace) -> dict:
    from indexing.embed import EmbedConfig, embed
    from vlsearch.models.factory import default_model
    from vlsearch.query.searcher import Searcher

    by_image: dict[str, list[str]] = {}
    with open(DATA / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_image.setdefault(row["image"], []).append(row["caption"])
    work = OUT / "flickr"
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "first-caption.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for image, caps in by_image.items():
            w.writerow([str(DATA / image), caps[0]])
    coll_dir = work / "collection"
    start = time.perf_counter()
    model = args.model or default_model()
    embed(manifest, coll_dir, EmbedConfig(model=model, workers=0, device="cpu", batch_size=64, shard_size=10_000))
    embed_s = time.perf_counter() - start
    s = Searcher.open(coll_dir, device="cpu", text_cache_mb=64)  # every query embedded once for all modes
    table = s.collection.read_table(columns=["id", "path"])
    path_to_id = dict(zip(table.column("path").to_pylist(), table.column("id").to_pylist()))
    queries, truth = [], []
    for image, caps in by_image.items():
        for cap in caps[1:]:
            queries.append(cap)
            truth.append(path_to_id[str(DATA / image)])
    truth = np.array(truth)
    modes = {"vector": {}, "keyword": {}, "hybrid (RRF 60)": {"mode": "hybrid"}}
    for alpha in args.alphas:
        modes[f"hybrid (alpha {alpha})"] = {"mode": "hybrid", "alpha": alpha}
    rows = {}
    for label, kw in modes.items():
        mode = kw.get("mode", label if label in ("vector", "keyword") else "hybrid")
        t0 = time.perf_counter()
        ranks = []
        for q, want in zip(queries, truth):
            text = q if mode == "vector" else plain(q)
            hits = s.search_text(text, k=100, exact=True, mode=mode, alpha=kw.get("alpha"))
            ids = [h.id for h in hits]
            ranks.append(ids.index(want) + 1 if want in ids else 0)
        ranks = np.array(ranks)
        found = ranks > 0
        rows[label] = {**{f"R@{k}": float(np.mean(found & (ranks <= k)) * 100) for k in KS},
                       "MRR": float(np.mean(np.where(found, 1.0 / np.maximum(ranks, 1), 0.0))),
                       "ms_per_query": (time.perf_counter() - t0) * 1e3 / len(queries)}
        print(label, rows[label], flush=True)
    result = {"model": model, "images": len(by_image), "queries": len(queries), "embed_s": round(embed_s, 1),
              "rows": rows, "command": command_line(), "machine": machine()}
    (OUT / "flickr.json").write_text(json.dumps(result, indent=2))
    return result


# ---- synthetic captions -----------------------------------------------------------------------------

def vocabulary(size: int = 5000) -> np.ndarray:
    rng = np.random.default_rng(7)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(letters, rng.integers(3, 9))))
    return np.array(sorted(words))


def _zipf_p(n: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** 1.1
    return p / p.sum()


def captions_for(ids: np.ndarray, vocab: np.ndarray) -> list[str]:
    """One synthetic caption per id, a function of the id alone (reproducible in any chunking)."""
    p = _zipf_p(len(vocab))
    out = []
    for i in ids.tolist():
        rng = np.random.default_rng([11, i])
        out.append(" ".join(vocab[rng.choice(len(vocab), rng.integers(8, 15), p=p)]))
    return out


def query_texts(n: int, vocab: np.ndarray) -> list[str]:
    rng = np.random.default_rng(13)
    p = _zipf_p(len(vocab))
    return [" ".join(vocab[rng.choice(len(vocab), 3, p=p)]) for _ in range(n)]


# ---- latency at scale ---------------------------------------------------------------------------------

def latency(args: argparse.Namespace) -> dict:
    import pyarrow as pa

    from benchmarks._results import ensure_index
    from benchmarks.synthetic import make_dataset
    from vlsearch.core.threads import cpu_threads
    from vlsearch.query.searcher import Searcher

    n = args.latency
    vocab = vocabulary()
    t0 = time.perf_counter()
    coll_dir = make_dataset(n=n, dim=384, n_queries=1000, seed=0, shard_size=10_000, variant="-captions",
                            columns=lambda ids: {"text": pa.array(captions_for(ids, vocab))})
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    entry = ensure_index(coll_dir, args.index_type)
    index_s = time.perf_counter() - t0
    qvecs = np.load(coll_dir.parent / "queries.npy")
    texts = query_texts(len(qvecs), vocab)
    s = Searcher.open(coll_dir)
    nq = args.queries
    rows = {}
    with cpu_threads(1):
        t0 = time.perf_counter()
        s.search_text(texts[0], k=10, mode="keyword")  # opens the shards' keyword indexes
        open_ms = (time.perf_counter() - t0) * 1e3
        for label in ("vector", "keyword", "hybrid (RRF)"):
            for q in range(5):  # warm-up
                _run(s, label, texts[q], qvecs[q])
            times = []
            for q in range(nq):
                t = time.perf_counter()
                _run(s, label, texts[q], qvecs[q])
                times.append((time.perf_counter() - t) * 1e3)
            rows[label] = {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}
            print(label, rows[label], flush=True)
    kw_dir = coll_dir / "keyword"
    kw_bytes = sum(p.stat().st_size for p in kw_dir.rglob("*") if p.is_file())
    result = {"n": n, "shards": len(s.collection.shard_numbers()), "index": entry.get("factory"),
              "generate_s": round(gen_s, 1), "index_s": round(index_s, 1), "keyword_bytes": kw_bytes,
              "open_ms": open_ms, "rows": rows, "queries": nq, "command": command_line(), "machine": machine()}
    (OUT / f"latency-{n}.json").write_text(json.dumps(result, indent=2))
    return result


def _run(s, label: str, text: str, vector: np.ndarray) -> None:
    """A query of mode ``label``; vector and hybrid use the stored query vector (no text model)."""
    if label == "vector":
        s.search_vector(vector, k=10)
    elif label == "keyword":
        s.search_text(text, k=10, mode="keyword")
    else:
        from vlsearch.query import hybrid

        v = s._current  # the parts a hybrid text query runs, with the query vector given
        v.search_text_mode([text], lambda: vector[None, :], 10, "hybrid", None, hybrid.RRF_K, None, False, None, None)


# ---- engine choice -------------------------------------------------------------------------------------

def engines(args: argparse.Namespace) -> dict:
    import pyarrow as pa

    from vlsearch.store.keyword import KeywordSearcher, build_shard_index

    n, shard = args.engines, 10_000
    vocab = vocabulary()
    docs = captions_for(np.arange(n), vocab)
    queries = query_texts(200, vocab)
    out: dict = {"n": n, "shard_rows": shard}
    tmp = Path(tempfile.mkdtemp(prefix="bench-hybrid-"))
    try:
        # tantivy, the layout vlsearch writes: one index per shard of 10,000 rows
        t0 = time.perf_counter()
        for number, start in enumerate(range(0, n, shard)):
            ids = np.arange(start, min(n, start + shard))
            build_shard_index(tmp / "sharded", number, pa.table({"id": ids, "path": [f"x/{i}.jpg" for i in ids],
                                                                  "captions": [[docs[i]] for i in ids]}))
        out["tantivy_sharded_build_s"] = time.perf_counter() - t0
        sharded = KeywordSearcher(tmp / "sharded", list(range((n + shard - 1) // shard)), {})
        # tantivy, one global index (the reference for BM25 statistics)
        t0 = time.perf_counter()
        build_shard_index(tmp / "global", 0, pa.table({"id": np.arange(n), "path": [f"x/{i}.jpg" for i in range(n)],
                                                         "captions": [[d] for d in docs]}))
        out["tantivy_global_build_s"] = time.perf_counter() - t0
        glob = KeywordSearcher(tmp / "global", [0], {})
        for name, searcher in (("tantivy_sharded", sharded), ("tantivy_global", glob)):
            searcher.search(queries[0], 10)
            t0 = time.perf_counter()
            for q in queries:
                searcher.search(q, 10)
            out[f"{name}_query_ms"] = (time.perf_counter() - t0) * 1e3 / len(queries)
        overlap = [len(set(sharded.search(q, 10)[1].tolist()) & set(glob.search(q, 10)[1].tolist())) / 10
                   for q in queries]
        out["top10_agreement"] = float(np.mean(overlap))
        out["flickr_keyword_r10_by_shards"] = _flickr_shard_quality(tmp)
        try:
            import bm25s
        except ImportError:
            out["bm25s"] = "not installed"
        else:
            t0 = time.perf_counter()
            retriever = bm25s.BM25()
            retriever.index(bm25s.tokenize(docs, show_progress=False), show_progress=False)
            out["bm25s_build_s"] = time.perf_counter() - t0
            tokens = [bm25s.tokenize([q], show_progress=False) for q in queries]
            t0 = time.perf_counter()
            for tk in tokens:
                retriever.retrieve(tk, k=10, show_progress=False)
            out["bm25s_query_ms"] = (time.perf_counter() - t0) * 1e3 / len(queries)
            out["bm25s_version"] = bm25s.__version__
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import tantivy

    out["tantivy_version"] = getattr(tantivy, "__version__", "0.27")
    out["command"], out["machine"] = command_line(), machine()
    print(out, flush=True)
    (OUT / f"engines-{n}.json").write_text(json.dumps(out, indent=2))
    return out


def _flickr_shard_quality(tmp: Path) -> dict[str, float]:
    """Keyword R@10 on the flickr split (first captions stored, the others as queries) with the
    1,000 images in 1 index, 4 shards of 250 or 10 shards of 100: what per-shard BM25 statistics
    cost in ranking quality (vlsearch's shards hold 10,000 rows: fewer, larger, closer to global)."""
    import pyarrow as pa

    from vlsearch.store.keyword import KeywordSearcher, build_shard_index

    by_image: dict[str, list[str]] = {}
    with open(DATA / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_image.setdefault(row["image"], []).append(row["caption"])
    images = list(by_image)
    out = {}
    for n_shards in (1, 4, 10):
        root = tmp / f"flickr-{n_shards}"
        size = len(images) // n_shards
        for k in range(n_shards):
            ids = np.arange(k * size, (k + 1) * size)
            build_shard_index(root, k, pa.table({"id": ids, "path": ["x.jpg"] * len(ids),
                                                 "captions": [[by_image[images[i]][0]] for i in ids]}))
        searcher = KeywordSearcher(root, list(range(n_shards)), {})
        hits = [int(i) in searcher.search(plain(c), 10)[1].tolist()
                for i, image in enumerate(images) for c in by_image[image][1:]]
        out[str(n_shards)] = float(np.mean(hits) * 100)
    return out


# ---- RESULTS.md -----------------------------------------------------------------------------------------

def report() -> str:
    parts = ["## Keyword and hybrid search (`bench_hybrid.py`)", ""]
    fl = OUT / "flickr.json"
    if fl.is_file():
        r = json.loads(fl.read_text())
        vec = r["rows"]["vector"]
        parts += [f"flickr8k-test, {r['model']}, only each image's first caption stored ({r['images']} images); "
                  f"the other four captions are the {r['queries']:,} queries; text->image recall in %, MRR over the "
                  "top 100; exact vector search. Command: `" + r["command"] + "`; " + r["machine"] + ".", ""]
        table = [[label, *(round(row[f"R@{k}"], 1) for k in KS), round(row["MRR"], 3),
                  f"{row['R@10'] - vec['R@10']:+.1f}", round(row["ms_per_query"], 2)] for label, row in r["rows"].items()]
        parts += [markdown_table(["mode", "R@1", "R@5", "R@10", "MRR", "R@10 vs vector", "ms/query"], table), ""]
        parts += ["ms/query includes embedding the query text (vector, hybrid) on a shared 2-core machine "
                  "under load from other jobs: read it as an order of magnitude. Keyword queries need no model.", ""]
    for p in sorted(OUT.glob("latency-*.json")):
        r = json.loads(p.read_text())
        parts += [f"Latency on {r['n']:,} synthetic rows ({r['shards']} shards, index {r['index']}; a caption of "
                  "8-14 Zipf words per row, 3-word keyword queries; one thread, k=10, hybrid depth 100 + RRF). "
                  f"Keyword indexes: {r['keyword_bytes'] / 1e6:.0f} MB; first keyword query (opens every shard's "
                  f"index): {r['open_ms']:.0f} ms. Vector and hybrid take the synthetic query vector (no text "
                  "embedding timed); the keyword shards are searched one after another. p99 is inflated by "
                  f"other jobs sharing the machine. Command: `{r['command']}`; {r['machine']}.", ""]
        parts += [markdown_table(["mode", "p50 ms", "p99 ms"],
                                 [[m, round(v["p50_ms"], 2), round(v["p99_ms"], 2)] for m, v in r["rows"].items()]), ""]
    for p in sorted(OUT.glob("engines-*.json")):
        r = json.loads(p.read_text())
        rows = [["tantivy, per shard of 10,000 (vlsearch's layout)", round(r["tantivy_sharded_build_s"], 2),
                 round(r["tantivy_sharded_query_ms"], 3), "phrases, fields, boolean, syntax errors"],
                ["tantivy, one global index", round(r["tantivy_global_build_s"], 2),
                 round(r["tantivy_global_query_ms"], 3), "same"]]
        if "bm25s_build_s" in r:
            rows.append([f"bm25s {r['bm25s_version']}", round(r["bm25s_build_s"], 2), round(r["bm25s_query_ms"], 3),
                         "bag of words only (no phrases, fields or syntax)"])
        parts += [f"Engine choice on {r['n']:,} synthetic captions (build from Python lists; one query = "
                  "3 words, top 10): top-10 agreement of per-shard with global BM25 statistics "
                  f"{r['top10_agreement'] * 100:.1f} % (near-tied scores on random captions); keyword R@10 on the "
                  "flickr split with its 1,000 images in 1 / 4 / 10 shards: "
                  + " / ".join(f"{v:.1f}" for v in r.get("flickr_keyword_r10_by_shards", {}).values())
                  + f" %. Command: `{r['command']}`; {r['machine']}.", ""]
        parts += [markdown_table(["engine", "build s", "query ms", "query syntax"], rows), ""]
    parts += ["Each run writes its JSON under `bench-data/hybrid/`; this section is rebuilt from them "
              "(`python benchmarks/bench_hybrid.py --report-only`).", ""]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flickr", action="store_true")
    ap.add_argument("--model", default=None, help="flickr: the model (default: vlsearch's default, vlsearch-small)")
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.5])
    ap.add_argument("--latency", type=int, default=0, help="rows of the latency run (0: skip)")
    ap.add_argument("--index-type", default="IVF1024,Flat")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--engines", type=int, default=0, help="captions of the engine comparison (0: skip)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        if args.engines:
            engines(args)
        if args.flickr:
            flickr(args)
        if args.latency:
            latency(args)
    text = report()
    print(text)
    if not args.no_write:
        write_section("bench_hybrid", text)


if __name__ == "__main__":
    main()
