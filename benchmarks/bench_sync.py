"""Sync cost benchmark: +1 % / -1 % on a 100k-vector collection, index update vs full rebuild.

For each index type, on a fresh copy of a synthetic collection (100,000 x 512, ids hashed from
paths like real ones, ``benchmarks/synthetic.py``'s generative model):

1. ``build_index`` (the reference full rebuild of the index);
2. one version that adds 1 % new vectors and deletes 1 % (``Collection.update``: new shard,
   tombstones, the trained index follows) — wall time;
3. recall@10 of ANN search against exact search over the live rows, after the sync;
4. ``build_index`` again on the synced collection (full rebuild) — wall time, recall@10.

Then the two ways to keep deleted ids out of an IVF index are measured on the same data:
``remove_ids`` (cost at update time) against a tombstone ``IDSelectorNot(IDSelectorBatch)``
passed in every call's ``SearchParameters`` (cost at query time), at 1 % and 10 % deleted.

Vectors, not images: a real sync also hashes changed files and encodes the new images, and a
real full rebuild re-encodes every image (the dominant cost; see bench_encode.py for img/s).

    python benchmarks/bench_sync.py                  # 100k x 512, three index types
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402
from benchmarks.synthetic import DEFAULT_DIR, SyntheticSpec, _Model  # noqa: E402

TYPES = ("Flat", "IVF1024,PQ32x4fs", "IVF1024,PQ64x4fs,Refine(SQ8)")
#: The removable IVF index on which remove_ids and the tombstone selector are compared.
TOMB_FACTORY = "IVF1024,PQ32x4fs"


def make_collection(root: Path, n: int, extra: int, dim: int, seed: int = 0):
    """A finished collection of ``n`` vectors with path-hash ids; returns (path, extra rows, queries)."""
    import pyarrow as pa

    from vlsearch.data.sources import stable_id
    from vlsearch.store.collection import Collection
    from vlsearch.store.manifest import Manifest
    from vlsearch.store.arrays import embedding_array
    from vlsearch.core.modelinfo import ModelInfo

    model = _Model(SyntheticSpec(dim=dim), seed)
    x = model.sample(np.random.default_rng([seed, 1]), n + extra).astype(np.float16)
    queries = model.sample(np.random.default_rng([seed, 2]), 1000)
    ids = np.array([stable_id(f"synthetic/{i:08d}.jpg") for i in range(n + extra)], np.int64)

    def rows(sl: slice) -> pa.Table:
        return pa.table({"id": ids[sl], "path": [f"synthetic/{i:08d}.jpg" for i in range(n + extra)[sl]],
                         "embedding": embedding_array(x[sl])})

    if root.exists():
        shutil.rmtree(root)
    coll = Collection.create(root, Manifest(model=ModelInfo("synthetic", None, dim), shard_size=10_000))
    for k, s in enumerate(range(0, n, 10_000)):
        coll.write_shard(k, rows(slice(s, min(n, s + 10_000))))
    coll.commit_version(counts={"images": n, "captions": 0, "failures": 0, "shards": k + 1}, complete=True)
    return root, rows(slice(n, n + extra)), queries


def recall_vs_exact(path: Path, queries: np.ndarray) -> tuple[float, float]:
    """(recall@10 of the index against exact search over the live rows, batched ANN QPS)."""
    from vlsearch.query.searcher import Searcher

    s = Searcher.open(path)
    _, truth = s.knn(queries, k=10, exact=True)
    t = time.perf_counter()
    _, found = s.knn(queries, k=10)
    qps = len(queries) / (time.perf_counter() - t)
    hits = sum(len(np.intersect1d(f, g)) for f, g in zip(found, truth))
    return hits / truth.size, qps


def run_type(base: Path, work: Path, factory: str, extra_rows, queries: np.ndarray, frac: float) -> list:
    from indexing.build import build_index
    from vlsearch.store.collection import Collection

    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(base, work)
    t = time.perf_counter()
    build_index(work, factory, seed=0)
    build_s = time.perf_counter() - t
    if factory == TOMB_FACTORY:  # kept for tombstones_vs_remove (no second build of it)
        shutil.copytree(work, work.parent / "tombstones")
    coll = Collection.open(work)
    ids = coll.read_table(columns=["id"]).column("id").to_numpy()
    n_change = int(frac * len(ids))
    gone = np.random.default_rng(3).choice(ids, n_change, replace=False)
    t = time.perf_counter()
    with coll.update() as u:
        u.add(extra_rows.slice(0, n_change))
        u.remove(gone)
    sync_s = time.perf_counter() - t
    sync_recall, sync_qps = recall_vs_exact(work, queries)
    t = time.perf_counter()
    build_index(work, factory, seed=0)
    rebuild_s = time.perf_counter() - t
    rebuild_recall, rebuild_qps = recall_vs_exact(work, queries)
    entry = Collection.open(work).manifest.index
    print(f"{factory}: sync {sync_s:.2f}s vs rebuild {rebuild_s:.1f}s (first build {build_s:.1f}s); "
          f"recall@10 {sync_recall:.3f} after sync, {rebuild_recall:.3f} after rebuild", flush=True)
    return [factory, f"{build_s:.1f}", f"{sync_s:.2f}", f"{rebuild_s:.1f}", f"{rebuild_s / sync_s:.0f}x",
            round(sync_recall, 3), round(rebuild_recall, 3), f"{sync_qps:,.0f}", f"{rebuild_qps:,.0f}",
            entry["nprobe_default"]]


def tombstones_vs_remove(work: Path, queries: np.ndarray) -> list:
    """remove_ids at update time against an IDSelector at query time, 1 % and 10 % deleted, on
    the TOMB_FACTORY index ``run_type`` built in ``work``."""
    import faiss

    from vlsearch.store.collection import Collection
    from vlsearch.ann.faiss_index import search_parameters

    coll = Collection.open(work)
    ids = coll.read_table(columns=["id"]).column("id").to_numpy()
    nprobe = coll.manifest.index["nprobe_default"]
    rows = []

    def qps(index, params) -> float:
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            index.search(queries, 10, params=params)
            best = max(best, len(queries) / (time.perf_counter() - t))
        return best

    plain = coll.load_index()
    qps(plain, search_parameters(plain, nprobe))  # warm-up
    for frac in (0.01, 0.10):
        base_qps = qps(plain, search_parameters(plain, nprobe))
        gone = np.random.default_rng(4).choice(ids, int(frac * len(ids)), replace=False)
        index = coll.load_index()
        t = time.perf_counter()
        index.remove_ids(faiss.IDSelectorBatch(gone))
        remove_s = time.perf_counter() - t
        removed_qps = qps(index, search_parameters(index, nprobe))
        t = time.perf_counter()
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(gone))
        selector_s = time.perf_counter() - t
        sel_qps = qps(plain, search_parameters(plain, nprobe, sel=sel))
        print(f"{frac:.0%} deleted: remove_ids {remove_s * 1e3:.1f} ms, then {removed_qps:,.0f} QPS; "
              f"selector built in {selector_s * 1e3:.1f} ms, {sel_qps:,.0f} QPS (no deletion: {base_qps:,.0f})",
              flush=True)
        rows.append([f"{frac:.0%}", f"{remove_s * 1e3:.1f}", f"{removed_qps:,.0f}", f"{selector_s * 1e3:.1f}",
                     f"{sel_qps:,.0f}", f"{base_qps:,.0f}"])
    shutil.rmtree(work)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--frac", type=float, default=0.01, help="Fraction added and fraction deleted.")
    ap.add_argument("--types", nargs="+", default=list(TYPES))
    ap.add_argument("--out-dir", default=str(DEFAULT_DIR / "sync"))
    a = ap.parse_args()
    out = Path(a.out_dir)
    base, extra, queries = make_collection(out / "base", a.n, int(a.frac * a.n) + 1, a.dim)
    shutil.rmtree(out / "tombstones", ignore_errors=True)
    types = a.types if TOMB_FACTORY in a.types else [*a.types, TOMB_FACTORY]
    table = [run_type(base, out / "work", f, extra, queries, a.frac) for f in types]
    shutil.rmtree(out / "work", ignore_errors=True)
    tomb = tombstones_vs_remove(out / "tombstones", queries)
    shutil.rmtree(out, ignore_errors=True)
    body = "\n".join([
        f"## Sync cost: +{a.frac:.0%} / -{a.frac:.0%} on {a.n:,} x {a.dim} (bench_sync.py)", "",
        f"Machine: {machine()}. Shared with other jobs (2 cores, several helpers): ratios measured in one run.",
        f"Command: `{command_line()}`", "",
        "One version that adds and deletes 1 % (new shard + tombstones + the trained index follows: "
        "`remove_ids`, or dead IDMap entries for Refine, then `add_with_ids`) against `build_index` on the "
        "same final collection. Recall@10 of ANN against exact search over the live rows (1,000 queries). "
        "Vectors only: a real sync also hashes changed files and encodes only the new images, a real "
        "rebuild re-encodes every image.", "",
        markdown_table(["index", "first build s", "sync s", "full rebuild s", "rebuild / sync",
                        "recall@10 after sync", "after rebuild", "QPS after sync", "after rebuild", "nprobe"], table),
        "", f"Deleted ids out of an IVF index ({TOMB_FACTORY}, nprobe as tuned, 1,000 batched queries, best of 3):", "",
        markdown_table(["deleted", "remove_ids ms", "QPS after remove_ids", "selector build ms",
                        "QPS with IDSelectorNot(Batch)", "QPS, nothing deleted"], tomb),
        "",
        "Choice: `remove_ids` at update time wherever the index type supports it (IVF, Flat in an IDMap): it "
        "costs milliseconds once, and searches pay nothing afterwards. It is also required for changed "
        "files, which keep their id: an id-based tombstone selector cannot tell a changed file's old "
        "entry from its new one. Refine and HNSW indexes cannot remove: their dead entries get id -1 in the "
        "IDMap and each search passes the selector, until `vlsearch compact`.",
    ])
    write_section("bench_sync", body)
    print(body)


if __name__ == "__main__":
    main()
