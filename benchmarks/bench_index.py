"""Index build benchmark: ``auto`` and explicit FAISS factories on the synthetic collection.

For each index type: build time and peak RSS (build runs in its own process), payload bytes per
vector (codes + ids + refine codes) and file bytes per vector, recall@1/10/100 against exact
inner-product top-k at several nprobe, batched QPS (all queries in one call), single-query
p50/p99 latency, and exact-search QPS (``faiss.IndexFlatIP``, batched) in the same run.

    nice -n 10 python benchmarks/bench_index.py --n 1000000          # the issue's 1M x 512 set
    nice -n 10 python benchmarks/bench_index.py --n 100000 --types auto "IVF1024,PQ32x4fs"

The dataset is generated once and cached (``benchmarks/synthetic.py``, ``bench-data/``).
Indexes are built in a "view" folder (manifest copy + symlinked shards) so the cached dataset
is never modified.
"""

from __future__ import annotations

import argparse
import json
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

KS = (1, 10, 100)


def view_of(collection: Path, name: str) -> Path:
    view = collection.parent.parent / f"index-view-{collection.parent.name}-{name}"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    shutil.copy(collection / "manifest.json", view / "manifest.json")
    os.symlink(collection / "images", view / "images")
    return view


def build_in_subprocess(view: Path, index_type: str, max_memory: str) -> dict:
    code = ("import json,sys; from indexing.build import build_index; "
            f"e = build_index({str(view)!r}, {index_type!r}, max_memory={max_memory!r}); print(json.dumps(e))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(index, queries: np.ndarray, gt: np.ndarray, latency_queries: int) -> dict:
    t0 = time.perf_counter()
    _, found = index.search(queries, max(KS))
    batched = time.perf_counter() - t0
    lat = []
    for q in queries[:latency_queries]:
        t = time.perf_counter()
        index.search(q[None], 10)
        lat.append(time.perf_counter() - t)
    out = {f"R@{k}": ann_recall(found, gt, k) for k in KS}
    out.update(qps=len(queries) / batched, p50_ms=1e3 * float(np.percentile(lat, 50)),
               p99_ms=1e3 * float(np.percentile(lat, 99)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--types", nargs="+", default=["auto", "IVF{nlist},PQ32x4fs", "IVF{nlist},PQ64x4fs,Refine(SQ8)"],
                    help="index types; {nlist} is replaced by auto's nlist for this N")
    ap.add_argument("--nprobes", default="8,16,32,64,128", help="nprobe values measured besides the tuned default")
    ap.add_argument("--max-memory", default="4GB")
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--no-write", action="store_true", help="print only, do not update RESULTS.md")
    args = ap.parse_args()

    import faiss

    from indexing.plan import AutoPolicy, auto_nlist
    from vlsearch.faiss_index import find_ivf, load_index, set_search_params

    data = load_dataset(args.n, 512, args.queries)
    q, gt = data.queries, data.gt_ids
    print(f"dataset {data.collection}: {args.n:,} x 512, {len(q)} queries", flush=True)

    xb = data.base_vectors()
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    del xb
    t0 = time.perf_counter()
    _, ex = flat.search(q, max(KS))
    exact_qps = len(q) / (time.perf_counter() - t0)
    lat = []
    for v in q[:20]:
        t = time.perf_counter()
        flat.search(v[None], 10)
        lat.append(time.perf_counter() - t)
    exact_p50 = 1e3 * float(np.median(lat))
    del flat
    print(f"exact Flat IP: {exact_qps:.0f} q/s batched, p50 {exact_p50:.1f} ms (R@10 vs cached gt "
          f"{ann_recall(ex, gt, 10):.3f})", flush=True)

    nlist = auto_nlist(args.n, AutoPolicy())
    nprobes = [int(x) for x in args.nprobes.split(",") if x]
    build_rows, search_rows = [], []
    for i, t in enumerate(args.types):
        t = t.replace("{nlist}", str(nlist))
        view = view_of(data.collection, f"{i}")
        entry = build_in_subprocess(view, t, args.max_memory)
        n = entry["ntotal"]
        print(f"{t}: built {entry['factory']} in {entry['build_seconds']:.0f} s, peak RSS {entry['peak_rss_mb']:.0f} MB, "
              f"{entry['bytes_per_vector']} B/vec, nprobe_default={entry['nprobe_default']} "
              f"(held-out R@10 {entry['recall_at_10']:.3f})", flush=True)
        build_rows.append([t, entry["factory"], round(entry["build_seconds"], 1), round(entry["peak_rss_mb"]),
                           entry["bytes_per_vector"], round(entry["file_bytes"] / n, 1), entry["train_size"],
                           entry["nprobe_default"], entry["recall_at_10"]])
        index = load_index(view)
        ivf = find_ivf(index)
        settings = [entry["nprobe_default"]] + ([p for p in nprobes if p != entry["nprobe_default"]
                                                 and p <= ivf.nlist] if ivf is not None else [])
        for p in sorted(set(settings), key=lambda x: (x is None, x)):
            set_search_params(index, nprobe=p)
            m = measure(index, q, gt, args.latency_queries)
            row = [entry["factory"], p if p is not None else "-", m["R@1"], m["R@10"], m["R@100"], round(m["qps"]),
                   round(m["qps"] / exact_qps, 1), m["p50_ms"], m["p99_ms"]]
            print("  " + " | ".join(str(round(v, 3) if isinstance(v, float) else v) for v in row), flush=True)
            search_rows.append(row)
        del index, ivf
        shutil.rmtree(view)

    load = os.getloadavg()
    body = "\n".join([
        f"## Index build and ANN search ({args.n:,} x 512 synthetic, {len(q)} held-out queries)",
        "",
        f"Machine: {machine()}. Load average at the end: {load[0]:.1f} (shared machine: other jobs were running, "
        "so times are pessimistic and noisy).",
        f"Command: `{command_line()}`",
        "",
        f"Exact search (`IndexFlatIP`, batched {len(q)} queries, k=100): **{exact_qps:.0f} q/s**, single-query p50 "
        f"{exact_p50:.1f} ms.",
        "",
        markdown_table(["--index-type", "factory", "build s", "peak RSS MB", "payload B/vec", "file B/vec",
                        "train size", "nprobe_default", "held-out R@10"], build_rows),
        "",
        "Search (recall vs exact inner-product top-k; batched = all queries in one call, k=100; latency k=10):",
        "",
        markdown_table(["factory", "nprobe", "R@1", "R@10", "R@100", "batched q/s", "x exact", "p50 ms", "p99 ms"],
                       search_rows),
    ])
    print(body)
    if not args.no_write:
        write_section("bench_index", body)


if __name__ == "__main__":
    main()
