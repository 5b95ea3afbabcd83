"""Distributed index build on Ray vs the single-machine build of the same plan.

The measurement behind docs/SCALING.md. On the cached synthetic collection
(``benchmarks/synthetic.py``: N x 512 vectors of the "real"-fitted generator, 50k-row shards,
1000 held-out queries) it builds the same plan (default ``auto`` at the build defaults,
``--max-memory 4GB``; ``--factory`` and ``--max-bytes-per-vector`` change it) with the same seed twice:

- ``local``: :func:`indexing.build.build_index` in one process;
- ``ray``: :func:`indexing.ray_engine.build_index_ray` with ``--parts`` parts on a local Ray
  instance (``--actors`` CPUs), merged through on-disk inverted lists (``on_disk=True``).

Each stage runs in its own process (``--stage data|local|ray|eval``; ``--stage all`` runs them
in order) so every peak RSS belongs to that stage alone (``data`` generates the set once: its
memory-mapped writes would otherwise count in the first build's peak). ``eval`` takes an exact
top-10 streamed over the shards as ground truth and exact baseline, then measures each index at its
tuned defaults: recall@10, QPS of a 1000-query batch, single-query p50/p99 warm, and cold (the rows
file and any on-disk lists evicted with ``posix_fadvise(DONTNEED)`` before each query); it writes
the ``bench_ray_auto_n{N}`` section of benchmarks/RESULTS.md (``bench_ray[_nN]`` for a ``--factory``).
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

from benchmarks._results import command_line, evict_from_page_cache, machine, markdown_table, write_section
from benchmarks.synthetic import DEFAULT_DIR, SyntheticData, dataset_dir, load_dataset, make_dataset


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--factory", default="auto", help="index type for both builds (default: the auto plan)")
    ap.add_argument("--max-memory", default="4GB", help="build budget, as `vlsearch build-index` (its default)")
    ap.add_argument("--max-bytes-per-vector", type=int, default=None, help="cap on resident bytes per vector")
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=50_000, help="rows per collection shard (parts group shards)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--stage", choices=["all", "data", "local", "ray", "eval"], default="all")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update RESULTS.md")
    return ap.parse_args()

def _out_dir(args: argparse.Namespace) -> Path | None:
    return None if args.shard_size == 50_000 else DEFAULT_DIR / f"shards{args.shard_size}"


def _root(args: argparse.Namespace) -> Path:
    return dataset_dir(args.n, 512, 1000, 0, _out_dir(args))


def _dataset(args: argparse.Namespace, log=lambda *a: print(*a, flush=True)) -> SyntheticData:
    """The cached synthetic dataset with this run's shard size (generated once)."""
    make_dataset(args.n, out_dir=_out_dir(args), shard_size=args.shard_size, log=log)
    return load_dataset(args.n, out_dir=_out_dir(args), log=log)


def _collection_copy(args: argparse.Namespace, name: str) -> Path:
    """A collection sharing the synthetic one's shards (symlinked), with its own index files."""
    from vlsearch.store.collection import Collection

    data = _dataset(args)
    target = _root(args) / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    (target / "images").symlink_to(data.collection / "images")
    manifest = json.loads((data.collection / "manifest.json").read_text())
    manifest["index"] = None
    (target / "manifest.json").write_text(json.dumps(manifest))
    Collection.open(target)
    return target

def stage_build(args: argparse.Namespace, engine: str) -> None:
    from indexing.build import peak_rss_mb

    coll = _collection_copy(args, engine)
    start = time.perf_counter()
    seen: list[str] = []

    def progress(done, total, stage=None, **_):  # one line per stage, so a long build shows where it is
        if stage not in seen:
            seen.append(stage)
            print(f"{engine}: {stage} from {time.perf_counter() - start:.0f} s", flush=True)

    if engine == "local":
        from indexing.build import build_index

        entry = build_index(coll, args.factory, max_memory=args.max_memory, seed=0,
                            max_bytes_per_vector=args.max_bytes_per_vector, progress=progress)
    else:
        import ray

        from indexing.ray_engine import RayConfig, build_index_ray

        ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)
        t_ray = time.perf_counter() - start
        entry = build_index_ray(coll, args.factory, max_memory=args.max_memory, seed=0, parts=args.parts, on_disk=True,
                                ray_config=RayConfig(actors=args.actors), max_bytes_per_vector=args.max_bytes_per_vector,
                                progress=progress)
        entry["ray_init_seconds"] = round(t_ray, 1)
        ray.shutdown()
    entry["wall_seconds"] = round(time.perf_counter() - start, 1)
    entry["process_peak_rss_mb"] = round(peak_rss_mb(), 0)
    (_root(args) / f"stage-{engine}.json").write_text(json.dumps(entry, indent=1))
    print(json.dumps({k: entry.get(k) for k in ("factory", "build_seconds", "stage_seconds", "process_peak_rss_mb",
                                                "part_peak_rss_mb", "parts", "layout")}), flush=True)

def _measure(searcher, queries: np.ndarray, truth: np.ndarray, n_lat: int) -> dict:
    """At the index's tuned defaults: recall@10 and QPS of one batched call (after a warm-up
    call), then single-query latencies (warm)."""
    searcher.knn(queries, 10)  # warm: the rows the shortlists touch are in the page cache
    t = time.perf_counter()
    _, ids = searcher.knn(queries, 10)
    qps = len(queries) / (time.perf_counter() - t)
    lat = []
    for q in queries[:n_lat]:
        t = time.perf_counter()
        searcher.knn(q[None], 10)
        lat.append(time.perf_counter() - t)
    return {"recall": _recall(ids, truth), "qps": qps, "p50_ms": 1000 * float(np.median(lat)),
            "p99_ms": 1000 * float(np.percentile(lat, 99)), "ids": ids}


def _recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth[:, :10])]))


def _cold_ms(coll: Path, queries: np.ndarray) -> tuple[float, float]:
    """Single-query p50/p99 with everything on disk out of the page cache: the index stays in RAM
    (what a server keeps resident); before each query the rows file (and any on-disk lists) is
    unmapped and evicted (``posix_fadvise DONTNEED``), then mapped again (not timed)."""
    from vlsearch.ann.faiss_index import search_parameters
    from vlsearch.ann.refine import DiskRefine
    from vlsearch.store.collection import Collection

    c = Collection.open(coll)
    entry = c.manifest.index
    files = [coll / f for f in (entry.get("rows_file"), entry.get("ivfdata")) if f]
    lat, index = [], c.load_index()
    for q in queries:
        for f in files:
            evict_from_page_cache(f)
        if entry.get("ivfdata"):  # on-disk lists: mapped again after the eviction
            del index
            index = c.load_index()
        refine = DiskRefine.from_entry(coll, entry)
        params = search_parameters(index, entry["nprobe_default"])
        t = time.perf_counter()
        if refine is not None:
            refine.search(index, q[None], 10, entry["k_factor_default"], params)
        else:
            index.search(q[None], 10, params=params)
        lat.append(time.perf_counter() - t)
        del refine
    return 1000 * float(np.median(lat)), 1000 * float(np.percentile(lat, 99))


def _exact_streamed(coll: Path, queries: np.ndarray) -> tuple[np.ndarray, float]:
    """The exact top-10 of the queries, streamed over the collection's shards (fp16 rows as stored),
    and its wall seconds: the ground truth, and the exact search the ANN QPS is compared with."""
    from vlsearch.query.exact import ExactTopK
    from vlsearch.store.collection import Collection

    t = time.perf_counter()
    exact = ExactTopK(queries, 10, "ip")
    for ids, vecs in Collection.open(coll).iter_embeddings(batch_size=65_536):
        exact.add(ids, vecs)
    return exact.result()[1], time.perf_counter() - t


def stage_eval(args: argparse.Namespace) -> dict:
    from vlsearch.query.searcher import Searcher

    data = _dataset(args, log=lambda *a: None)
    root = _root(args)
    truth, exact_s = _exact_streamed(root / "local", data.queries)
    out: dict = {"exact_seconds": exact_s, "exact_qps": len(data.queries) / exact_s,
                 "truth_vs_generated": _recall(truth, data.gt_ids)}
    print(json.dumps(out), flush=True)
    for name in ("local", "ray"):  # cold first: no other mapping of the files may exist
        out[f"{name}_cold"] = _cold_ms(root / name, data.queries[:50])
        searcher = Searcher.open(root / name)
        out[name] = _measure(searcher, data.queries, truth, args.latency_queries)
        searcher.close()
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "ids"}), out[f"{name}_cold"], flush=True)
    out["same_top10"] = float(np.mean([set(a) == set(b) for a, b in zip(out["local"]["ids"], out["ray"]["ids"])]))
    kept = {k: ({x: y for x, y in v.items() if x != "ids"} if isinstance(v, dict) else v) for k, v in out.items()}
    (root / "stage-eval.json").write_text(json.dumps(kept, indent=1))  # the figures, without the ids
    return out


def _build_rows(args: argparse.Namespace, entries: dict, n: int) -> list[list]:
    rows = []
    for name, e in entries.items():
        disk = sum((_root(args) / name / f).stat().st_size for f in ("index.faiss", e["rows_file"], e.get("rows_ids_file"))
                   if f)
        label = "local" if name == "local" else f"Ray, {e['parts']} parts / {args.actors} actors, merged on disk"
        worker = e.get("part_peak_rss_mb")
        rows.append([label, round(e["wall_seconds"]), round(e["stage_seconds"]["train"]), round(e["stage_seconds"]["add"]),
                     f"{e['process_peak_rss_mb']:,.0f}", "-" if worker is None else f"{worker:,.0f}",
                     e["resident_bytes_per_vector"], round(disk / n, 1)])
    return rows


def report(args: argparse.Namespace, ev: dict) -> str:
    root = _root(args)
    entries = {k: json.loads((root / f"stage-{k}.json").read_text()) for k in ("local", "ray")}
    loc, ray = entries["local"], entries["ray"]
    n = loc["ntotal"]
    build = markdown_table(["build", "wall s", "train s", "add s (parts + merge)", "peak RSS driver MB",
                            "peak RSS per worker MB", "resident B/vector", "disk B/vector (index + rows file)"],
                           _build_rows(args, entries, n))
    search = markdown_table(
        ["index", "defaults nprobe / k_factor", "recall@10", "QPS (1000-query batch)", "x exact QPS",
         "p50 / p99 ms warm", "p50 / p99 ms cold"],
        [[k, f"{e['nprobe_default']} / {e['k_factor_default']}", round(ev[k]["recall"], 4), round(ev[k]["qps"]),
          round(ev[k]["qps"] / ev["exact_qps"], 1), f"{ev[k]['p50_ms']:.2f} / {ev[k]['p99_ms']:.2f}",
          f"{ev[k + '_cold'][0]:.2f} / {ev[k + '_cold'][1]:.2f}"] for k, e in entries.items()])
    load = os.getloadavg()
    what = "the auto plan at the build defaults" if args.factory == "auto" else f"`{args.factory}`"
    return (f"## bench_ray: {what}, Ray (on-disk merge) vs local — {n:,} x 512 synthetic\n\n"
            f"`{args.factory}` plan, the build defaults (`--max-memory {args.max_memory}`"
            + (f", `--max-bytes-per-vector {args.max_bytes_per_vector}`" if args.max_bytes_per_vector else "")
            + f"), seed 0: **`{loc['factory']}`** (local) and **`{ray['factory']}`** (Ray); queries are the "
            f"{len(ev['local']['ids']):,} held-out queries of the \"real\"-fitted generator, not in the index, searched "
            "at each build's tuned defaults. Ground truth and the exact baseline: an exact top-10 streamed over "
            f"the shards, one batch of all queries, {ev['exact_seconds']:.0f} s = {ev['exact_qps']:.1f} QPS "
            f"(it agrees with the generator's own ground truth at {ev['truth_vs_generated']:.4f}). "
            f"Ray: a local instance with {args.actors} CPUs on this machine (startup {ray.get('ray_init_seconds')} s, "
            "in the wall time); parts add to plain 4-bit IVFPQ copies of the trained index and write their rows into "
            "the build's rows file; the driver merges them through an on-disk lists file "
            "(`faiss.contrib.ondisk.merge_ondisk`) and reads that into the fast-scan layout. Peak RSS is each "
            "process's VmHWM (driver: the build process; worker: the largest Ray worker). Cold: the index in RAM, "
            "the rows file unmapped and evicted (`posix_fadvise DONTNEED`) before each of 50 single queries (this "
            "VM's virtual disk may still be cached by its host).\n\n"
            f"{build}\n\n{search}\n\nSame top-10 ids, local vs Ray: {ev['same_top10']:.4f} of queries.\n\n"
            f"Machine: {machine()}. Load average at the end: {load[0]:.1f}; ratios measured in one run.\n"
            f"Command: `{command_line()}` (without `--stage`: data, local, ray, eval in that order, each in its own "
            "process; `--stage` reruns one).")


def main() -> None:
    args = _args()
    if args.stage == "all":
        for stage in ("data", "local", "ray", "eval"):
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--stage", stage], check=True)
        return
    if args.stage == "data":  # its own process: writing the memory-mapped set would count in a build's peak RSS
        _dataset(args)
        return
    if args.stage in ("local", "ray"):
        stage_build(args, args.stage)
        return
    body = report(args, stage_eval(args))
    print(body)
    if not args.no_write:
        plan = "" if args.factory != "auto" else "_auto"  # keeps each size and the earlier fixed-factory runs
        write_section(f"bench_ray{plan}" if args.n == 1_000_000 else f"bench_ray{plan}_n{args.n}", body)

if __name__ == "__main__":
    main()
