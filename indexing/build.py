"""Build the FAISS index of a collection: choose, train, stream-add, tune nprobe, write atomically.

``build_index(collection_dir)`` reads the collection's image embeddings shard by shard and writes
``index.faiss`` beside them; FAISS ids are the collection's image ids. The chosen factory string,
the reasons for it, nlist, code size, training sample size, build time, peak memory and the
measured default ``nprobe`` go to ``manifest["index"]``. Steps:

1. **Plan** (``index_type="auto"``, see :mod:`indexing.plan`: :class:`AutoPolicy`, :func:`choose_index`): exact
   ``Flat`` for small collections; above ``flat_max_n`` an IVF index with 4-bit fast-scan PQ codes
   (8-bit PQ on GPU) re-ranked by a compact refine code, sized so that codes + id + refine payload
   stay within ``max_bytes_per_vector`` and the memory budget. Any FAISS factory string can be
   given instead; it is validated against the collection's dimension first.
2. **Sample**: one uniform random sample of row positions over *all* shards (seeded), split into a
   training set (sized from nlist and the PQ codebooks, capped by the budget) and held-out queries.
3. **Train** on that sample (on GPU when ``faiss.get_num_gpus() > 0``; the stored index is CPU).
4. **Add** in batches streamed from the shards with ``add_with_ids`` (IVF) or, for index types
   without id support, plain ``add`` when ids are ``0..N-1`` in order and an ``IDMap2`` wrapper
   otherwise. The exact top-k of the held-out queries is accumulated during the same pass.
5. **Tune**: the smallest ``nprobe`` whose recall@10 against exact search reaches the target
   (0.95) on the held-out queries; both are recorded and ``nprobe`` is stored in the index.
6. **Write** ``index.faiss`` via a temporary file + rename, then the manifest entry. A crash at
   any point before the rename leaves the previous index and its manifest entry untouched.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlsearch.collection import INDEX_FILE, Collection, now_iso
from vlsearch.errors import IndexConfigError
from vlsearch.exact import ExactTopK
from vlsearch.faiss_index import (
    faiss_metric,
    find_ivf,
    find_refine,
    make_index,
    payload_bytes,
    pq_owners,
    set_search_params,
    supports_ids,
    write_index,
    code_size,
)
from vlsearch.metrics import ann_recall
from vlsearch.progress import Progress, no_progress

from .plan import AutoPolicy, IndexPlan, choose_index, gpu_plan, parse_memory

log = logging.getLogger(__name__)

#: Depth of the held-out recall that tunes nprobe.
TUNE_K = 10


def gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


# ---- sampling / streaming ------------------------------------------------------------------------
def sample_positions(n: int, n_train: int, n_eval: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint uniform random row positions (sorted) for training and held-out evaluation."""
    rng = np.random.default_rng(seed)
    take = min(n, n_train + n_eval)
    pos = rng.choice(n, size=take, replace=False)
    n_eval = min(n_eval, max(0, take - min(n_train, take)))
    return np.sort(pos[n_eval:]), np.sort(pos[:n_eval])


def gather_rows(coll: Collection, positions: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """One streaming pass over all shards returning the vectors at each sorted ``positions`` array."""
    out = [np.empty((len(p), coll.dim), np.float32) for p in positions]
    filled = [0] * len(positions)
    start = 0
    for _, vecs in coll.iter_embeddings(batch_size=batch_size):
        stop = start + len(vecs)
        for k, pos in enumerate(positions):
            lo, hi = np.searchsorted(pos, [start, stop])
            if hi > lo:
                out[k][filled[k]:filled[k] + hi - lo] = vecs[pos[lo:hi] - start]
                filled[k] += hi - lo
        start = stop
    return out


def tune_nprobe(index: Any, queries: np.ndarray, truth: np.ndarray, target: float,
                k: int = TUNE_K) -> tuple[int | None, float, dict[int, float]]:
    """Smallest power-of-two nprobe with recall@k >= target; the plateau's start if never reached."""
    ivf = find_ivf(index)
    if ivf is None:
        _, found = index.search(queries, k)
        return None, _recall(found, truth, k), {}
    curve: dict[int, float] = {}
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        _, found = index.search(queries, k)
        curve[nprobe] = _recall(found, truth, k)
        if curve[nprobe] >= target or nprobe >= ivf.nlist:
            break
        nprobe *= 2
    if curve[nprobe] >= target:
        return nprobe, curve[nprobe], curve
    best = max(curve.values())
    chosen = min(p for p, r in curve.items() if r >= best - 0.005)
    return chosen, curve[chosen], curve


def _recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Held-out recall@k over the real exact ids (see :func:`vlsearch.metrics.ann_recall`)."""
    return ann_recall(found, truth, k, denominator="exact")


# ---- training / adding (CPU or GPU) --------------------------------------------------------------
def _train(index: Any, xt: np.ndarray, use_gpu: bool, seed: int) -> None:
    import faiss

    ivf = find_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    for pq in pq_owners(index):
        pq.cp.seed = seed
    if use_gpu and ivf is not None:
        # k-means of the coarse quantizer on the GPU (the dominant training cost), CPU index kept
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    index.train(xt)
    if use_gpu and ivf is not None:
        ivf.clustering_index = None


def _gpu_adder(index: Any, factory: str, dim: int) -> tuple[Any, Callable[[Any], Any]]:
    """Clone a plain GPU-capable IVF index to GPU for adding; returns (index to add to, back-to-CPU)."""
    import faiss

    idx = faiss.downcast_index(index)
    if not isinstance(idx, (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)) \
            or isinstance(idx, faiss.IndexIVFPQFastScan):
        return index, lambda i: i
    co = faiss.GpuClonerOptions()
    co.useFloat16LookupTables = gpu_plan(factory, dim).use_float16_lookup_tables
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, 0, idx, co)
    return gpu_index, lambda g: faiss.index_gpu_to_cpu(g)


def _train_size(index: Any, n: int, dim: int, budget: int, given: int | None, policy: AutoPolicy) -> int:
    """Training points: max(per-centroid need, 256 per PQ centroid...) capped by N, policy and budget."""
    if given is not None:
        if given < 1:
            raise IndexConfigError(f"train_size must be >= 1, got {given}")
        return min(given, n)
    if index.is_trained:
        return 0
    need = 10_000
    ivf = find_ivf(index)
    if ivf is not None:
        need = max(need, policy.train_per_centroid * ivf.nlist)
    for pq in pq_owners(index):
        need = max(need, 256 * pq.ksub)  # FAISS PQ training uses up to 256 points per centroid
    cap = max(1000, budget // (4 * dim * 4))  # the sample takes at most a quarter of the budget
    return int(min(n, need, policy.max_train, cap))


# ---- the builder: plan -> sample -> train -> add -> tune -> record ----------------------------------
@dataclass
class _Timer:
    t0: float = field(default_factory=time.perf_counter)
    stages: dict[str, float] = field(default_factory=dict)
    last: float = 0.0

    def mark(self, name: str) -> None:
        now = time.perf_counter() - self.t0
        self.stages[name] = round(now - self.last, 3)
        self.last = now


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class _Build:
    """What the steps of one build share."""

    coll: Collection
    n: int
    budget: int
    metric: str
    gpu: bool
    policy: AutoPolicy
    progress: Progress
    seed: int
    timer: _Timer
    reasons: list[str] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return int(min(65_536, max(1024, self.budget // (16 * self.coll.dim * 4))))


def build_index(
    collection_dir: str | Path | Collection,
    index_type: str = "auto",
    max_memory: str | int = "4GB",
    metric: str = "ip",
    nprobe_default: int | None = None,
    train_size: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    policy: AutoPolicy = AutoPolicy(),
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    """Build ``index.faiss`` for a collection and return the manifest's ``index`` entry.

    ``index_type``: ``"auto"`` (see :func:`indexing.plan.choose_index`) or any FAISS factory string.
    ``max_memory``: budget for the index being built, the training sample and add batches.
    ``train_size``: training sample size (default: sized from nlist and PQ codebooks).
    ``use_gpu``: default ``faiss.get_num_gpus() > 0``.
    """
    timer = _Timer()
    coll = collection_dir if isinstance(collection_dir, Collection) else Collection.open(collection_dir)
    faiss_metric(metric)
    if nprobe_default is not None and nprobe_default < 1:
        raise IndexConfigError(f"nprobe_default must be >= 1, got {nprobe_default}")
    if coll.count() == 0:
        raise IndexConfigError(f"collection {coll.path} has no embeddings to index")
    b = _Build(coll, coll.count(), parse_memory(max_memory), metric,
               gpu_count() > 0 if use_gpu is None else use_gpu, policy, progress or no_progress, seed, timer)
    plan = _plan(b, index_type)
    index = _make(b, plan)
    n_eval = min(policy.eval_queries, b.n // 10)  # held out of training (still indexed)
    n_train = min(_train_size(index, b.n, coll.dim, b.budget, train_size, policy), b.n - n_eval)
    train_pos, eval_pos = sample_positions(b.n, n_train if index.is_trained is False else 0, n_eval, seed)
    b.progress(0, b.n, stage="sample")
    xt, xq = gather_rows(coll, [train_pos, eval_pos], b.batch)
    b.timer.mark("sample")
    if not index.is_trained:
        b.progress(0, b.n, stage="train")
        _train(index, xt, b.gpu, seed)
    del xt
    b.timer.mark("train")
    index, truth = _add(b, index, plan.factory, xq)
    nprobe, recall, curve = _tune(b, index, xq, truth, nprobe_default)
    return _record(b, index, plan.factory, len(train_pos), len(xq), (nprobe, recall, curve))


def _plan(b: _Build, index_type: str) -> IndexPlan:
    """The index to build: the auto plan or the given factory string, adapted for GPU."""
    dim = b.coll.dim
    if index_type == "auto":
        plan = choose_index(b.n, dim, b.budget, gpu=b.gpu, policy=b.policy)
    else:
        ivf = find_ivf(make_index(index_type, dim, b.metric))
        plan = IndexPlan(index_type.strip(), ivf.nlist if ivf is not None else None, None,
                         ("given explicitly (--index-type)",))
    b.reasons += plan.reasons
    if b.gpu:
        gp = gpu_plan(plan.factory, dim)
        if gp.factory != plan.factory:
            b.reasons += gp.reasons
            plan = IndexPlan(gp.factory, plan.nlist, plan.refine_k_factor, plan.reasons)
    return plan


def _make(b: _Build, plan: IndexPlan) -> Any:
    """The empty index of the plan, refine factor set, wrapped in IDMap2 where ids need it."""
    import faiss

    index = make_index(plan.factory, b.coll.dim, b.metric)
    if find_refine(index) is not None:  # FAISS defaults to k_factor=1: no re-ranking beyond k
        set_search_params(index, k_factor=plan.refine_k_factor or b.policy.refine_k_factor)
    ids_all = b.coll.read_table(columns=["id"]).column("id").to_numpy().astype(np.int64)
    contiguous = bool(np.array_equal(ids_all, np.arange(b.n, dtype=np.int64)))
    if not supports_ids(index) and not contiguous:
        index = faiss.IndexIDMap2(index)
        b.reasons.append("wrapped in IDMap2: this index type cannot store ids and the collection ids are not 0..N-1")
    return index


def _add(b: _Build, index: Any, factory: str, xq: np.ndarray) -> tuple[Any, np.ndarray]:
    """Stream every shard into the index; the exact top-k of the held-out queries in the same pass."""
    exact = ExactTopK(xq, TUNE_K, b.metric)
    target, to_cpu = (_gpu_adder(index, factory, b.coll.dim) if b.gpu else (index, lambda i: i))
    done = 0
    for ids, vecs in b.coll.iter_embeddings(batch_size=b.batch):
        if supports_ids(target):
            target.add_with_ids(vecs, ids)
        else:
            target.add(vecs)
        exact.add(ids, vecs)
        done += len(ids)
        b.progress(done, b.n, stage="add")
    b.timer.mark("add")
    return to_cpu(target), exact.result()[1]


def _tune(b: _Build, index: Any, xq: np.ndarray, truth: np.ndarray,
          nprobe_default: int | None) -> tuple[int | None, float, dict[int, float]]:
    """nprobe: tuned to the target recall, or the given one measured; stored in the index."""
    target = b.policy.target_recall
    if nprobe_default is None:
        nprobe, recall, curve = tune_nprobe(index, xq, truth, target)
    else:
        set_search_params(index, nprobe=nprobe_default)
        _, found = index.search(xq, TUNE_K) if len(xq) else (None, np.zeros((0, TUNE_K), np.int64))
        nprobe, recall, curve = nprobe_default, _recall(found, truth, TUNE_K), {}
    set_search_params(index, nprobe=nprobe)
    b.timer.mark("tune")
    if curve:
        b.reasons.append(f"nprobe={nprobe}: smallest power of two with recall@10 >= {target} on "
                         f"{len(xq)} held-out collection vectors" if recall >= target else
                         f"nprobe={nprobe}: recall@10 target {target} not reached; start of the plateau "
                         f"({recall:.3f})")
    return nprobe, recall, curve


def _record(b: _Build, index: Any, factory: str, n_train: int, n_eval: int,
            tuned: tuple[int | None, float, dict[int, float]]) -> dict[str, Any]:
    """Write the index atomically, then its manifest entry (which is returned)."""
    nprobe, recall, curve = tuned
    ivf, refine = find_ivf(index), find_refine(index)
    entry: dict[str, Any] = {
        "factory": factory,
        "metric": b.metric,
        "nlist": int(ivf.nlist) if ivf is not None else None,
        "nprobe_default": nprobe,
        "refine_k_factor": float(refine.k_factor) if refine is not None else None,
        "code_size": code_size(index),
        "bytes_per_vector": payload_bytes(index),
        "ntotal": int(index.ntotal),
        "train_size": int(n_train),
        "seed": b.seed,
        "recall_at_10": round(float(recall), 4),
        "recall_curve": {str(k): round(v, 4) for k, v in curve.items()},
        "eval_queries": int(n_eval),
        "gpu": bool(b.gpu),
        "reasons": b.reasons,
        "model": b.coll.model.to_dict(),
        "file": INDEX_FILE,
    }
    write_index(index, b.coll.index_path)
    entry["file_bytes"] = b.coll.index_path.stat().st_size
    b.timer.mark("write")
    entry["build_seconds"] = round(time.perf_counter() - b.timer.t0, 2)
    entry["stage_seconds"] = b.timer.stages
    entry["peak_rss_mb"] = round(peak_rss_mb(), 1)
    entry["built_at"] = now_iso()
    b.coll.update_manifest(index=entry)
    log.info("built %s over %d vectors in %.1fs", factory, b.n, entry["build_seconds"])
    return entry
