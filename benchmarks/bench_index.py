"""Index build benchmark: ``auto`` plans and explicit factories against exact Flat search, in one run.

For each index type: build wall time and peak RSS (each build runs in its own process and
reports its own ``VmHWM``), bytes/vector resident (``index.faiss``: codes, ids, centroids) and on
disk (the on-disk refine's fp16 rows), the tuned defaults and their leave-one-out recall@10; then,
through ``Searcher`` with **default settings** on held-out queries that are not in the index:
recall@1/10 against the exact top-10, batched QPS and its ratio to exact ``IndexFlatIP`` in the
same run, and single-query p50/p99 latency (1 FAISS thread) warm and cold. Cold = the on-disk
refine file's pages evicted before every query (``MADV_DONTNEED`` on the mapping +
``POSIX_FADV_DONTNEED`` on the file: only this file leaves the page cache, the machine's other
users keep theirs); an index entirely in RAM has no cold case.

    nice -n 10 python benchmarks/bench_index.py --n 1000000                       # 1M x 512, 'real' set
    python benchmarks/bench_index.py --n 200000 --types auto auto@80 --kind hard  # smaller, old generator

Types: ``auto``, ``auto@B`` (auto with ``max_bytes_per_vector=B``) or a FAISS factory string
(``{nlist}`` is replaced by auto's nlist; ``,Refine(disk)`` allowed). The dataset is generated
once and cached (``benchmarks/synthetic.py``, ``bench-data/``); indexes are built in a "view"
folder (manifest copy + symlinked shards) so the cached dataset is never modified.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402
from benchmarks.synthetic import load_dataset  # noqa: E402
from vlsearch.metrics import ann_recall  # noqa: E402


def view_of(collection: Path, name: str) -> Path:
    view = collection.parent.parent / f"index-view-{collection.parent.name}-{name}"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    shutil.copy(collection / "manifest.json", view / "manifest.json")
    os.symlink(collection / "images", view / "images")
    return view


def build_in_subprocess(view: Path, index_type: str, max_memory: str) -> dict:
    """Build in a fresh process; its entry's peak_rss_mb is that process's own VmHWM."""
    kind, _, bpv = index_type.partition("@")
    code = ("import json; from indexing.build import build_index; "
            f"e = build_index({str(view)!r}, {kind!r}, max_memory={max_memory!r}, "
            f"max_bytes_per_vector={int(bpv) if bpv else None}); print(json.dumps(e))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def evict(searcher) -> None:
    """Drop the on-disk refine file from this process's mapping and from the page cache."""
    refine = searcher.disk_refine
    if refine is None:
        return
    arr = refine.vectors
    arr._mmap.madvise(mmap.MADV_DONTNEED)
    fd = os.open(arr.filename, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def latencies(searcher, queries: np.ndarray, cold: bool, **settings) -> tuple[float, float]:
    ms = []
    for q in queries:
        if cold:
            evict(searcher)
        t = time.perf_counter()
        searcher.knn(q, k=10, **settings)
        ms.append(1e3 * (time.perf_counter() - t))
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def measure(searcher, q: np.ndarray, gt: np.ndarray, exact_qps: float, args, **settings) -> list:
    import faiss

    threads = faiss.omp_get_max_threads()
    searcher.knn(q[:50], k=10, **settings)  # warm-up
    t0 = time.perf_counter()
    _, found = searcher.knn(q, k=10, **settings)
    qps = len(q) / (time.perf_counter() - t0)
    faiss.omp_set_num_threads(1)
    try:
        warm = latencies(searcher, q[:args.latency_queries], False, **settings)
        cold = latencies(searcher, q[:args.cold_queries], True, **settings) if searcher.disk_refine else None
    finally:
        faiss.omp_set_num_threads(threads)
    fmt = lambda pair: f"{pair[0]:.2f} / {pair[1]:.2f}" if pair else "- (all in RAM)"  # noqa: E731
    return [ann_recall(found, gt, 1), ann_recall(found, gt, 10), round(qps), round(qps / exact_qps, 1), fmt(warm), fmt(cold)]


def exact_baseline(data, q: np.ndarray) -> tuple[float, float]:
    import faiss

    flat = faiss.IndexFlatIP(q.shape[1])
    flat.add(data.base_vectors())
    t0 = time.perf_counter()
    flat.search(q, 10)
    qps = len(q) / (time.perf_counter() - t0)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    lat = []
    for v in q[:20]:
        t = time.perf_counter()
        flat.search(v[None], 10)
        lat.append(1e3 * (time.perf_counter() - t))
    faiss.omp_set_num_threads(threads)
    return qps, float(np.median(lat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--kind", default="real", help="synthetic generator: real (fitted) or hard")
    ap.add_argument("--types", nargs="+", default=["auto", "auto@80"])
    ap.add_argument("--max-memory", default="4GB")
    ap.add_argument("--latency-queries", type=int, default=300)
    ap.add_argument("--cold-queries", type=int, default=100)
    ap.add_argument("--no-write", action="store_true", help="print only, do not update RESULTS.md")
    args = ap.parse_args()

    from indexing.plan import AutoPolicy, auto_nlist
    from vlsearch.search import Searcher

    data = load_dataset(args.n, 512, args.queries, kind=args.kind)
    q, gt = data.queries, data.gt_ids
    print(f"dataset {data.collection}: {args.n:,} x 512, {len(q)} held-out queries", flush=True)
    exact_qps, exact_p50 = exact_baseline(data, q)
    print(f"exact Flat IP: {exact_qps:.0f} q/s batched, single-query p50 {exact_p50:.1f} ms", flush=True)

    nlist = auto_nlist(args.n, AutoPolicy())
    build_rows, search_rows = [], []
    for i, t in enumerate(args.types):
        t = t.replace("{nlist}", str(nlist))
        view = view_of(data.collection, f"{i}")
        e = build_in_subprocess(view, t, args.max_memory)
        build_rows.append([t, e["factory"], round(e["build_seconds"]), round(e["peak_rss_mb"]),
                           e["resident_bytes_per_vector"], e.get("disk_bytes_per_vector") or 0, e["train_size"],
                           f"{e['nprobe_default']} / {e['k_factor_default']}", e["recall_at_10"], e["target_met"]])
        print(" | ".join(map(str, build_rows[-1])), flush=True)
        s = Searcher.open(view)
        search_rows.append([e["factory"], "defaults"] + measure(s, q, gt, exact_qps, args))
        print(" | ".join(map(str, search_rows[-1])), flush=True)
        del s
        shutil.rmtree(view)

    load = os.getloadavg()
    body = "\n".join([
        f"## Index build and ANN search ({args.n:,} x 512 synthetic '{args.kind}', {len(q)} held-out queries)",
        "",
        f"Machine: {machine()}. Load average at the end: {load[0]:.1f} (shared machine: other jobs were running, "
        "so times are noisy; ratios are from this one run).",
        f"Command: `{command_line()}`",
        "",
        f"Exact search (`IndexFlatIP`, batched {len(q)} queries, k=10): **{exact_qps:.0f} q/s**, single-query p50 "
        f"{exact_p50:.1f} ms.",
        "",
        markdown_table(["--index-type", "factory", "build s", "peak RSS MB (own process)", "resident B/vec",
                        "disk B/vec", "train size", "defaults nprobe / k_factor", "leave-one-out R@10",
                        "target met"], build_rows),
        "",
        "Search with `Searcher` default settings, queries not in the index (recall vs exact top-10; batched = all "
        "queries in one call on all cores; latency = single queries, 1 FAISS thread, ms):",
        "",
        markdown_table(["factory", "settings", "R@1", "R@10", "batched q/s", "x exact", "warm p50 / p99",
                        "cold p50 / p99"], search_rows),
    ])
    print(body)
    if not args.no_write:
        write_section(f"bench_index_{args.kind}", body)


if __name__ == "__main__":
    main()
