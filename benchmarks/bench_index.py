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
    # the same in stages, each short enough for a time-limited slot (dataset and views are kept):
    python benchmarks/bench_index.py --n 1000000 --types auto@80 --stage build
    python benchmarks/bench_index.py --n 1000000 --types auto --stage build
    python benchmarks/bench_index.py --n 1000000 --types auto auto@80 --stage eval --settings 16:32

``--stage build`` builds each type into a kept view (``bench-entry.json`` records the build);
``--stage eval`` measures the kept views against one exact Flat baseline in one run and writes
RESULTS.md; ``--stage all`` (default) does both and removes the views. ``--settings NPROBE:K_FACTOR``
adds rows at explicit settings next to each index's defaults (the levers when a target is missed).

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
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import (  # noqa: E402
    command_line, evict_from_page_cache, machine, markdown_table, write_section)
from benchmarks.synthetic import load_dataset  # noqa: E402
from vlsearch.core.metrics import ann_recall  # noqa: E402


ENTRY = "bench-entry.json"


def view_path(collection: Path, index_type: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9@]+", "_", index_type).strip("_")
    return collection.parent.parent / f"index-view-{collection.parent.name}-{slug}"


def view_of(collection: Path, index_type: str) -> Path:
    """A fresh folder for one build: manifest copy + symlinked shards (the cached dataset is never modified)."""
    view = view_path(collection, index_type)
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
    evict_from_page_cache(arr.filename)


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
    if searcher.disk_refine is not None:
        searcher.disk_refine.warm()  # warm = the rows file in the page cache and mapped, as in a running server
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


def parse_settings(specs: list[str]) -> list[dict]:
    """``["16:32", "64:"]`` -> ``[{"nprobe": 16, "k_factor": 32.0}, {"nprobe": 64}]``."""
    out = []
    for spec in specs:
        nprobe, _, k_factor = spec.partition(":")
        out.append({k: v for k, v in (("nprobe", int(nprobe) if nprobe else None),
                                      ("k_factor", float(k_factor) if k_factor else None)) if v is not None})
    return out


def build_stage(collection: Path, types: list[str], max_memory: str) -> list[Path]:
    """Build every type in its own process into a kept view; record the entry beside it."""
    views = []
    for t in types:
        view = view_of(collection, t)
        e = build_in_subprocess(view, t, max_memory)
        (view / ENTRY).write_text(json.dumps(e))
        print(" | ".join(map(str, build_row(t, e))), flush=True)
        views.append(view)
    return views


def build_row(index_type: str, e: dict) -> list:
    return [index_type, e["factory"], round(e["build_seconds"]), round(e["peak_rss_mb"]),
            e["resident_bytes_per_vector"], e.get("disk_bytes_per_vector") or 0, e["train_size"],
            f"{e['nprobe_default']} / {e['k_factor_default']}", e["recall_at_10"], e["target_met"]]


def eval_stage(data, types: list[str], args) -> tuple[float, float, list, list]:
    """Exact Flat once, then every kept view with its defaults and the ``--settings`` rows."""
    from vlsearch.query.searcher import Searcher

    q, gt = data.queries, data.gt_ids
    views = [view_path(data.collection, t) for t in types]
    missing = [str(v) for v in views if not (v / ENTRY).is_file()]
    if missing:
        raise SystemExit(f"not built (run --stage build first): {', '.join(missing)}")
    exact_qps, exact_p50 = exact_baseline(data, q)
    print(f"exact Flat IP: {exact_qps:.0f} q/s batched, single-query p50 {exact_p50:.1f} ms", flush=True)
    build_rows, search_rows = [], []
    for t, view in zip(types, views):
        e = json.loads((view / ENTRY).read_text())
        build_rows.append(build_row(t, e))
        s = Searcher.open(view)
        for label, settings in [("defaults", {})] + [(f"nprobe {x.get('nprobe', '-')}, k_factor {x.get('k_factor', '-')}", x)
                                                     for x in parse_settings(args.settings)]:
            search_rows.append([e["factory"], label] + measure(s, q, gt, exact_qps, args, **settings))
            print(" | ".join(map(str, search_rows[-1])), flush=True)
        del s
    return exact_qps, exact_p50, build_rows, search_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--kind", default="real", help="synthetic generator: real (fitted) or hard")
    ap.add_argument("--types", nargs="+", default=["auto", "auto@80"])
    ap.add_argument("--max-memory", default="4GB")
    ap.add_argument("--latency-queries", type=int, default=300)
    ap.add_argument("--cold-queries", type=int, default=100)
    ap.add_argument("--stage", choices=["all", "build", "eval"], default="all",
                    help="build: build into kept views; eval: measure kept views; all: both, views removed")
    ap.add_argument("--settings", nargs="*", default=[], metavar="NPROBE:K_FACTOR",
                    help="extra search settings measured next to the defaults (either part may be empty)")
    ap.add_argument("--note", default="", help="a sentence added to the RESULTS.md section (e.g. the stage commands)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update RESULTS.md")
    args = ap.parse_args()

    from vlsearch.ann.plan import AutoPolicy, auto_nlist

    data = load_dataset(args.n, 512, args.queries, kind=args.kind)
    print(f"dataset {data.collection}: {args.n:,} x 512, {len(data.queries)} held-out queries", flush=True)
    nlist = auto_nlist(args.n, AutoPolicy())
    types = [t.replace("{nlist}", str(nlist)) for t in args.types]
    if args.stage in ("all", "build"):
        views = build_stage(data.collection, types, args.max_memory)
        if args.stage == "build":
            return
    exact_qps, exact_p50, build_rows, search_rows = eval_stage(data, types, args)
    if args.stage == "all":
        for v in views:
            shutil.rmtree(v)
    body = report(args, len(data.queries), exact_qps, exact_p50, build_rows, search_rows)
    print(body)
    if not args.no_write:
        write_section(f"bench_index_{args.kind}", body)


def report(args, n_queries: int, exact_qps: float, exact_p50: float, build_rows: list, search_rows: list) -> str:
    load = os.getloadavg()
    return "\n".join([
        f"## Index build and ANN search ({args.n:,} x 512 synthetic '{args.kind}', {n_queries} held-out queries)",
        "",
        f"Machine: {machine()}. Load average at the end: {load[0]:.1f}"
        + (" (above the 2 cores: other jobs were running, so times are noisy)" if load[0] > 2.5 else "")
        + "; search ratios are from this one run.",
        f"Command: `{command_line()}`" + (f" {args.note}" if args.note else ""),
        "",
        f"Exact search (`IndexFlatIP`, batched {n_queries} queries, k=10): **{exact_qps:.0f} q/s**, single-query p50 "
        f"{exact_p50:.1f} ms.",
        "",
        markdown_table(["--index-type", "factory", "build s", "peak RSS MB (own process)", "resident B/vec",
                        "disk B/vec", "train size", "defaults nprobe / k_factor", "leave-one-out R@10",
                        "target met"], build_rows),
        "",
        "Search with `Searcher`, queries not in the index (recall vs exact top-10; batched = all "
        "queries in one call on all cores; latency = single queries, 1 FAISS thread, ms):",
        "",
        markdown_table(["factory", "settings", "R@1", "R@10", "batched q/s", "x exact", "warm p50 / p99",
                        "cold p50 / p99"], search_rows),
    ])


if __name__ == "__main__":
    main()
