"""A reproducible synthetic embedding collection for index and search benchmarks.

``make_dataset(n, dim, n_queries, seed, out_dir)`` writes a real vlsearch collection of ``n``
L2-normalised ``dim``-d vectors (fake image paths, model ``synthetic``), ``n_queries`` held-out
queries from the same distribution, and their exact inner-product top-100 against the stored
(float16-rounded) vectors. Everything is cached under ``out_dir`` (default ``bench-data/``,
gitignored) and generated once: a second call returns immediately.

The generative model imitates what CLIP-like image embeddings look like:

* an anisotropic space: a random orthonormal basis with a power-law variance spectrum
  ``lambda_i ∝ (1 + i) ** -1`` (the top quarter of the dimensions hold ~80 % of the variance,
  as for real CLIP embeddings), instead of isotropic noise, which no real model produces;
* a "cone": every vector shares a common mean direction (weight 0.4), as CLIP embeddings do;
* ``n_centres`` (default 4,096) semantic clusters with log-normal (skewed) sizes;
* points = normalise(centre + 0.7 * anisotropic noise of unit expected norm), so a point's
  cosine to its centre is ~0.8 and its nearest neighbours are a mix of its own cluster and
  neighbouring ones (a realistic, not trivially separable, ANN problem).

Rows are generated in fixed chunks of 100,000 from ``(seed, chunk)`` seeds, so the first 100k
rows of the 1M set equal the 100k set. Queries use their own seed stream and are not in the base.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "bench-data"
CHUNK = 100_000
GT_K = 100


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the generative model (documented in the module docstring)."""

    dim: int = 512
    n_centres: int = 4096
    spectrum_decay: float = 1.0
    cone: float = 0.4
    noise: float = 0.7
    size_sigma: float = 1.0


@dataclass(frozen=True)
class SyntheticData:
    """Paths and arrays of a generated dataset."""

    collection: Path
    queries: np.ndarray  # (n_queries, dim) float32, unit norm
    gt_scores: np.ndarray  # (n_queries, 100) float32, exact inner products, descending
    gt_ids: np.ndarray  # (n_queries, 100) int64 collection ids

    def base_vectors(self) -> np.ndarray:
        """All base vectors as float32 (as stored: float16-rounded), from the cached .npy."""
        return np.load(self.collection.parent / "base_f16.npy", mmap_mode="r").astype(np.float32)


class _Model:
    def __init__(self, spec: SyntheticSpec, seed: int):
        rng = np.random.default_rng([seed, 0xC0FFEE])
        d = spec.dim
        self.spec = spec
        self.basis = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
        lam = (1.0 + np.arange(d)) ** -spec.spectrum_decay
        self.scale = np.sqrt(lam / lam.sum()).astype(np.float32)  # noise of unit expected norm
        mean = rng.standard_normal(d).astype(np.float32)
        self.mean = mean / np.linalg.norm(mean)
        centres = _normalise(self._aniso(rng, spec.n_centres))
        self.centres = _normalise(spec.cone * self.mean + (1 - spec.cone) * centres)
        w = np.exp(spec.size_sigma * rng.standard_normal(spec.n_centres))
        self.weights = w / w.sum()

    def _aniso(self, rng: np.random.Generator, n: int) -> np.ndarray:
        z = rng.standard_normal((n, self.spec.dim), dtype=np.float32) * self.scale
        return z @ self.basis.T

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        labels = rng.choice(self.spec.n_centres, size=n, p=self.weights)
        return _normalise(self.centres[labels] + self.spec.noise * self._aniso(rng, n))


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def dataset_dir(n: int, dim: int, n_queries: int, seed: int, out_dir: str | os.PathLike | None,
                variant: str = "") -> Path:
    return Path(out_dir or DEFAULT_DIR) / f"synthetic-n{n}-d{dim}-q{n_queries}-s{seed}{variant}"


def _no_columns(ids: np.ndarray) -> dict:
    return {}


def make_dataset(
    n: int = 1_000_000,
    dim: int = 512,
    n_queries: int = 1000,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    shard_size: int = 50_000,
    log=print,
    columns: Callable[[np.ndarray], dict] = _no_columns,
    variant: str = "",
) -> Path:
    """Generate (once) and return the path of the synthetic collection; see the module doc.

    ``columns(ids)`` may add metadata columns (name -> Arrow array) to each image shard; a dataset
    with extra columns is cached under its own ``variant`` suffix.
    """
    root = dataset_dir(n, dim, n_queries, seed, out_dir, variant)
    if (root / "info.json").is_file():
        return root / "collection"
    import faiss
    import pyarrow as pa

    from vlsearch.collection import Collection, Manifest, embedding_array
    from vlsearch.modelinfo import ModelInfo

    if root.exists():  # an interrupted generation: start over
        import shutil

        shutil.rmtree(root)
    spec = SyntheticSpec(dim=dim)
    model = _Model(spec, seed)
    queries = model.sample(np.random.default_rng([seed, 0x9E7]), n_queries)
    coll = Collection.create(root / "collection", Manifest(
        model=ModelInfo("synthetic", None, dim), shard_size=shard_size,
        source={"kind": "synthetic", "n": n, "seed": seed, "spec": spec.__dict__}))
    heap = faiss.ResultHeap(n_queries, GT_K, keep_max=True)
    base = np.lib.format.open_memmap(root / "base_f16.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        x16 = model.sample(np.random.default_rng([seed, start // CHUNK]), stop - start).astype(np.float16)
        base[start:stop] = x16
        x = x16.astype(np.float32)
        scores, idx = faiss.knn(queries, x, min(GT_K, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        if idx.shape[1] < GT_K:  # tiny datasets: pad so every chunk adds (nq, GT_K)
            pad = GT_K - idx.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1 - start)
        heap.add_result(scores, idx + start)
        for s0 in range(start, stop, shard_size):
            s1 = min(stop, s0 + shard_size)
            ids = np.arange(s0, s1, dtype=np.int64)
            coll.write_shard(s0 // shard_size, pa.table({
                "id": ids,
                "path": pa.array([f"synthetic/{i:08d}.jpg" for i in ids]),
                "width": pa.array(np.full(len(ids), 224, np.int32)),
                "height": pa.array(np.full(len(ids), 224, np.int32)),
                "captions": pa.array([[] for _ in ids], type=pa.list_(pa.string())),
                **columns(ids),
                "embedding": embedding_array(x16[s0 - start:s1 - start]),
            }))
        log(f"synthetic: generated {stop:,}/{n:,}")
    base.flush()
    del base
    heap.finalize()
    n_shards = (n + shard_size - 1) // shard_size
    coll.update_manifest(counts={"images": n, "captions": 0, "failures": 0, "shards": n_shards}, complete=True)
    np.save(root / "queries.npy", queries)
    np.save(root / "gt_scores.npy", heap.D.astype(np.float32))
    np.save(root / "gt_ids.npy", heap.I.astype(np.int64))
    (root / "info.json").write_text(json.dumps({"n": n, "dim": dim, "n_queries": n_queries, "seed": seed,
                                                "spec": spec.__dict__, "gt_k": GT_K}, indent=2))
    return root / "collection"


def load_dataset(n: int = 1_000_000, dim: int = 512, n_queries: int = 1000, seed: int = 0,
                 out_dir: str | os.PathLike | None = None, log=print,
                 columns: Callable[[np.ndarray], dict] = _no_columns, variant: str = "") -> SyntheticData:
    """``make_dataset`` (cached) then load queries and ground truth."""
    coll = make_dataset(n, dim, n_queries, seed, out_dir, log=log, columns=columns, variant=variant)
    root = coll.parent
    return SyntheticData(coll, np.load(root / "queries.npy"), np.load(root / "gt_scores.npy"),
                         np.load(root / "gt_ids.npy"))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Generate the cached synthetic benchmark collection.")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args()
    print(make_dataset(a.n, a.dim, a.queries, a.seed, a.out_dir))
