"""A reproducible synthetic embedding collection for index and search benchmarks.

``make_dataset(n, dim, n_queries, seed, out_dir)`` writes a real vlsearch collection of ``n``
L2-normalised ``dim``-d vectors (fake image paths, model ``synthetic``), ``n_queries`` held-out
queries from the same distribution, and their exact inner-product top-100 against the stored
(float16-rounded) vectors. Everything is cached under ``out_dir`` (default ``bench-data/``,
gitignored) and generated once: a second call returns immediately.

Two generators (``kind``), one generative model:

* a random orthonormal basis with a decaying variance spectrum (never isotropic noise, which no
  real model produces); a "cone": every vector shares a common mean direction; ``n_centres``
  semantic clusters with log-normal (skewed) sizes; points = normalise(centre + noise x
  anisotropic noise of unit expected norm).
* ``"real"`` (default) is **fitted to real embeddings** (:func:`fit`, ``--fit COLLECTION``):
  vlsearch-small on flickr8k-test has a steep spectrum (94 % of the variance in the top 10 % of
  directions; ``lambda_i ∝ exp(-i / (0.036 d))``), a mean direction of norm 0.32 and 64
  clusters explaining its k-means structure; fit and statistics in benchmarks/RESULTS.md.
* ``"hard"`` is the original generator: a slow power-law spectrum ``lambda_i ∝ (1 + i) ** -1``,
  cone 0.4, 4,096 clusters, noise 0.7 — near-tie neighbours on which compact codes struggle. Its
  cached datasets keep their old directory names.

Rows are generated in fixed chunks of 100,000 from ``(seed, chunk)`` seeds, so the first 100k
rows of the 1M set equal the 100k set. Queries use their own seed stream and are not in the base.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "bench-data"
CHUNK = 100_000
GT_K = 100


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the generative model (documented in the module docstring).

    ``spectrum``: ``"power"`` (``lambda_i ∝ (1+i)^-spectrum_decay``, the hard case) or
    ``"stretched"`` (``lambda_i ∝ exp(-(i / (spectrum_tau * dim)) ** spectrum_power) + spectrum_floor``,
    fitted to real embeddings; the scale is relative to ``dim`` so the shape carries across sizes).
    """

    dim: int = 512
    n_centres: int = 4096
    spectrum_decay: float = 1.0
    cone: float = 0.4
    noise: float = 0.7
    size_sigma: float = 1.0
    spectrum: str = "power"
    spectrum_tau: float = 0.046
    spectrum_power: float = 1.25
    spectrum_floor: float = 2e-4

    def eigenvalues(self) -> np.ndarray:
        """The noise variance per principal direction, summing to 1."""
        i = np.arange(self.dim, dtype=np.float64)
        if self.spectrum == "power":
            lam = (1.0 + i) ** -self.spectrum_decay
        elif self.spectrum == "stretched":
            lam = np.exp(-(i / (self.spectrum_tau * self.dim)) ** self.spectrum_power) + self.spectrum_floor
        else:
            raise ValueError(f"unknown spectrum {self.spectrum!r}: power or stretched")
        return lam / lam.sum()


#: ``hard``: the original generator (power-law spectrum, slow decay, near-tie neighbours; compact
#: codes struggle). ``real``: fitted to vlsearch-small embeddings of flickr8k-test (see :func:`fit`
#: and benchmarks/RESULTS.md "Synthetic data fit").
KINDS = {
    "hard": SyntheticSpec(),
    "real": SyntheticSpec(spectrum="stretched", spectrum_tau=0.0356, spectrum_power=1.0, cone=0.3, noise=0.85,
                          n_centres=64),
}


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
        self.scale = np.sqrt(spec.eigenvalues()).astype(np.float32)  # noise of unit expected norm
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
                kind: str = "real", variant: str = "") -> Path:
    prefix = "synthetic" if kind == "hard" else f"synthetic-{kind}"  # "hard" keeps its old cache name
    return Path(out_dir or DEFAULT_DIR) / f"{prefix}-n{n}-d{dim}-q{n_queries}-s{seed}{variant}"


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
    kind: str = "real",
    columns: Callable[[np.ndarray], dict] = _no_columns,
    variant: str = "",
) -> Path:
    """Generate (once) and return the path of the synthetic collection; see the module doc.

    ``kind``: ``"real"`` (fitted to real embeddings) or ``"hard"`` (the original generator).
    ``columns(ids)`` may add metadata columns (name -> Arrow array) to each image shard; a dataset
    with extra columns is cached under its own ``variant`` suffix.
    """
    root = dataset_dir(n, dim, n_queries, seed, out_dir, kind, variant)
    if (root / "info.json").is_file():
        return root / "collection"
    import faiss
    import pyarrow as pa

    from vlsearch.store.collection import Collection
    from vlsearch.store.manifest import Manifest
    from vlsearch.store.arrays import embedding_array
    from vlsearch.core.modelinfo import ModelInfo

    if root.exists():  # an interrupted generation: start over
        import shutil

        shutil.rmtree(root)
    spec = replace(KINDS[kind], dim=dim)
    model = _Model(spec, seed)
    queries = model.sample(np.random.default_rng([seed, 0x9E7]), n_queries)
    coll = Collection.create(root / "collection", Manifest(
        model=ModelInfo("synthetic", None, dim), shard_size=shard_size,
        source={"kind": "synthetic", "generator": kind, "n": n, "seed": seed, "spec": spec.__dict__}))
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
    (root / "info.json").write_text(json.dumps({"n": n, "dim": dim, "n_queries": n_queries, "seed": seed, "kind": kind,
                                                "spec": spec.__dict__, "gt_k": GT_K}, indent=2))
    return root / "collection"


def embedding_stats(x: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Statistics the generator is fitted on (unit vectors ``x``, ~1,000 rows).

    ``mean_norm`` (the cone), ``top10_var`` / ``participation`` (spectrum: variance share of the
    top 10 % principal directions, participation ratio / dim), ``nn1_cos`` / ``nn10_cos`` (mean
    cosine to the 1st / 10th neighbour in the sample) and ``kmeans32`` (variance explained by 32
    k-means clusters: the cluster structure).
    """
    import faiss

    x = np.asarray(x, np.float32)
    n, d = x.shape
    xc = x - x.mean(0)
    ev = np.clip(np.linalg.eigvalsh(np.cov(xc.T))[::-1], 0, None)
    ev = ev / ev.sum()
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    nn = -np.sort(-sims, axis=1)[:, :10]
    km = faiss.Kmeans(d, 32, niter=20, seed=seed + 1)
    km.train(xc)
    within, _ = km.index.search(xc, 1)
    return {"mean_norm": float(np.linalg.norm(x.mean(0))), "top10_var": float(ev[: max(1, d // 10)].sum()),
            "participation": float(1 / np.sum(ev ** 2) / d), "nn1_cos": float(nn[:, 0].mean()),
            "nn10_cos": float(nn[:, 9].mean()), "kmeans32": float(1 - within.sum() / (xc ** 2).sum())}


def fit_spectrum(x: np.ndarray) -> tuple[float, float]:
    """(tau relative to dim, power) of ``exp(-(i/(tau*d))**power)`` fitted to the top of ``x``'s spectrum."""
    d = x.shape[1]
    ev = np.linalg.eigvalsh(np.cov((x - x.mean(0)).T))[::-1]
    ev = ev / ev[0]
    i = np.arange(d)
    keep = (i > 0) & (ev > 1e-3) & (ev < 0.9)  # -ln(ev) = (i/tau)^p  ->  ln(-ln ev) = p ln i - p ln tau
    power, icept = np.polyfit(np.log(i[keep]), np.log(-np.log(ev[keep])), 1)
    return float(np.exp(-icept / power) / d), float(power)


def fit(real: np.ndarray, seed: int = 0) -> tuple[SyntheticSpec, dict[str, float], dict[str, float]]:
    """Fit ``KINDS["real"]``-style parameters to real embeddings: the spectrum by least squares,
    then cone / noise / n_centres by a grid search on the statistics of a same-size sample in the
    same dimension. Returns (spec at the real dimension, real stats, fitted stats)."""
    target = embedding_stats(real, seed)
    tau, power = fit_spectrum(real)
    n, d = real.shape
    keys = ("mean_norm", "nn1_cos", "nn10_cos", "kmeans32", "top10_var")
    best = None
    for n_centres in (64, 256, 1024, 4096):
        for cone in (0.2, 0.3, 0.35, 0.4, 0.5):
            for noise in (0.4, 0.55, 0.7, 0.85, 1.0, 1.2):
                spec = SyntheticSpec(dim=d, n_centres=n_centres, cone=cone, noise=noise, spectrum="stretched",
                                     spectrum_tau=tau, spectrum_power=power)
                got = embedding_stats(_Model(spec, seed).sample(np.random.default_rng([seed, 1]), n), seed)
                err = sum(((got[k] - target[k]) / max(abs(target[k]), 1e-3)) ** 2 for k in keys)
                if best is None or err < best[0]:
                    best = (err, spec, got)
    return best[1], target, best[2]


def load_dataset(n: int = 1_000_000, dim: int = 512, n_queries: int = 1000, seed: int = 0,
                 out_dir: str | os.PathLike | None = None, log=print, kind: str = "real",
                 columns: Callable[[np.ndarray], dict] = _no_columns, variant: str = "") -> SyntheticData:
    """``make_dataset`` (cached) then load queries and ground truth."""
    coll = make_dataset(n, dim, n_queries, seed, out_dir, log=log, kind=kind, columns=columns, variant=variant)
    root = coll.parent
    return SyntheticData(coll, np.load(root / "queries.npy"), np.load(root / "gt_scores.npy"),
                         np.load(root / "gt_ids.npy"))


def _report_fit(collection: str, seed: int) -> None:
    """Fit the generator to a collection's image embeddings; print and record real vs synthetic stats."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._results import command_line, markdown_table, write_section
    from vlsearch.store.collection import Collection

    coll = Collection.open(collection)
    real = coll.read_embeddings()[1][:1000]
    spec, target, got = fit(real, seed)
    rows = [["real: " + f"{coll.model.name} ({coll.model.pretrained}) on {Path(collection).name}, {real.shape[1]}-d", *target.values()],
            [f"fitted generator, {real.shape[1]}-d", *got.values()]]
    for name in ("real", "hard"):
        s512 = replace(spec if name == "real" else KINDS["hard"], dim=512)
        rows.append([f"'{name}' generator, 512-d", *embedding_stats(_Model(s512, seed).sample(
            np.random.default_rng([seed, 1]), len(real)), seed).values()])
    params = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in spec.__dict__.items() if k != "dim"}
    body = "\n".join([
        "## Synthetic data fit (`benchmarks/synthetic.py --fit`)\n",
        f"Command: `{command_line()}`. Statistics of {len(real):,} vectors each (see `embedding_stats`).\n",
        markdown_table(["vectors", *target.keys()], [[r[0], *(round(v, 3) for v in r[1:])] for r in rows]),
        f"\nFitted parameters: `{params}`. The 'real' generator (`KINDS['real']`) uses them with the spectrum "
        "scale relative to the dimension; 'hard' is the original generator (slow power-law spectrum)."])
    print(body)
    write_section("synthetic_fit", body)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Generate the cached synthetic benchmark collection.")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--kind", choices=sorted(KINDS), default="real")
    ap.add_argument("--fit", metavar="COLLECTION", help="fit the 'real' generator to this collection's embeddings "
                    "and write the comparison to RESULTS.md (instead of generating)")
    a = ap.parse_args()
    if a.fit:
        _report_fit(a.fit, a.seed)
    else:
        print(make_dataset(a.n, a.dim, a.queries, a.seed, a.out_dir, kind=a.kind))
