"""Filtered search on a 1M x 512 synthetic collection: speed and recall per selectivity.

::

    flock /work/wt/cpu.lock python benchmarks/bench_filter.py --prepare   # data + auto index (cached)
    flock /work/wt/cpu.lock python benchmarks/bench_filter.py --sweep 0.25,0.5,1   # measure, write RESULTS.md
    python benchmarks/bench_filter.py --cliff after      # first-call / warm times only (issue 36)

``--cliff LABEL`` times, per selectivity, the first call and warm calls of filtered ANN and of
filtered exact search, each on a fresh Searcher (its own caches; the OS page cache is not
dropped), and keeps them as ``<out-dir>/filter-cliff-LABEL.json``; the RESULTS.md section shows
every label kept, so a ``before`` run of another checkout (``PYTHONPATH=that checkout``, this
script copied there, ``--out-dir`` this tree's ``bench-data``) sits beside ``after``.

The collection is ``benchmarks/synthetic.py``'s 1M x 512 set with two metadata columns derived
from a hash of the id: ``bucket`` (uniform in 0..9999, so ``bucket < 10 * pct`` passes ``pct`` %
of the rows, uncorrelated with the vectors) and ``label`` (8 values). The index is the one
``vlsearch build-index --index-type auto`` builds. Per selectivity (50, 10, 1, 0.1, 0.01 %):

* filter evaluation: DuckDB (:class:`vlsearch.query.filters.FilterEngine`, the chosen engine) against
  DuckDB scanning the Arrow table in place and a pyarrow compute expression;
* filtered search as ``Searcher.knn(where=...)`` runs it (automatic exact / selector switch),
  against exact filtered search (``exact=True``: exact over the matching rows), and ANN with an
  ``IDSelector`` at several nprobe exponents (``--sweep``);
* recall@10 against exact filtered search (brute force over the matching rows' stored vectors);
* single-query p50 / p99 (1 thread) and batched QPS (all cores), against unfiltered ANN.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import (  # noqa: E402
    command_line, evict_from_page_cache, machine, markdown_table, write_section)
from benchmarks.synthetic import load_dataset  # noqa: E402

LABELS = np.array(["cat", "dog", "bird", "car", "tree", "boat", "house", "person"])
VARIANT = "-filter"
SELECTIVITIES = (50.0, 10.0, 1.0, 0.1, 0.01)


def columns(ids: np.ndarray) -> dict:
    """Metadata derived from a 64-bit mix of the id (splitmix64 finaliser): reproducible, uniform."""
    import pyarrow as pa

    h = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    return {"bucket": pa.array((h % np.uint64(10000)).astype(np.int32)),
            "label": pa.array(LABELS[((h >> np.uint64(40)) % np.uint64(8)).astype(np.int64)])}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200, help="held-out queries used (of 1000)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--selectivities", default=",".join(map(str, SELECTIVITIES)), help="percent, comma-separated")
    ap.add_argument("--prepare", action="store_true", help="only generate the data and build the index")
    ap.add_argument("--sweep", default=None, metavar="EXPONENTS",
                    help="also sweep SubsetPolicy.nprobe_exponent (comma-separated) on the forced ANN+selector "
                         "path: recall@10 and batched q/s per selectivity")
    ap.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--note", default="", help="a paragraph appended to the RESULTS.md section")
    ap.add_argument("--cliff", default=None, metavar="LABEL",
                    help="only time first and warm filtered calls (ANN and exact); keep them under LABEL")
    ap.add_argument("--cold", action="store_true",
                    help="only time a new Searcher's first exact=True call with the rows file evicted from the page "
                         "cache, per selectivity (opening and the filter's evaluation timed apart)")
    ap.add_argument("--no-rows", action="store_true",
                    help="with --cliff: read vectors from the shards even where the index has a vector rows file")
    return ap.parse_args()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(a: argparse.Namespace):
    data = load_dataset(a.n, a.dim, 1000, 0, a.out_dir, kind="hard", columns=columns, variant=VARIANT)
    from vlsearch.store.collection import Collection

    if Collection.open(data.collection).manifest.index is None:
        from indexing.build import build_index

        t = time.perf_counter()
        entry = build_index(data.collection, "auto")
        print(f"built {entry['factory']} in {time.perf_counter() - t:.0f} s (nprobe {entry['nprobe_default']})")
    return data


def truth_of(base: np.ndarray, allowed: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact filtered top-k ids: brute force over the allowed rows' stored (float16) vectors."""
    from vlsearch.query.exact import exact_search

    chunks = ((allowed[i:i + 65536], base[allowed[i:i + 65536]].astype(np.float32))
              for i in range(0, len(allowed), 65536))
    return exact_search(queries, chunks, k)[1]


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of the exact top-k (of the rows that exist: fewer than k may pass) that was found."""
    out = []
    for f, t in zip(found, truth):
        t = set(t[:k].tolist()) - {-1}
        out.append(len(set(f[:k].tolist()) & t) / max(len(t), 1))
    return float(np.mean(out))


def latencies(fn, queries: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Single-query p50 / p99 (ms) and the ids found."""
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(fn(q[None])[1][0])
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99)), np.stack(found)


def qps(fn, queries: np.ndarray) -> float:
    t = time.perf_counter()
    fn(queries)
    return len(queries) / (time.perf_counter() - t)


def engine_figures(coll_path: Path, pcts: list[float]) -> tuple[list[list], dict]:
    """Time per filter evaluation over the 1M-row metadata: DuckDB table (chosen), DuckDB over
    the Arrow table in place, pyarrow compute."""
    import duckdb
    import pyarrow.compute as pc

    from vlsearch.store.collection import Collection
    from vlsearch.query.filters import FilterEngine, compile_filter, read_metadata

    coll = Collection.open(coll_path)
    r0, t = rss_mb(), time.perf_counter()
    table = read_metadata(coll.shard_paths())
    read_s, r1 = time.perf_counter() - t, rss_mb()
    t = time.perf_counter()
    engine = FilterEngine(table)
    build_s, r2 = time.perf_counter() - t, rss_mb()
    arrow_con = duckdb.connect(config={"threads": 1})
    arrow_con.register("images", table)
    rows = []
    for pct in pcts:
        where = f"bucket < {int(round(pct * 100))} AND label <> 'nothing'"
        compiled = engine.compile(where)
        t = time.perf_counter()
        n = len(engine.matching_ids(compiled))
        duck = time.perf_counter() - t
        t = time.perf_counter()
        arrow_con.execute(compiled.sql).fetchnumpy()
        duck_arrow = time.perf_counter() - t
        t = time.perf_counter()
        expr = (pc.field("bucket") < int(round(pct * 100))) & (pc.field("label") != "nothing")
        table.filter(expr).column("id").to_numpy()
        arrow = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(20):
            compile_filter(where, engine.columns)
        parse_ms = (time.perf_counter() - t) / 20 * 1e3
        rows.append([f"{pct:g} %", f"{n:,}", round(parse_ms, 2), round(duck * 1e3, 1), round(duck_arrow * 1e3, 1),
                     round(arrow * 1e3, 1)])
    info = {"read_s": read_s, "build_s": build_s, "arrow_mb": table.nbytes / 2**20, "read_rss_mb": r1 - r0,
            "engine_rss_mb": r2 - r1}
    engine.close()
    return rows, info


def sweep(s, queries: np.ndarray, k: int, truths: dict, base_qps: float, exponents: list[float]) -> list[list]:
    """Forced ANN+selector path: nprobe = nprobe_default x selectivity^-e (capped at nlist);
    recall@10 and batched q/s per selectivity and exponent."""
    from vlsearch.query.searcher import Searcher

    nlist = int(s.collection.manifest.index.get("nlist") or 0)
    rows = []
    for where, (allowed, truth) in truths.items():
        for e in exponents:
            policy = replace(s.options.subset_policy, exact_max_rows=0, nprobe_exponent=e)
            ann = Searcher(s.collection, s.index, options=replace(s.options, subset_policy=policy))
            ann.plan.filters.engine = s.filter_engine  # one engine per collection version: shared
            ann.knn(queries[:1], k, where=where)
            t = time.perf_counter()
            _, found = ann.knn(queries, k, where=where)
            q = len(queries) / (time.perf_counter() - t)
            probe = min(nlist, int(np.ceil((s.nprobe_default or 0) * (len(allowed) / len(s.row_locator)) ** -e)))
            rows.append([f"{100 * len(allowed) / len(s.row_locator):.3g} %", e, probe,
                         f"{recall(found, truth, k):.4f}", round(q), f"{q / base_qps:.2f}x"])
            print(rows[-1], flush=True)
    return rows


def forced_exact(s, queries: np.ndarray, k: int, where: str, allowed: np.ndarray) -> tuple[float, float, float]:
    """Exact over the subset: (first call ms: it gathers the vectors, batched q/s, warm single-query
    p50 ms). When the vectors do not fit the cache every call re-reads them, so one batched call
    (one streamed pass) gives all three: its time, its q/s, and nan."""
    from vlsearch.query.searcher import Searcher

    ex = Searcher(s.collection, s.index)  # its own caches: the first call gathers from the shards
    ex.plan.filters.engine = s.filter_engine
    if len(allowed) * s.dim * 4 > s.options.subset_policy.vector_cache_bytes:
        t = time.perf_counter()
        ex.knn(queries, k, where=where, exact=True)
        took = time.perf_counter() - t
        return took * 1e3, len(queries) / took, float("nan")
    t = time.perf_counter()
    ex.knn(queries[:1], k, where=where, exact=True)
    first_ms = (time.perf_counter() - t) * 1e3
    p50, _, _ = latencies(lambda q: ex.knn(q, k, where=where, exact=True), queries)
    return first_ms, qps(lambda q: ex.knn(q, k, where=where, exact=True), queries), p50


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def cliff_row(s, queries: np.ndarray, k: int, where: str, no_rows: bool) -> dict:
    """First-call and warm ms of one filtered query (single thread for ANN, as served), ANN
    (the automatic plan) and exact, each on a fresh Searcher sharing the filter engine."""
    import faiss

    from vlsearch.query.searcher import Searcher

    out: dict = {}
    for mode, exact in (("ann", False), ("exact", True)):
        fresh = Searcher(s.collection, s.index)
        fresh.plan.filters.engine = s.filter_engine
        fresh.filter_ids(where)  # the filter's evaluation is not what is timed
        stored = getattr(fresh.plan, "stored", None)
        if no_rows and stored is not None:
            stored.rows = None
        faiss.omp_set_num_threads(1)
        out[f"{mode}_first"] = _timed(lambda: fresh.knn(queries[:1], k, where=where, exact=exact))
        warm = [_timed(lambda q=q: fresh.knn(q[None], k, where=where, exact=exact))
                for q in queries[1:(21 if not exact else 3)]]
        out[f"{mode}_warm"] = float(np.median(warm))
        faiss.omp_set_num_threads(os.cpu_count() or 1)
    return out


def cliff(a: argparse.Namespace, data, s, queries: np.ndarray, pcts: list[float]) -> None:
    """``--cliff``: time and keep the first-call / warm figures of this checkout, then report all labels kept."""
    import json

    rows = {}
    for pct in pcts:
        where = f"bucket < {int(round(pct * 100))}"
        rows[f"{pct:g}"] = {"rows": int(len(s.filter_ids(where))), **cliff_row(s, queries, a.k, where, a.no_rows)}
        print(pct, rows[f"{pct:g}"], flush=True)
    folder = data.collection.parent
    label = a.cliff + ("-no-rows" if a.no_rows else "")
    (folder / f"filter-cliff-{label}.json").write_text(json.dumps(
        {"rows": rows, "command": command_line(), "machine": machine(), "load": os.getloadavg()[0]}, indent=1))
    if not a.no_write:
        write_section("bench_filter_cliff", cliff_report(folder, s.collection.manifest.index, a.note))


def cold_first_calls(coll: Path, queries: np.ndarray, pcts: list[float], k: int) -> None:
    """``--cold``: per selectivity, the rows file evicted (``posix_fadvise DONTNEED``), a new
    Searcher, the filter evaluated, then its first ``exact=True`` call; each step timed."""
    import json

    from vlsearch.query.searcher import Searcher

    rows_file = coll / json.loads((coll / "manifest.json").read_text())["index"]["rows_file"]
    for pct in pcts:
        where = f"bucket < {int(round(pct * 100))}"
        evict_from_page_cache(rows_file)
        t0 = time.perf_counter()
        s = Searcher.open(coll)
        t1 = time.perf_counter()
        s.filter_ids(where)
        t2 = time.perf_counter()
        s.knn(queries[:1], k, where=where, exact=True)
        t3 = time.perf_counter()
        s.close()
        print(f"{pct:g} %: open {1e3 * (t1 - t0):,.0f} ms, filter {1e3 * (t2 - t1):,.0f} ms, first exact call "
              f"(rows file evicted) {1e3 * (t3 - t2):,.0f} ms", flush=True)


def cliff_report(folder: Path, entry: dict, note: str = "") -> str:
    """The RESULTS.md section: one row per (label, selectivity) of every ``filter-cliff-*.json`` kept."""
    import json

    labels = sorted((p.stem[len("filter-cliff-"):] for p in folder.glob("filter-cliff-*.json")),
                    key=lambda label: (label != "before", label))
    runs = {label: json.loads((folder / f"filter-cliff-{label}.json").read_text()) for label in labels}

    def ms(v: float) -> str:
        return f"{v:,.0f}" if v >= 100 else f"{v:.2g}" if v < 1 else f"{v:.1f}"

    table = [[label, f"{float(pct):g} %", f"{r['rows']:,}", ms(r["ann_first"]), ms(r["ann_warm"]),
              ms(r["exact_first"]), ms(r["exact_warm"])]
             for label, run in runs.items() for pct, r in run["rows"].items()]
    runs_text = [f"- `{label}`: `{run['command']}` (load average {run['load']:.1f})" for label, run in runs.items()]
    return "\n".join([
        "## Filtered search: first call and warm, before / after the vector rows file (issue 36)",
        "",
        f"1,000,000 x 512 synthetic (`bench_filter.py`'s collection, 20 shards), index `{entry['factory']}`; "
        f"filter `bucket < X` (uniform). Machine: {next(iter(runs.values()))['machine']} (shared: other "
        "jobs were running). Each figure is a fresh `Searcher` (its own caches, the OS page cache not dropped): "
        "`1st` its first `knn(where=...)` call (one query, the filter already evaluated), `warm` the median "
        "of the next calls (20 for ANN, 2 for exact), single thread for ANN. `ANN` is the automatic plan "
        "(exact over small subsets, else ANN + IDSelector); `exact` is `exact=True`.",
        "",
        markdown_table(["run", "selectivity", "rows", "ANN 1st ms", "ANN warm ms", "exact 1st ms", "exact warm ms"],
                       table),
        "",
        "Runs (each under `taskset -c 1`, pinned to one of the 2 shared cores; `before` is main's code, "
        "`git archive main` unpacked in /tmp/gather-base with this script copied in and run there with "
        "`PYTHONPATH=/tmp/gather-base`; the others this tree):",
        *runs_text,
        "",
        *disk_cost(folder / "collection", entry),
        *(["", note] if note else []),
    ])


def disk_cost(coll_path: Path, entry: dict) -> list[str]:
    """What the vector rows file costs on disk, against the shards and the index."""
    rows_file = entry.get("rows_file")
    if not rows_file or not (coll_path / rows_file).is_file():
        return ["The index has no vector rows file."]
    rows = (coll_path / rows_file).stat().st_size
    shards = sum(p.stat().st_size for p in (coll_path / "images").glob("*.parquet"))
    index = (coll_path / entry.get("file", "index.faiss")).stat().st_size
    return [f"Disk: the vector rows file is {rows / 2**30:.2f} GiB ({rows / entry['ntotal']:.0f} B/vector, 2 bytes "
            f"per dimension), beside {shards / 2**30:.2f} GiB of shards and a {index / 2**30:.2f} GiB index: "
            f"+{100 * rows / (shards + index):.0f} % on disk, and every version an update writes has its own "
            "until GC (kept rows are copied from the previous file, no shard is decoded). "
            "`build_index(..., vector_rows=False)` skips it (filtered exact search then reads the shards: "
            "`after-no-rows`)."]


def main() -> None:
    a = parse_args()
    import faiss

    from vlsearch.query.searcher import Searcher

    t_all = time.perf_counter()
    data = prepare(a)
    if a.prepare:
        return
    pcts = [float(x) for x in a.selectivities.split(",")]
    queries, k = data.queries[: a.queries], a.k
    if a.cliff:
        return cliff(a, data, Searcher.open(data.collection), queries, pcts)
    if a.cold:
        return cold_first_calls(data.collection, queries, pcts, a.k)
    base = np.load(data.collection.parent / "base_f16.npy", mmap_mode="r")
    cores = faiss.omp_get_max_threads()

    engine_rows, engine_info = engine_figures(data.collection, pcts)
    t = time.perf_counter()
    s = Searcher.open(data.collection)
    open_s = time.perf_counter() - t
    entry, policy = s.collection.manifest.index, s.options.subset_policy
    faiss.omp_set_num_threads(1)
    p50, p99, found = latencies(lambda q: s.knn(q, k), queries)
    faiss.omp_set_num_threads(cores)
    base_qps = qps(lambda q: s.knn(q, k), queries)
    unfiltered = {"p50": p50, "p99": p99, "qps": base_qps, "recall": recall(found, data.gt_ids[: a.queries], k)}
    kf = policy.min_k_factor  # the same re-ranking depth as filtered ANN, for a like-for-like ratio
    unfiltered["qps_kf"] = qps(lambda q: s.knn(q, k, k_factor=kf), queries)
    unfiltered["recall_kf"] = recall(s.knn(queries, k, k_factor=kf)[1], data.gt_ids[: a.queries], k)
    print("unfiltered", unfiltered, flush=True)

    rows, truths = [], {}
    for pct in pcts:
        where = f"bucket < {int(round(pct * 100))}"
        t = time.perf_counter()
        allowed = s.filter_ids(where)
        filter_ms = (time.perf_counter() - t) * 1e3
        truths[where] = allowed, truth_of(base, allowed, queries, k)
        faiss.omp_set_num_threads(1)
        t = time.perf_counter()
        s.knn(queries[:1], k, where=where)
        first_ms = (time.perf_counter() - t) * 1e3
        p50, p99, found = latencies(lambda q: s.knn(q, k, where=where), queries)
        faiss.omp_set_num_threads(cores)
        fq = qps(lambda q: s.knn(q, k, where=where), queries)
        e_first, e_qps, e_p50 = forced_exact(s, queries, k, where, allowed)
        rows.append([f"{pct:g} %", f"{len(allowed):,}", round(filter_ms, 1), round(first_ms, 1), round(p50, 2),
                     round(p99, 2), round(fq), f"{fq / base_qps:.2f}x", f"{recall(found, truths[where][1], k):.4f}",
                     round(e_first), "-" if np.isnan(e_p50) else round(e_p50, 2), round(e_qps, 1)])
        print(rows[-1], flush=True)
        report(a, rows, [], unfiltered, entry, policy, engine_rows, engine_info, cores, t_all, open_s, queries, final=False)
    sweep_rows = sweep(s, queries, k, truths, base_qps, [float(x) for x in a.sweep.split(",")]) if a.sweep else []
    report(a, rows, sweep_rows, unfiltered, entry, policy, engine_rows, engine_info, cores, t_all, open_s, queries)


def report(a, rows, sweep_rows, unfiltered, entry, policy, engine_rows, engine_info, cores, t_all, open_s, queries,
           final: bool = True) -> None:
    """Write the RESULTS.md section (also after each selectivity, so a run cut short keeps its rows)."""
    import faiss

    k = a.k
    body = [
        "## Filtered search (1,000,000 x 512 synthetic, `benchmarks/bench_filter.py`)",
        "",
        f"Machine: {machine()}; FAISS {faiss.__version__}, {cores} OpenMP threads for batches, 1 for single "
        f"queries; load average {os.getloadavg()[0]:.1f} (shared machine: other jobs were running, "
        "so absolute times are pessimistic and noisy; ratios come from one run).  ",
        f"Command: `{command_line()}`  ",
        f"Index: `{entry['factory']}` (auto), nprobe_default {entry['nprobe_default']}, refine k_factor "
        f"{entry.get('refine_k_factor')}; {len(queries)} held-out queries, k={k}. Filter `bucket < X`: uniform, "
        f"uncorrelated with the vectors. Policy (`SubsetPolicy`): exact over the subset up to "
        f"{policy.exact_max_rows:,} rows when its vectors are gathered, in the index's vector rows file, or (without "
        f"one) the gather reads <= {policy.cold_row_groups} row groups, else ANN with an IDSelector, nprobe x selectivity^-{policy.nprobe_exponent:g} and refine "
        f"k_factor >= {policy.min_k_factor:g}.",
        "",
        f"Unfiltered ANN: p50 / p99 {unfiltered['p50']:.2f} / {unfiltered['p99']:.2f} ms, batched "
        f"{unfiltered['qps']:,.0f} q/s, recall@10 {unfiltered['recall']:.4f} (vs exact unfiltered); with the "
        f"filtered path's refine k_factor {policy.min_k_factor:g}: {unfiltered['qps_kf']:,.0f} q/s, recall@10 "
        f"{unfiltered['recall_kf']:.4f}. `x unfiltered` below divides by the first figure.",
        "",
        markdown_table(["selectivity", "rows", "filter ms", "1st query ms", "p50 ms", "p99 ms", "batched q/s",
                        "x unfiltered", "recall@10 vs exact filtered", "exact: 1st call ms", "exact: warm p50 ms",
                        "exact: batched q/s"], rows),
        "",
        "`filter ms`: first evaluation of the filter (DuckDB, then cached). `exact`: "
        "`knn(exact=True, where=...)`, exact over the matching rows; its first call gathers their "
        "vectors (from the index's vector rows file, else from the shards' row groups), later calls reuse them "
        f"while they fit the {policy.vector_cache_bytes >> 20} MiB budget (`-`: they do not; then every call "
        "re-reads them and the first call is the whole batch, one streamed pass).",
    ]
    if sweep_rows:
        body += ["", f"ANN + IDSelector forced, nprobe exponent sweep (batched, all cores, refine k_factor "
                 f"{policy.min_k_factor:g}):", "",
                 markdown_table(["selectivity", "exponent", "nprobe", "recall@10", "batched q/s", "x unfiltered"],
                                sweep_rows)]
    body += [
        "",
        "Filter engine (1M rows; `bucket < X AND label <> 'nothing'`; first evaluation): metadata read "
        f"{engine_info['read_s']:.2f} s ({engine_info['arrow_mb']:.0f} MiB Arrow, +{engine_info['read_rss_mb']:.0f} MiB "
        f"RSS), DuckDB table built in {engine_info['build_s']:.2f} s (+{engine_info['engine_rss_mb']:.0f} MiB RSS).",
        "",
        markdown_table(["selectivity", "rows", "parse+check ms", "DuckDB table ms", "DuckDB on Arrow ms",
                        "pyarrow compute ms"], engine_rows),
        "",
        *([a.note, ""] if a.note else []),
        f"Total benchmark time {time.perf_counter() - t_all:.0f} s; index opened in {open_s:.1f} s."
        + ("" if final else " (run in progress: rows so far)"),
    ]
    text = "\n".join(body)
    if final:
        print(text)
    if not a.no_write:
        write_section("bench_filter", text)


if __name__ == "__main__":
    main()
