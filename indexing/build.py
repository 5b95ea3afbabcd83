"""Build the FAISS index of a collection: choose, train, stream-add, tune nprobe, write atomically.

``build_index(collection_dir)`` reads the collection's image embeddings shard by shard and writes
``index.faiss`` beside them; FAISS ids are the collection's image ids. The chosen factory string,
the reasons for it, nlist, code size, training sample size, build time, peak memory and the
measured default ``nprobe`` go to ``manifest["index"]``. Steps:

1. **Choose** (``index_type="auto"``, see :class:`AutoPolicy` and :func:`choose_index`): exact
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
import math
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlsearch.collection import INDEX_FILE, Collection, now_iso
from vlsearch.errors import CollectionMismatchError, IndexConfigError, IndexNotBuiltError
from vlsearch.fsutil import atomic_path

log = logging.getLogger(__name__)

Progress = Callable[..., None]
METRICS = ("ip", "l2")
#: Code sizes (bytes = M sub-quantizers of 8 bits) that FAISS GPU IVFPQ supports.
GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
#: Above this many bytes per code, GPU IVFPQ needs float16 lookup tables (shared-memory limit).
GPU_FLOAT32_LUT_MAX_M = 48
ID_BYTES = 8


@dataclass(frozen=True)
class AutoPolicy:
    """How ``index_type="auto"`` chooses; every threshold is a field so it can be tested/tuned.

    The defaults come from ``benchmarks/bench_index.py`` (1M x 512 synthetic, 2 CPU cores): see
    ``benchmarks/RESULTS.md``.
    """

    #: Exact search up to this many vectors (~10 ms per single query on 2 cores at 512-d, 100 %
    #: recall; below ~100k an IVF index's training cost and recall loss are not worth it).
    flat_max_n: int = 100_000
    #: nlist = nearest power of two to ``nlist_factor * sqrt(N)``.
    nlist_factor: float = 4.0
    min_nlist: int = 64
    max_nlist: int = 65_536
    #: Per-vector payload cap (codes + id + refine codes); the memory budget may lower it. 1 KiB
    #: leaves room for a full-dimension SQ8 refine code at 512-d: on the 100k x 512 synthetic set
    #: IVF1024,PQ64x4fs,Refine(SQ8) reached recall@10 0.89-0.92 (nprobe 128, k_factor 10-20)
    #: where the 80-byte PQ16x4fs,Refine(PQ64) plan stayed at 0.31-0.41 (benchmarks/refine_probe.py).
    #: Cap it (or --max-memory) for compact indexes.
    max_bytes_per_vector: int = 1024
    #: Largest fast-scan PQ code in bytes (4-bit: 2 sub-quantizers per byte); halved (twice at
    #: most) when that leaves the refine code more room.
    fastscan_bytes: int = 32
    #: Refine stage: the rest of the per-vector payload holds a full-dimension code (SQ8, SQ4 or
    #: 8-bit PQ); candidates re-ranked = ``refine_k_factor * k``.
    refine_k_factor: float = 10.0
    #: Training points per IVF centroid (FAISS warns below 39) and cap on the sample.
    train_per_centroid: int = 64
    max_train: int = 500_000
    #: nprobe tuning: held-out queries and target recall@10 against exact search.
    eval_queries: int = 500
    target_recall: float = 0.95


@dataclass(frozen=True)
class IndexPlan:
    """A chosen index: factory string, its IVF size, and why."""

    factory: str
    nlist: int | None = None
    refine_k_factor: float | None = None
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class GpuPlan:
    """How a factory is adapted for FAISS GPU training/adding (``faiss.GpuClonerOptions``)."""

    factory: str
    use_float16_lookup_tables: bool = False
    reasons: tuple[str, ...] = ()


# ---- budget / factory helpers --------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$", re.I)


def parse_memory(value: str | int | float) -> int:
    """``"4GB"``, ``"512MiB"``, ``"1.5g"`` or a number of bytes -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise IndexConfigError(f"memory budget must be positive, got {value}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise IndexConfigError(f"cannot parse memory budget {value!r} (examples: 4GB, 512MB, 1.5GiB)")
    scale = 1024 ** " kmgt".index(m.group(2).lower() or " ")
    n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise IndexConfigError(f"memory budget must be positive, got {value!r}")
    return n


def _faiss_metric(metric: str) -> int:
    import faiss

    if metric not in METRICS:
        raise IndexConfigError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def make_index(factory: str, dim: int, metric: str = "ip") -> Any:
    """``faiss.index_factory`` with a clear :class:`IndexConfigError` for a bad string."""
    import faiss

    metric_type = _faiss_metric(metric)
    if not isinstance(factory, str) or not factory.strip():
        raise IndexConfigError("index type must be 'auto' or a FAISS factory string such as 'IVF1024,PQ32x4fs'")
    try:
        return faiss.index_factory(dim, factory.strip(), metric_type)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1]
        detail = detail.split(": ", 1)[-1] if "Error" in detail else detail
        raise IndexConfigError(f"invalid FAISS index type {factory!r} for dim {dim}: {detail}") from None


def pow2_near(x: float) -> int:
    return 1 << max(0, round(math.log2(max(1.0, x))))


def auto_nlist(n: int, policy: AutoPolicy = AutoPolicy()) -> int:
    """IVF list count for ``n`` vectors: ~``nlist_factor*sqrt(n)``, a power of two, >= 39 points each."""
    nlist = pow2_near(policy.nlist_factor * math.sqrt(n))
    nlist = min(max(nlist, policy.min_nlist), policy.max_nlist)
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return nlist


def choose_index(n: int, dim: int, budget: int, *, gpu: bool = False,
                 policy: AutoPolicy = AutoPolicy()) -> IndexPlan:
    """The ``auto`` policy: pick a factory string for ``n`` vectors of ``dim`` within ``budget`` bytes."""
    flat_bytes = n * dim * 4
    if n <= policy.flat_max_n and flat_bytes <= budget // 2:
        return IndexPlan("Flat", reasons=(
            f"N={n:,} <= flat_max_n={policy.flat_max_n:,}: exact search is fast enough and has recall 1.0",
            f"Flat needs {flat_bytes / 2**20:.0f} MiB <= half the budget ({budget / 2**20:.0f} MiB)"))
    reasons = [f"N={n:,} > flat_max_n={policy.flat_max_n:,}" if n > policy.flat_max_n else
               f"Flat ({flat_bytes / 2**20:.0f} MiB) exceeds half the budget ({budget / 2**20:.0f} MiB)"]
    nlist = auto_nlist(n, policy)
    reasons.append(f"nlist={nlist}: power of two nearest {policy.nlist_factor:g}*sqrt(N), >= 39 training points per list")
    per_vec = min(policy.max_bytes_per_vector, int(0.8 * budget / max(n, 1)))
    reasons.append(f"per-vector payload <= {per_vec} bytes (max_bytes_per_vector={policy.max_bytes_per_vector}, "
                   f"80% of the {budget / 2**30:.2f} GiB budget over N)")
    room = max(1, per_vec - ID_BYTES)
    if gpu:
        m = max([g for g in GPU_PQ_M if g <= min(policy.fastscan_bytes, room) and dim % g == 0] or [1])
        base, code = f"IVF{nlist},PQ{m}", m
        reasons.append(f"PQ{m} (8-bit, {m} bytes): FAISS GPU has no 4-bit fast-scan; M in its supported set")
    else:
        # the refine code decides the final ranking, the fast-scan code only shortlists: give the
        # refine code as many bytes as possible, then the fast-scan code the largest size that keeps it
        options = []
        for fs in (policy.fastscan_bytes, policy.fastscan_bytes // 2, policy.fastscan_bytes // 4):
            m = _divisor_at_most(dim, 2 * min(fs, room), multiple=2)
            options.append((_refine_code(dim, room - m // 2)[1], m))
        best_ref = max(o[0] for o in options)
        m = max(o[1] for o in options if o[0] == best_ref)
        base, code = f"IVF{nlist},PQ{m}x4fs", m // 2
        reasons.append(f"PQ{m}x4fs: 4-bit fast-scan PQ ({code} bytes), SIMD LUT scan is the fastest CPU IVF code")
    refine, ref_bytes = _refine_code(dim, per_vec - ID_BYTES - code)
    if refine is not None:
        reasons.append(f"Refine({refine}): re-rank {policy.refine_k_factor:g}*k shortlisted candidates with a "
                       f"{ref_bytes}-byte full-dimension code (truncating dimensions, e.g. PCA, loses the small "
                       "differences that order near neighbours)")
        return IndexPlan(f"{base},Refine({refine})", nlist, policy.refine_k_factor, tuple(reasons))
    reasons.append(f"no refine stage: only {per_vec - ID_BYTES - code} bytes/vector left after codes and ids")
    return IndexPlan(base, nlist, None, tuple(reasons))


def _refine_code(dim: int, room: int) -> tuple[str | None, int]:
    """Best full-dimension refine code within ``room`` bytes: SQ8, SQ4, else 8-bit PQ (None if < 8 bytes)."""
    if room >= dim:
        return "SQ8", dim
    if room >= dim // 2:
        return "SQ4", dim // 2
    m = _divisor_at_most(dim, room)
    return (f"PQ{m}", m) if m >= 8 else (None, 0)


def _divisor_at_most(dim: int, m: int, multiple: int = 1) -> int:
    for cand in range(max(1, m), 0, -1):
        if dim % cand == 0 and cand % multiple == 0:
            return cand
    return 1


def gpu_plan(factory: str, dim: int) -> GpuPlan:
    """Map a factory string to one FAISS GPU can train/add: 8-bit PQ, supported M, fp16 LUTs.

    Pure string logic (testable without a GPU). ``PQ{M}x4fs`` becomes ``PQ{M'}`` with the same
    code size when possible (``M' = M/2`` bytes) and a GPU-supported M'.
    """
    reasons: list[str] = []

    def fix(match: re.Match) -> str:
        m = int(match.group(1))
        nbits = int(match.group(2) or 8)
        code = max(1, m * nbits // 8)
        cands = [g for g in GPU_PQ_M if g <= code and dim % g == 0] or [1]
        new = cands[-1]
        reasons.append(f"PQ{m}{'x' + match.group(2) if match.group(2) else ''}{match.group(3) or ''} -> PQ{new}: "
                       "GPU IVFPQ uses 8-bit codes with M in " + ",".join(map(str, GPU_PQ_M)))
        return f"PQ{new}"

    # only the IVF codes (``,PQ..`` after ``IVF..``); a ``Refine(...)`` stage stays on CPU as is
    head, sep, tail = factory.partition(",Refine(")
    head = re.sub(r"(?<=,)PQ(\d+)(?:x(\d+))?(fs)?(?=,|$)", fix, head)
    new = head + sep + tail
    ms = [int(x) for x in re.findall(r"(?<=,)PQ(\d+)(?=,|$)", head)]
    fp16 = any(m > GPU_FLOAT32_LUT_MAX_M for m in ms)
    if fp16:
        reasons.append(f"useFloat16LookupTables: codes above {GPU_FLOAT32_LUT_MAX_M} bytes need fp16 LUTs on GPU")
    return GpuPlan(new, fp16, tuple(reasons))


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


# ---- index structure helpers ---------------------------------------------------------------------
def _downcast(index: Any) -> Any:
    import faiss

    return faiss.downcast_index(index)


def supports_ids(index: Any) -> bool:
    """Whether ``add_with_ids`` works on this (possibly wrapped) index."""
    import faiss

    idx = _downcast(index)
    if isinstance(idx, faiss.IndexPreTransform):
        return supports_ids(idx.index)
    return isinstance(idx, (faiss.IndexIVF, faiss.IndexIDMap, faiss.IndexIDMap2))


def find_ivf(index: Any) -> Any | None:
    """The IVF inside wrappers (PreTransform, IDMap, Refine), or None."""
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def find_refine(index: Any) -> Any | None:
    import faiss

    idx = _downcast(index)
    while True:
        if isinstance(idx, faiss.IndexRefine):
            return idx
        if isinstance(idx, faiss.IndexPreTransform):
            idx = _downcast(idx.index)
        elif isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            idx = _downcast(idx.index)
        else:
            return None


def code_size(index: Any) -> int:
    """Bytes per vector of the primary codes (IVF lists or flat storage)."""
    ivf = find_ivf(index)
    if ivf is not None:
        return int(ivf.code_size)
    idx = _downcast(index)
    inner = find_refine(idx)
    if inner is not None:
        return code_size(inner.base_index)
    while hasattr(idx, "index") and not hasattr(idx, "code_size"):
        idx = _downcast(idx.index)
    return int(getattr(idx, "code_size", 0) or idx.d * 4)


def payload_bytes(index: Any) -> int:
    """Per-vector payload: primary codes + stored ids + refine codes."""
    import faiss

    total = code_size(index)
    idx = _downcast(index)
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)) or find_ivf(index) is not None:
        total += ID_BYTES
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)) and find_ivf(index) is not None:
        total += ID_BYTES  # both the IDMap and the IVF lists store an id
    ref = find_refine(index)
    if ref is not None:
        total += code_size(ref.refine_index) if not isinstance(_downcast(ref.refine_index), faiss.IndexFlat) \
            else ref.d * 4
    return total


def set_search_params(index: Any, nprobe: int | None = None, k_factor: float | None = None) -> None:
    """Set nprobe / refine k_factor wherever they live in the wrapper chain."""
    if nprobe is not None:
        ivf = find_ivf(index)
        if ivf is not None:
            ivf.nprobe = int(nprobe)
    if k_factor is not None:
        ref = find_refine(index)
        if ref is not None:
            ref.k_factor = float(k_factor)


# ---- exact ground truth / recall -----------------------------------------------------------------
class _ExactTopK:
    """Exact top-k of a few queries, accumulated over streamed batches (``faiss.ResultHeap``)."""

    def __init__(self, queries: np.ndarray, k: int, metric: str):
        import faiss

        self.queries, self.k, self.metric = queries, k, metric
        self.heap = faiss.ResultHeap(len(queries), k, keep_max=(metric == "ip"))

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        import faiss

        if len(self.queries) == 0 or len(vecs) == 0:
            return
        k = min(self.k, len(vecs))
        mt = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
        d, i = faiss.knn(self.queries, vecs, k, metric=mt)
        if k < self.k:
            fill = -np.inf if self.metric == "ip" else np.inf
            d = np.pad(d, ((0, 0), (0, self.k - k)), constant_values=fill)
            i = np.pad(i, ((0, 0), (0, self.k - k)), constant_values=-1)
        self.heap.add_result(d, np.where(i >= 0, ids[np.maximum(i, 0)], -1))

    def result(self) -> np.ndarray:
        self.heap.finalize()
        return self.heap.I


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |found[:, :k] ∩ truth[:, :k]| / k."""
    if len(truth) == 0:
        return 1.0
    hits = sum(len(np.intersect1d(f[:k][f[:k] >= 0], t[:k][t[:k] >= 0])) for f, t in zip(found, truth))
    denom = sum(min(k, int((t[:k] >= 0).sum())) for t in truth)
    return hits / max(denom, 1)


def tune_nprobe(index: Any, queries: np.ndarray, truth: np.ndarray, target: float,
                k: int = 10) -> tuple[int | None, float, dict[int, float]]:
    """Smallest power-of-two nprobe with recall@k >= target; the plateau's start if never reached."""
    ivf = find_ivf(index)
    if ivf is None:
        _, found = index.search(queries, k)
        return None, recall_at(found, truth, k), {}
    curve: dict[int, float] = {}
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        _, found = index.search(queries, k)
        curve[nprobe] = recall_at(found, truth, k)
        if curve[nprobe] >= target or nprobe >= ivf.nlist:
            break
        nprobe *= 2
    if curve[nprobe] >= target:
        return nprobe, curve[nprobe], curve
    best = max(curve.values())
    chosen = min(p for p, r in curve.items() if r >= best - 0.005)
    return chosen, curve[chosen], curve


# ---- training / adding (CPU or GPU) --------------------------------------------------------------
def _train(index: Any, xt: np.ndarray, use_gpu: bool, seed: int) -> None:
    import faiss

    ivf = find_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    for pq_owner in _pq_owners(index):
        pq_owner.cp.seed = seed
    if use_gpu and ivf is not None:
        # k-means of the coarse quantizer on the GPU (the dominant training cost), CPU index kept
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    index.train(xt)
    if use_gpu and ivf is not None:
        ivf.clustering_index = None


def _pq_owners(index: Any) -> list[Any]:
    """ProductQuantizers inside the index whose k-means seed we set (reproducible codebooks)."""
    import faiss

    owners = []
    stack = [index]
    while stack:
        idx = _downcast(stack.pop())
        pq = getattr(idx, "pq", None)
        if isinstance(pq, faiss.ProductQuantizer):
            owners.append(pq)
        for attr in ("index", "base_index", "refine_index"):
            sub = getattr(idx, attr, None)
            if sub is not None and isinstance(sub, faiss.Index):
                stack.append(sub)
    return owners


def _gpu_adder(index: Any, factory: str, dim: int) -> tuple[Any, Callable[[Any], Any]]:
    """Clone a plain GPU-capable IVF index to GPU for adding; returns (index to add to, back-to-CPU)."""
    import faiss

    idx = _downcast(index)
    if not isinstance(idx, (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)) \
            or isinstance(idx, faiss.IndexIVFPQFastScan):
        return index, lambda i: i
    co = faiss.GpuClonerOptions()
    co.useFloat16LookupTables = gpu_plan(factory, dim).use_float16_lookup_tables
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, 0, idx, co)
    return gpu_index, lambda g: faiss.index_gpu_to_cpu(g)


Adder = Callable[..., tuple[Any, np.ndarray, dict[str, Any]]]
"""The add stage: ``adder(trained_index, coll, eval_queries, metric, batch, progress)`` ->
``(filled index, exact top-10 ids of the eval queries, extra manifest fields)``."""


def _add_local(index: Any, coll: Collection, xq: np.ndarray, metric: str, batch: int, progress: Progress, *,
               gpu: bool, factory: str) -> tuple[Any, np.ndarray, dict[str, Any]]:
    """Stream every shard into ``index`` (ids from the shards), and the eval queries' exact top-10."""
    exact = _ExactTopK(xq, 10, metric)
    target, to_cpu = (_gpu_adder(index, factory, coll.dim) if gpu else (index, lambda i: i))
    done, n = 0, coll.count()
    for ids, vecs in coll.iter_embeddings(batch_size=batch):
        add_vectors(target, ids, vecs)
        exact.add(ids, vecs)
        done += len(ids)
        progress(done, n, stage="add")
    return to_cpu(target), exact.result(), {}


def add_vectors(index: Any, ids: np.ndarray, vecs: np.ndarray) -> None:
    """``add_with_ids`` where the index stores ids, else plain ``add`` (ids are then positions)."""
    if supports_ids(index):
        index.add_with_ids(vecs, ids)
    else:
        index.add(vecs)


# ---- the builder ---------------------------------------------------------------------------------
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


def _open(collection: Collection | str | Path) -> Collection:
    return collection if isinstance(collection, Collection) else Collection.open(collection)


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
    adder: Adder | None = None,
) -> dict[str, Any]:
    """Build ``index.faiss`` for a collection and return the manifest's ``index`` entry.

    ``index_type``: ``"auto"`` (see :func:`choose_index`) or any FAISS factory string.
    ``max_memory``: budget for the index being built, the training sample and add batches.
    ``train_size``: training sample size (default: sized from nlist and PQ codebooks).
    ``use_gpu``: default ``faiss.get_num_gpus() > 0``.
    ``adder``: the add stage (default: stream every shard into ``index`` here); the Ray engine
    passes its distributed one (``indexing.ray_engine``).
    """
    import faiss

    timer = _Timer()
    coll = _open(collection_dir)
    budget = parse_memory(max_memory)
    _faiss_metric(metric)
    if nprobe_default is not None and nprobe_default < 1:
        raise IndexConfigError(f"nprobe_default must be >= 1, got {nprobe_default}")
    n, dim = coll.count(), coll.dim
    if n == 0:
        raise IndexConfigError(f"collection {coll.path} has no embeddings to index")
    gpu = gpu_count() > 0 if use_gpu is None else use_gpu
    progress = progress or (lambda *a, **k: None)

    if index_type == "auto":
        plan = choose_index(n, dim, budget, gpu=gpu, policy=policy)
    else:
        probe = make_index(index_type, dim, metric)
        ivf = find_ivf(probe)
        plan = IndexPlan(index_type.strip(), ivf.nlist if ivf is not None else None, None,
                         ("given explicitly (--index-type)",))
    factory = plan.factory
    reasons = list(plan.reasons)
    if gpu:
        gp = gpu_plan(factory, dim)
        if gp.factory != factory:
            reasons += list(gp.reasons)
            factory = gp.factory
    index = make_index(factory, dim, metric)
    if find_refine(index) is not None:  # FAISS defaults to k_factor=1: no re-ranking beyond k
        set_search_params(index, k_factor=plan.refine_k_factor or policy.refine_k_factor)

    ids_all = coll.read_table(columns=["id"]).column("id").to_numpy().astype(np.int64)
    contiguous = bool(np.array_equal(ids_all, np.arange(n, dtype=np.int64)))
    del ids_all
    if not supports_ids(index) and not contiguous:
        index = faiss.IndexIDMap2(index)
        reasons.append("wrapped in IDMap2: this index type cannot store ids and the collection ids are not 0..N-1")

    batch = int(min(65_536, max(1024, budget // (16 * dim * 4))))
    n_eval = min(policy.eval_queries, n // 10)  # held out of training (still indexed)
    n_train = min(_train_size(index, n, dim, budget, train_size, policy), n - n_eval)
    train_pos, eval_pos = sample_positions(n, n_train if index.is_trained is False else 0, n_eval, seed)
    progress(0, n, stage="sample")
    xt, xq = gather_rows(coll, [train_pos, eval_pos], batch)
    timer.mark("sample")

    if not index.is_trained:
        progress(0, n, stage="train")
        _train(index, xt, gpu, seed)
    del xt
    timer.mark("train")

    if adder is None:
        index, truth, extra = _add_local(index, coll, xq, metric, batch, progress, gpu=gpu, factory=factory)
    else:
        index, truth, extra = adder(index, coll, xq, metric, batch, progress)
    timer.mark("add")

    if nprobe_default is None:
        nprobe, recall, curve = tune_nprobe(index, xq, truth, policy.target_recall)
    else:
        set_search_params(index, nprobe=nprobe_default)
        _, found = index.search(xq, 10) if len(xq) else (None, np.zeros((0, 10), np.int64))
        nprobe, recall, curve = nprobe_default, recall_at(found, truth, 10), {}
    set_search_params(index, nprobe=nprobe)
    timer.mark("tune")
    if curve:
        reasons.append(f"nprobe={nprobe}: smallest power of two with recall@10 >= {policy.target_recall} on "
                       f"{len(xq)} held-out collection vectors" if recall >= policy.target_recall else
                       f"nprobe={nprobe}: recall@10 target {policy.target_recall} not reached; start of the plateau "
                       f"({recall:.3f})")

    ivf = find_ivf(index)
    entry: dict[str, Any] = {
        "factory": factory,
        "metric": metric,
        "nlist": int(ivf.nlist) if ivf is not None else None,
        "nprobe_default": nprobe,
        "refine_k_factor": float(find_refine(index).k_factor) if find_refine(index) is not None else None,
        "code_size": code_size(index),
        "bytes_per_vector": payload_bytes(index),
        "ntotal": int(index.ntotal),
        "train_size": int(len(train_pos)),
        "seed": seed,
        "recall_at_10": round(float(recall), 4),
        "recall_curve": {str(k): round(v, 4) for k, v in curve.items()},
        "eval_queries": int(len(xq)),
        "gpu": bool(gpu),
        "reasons": reasons,
        "model": coll.model.to_dict(),
        "file": INDEX_FILE,
        "layout": "memory",
        "engine": "local",
        **extra,
    }
    with atomic_path(coll.index_path) as tmp:
        faiss.write_index(index, str(tmp))
    entry["file_bytes"] = coll.index_path.stat().st_size
    timer.mark("write")
    entry["build_seconds"] = round(time.perf_counter() - timer.t0, 2)
    entry["stage_seconds"] = timer.stages
    entry["peak_rss_mb"] = round(peak_rss_mb(), 1)
    entry["built_at"] = now_iso()
    coll.update_manifest(index=entry)
    log.info("built %s over %d vectors in %.1fs", factory, n, entry["build_seconds"])
    return entry


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
    for pq in _pq_owners(index):
        need = max(need, 256 * pq.ksub)  # FAISS PQ training uses up to 256 points per centroid
    cap = max(1000, budget // (4 * dim * 4))  # the sample takes at most a quarter of the budget
    return int(min(n, need, policy.max_train, cap))


def load_index(collection: Collection | str | Path, mmap: bool = False) -> Any:
    """Read ``index.faiss`` after checking it belongs to this collection's model and dimension.

    ``mmap=True`` maps the file read-only instead of reading it (indexes larger than RAM; pages
    are loaded on demand). Raises IndexNotBuiltError / CollectionMismatchError.
    """
    import faiss

    coll = _open(collection)
    entry = coll.manifest.index
    if not entry or not coll.index_path.is_file():
        raise IndexNotBuiltError(f"collection {coll.path} has no index; run `vlsearch build-index {coll.path}`")
    recorded = entry.get("model") or {}
    mine = coll.model.to_dict()
    if (recorded.get("name"), recorded.get("pretrained"), recorded.get("dim")) != \
            (mine["name"], mine["pretrained"], mine["dim"]):
        raise CollectionMismatchError(
            f"index of {coll.path} was built for model {recorded.get('name')} (pretrained={recorded.get('pretrained')}, "
            f"dim={recorded.get('dim')}) but the collection holds {mine['name']} (pretrained={mine['pretrained']}, "
            f"dim={mine['dim']}); rebuild it with `vlsearch build-index`")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    if entry.get("layout") == "ondisk":  # inverted lists in a file beside it, mapped by OnDiskInvertedLists
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY  # + IO_FLAG_MMAP crashes searches (faiss 1.15)
    index = faiss.read_index(str(coll.index_path), flags)
    if index.d != coll.dim:
        raise CollectionMismatchError(
            f"index.faiss of {coll.path} has dimension {index.d}, the collection's embeddings have {coll.dim}")
    if entry.get("ntotal") is not None and index.ntotal != entry["ntotal"]:
        log.warning("index.faiss holds %d vectors, manifest records %d", index.ntotal, entry["ntotal"])
    return index
