"""The one auto index plan: which FAISS index a collection of N vectors of dimension d gets.

:func:`choose_index` is the ``index_type="auto"`` policy of :func:`indexing.build.build_index`
(thresholds in :class:`AutoPolicy`, measured in ``benchmarks/bench_index.py``); :func:`gpu_plan`
adapts a factory string to FAISS GPU; :func:`demo_index_type` is the choice for a collection that
must use the approximate path even when small (``vlsearch demo``), with
:func:`small_collection_factory` below ``4 * dim`` vectors. Pure arithmetic and strings: no FAISS
import, no data read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from vlsearch.core.errors import IndexConfigError
from vlsearch.ann.faiss_index import ID_BYTES

from vlsearch.ann.tune import K_FACTORS

#: Code sizes (bytes = M sub-quantizers of 8 bits) that FAISS GPU IVFPQ supports.
GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
#: Above this many bytes per code, GPU IVFPQ needs float16 lookup tables (shared-memory limit).
GPU_FLOAT32_LUT_MAX_M = 48
#: ``--index-type`` suffix for an on-disk fp16 refine stage (``IVF4096,PQ64x4fs,Refine(disk)``).
DISK_REFINE = "Refine(disk)"


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
    #: Largest fast-scan code (bytes) of the on-disk-refine plan, chosen when a full-dimension SQ8
    #: refine code does not fit in the per-vector budget (e.g. ``--max-bytes-per-vector 80``).
    disk_fastscan_bytes: int = 64
    #: Training points per IVF centroid (FAISS warns below 39) and cap on the sample.
    train_per_centroid: int = 64
    max_train: int = 500_000
    #: Default-settings tuning (vlsearch.ann.tune): leave-one-out queries, target recall@10 against
    #: exact search, and the refine factors tried (nprobe: powers of two up to nlist).
    eval_queries: int = 500
    target_recall: float = 0.95
    k_factors: tuple[float, ...] = K_FACTORS


@dataclass(frozen=True)
class IndexPlan:
    """A chosen index: factory string, its IVF size, and why."""

    factory: str
    nlist: int | None = None
    refine_k_factor: float | None = None
    reasons: tuple[str, ...] = ()

    @property
    def disk_refine(self) -> bool:
        """Exact re-scoring from the fp16 vectors file on disk (``,Refine(disk)``, vlsearch.ann.refine)."""
        return split_disk_refine(self.factory)[1]

    @property
    def faiss_factory(self) -> str:
        """The part FAISS builds (the factory without ``,Refine(disk)``)."""
        return split_disk_refine(self.factory)[0]


def split_disk_refine(index_type: str) -> tuple[str, bool]:
    """``"IVF4096,PQ64x4fs,Refine(disk)"`` -> ``("IVF4096,PQ64x4fs", True)``; other strings unchanged."""
    text = index_type.strip() if isinstance(index_type, str) else index_type
    if isinstance(text, str) and text.replace(" ", "").endswith("," + DISK_REFINE):
        return text[: text.rindex(",")].strip(), True
    return text, False


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
    if _refine_code(dim, room - policy.fastscan_bytes // 4)[0] != "SQ8":
        return _disk_plan(n, dim, nlist, per_vec, gpu, policy, reasons)
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


def _disk_plan(n: int, dim: int, nlist: int, per_vec: int, gpu: bool, policy: AutoPolicy,
               reasons: list[str]) -> IndexPlan:
    """Compact fast-scan shortlist in RAM, exact fp16 re-scoring from disk (vlsearch.ann.refine).

    Half the lists when the centroid bytes it saves let the code grow: a larger code shortlists
    so much better that it needs far fewer candidates (1M x 512 at 80 B/vector: IVF2048,PQ128x4fs
    reached recall@10 0.95 with 320 re-scored candidates where IVF4096,PQ64x4fs stayed at 0.87 with
    640; benchmarks/RESULTS.md, issue 21).
    """
    options = []
    for lists in dict.fromkeys((nlist, min(nlist, max(policy.min_nlist, nlist // 2)))):
        centroids = math.ceil(lists * dim * 4 / n)
        code = max(1, min(policy.disk_fastscan_bytes, per_vec - ID_BYTES - centroids))
        if gpu:
            m = max([g for g in GPU_PQ_M if g <= code and dim % g == 0] or [1])
            options.append((m, lists, centroids, f"IVF{lists},PQ{m}"))
        else:
            m = _divisor_at_most(dim, 2 * code, multiple=2)
            options.append((m // 2, lists, centroids, f"IVF{lists},PQ{m}x4fs"))
    nbytes, lists, centroids, base = max(options)  # the largest code, then the most lists
    if lists != nlist:
        reasons.append(f"nlist={lists}: half the lists leave room for a {nbytes}-byte code "
                       f"({options[0][0]} bytes with nlist={nlist})")
    reasons.append(f"{DISK_REFINE}: a full-dimension SQ8 refine code ({dim} B) does not fit in {per_vec} B/vector, so "
                   f"the {nbytes}-byte {'PQ' if gpu else 'fast-scan PQ'} shortlist is re-scored exactly from the fp16 "
                   f"vectors file on disk ({2 * dim} B/vector, memory-mapped); in RAM: codes + {ID_BYTES}-byte ids "
                   f"+ ~{centroids} B/vector of centroids")
    return IndexPlan(f"{base},{DISK_REFINE}", lists, policy.refine_k_factor, tuple(reasons))


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


#: The demo's policy: the approximate path even for a small collection (no Flat threshold).
ALWAYS_ANN = AutoPolicy(flat_max_n=0, min_nlist=1)


def small_collection_factory(n: int, dim: int) -> str:
    """IVF-PQ for a collection too small for :func:`choose_index` (PCA and PQ training need more
    vectors than dimensions): ~``sqrt(n)/2`` lists (a power of two, at least 4), 4-bit fast-scan
    PQ with about ``dim/4`` sub-quantizers, and exact re-ranking (``RFlat``).
    """
    nlist = max(4, 2 ** round(math.log2(max(1.0, math.sqrt(n) / 2))))
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    return f"IVF{nlist},PQ{m}x4fs,RFlat"


def demo_index_type(n: int, dim: int) -> str:
    """The index type of a collection that must exercise the approximate path: ``"auto"`` (with
    :data:`ALWAYS_ANN`) from ``4 * dim`` vectors on, else :func:`small_collection_factory`."""
    return "auto" if n >= 4 * dim else small_collection_factory(n, dim)
