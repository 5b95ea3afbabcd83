"""Build the FAISS index of a collection: choose, train, stream-add, tune search defaults, write atomically.

``build_index(collection_dir)`` reads the collection's image embeddings shard by shard and writes
``index.faiss`` beside them; FAISS ids are the collection's image ids. The chosen factory string,
the reasons for it, nlist, code size, training sample size, build time, peak memory and the
tuned defaults (``nprobe_default``, ``k_factor_default``) go to ``manifest["index"]``. Steps:

1. **Plan** (``index_type="auto"``, see :mod:`vlsearch.ann.plan`: :class:`AutoPolicy`, :func:`choose_index`): exact
   ``Flat`` for small collections; above ``flat_max_n`` an IVF index with 4-bit fast-scan PQ codes
   (8-bit PQ on GPU) re-ranked by a compact refine code, sized so that codes + id + refine payload
   stay within ``max_bytes_per_vector`` and the memory budget; when a full-dimension SQ8 refine
   code does not fit, the shortlist is re-scored exactly from fp16 rows on disk (``Refine(disk)``).
   Any FAISS factory string can be given instead; it is validated against the collection's
   dimension first.
2. **Sample**: one uniform random sample of row positions over *all* shards (seeded), split into a
   training set (sized from nlist and the PQ codebooks, capped by the budget) and held-out queries.
3. **Train** on that sample (on GPU when ``faiss.get_num_gpus() > 0``; the stored index is CPU).
4. **Add** in batches streamed from the shards with ``add_with_ids`` (IVF) or, for index types
   without id support, plain ``add`` when ids are ``0..N-1`` in order and an ``IDMap`` wrapper
   otherwise. The exact top-k of the held-out queries is accumulated during the same pass, and
   an on-disk refine's fp16 rows file (:mod:`vlsearch.ann.refine`) is written from it too.
5. **Tune** (:mod:`vlsearch.ann.tune`): the fastest ``nprobe`` x refine ``k_factor`` whose recall@10
   against exact search reaches the target (0.95) on *leave-one-out* queries (held-out stored
   vectors, own id removed from both lists); the settings, the recall and whether the target was
   met are recorded and the settings stored in the index. ``Searcher`` uses them by default.
6. **Write** ``index.faiss`` via a temporary file + rename, then the manifest entry. A crash at
   any point before the rename leaves the previous index and its manifest entry untouched.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from vlsearch.store.layout import INDEX_FILE, now_iso
from vlsearch.store.collection import Collection
from vlsearch.core.errors import IndexConfigError
from vlsearch.query.exact import ExactTopK
from vlsearch.ann.faiss_index import (
    faiss_metric,
    find_ivf,
    find_refine,
    make_index,
    payload_bytes,
    pq_owners,
    search_parameters,
    set_search_params,
    supports_ids,
    write_index,
    code_size,
)
from vlsearch.ann.refine import DiskRefine, RowsWriter, new_vectors_stem, refine_fields, remove_stale, vectors_writer
from vlsearch.core.progress import Progress, no_progress

from vlsearch.ann.plan import (
    DISK_REFINE,
    ID_BYTES,
    AutoPolicy,
    IndexPlan,
    choose_index,
    gpu_plan,
    parse_memory,
    split_disk_refine,
)
from vlsearch.ann.tune import DISK_RESCORE_COST, RESCORE_COST, Tuning, drop_self, tune

log = logging.getLogger(__name__)

#: Depth of the leave-one-out recall that tunes the default search settings.
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
    """This process's own peak resident memory (MB): ``VmHWM`` on Linux.

    ``ru_maxrss`` is not used where VmHWM exists: Linux carries it across ``exec``, so a build
    started from a big parent process (a benchmark holding a Flat index) reports the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
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
    #: every collection id, in shard order (read once: id support, leave-one-out ids, rows file)
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

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
    k_factor_default: float | None = None,
    max_bytes_per_vector: int | None = None,
    policy: AutoPolicy = AutoPolicy(),
    use_gpu: bool | None = None,
    adder: Adder | None = None,
    vector_rows: bool = True,
) -> dict[str, Any]:
    """Build ``index.faiss`` for a collection and return the manifest's ``index`` entry.

    ``index_type``: ``"auto"`` (see :func:`vlsearch.ann.plan.choose_index`) or any FAISS factory string,
    optionally ending in ``,Refine(disk)`` (exact re-scoring from fp16 rows on disk, :mod:`vlsearch.ann.refine`).
    ``max_memory``: budget for the index being built, the training sample and add batches.
    ``max_bytes_per_vector``: cap on the index's resident bytes per vector (auto; default
    ``policy.max_bytes_per_vector``); below a full-dimension SQ8 code auto refines from disk.
    ``nprobe_default`` / ``k_factor_default``: fix that search default instead of tuning it.
    ``train_size``: training sample size (default: sized from nlist and PQ codebooks).
    ``use_gpu``: default ``faiss.get_num_gpus() > 0``.
    ``adder``: the add stage (default: stream every shard into the index here); the Ray engine
    passes its distributed one (:mod:`indexing.ray_engine`).
    ``vector_rows``: also write the fp16 vector rows file (:class:`vlsearch.ann.refine.VectorRows`,
    2 bytes per dimension per vector, as much again as the shards' embeddings) from which filtered
    exact search, ``dedup`` and item terms read single rows; without it they decode shard row
    groups. ``Refine(disk)`` indexes always write it, whichever engine adds the vectors.
    """
    coll = collection_dir if isinstance(collection_dir, Collection) else Collection.open(collection_dir)
    with coll.lock():  # one writer at a time; then build from the newest version
        return _build_index(Collection.open(coll.path), index_type, max_memory, metric, nprobe_default, train_size,
                            seed, progress, policy=policy, use_gpu=use_gpu, k_factor_default=k_factor_default,
                            max_bytes_per_vector=max_bytes_per_vector, adder=adder, vector_rows=vector_rows)


def _build_index(coll: Collection, index_type: str, max_memory: str | int, metric: str, nprobe_default: int | None,
                 train_size: int | None, seed: int, progress: Progress | None, *, policy: AutoPolicy,
                 use_gpu: bool | None, k_factor_default: float | None,
                 max_bytes_per_vector: int | None, adder: Adder | None, vector_rows: bool = True) -> dict[str, Any]:
    timer = _Timer()
    faiss_metric(metric)
    _check_options(nprobe_default, k_factor_default, max_bytes_per_vector)
    if max_bytes_per_vector is not None:
        policy = replace(policy, max_bytes_per_vector=int(max_bytes_per_vector))
    if coll.count() == 0:
        raise IndexConfigError(f"collection {coll.path} has no embeddings to index")
    b = _Build(coll, coll.count(), parse_memory(max_memory), metric,
               gpu_count() > 0 if use_gpu is None else use_gpu, policy, progress or no_progress, seed, timer)
    plan = _plan(b, index_type)
    index = _make(b, plan)
    n_eval = min(policy.eval_queries, b.n // 10)  # held out of training; searched leave-one-out
    n_train = min(_train_size(index, b.n, coll.dim, b.budget, train_size, policy), b.n - n_eval)
    train_pos, eval_pos = sample_positions(b.n, n_train if index.is_trained is False else 0, n_eval, seed)
    eval_ids = b.ids[eval_pos]
    b.progress(0, b.n, stage="sample")
    xt, xq = gather_rows(coll, [train_pos, eval_pos], b.batch)
    b.timer.mark("sample")
    if not index.is_trained:
        b.progress(0, b.n, stage="train")
        _train(index, xt, b.gpu, seed)
    del xt
    b.timer.mark("train")
    extra: dict[str, Any] = {}
    with _rows_writer(b, plan, vector_rows) as rows:
        if adder is None:
            index, truth = _add(b, index, plan, xq, rows)
        else:
            index, truth, extra = adder(index, coll, xq, metric, b.batch, b.progress, rows=rows)
    b.timer.mark("add")
    disk = {} if rows is None else {**rows.fields, **(refine_fields(rows.fields) if plan.disk_refine else {})}
    refine = DiskRefine.from_entry(coll.path, {**disk, "metric": metric})
    tuning = _tune(b, index, refine, xq, eval_ids, truth, nprobe_default, k_factor_default)
    entry = _record(b, index, plan.factory, len(train_pos), len(xq), tuning, refine, {**disk, **extra})
    if not coll.manifest.complete:  # else committing the version collects them, keeping leased versions' files
        remove_stale(coll.path, keep=disk.values())
    return entry


def _check_options(nprobe: int | None, k_factor: float | None, max_bytes: int | None) -> None:
    if nprobe is not None and nprobe < 1:
        raise IndexConfigError(f"nprobe_default must be >= 1, got {nprobe}")
    if k_factor is not None and not k_factor >= 1:
        raise IndexConfigError(f"k_factor_default must be >= 1, got {k_factor}")
    if max_bytes is not None and max_bytes < ID_BYTES + 4:
        raise IndexConfigError(f"max_bytes_per_vector must be >= {ID_BYTES + 4} (an id and a 4-byte code), got {max_bytes}")


def _plan(b: _Build, index_type: str) -> IndexPlan:
    """The index to build: the auto plan or the given factory string, adapted for GPU."""
    dim = b.coll.dim
    if index_type == "auto":
        plan = choose_index(b.n, dim, b.budget, gpu=b.gpu, policy=b.policy)
    else:
        factory, disk = split_disk_refine(index_type)
        probe = make_index(factory, dim, b.metric)
        ivf = find_ivf(probe)
        if disk and (find_refine(probe) is not None or ivf is None):
            raise IndexConfigError(f"{DISK_REFINE} needs an IVF index without another refine stage, got {index_type!r}")
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
    """The empty index of the plan, refine factor set, wrapped in IDMap where ids need it."""
    import faiss

    index = make_index(plan.faiss_factory, b.coll.dim, b.metric)
    if find_refine(index) is not None:  # FAISS defaults to k_factor=1: no re-ranking beyond k
        set_search_params(index, k_factor=plan.refine_k_factor or b.policy.refine_k_factor)
    b.ids = b.coll.read_table(columns=["id"]).column("id").to_numpy().astype(np.int64)
    contiguous = bool(np.array_equal(b.ids, np.arange(b.n, dtype=np.int64)))
    if not supports_ids(index) and not contiguous:
        index = faiss.IndexIDMap(index)
        b.reasons.append("wrapped in IDMap: this index type cannot store ids and the collection ids are not 0..N-1")
    return index


Adder = Callable[..., tuple[Any, np.ndarray, dict[str, Any]]]
"""The add stage: ``adder(trained_index, coll, eval_queries, metric, batch, progress, rows=writer)`` ->
``(filled index, exact top-(TUNE_K + 1) ids of the eval queries, extra manifest fields)``; ``rows``
(a :class:`~vlsearch.ann.refine.RowsWriter`, or None) takes every vector for the rows file."""


@contextlib.contextmanager
def _rows_writer(b: _Build, plan: IndexPlan, vector_rows: bool) -> Iterator[RowsWriter | None]:
    """The rows file's writer while the vectors are added (finished, fsynced and renamed on exit),
    or None when this build writes none."""
    if not (plan.disk_refine or vector_rows):
        yield None
        return
    with vectors_writer(b.coll.path, new_vectors_stem(), np.sort(b.ids), b.coll.dim) as rows:
        yield rows


def _add(b: _Build, index: Any, plan: IndexPlan, xq: np.ndarray, rows: RowsWriter | None) -> tuple[Any, np.ndarray]:
    """Stream every shard into the index; in the same pass the exact top-(k+1) of the held-out
    queries and the rows file (``rows``). Returns (index, exact ids)."""
    exact = ExactTopK(xq, TUNE_K + 1, b.metric)  # k + 1: each query's own id is dropped
    target, to_cpu = (_gpu_adder(index, plan.faiss_factory, b.coll.dim) if b.gpu else (index, lambda i: i))
    done = 0
    for ids, vecs in b.coll.iter_embeddings(batch_size=b.batch):
        add_vectors(target, ids, vecs)
        exact.add(ids, vecs)
        if rows is not None:
            rows(ids, vecs)
        done += len(ids)
        b.progress(done, b.n, stage="add")
    return to_cpu(target), exact.result()[1]


def add_vectors(index: Any, ids: np.ndarray, vecs: np.ndarray) -> None:
    """``add_with_ids`` where the index stores ids, else plain ``add`` (ids are then positions)."""
    if supports_ids(index):
        index.add_with_ids(vecs, ids)
    else:
        index.add(vecs)


def _tune(b: _Build, index: Any, refine: DiskRefine | None, xq: np.ndarray, eval_ids: np.ndarray,
          exact_top: np.ndarray, nprobe: int | None, k_factor: float | None) -> Tuning:
    """Default nprobe / k_factor reaching the target on leave-one-out queries (vlsearch.ann.tune); stored in the index."""
    ivf, has_refine = find_ivf(index), refine is not None or find_refine(index) is not None

    def search(q: np.ndarray, k: int, p: int | None, kf: float | None) -> np.ndarray:
        if refine is not None:
            return refine.search(index, q, k, kf, search_parameters(index, p))[1]
        return index.search(q, k, params=search_parameters(index, p, kf))[1]

    tuning = tune(search, xq, eval_ids, drop_self(exact_top, eval_ids, TUNE_K), target=b.policy.target_recall,
                  nlist=int(ivf.nlist) if ivf is not None else None, refine=has_refine, k=TUNE_K, nprobe=nprobe,
                  k_factor=k_factor if has_refine else None, k_factors=b.policy.k_factors, ntotal=int(index.ntotal),
                  rescore_cost=DISK_RESCORE_COST if refine is not None else RESCORE_COST)
    set_search_params(index, nprobe=tuning.nprobe, k_factor=tuning.k_factor)
    b.timer.mark("tune")
    b.reasons.append(tuning.message)
    if not tuning.met:
        log.warning("%s", tuning.message)
    return tuning


def _record(b: _Build, index: Any, factory: str, n_train: int, n_eval: int, tuning: Tuning,
            refine: DiskRefine | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Write the index atomically, then its manifest entry (which is returned)."""
    ivf = find_ivf(index)
    entry: dict[str, Any] = {
        "factory": factory,
        "metric": b.metric,
        "nlist": int(ivf.nlist) if ivf is not None else None,
        "nprobe_default": tuning.nprobe,
        "k_factor_default": tuning.k_factor,
        "refine_k_factor": tuning.k_factor,
        "refine": "disk-fp16" if refine is not None else ("ram" if find_refine(index) is not None else None),
        "code_size": code_size(index),
        "bytes_per_vector": payload_bytes(index),
        "disk_bytes_per_vector": round(refine.nbytes / max(index.ntotal, 1), 1) if refine is not None else None,
        "ntotal": int(index.ntotal),
        "train_size": int(n_train),
        "seed": b.seed,
        "recall_at_10": round(float(tuning.recall), 4),
        "recall_eval": "leave-one-out: stored vectors as queries, own id removed from exact and ANN top-10",
        "target_recall": tuning.target,
        "target_met": tuning.met,
        "tuning_message": tuning.message,
        "tuning": [t.as_row() for t in tuning.trials],  # [nprobe, k_factor, recall@10, ms/query]
        "eval_queries": int(n_eval),
        "gpu": bool(b.gpu),
        "reasons": b.reasons,
        "model": b.coll.model.to_dict(),
        "file": INDEX_FILE,
        "layout": "memory",
        "engine": "local",
        **extra,
    }
    index_path = b.coll.path / INDEX_FILE  # the current version may point at a sync's index-vN file
    write_index(index, index_path)
    entry["file_bytes"] = index_path.stat().st_size
    entry["resident_bytes_per_vector"] = round(entry["file_bytes"] / b.n, 1)  # codes, ids, centroids, tables
    b.timer.mark("write")
    entry["build_seconds"] = round(time.perf_counter() - b.timer.t0, 2)
    entry["stage_seconds"] = b.timer.stages
    entry["peak_rss_mb"] = round(peak_rss_mb(), 1)
    entry["built_at"] = now_iso()
    entry["built_ntotal"] = entry["ntotal"]
    if b.coll.manifest.complete:
        b.coll.commit_version(index=entry)  # a new version: readers of the previous one keep its index
    else:
        b.coll.update_manifest(index=entry)
    log.info("built %s over %d vectors in %.1fs", factory, b.n, entry["build_seconds"])
    return entry


def index_summary(entry: dict[str, Any]) -> list[str]:
    """Plain lines describing a manifest ``index`` entry: plan, memory, defaults, recall target."""
    ram = entry.get("resident_bytes_per_vector") or entry["bytes_per_vector"]
    lines = [f"{entry['factory']}: {entry['ntotal']:,} vectors, {ram} B/vector in RAM"
             + (f", {entry['disk_bytes_per_vector']} B/vector on disk" if entry.get("disk_bytes_per_vector") else "")
             + f", built in {entry['build_seconds']:.1f} s, peak RSS {entry['peak_rss_mb']:.0f} MB"]
    message = entry.get("tuning_message")
    if message is None:  # an index built before leave-one-out tuning
        message = (f"defaults nprobe={entry.get('nprobe_default')}: recall@10 {entry.get('recall_at_10', 0):.3f} on "
                   "held-out vectors that were still indexed (rebuild to tune on fresh queries)")
    lines.append(("" if entry.get("target_met") is not False else "WARNING: ") + message)
    return lines
