"""Recall@10 of IVF-PQ shortlists with a full-dimension refine code, on the cached synthetic set.

Measures what ``indexing.build``'s auto policy trades: the refine code's size vs recall, with
per-call ``IndexRefineSearchParameters`` (nprobe, k_factor). Needs the dataset that
``benchmarks/synthetic.py`` caches (``bench_index.py --n 100000`` creates it).

    python benchmarks/refine_probe.py --n 100000 "IVF1024,PQ64x4fs,Refine(SQ8)" "IVF1024,PQ32x4fs,Refine(SQ4)"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402
from benchmarks.synthetic import load_dataset  # noqa: E402


def probe(factory: str, base: np.ndarray, queries: np.ndarray, gt: np.ndarray, train_size: int,
          nprobes: list[int], k_factors: list[float], seed: int) -> list[list[object]]:
    start = time.perf_counter()
    index = faiss.index_factory(base.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    index.train(base[rng.choice(len(base), min(train_size, len(base)), replace=False)])
    index.add(base)
    build = time.perf_counter() - start
    rows = []
    for nprobe in nprobes:
        for kf in k_factors:
            params = faiss.IndexRefineSearchParameters(
                k_factor=kf, base_index_params=faiss.SearchParametersIVF(nprobe=nprobe))
            t = time.perf_counter()
            _, ids = index.search(queries, 10, params=params)
            qps = len(queries) / (time.perf_counter() - t)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, gt[:, :10])])
            rows.append([factory, round(build, 1), nprobe, kf, round(float(recall), 3), round(qps)])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("factories", nargs="+")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--nprobes", default="16,32,64,128")
    ap.add_argument("--k-factors", default="10,20")
    ap.add_argument("--train-size", type=int, default=65_536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", default="real", help="synthetic generator: real (fitted) or hard")
    args = ap.parse_args()
    data = load_dataset(n=args.n, kind=args.kind)
    base = np.asarray(data.base_vectors(), dtype=np.float32)
    rows = []
    for factory in args.factories:
        rows += probe(factory, base, data.queries, data.gt_ids, args.train_size,
                      [int(x) for x in args.nprobes.split(",")], [float(x) for x in args.k_factors.split(",")],
                      args.seed)
    table = markdown_table(["factory", "build s", "nprobe", "k_factor", "recall@10", "batched QPS"], rows)
    print(table)
    write_section("refine_probe", f"## Refine codes vs recall (`benchmarks/refine_probe.py`)\n\n{machine()}; "
                  f"synthetic '{args.kind}' {args.n:,} x 512, {len(data.queries)} queries, exact top-10 as truth.\n\n"
                  f"`{command_line()}`\n\n{table}\n")


if __name__ == "__main__":
    main()
