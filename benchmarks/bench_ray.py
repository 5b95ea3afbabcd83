"""Distributed index build on Ray vs the single-machine build, merged into on-disk inverted lists.

The simulation that docs/scale.md extrapolates from. On the cached synthetic collection
(``benchmarks/synthetic.py``: N x 512 CLIP-like vectors, 50k-row shards, exact top-100 of 1000
held-out queries) it builds the same factory (default ``IVF1024,PQ64``: plain 8-bit PQ codes,
which on-disk inverted lists can hold) with the same seed twice:

- ``local``: :func:`indexing.build.build_index` in one process, inverted lists in RAM;
- ``ray``: :func:`indexing.ray_engine.build_index_ray` with ``--parts`` parts on a local Ray
  instance (``--actors`` CPUs), merged into ``index-*.ivfdata`` (on-disk lists).

Each stage runs in its own process (``--stage data|local|ray|eval``; ``--stage all`` runs them
in order) so every peak RSS belongs to that stage alone (``data`` generates the set once: its
memory-mapped writes would otherwise count in the first build's peak). ``eval`` measures recall@10 against the
exact top-10 and QPS (1000-query batches; single-query p50 latency) for both indexes at the same
nprobe values, with the on-disk lists warm (page cache) and cold (evicted with
``posix_fadvise(DONTNEED)`` before each query), and writes the ``bench_ray`` section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import command_line, machine, markdown_table, write_section
from benchmarks.synthetic import DEFAULT_DIR, SyntheticData, dataset_dir, load_dataset, make_dataset


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--factory", default="IVF1024,PQ64")
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=50_000, help="rows per collection shard (parts group shards)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--nprobes", default="8,16,32,64")
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

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def stage_build(args: argparse.Namespace, engine: str) -> None:
    coll = _collection_copy(args, engine)
    start = time.perf_counter()
    if engine == "local":
        from indexing.build import build_index

        entry = build_index(coll, args.factory, max_memory="8GB", seed=0)
    else:
        import ray

        from indexing.ray_engine import RayConfig, build_index_ray

        ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)
        t_ray = time.perf_counter() - start
        entry = build_index_ray(coll, args.factory, max_memory="8GB", seed=0, parts=args.parts, on_disk=True,
                                ray_config=RayConfig(actors=args.actors))
        entry["ray_init_seconds"] = round(t_ray, 1)
        ray.shutdown()
    entry["wall_seconds"] = round(time.perf_counter() - start, 1)
    entry["process_peak_rss_mb"] = round(_peak_rss_mb(), 0)
    (_root(args) / f"stage-{engine}.json").write_text(json.dumps(entry, indent=1))
    print(json.dumps({k: entry.get(k) for k in ("factory", "build_seconds", "stage_seconds", "process_peak_rss_mb",
                                                "part_peak_rss_mb", "parts", "layout")}), flush=True)

def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)

def _measure(searcher, queries: np.ndarray, gt: np.ndarray, nprobe: int, n_lat: int) -> dict:
    """recall@10 and QPS of one batched call, then single-query latencies (warm)."""
    t = time.perf_counter()
    _, ids = searcher.knn(queries, 10, nprobe=nprobe)
    qps = len(queries) / (time.perf_counter() - t)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, gt[:, :10])]))
    lat = []
    for q in queries[:n_lat]:
        t = time.perf_counter()
        searcher.knn(q[None], 10, nprobe=nprobe)
        lat.append(time.perf_counter() - t)
    return {"recall": recall, "qps": qps, "p50_ms": 1000 * float(np.median(lat)), "p99_ms": 1000 * float(np.percentile(lat, 99))}


def _cold_p50_ms(coll: Path, ivfdata: Path, queries: np.ndarray, nprobe: int) -> float:
    """Single-query latency with the on-disk lists out of the page cache: the index is unmapped,
    the file evicted (``posix_fadvise DONTNEED``), mapped again (not timed), then one query timed."""
    from vlsearch.ann.faiss_index import search_parameters

    lat = []
    for q in queries:
        _evict(ivfdata)
        index = coll.load_index()
        params = search_parameters(index, nprobe=nprobe)
        t = time.perf_counter()
        index.search(q[None], 10, params=params)
        lat.append(time.perf_counter() - t)
        del index
    return 1000 * float(np.median(lat))


def stage_eval(args: argparse.Namespace) -> dict:
    from vlsearch.query.searcher import Searcher

    data = _dataset(args, log=lambda *a: None)
    root = _root(args)
    nprobes = [int(p) for p in args.nprobes.split(",")]
    ivfdata = root / "ray" / json.loads((root / "ray" / "manifest.json").read_text())["index"]["ivfdata"]
    # cold first: no other mapping of the lists may exist, or the kernel keeps their pages cached
    cold = {p: _cold_p50_ms(root / "ray", ivfdata, data.queries[:50], p) for p in nprobes}
    local, ray_built = Searcher.open(root / "local"), Searcher.open(root / "ray")
    rows = []
    for nprobe in nprobes:
        a = _measure(local, data.queries, data.gt_ids, nprobe, args.latency_queries)
        b = _measure(ray_built, data.queries, data.gt_ids, nprobe, args.latency_queries)
        _, ia = local.knn(data.queries, 10, nprobe=nprobe)
        _, ib = ray_built.knn(data.queries, 10, nprobe=nprobe)
        rows.append({"nprobe": nprobe, "local": a, "ray_ondisk": b, "ray_ondisk_cold": {"p50_ms": cold[nprobe]},
                     "same_top10": float(np.mean([set(x) == set(y) for x, y in zip(ia, ib)]))})
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def report(args: argparse.Namespace, evaluation: dict) -> str:
    root = _root(args)
    loc = json.loads((root / "stage-local.json").read_text())
    ray = json.loads((root / "stage-ray.json").read_text())
    n = loc["ntotal"]
    disk = {k: (root / k / "index.faiss").stat().st_size for k in ("local", "ray")}
    disk["ray"] += ray["ivfdata_bytes"]
    build = markdown_table(
        ["build", "wall s", "train s", "add s (parts + merge)", "peak RSS driver MB", "peak RSS per worker MB",
         "index bytes/vector (file)", "payload bytes/vector"],
        [["local, lists in RAM", loc["wall_seconds"], loc["stage_seconds"]["train"], loc["stage_seconds"]["add"],
          loc["process_peak_rss_mb"], "-", round(disk["local"] / n, 1), loc["bytes_per_vector"]],
         [f"Ray, {ray['parts']} parts / {args.actors} actors, merged on disk", ray["wall_seconds"],
          ray["stage_seconds"]["train"], ray["stage_seconds"]["add"], ray["process_peak_rss_mb"],
          ray["part_peak_rss_mb"], round(disk["ray"] / n, 1), ray["bytes_per_vector"]]])
    rows = []
    for r in evaluation["rows"]:
        rows.append([r["nprobe"], r["local"]["recall"], r["ray_ondisk"]["recall"], r["same_top10"],
                     round(r["local"]["qps"]), round(r["ray_ondisk"]["qps"]), round(r["local"]["p50_ms"], 2),
                     round(r["ray_ondisk"]["p50_ms"], 2), round(r["ray_ondisk_cold"]["p50_ms"], 2)])
    search = markdown_table(["nprobe", "recall@10 local", "recall@10 Ray", "same top-10 ids", "QPS local (RAM)",
                             "QPS Ray (on-disk, warm)", "p50 ms RAM", "p50 ms on-disk warm", "p50 ms on-disk cold"],
                            rows)
    load = os.getloadavg()
    return (f"## bench_ray: distributed build (Ray, on-disk merge) vs single machine — {n:,} x 512 synthetic\n\n"
            f"Factory `{args.factory}`, seed 0, tuned nprobe {loc['nprobe_default']} (local) / "
            f"{ray['nprobe_default']} (Ray). Ray: a local instance with {args.actors} CPUs on this machine "
            f"(startup {ray.get('ray_init_seconds')} s, not in the build time); parts write to the collection "
            "folder (the shared filesystem of a cluster), the driver merges them with "
            "`faiss.contrib.ondisk.merge_ondisk`. Latency: single queries, 1 query at a time; cold = the "
            ".ivfdata file unmapped and evicted from the page cache (`posix_fadvise DONTNEED`) before each of 50 "
            "queries (this VM's virtual disk may still be cached by its host).\n\n"
            f"{build}\n\n{search}\n\n"
            f"Machine: {machine()}. Load average at the end: {load[0]:.1f}"
            + (" (above the 2 cores: the 1-minute average still counts the stage before this one, or other jobs)"
               if load[0] > 2.5 else "")
            + "; ratios measured in one run.\n"
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
        write_section("bench_ray" if args.n == 1_000_000 else f"bench_ray_n{args.n}", body)  # keeps each size

if __name__ == "__main__":
    main()
