"""The one home of FAISS plumbing: read/write an index, find its layers, per-call parameters, sizes.

* :func:`load_index` reads a collection's ``index.faiss`` after checking that the manifest's
  ``index`` entry belongs to the collection's model and dimension (:func:`read_index` /
  :func:`write_index` are the bare file operations, atomic on write).
* :func:`find_ivf`, :func:`find_refine`, :func:`find_idmap`, :func:`find_pretransform` and
  :func:`pq_owners` find the
  layers of a (possibly wrapped: IDMap, PreTransform, Refine) index.
* :func:`search_parameters` builds the ``SearchParameters`` tree that sets ``nprobe`` and the
  refine ``k_factor`` for one call only; :func:`set_search_params` changes the values stored in
  the index (what the builder records as defaults).
* :func:`code_size` / :func:`payload_bytes`: bytes per vector.
* :func:`keep_referenced`: keep SWIG sub-objects alive as long as the object holding their pointers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from vlsearch.core.modelinfo import ModelInfo
from vlsearch.core.errors import CollectionError, CollectionMismatchError, IndexConfigError, IndexNotBuiltError
from vlsearch.core.fsutil import atomic_path

log = logging.getLogger(__name__)

METRICS = ("ip", "l2")
#: Bytes of one stored id (IVF lists and IDMap layers hold int64 ids).
ID_BYTES = 8


# ---- files ---------------------------------------------------------------------------------

def read_index(path: str | os.PathLike, mmap: bool = False, ondisk: bool = False) -> Any:
    """``faiss.read_index``; ``mmap=True`` maps the file read-only (pages load on demand).
    ``ondisk``: the index's inverted lists live in an ``.ivfdata`` file beside it
    (``OnDiskInvertedLists``, always memory-mapped). An unreadable file raises
    :class:`CollectionError` naming it."""
    import faiss

    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    if ondisk:  # found beside the index wherever the collection moved; IO_FLAG_MMAP on top crashes searches
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise CollectionError(f"cannot read index {path}: {exc}") from exc


def write_index(index: Any, path: str | os.PathLike) -> Path:
    """Write ``index`` atomically (temporary file, fsync, rename): a crash leaves the old file."""
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    return Path(path)


def copy_ondisk_lists(index: Any, ivfdata: str | os.PathLike) -> None:
    """Give an index read with (read-only) on-disk inverted lists a writable copy of them in a new
    ``ivfdata`` file, copied list by list (never all in RAM), so ids can be removed and vectors
    added while the old file stays intact for readers of the previous version. Write the index
    beside ``ivfdata`` afterwards: readers find it by name.

    Not ``OnDiskInvertedLists.merge_from_multiple``: in faiss 1.15 it leaves the whole file on
    the free-slot list, so a later add overwrites other lists' codes."""
    import faiss

    ivf = find_ivf(index)
    old = ivf.invlists
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    for list_no in range(ivf.nlist):
        n = old.list_size(list_no)
        if n:
            ids, codes = old.get_ids(list_no), old.get_codes(list_no)
            lists.add_entries(list_no, n, ids, codes)
            old.release_ids(list_no, ids)
            old.release_codes(list_no, codes)
    ivf.replace_invlists(lists, True)
    lists.this.disown()


def load_index(path: str | os.PathLike, entry: dict[str, Any] | None, model: ModelInfo,
               mmap: bool = False) -> Any:
    """Read the FAISS index file ``path`` that the manifest ``entry`` of a collection records, after
    checking that it belongs to ``model`` (the collection's) and its dimension.

    Raises IndexNotBuiltError when there is none (or its file is missing),
    CollectionMismatchError when it was built for another model or dimension, CollectionError
    when the file cannot be read.
    """
    path = Path(path)
    directory = path.parent
    if entry is None:
        raise IndexNotBuiltError(
            f"collection {directory} has no ANN index: run `vlsearch build-index {directory}` "
            "or search with exact=True (--exact)")
    if not path.is_file():
        raise IndexNotBuiltError(
            f"manifest of {directory} records an index but {path} is missing: rebuild it with "
            f"`vlsearch build-index {directory}` or search with exact=True (--exact)")
    _check_model(entry.get("model"), model, path)
    index = read_index(path, mmap=mmap, ondisk=entry.get("layout") == "ondisk")
    if index.d != model.dim:
        raise CollectionMismatchError(f"index {path} has dimension {index.d}, the collection {model.dim}: rebuild it")
    if entry.get("ntotal") is not None and index.ntotal != entry["ntotal"]:
        log.warning("%s holds %d vectors, the manifest records %d", path, index.ntotal, entry["ntotal"])
    return index


def _check_model(model: dict[str, Any] | None, mine: ModelInfo, path: Path) -> None:
    if model is not None and (model.get("name"), model.get("pretrained"), int(model.get("dim", -1))) != (
        mine.name, mine.pretrained, mine.dim
    ):
        raise CollectionMismatchError(
            f"index {path} was built for model {model.get('name')} (pretrained={model.get('pretrained')}, "
            f"dim={model.get('dim')}) but the collection holds {mine.name} (pretrained={mine.pretrained}, "
            f"dim={mine.dim}) embeddings: rebuild the index")


# ---- making ----------------------------------------------------------------------------------

def faiss_metric(metric: str) -> int:
    """``"ip"`` / ``"l2"`` -> the FAISS metric constant (IndexConfigError for anything else)."""
    import faiss

    if metric not in METRICS:
        raise IndexConfigError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def make_index(factory: str, dim: int, metric: str = "ip") -> Any:
    """``faiss.index_factory`` with a clear :class:`IndexConfigError` for a bad string."""
    import faiss

    metric_type = faiss_metric(metric)
    if not isinstance(factory, str) or not factory.strip():
        raise IndexConfigError("index type must be 'auto' or a FAISS factory string such as 'IVF1024,PQ32x4fs'")
    try:
        return faiss.index_factory(dim, factory.strip(), metric_type)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1]
        detail = detail.split(": ", 1)[-1] if "Error" in detail else detail
        raise IndexConfigError(f"invalid FAISS index type {factory!r} for dim {dim}: {detail}") from None


def is_l2(index: Any) -> bool:
    import faiss

    return index.metric_type == faiss.METRIC_L2


# ---- layers ----------------------------------------------------------------------------------

def downcast(index: Any) -> Any:
    import faiss

    return faiss.downcast_index(index)


def find_ivf(index: Any) -> Any | None:
    """The IVF inside wrappers (PreTransform, IDMap, Refine), or None. A view: keep ``index`` alive."""
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def find_refine(index: Any) -> Any | None:
    """The ``IndexRefine`` inside PreTransform / IDMap wrappers, or None."""
    import faiss

    idx = downcast(index)
    while True:
        if isinstance(idx, faiss.IndexRefine):
            return idx
        if isinstance(idx, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
            idx = downcast(idx.index)
        else:
            return None


def find_idmap(index: Any) -> Any | None:
    """The outermost ``IndexIDMap`` / ``IndexIDMap2`` (through PreTransform wrappers), or None."""
    import faiss

    idx = downcast(index)
    while isinstance(idx, faiss.IndexPreTransform):
        idx = downcast(idx.index)
    return idx if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)) else None


def find_pretransform(index: Any) -> Any | None:
    """The outermost ``IndexPreTransform`` (through IDMap wrappers), or None."""
    import faiss

    idx = downcast(index)
    while isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        idx = downcast(idx.index)
    return idx if isinstance(idx, faiss.IndexPreTransform) else None


def supports_ids(index: Any) -> bool:
    """Whether ``add_with_ids`` works on this (possibly wrapped) index."""
    import faiss

    idx = downcast(index)
    if isinstance(idx, faiss.IndexPreTransform):
        return supports_ids(idx.index)
    return isinstance(idx, (faiss.IndexIVF, faiss.IndexIDMap, faiss.IndexIDMap2))


def pq_owners(index: Any) -> list[Any]:
    """Every ``ProductQuantizer`` inside the index (e.g. to seed their k-means)."""
    import faiss

    owners = []
    stack = [index]
    while stack:
        idx = downcast(stack.pop())
        pq = getattr(idx, "pq", None)
        if isinstance(pq, faiss.ProductQuantizer):
            owners.append(pq)
        for attr in ("index", "base_index", "refine_index"):
            sub = getattr(idx, attr, None)
            if sub is not None and isinstance(sub, faiss.Index):
                stack.append(sub)
    return owners


def keep_referenced(owner: Any, *objects: Any) -> None:
    """Keep ``objects`` alive while ``owner`` (a FAISS object holding raw pointers to them) is.

    Appends to ``owner.referenced_objects``, FAISS's own keep-alive list: replacing it would drop
    what FAISS put there (constructor arguments; the sub-parameters of ``SearchParameters`` built
    with keywords, in the faiss versions that keep those there) and free live sub-objects."""
    owner.referenced_objects = [*getattr(owner, "referenced_objects", ()), *objects]


# ---- search parameters -----------------------------------------------------------------------

def search_parameters(index: Any, nprobe: int | None = None, k_factor: float | None = None, sel: Any = None) -> Any:
    """A FAISS ``SearchParameters`` tree that sets ``nprobe`` / ``k_factor`` for this call only.

    Walks the index structure (IDMap -> PreTransform -> Refine -> IVF); ``None`` values keep the
    index's own setting, but it is still passed explicitly so the call never depends on (or
    changes) mutable index state. ``sel`` (a FAISS ``IDSelector`` over collection ids) restricts
    the search: it goes to the innermost index (a Refine layer ignores its own), translated
    through an IDMap's id table. Returns None for indexes with no tunable parameter (Flat) and no
    selector.
    """
    import faiss

    idx = downcast(index)
    if isinstance(idx, faiss.IndexIDMap):  # (and IDMap2) the wrapped index numbers rows 0..n-1
        inner_sel = None if sel is None else faiss.IDSelectorTranslated(idx.id_map, sel)
        params = search_parameters(idx.index, nprobe, k_factor, inner_sel)
        if params is not None and sel is not None:
            keep_referenced(params, inner_sel, sel)  # SWIG holds raw pointers
        return params
    if isinstance(idx, faiss.IndexPreTransform):
        inner = search_parameters(idx.index, nprobe, k_factor, sel)
        return None if inner is None else faiss.SearchParametersPreTransform(index_params=inner)
    if isinstance(idx, faiss.IndexRefine):
        base = search_parameters(idx.base_index, nprobe, k_factor, sel)
        factor = float(idx.k_factor if k_factor is None else k_factor)
        return faiss.IndexRefineSearchParameters(k_factor=factor, base_index_params=base)
    if isinstance(idx, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=int(idx.nprobe if nprobe is None else nprobe), sel=sel)
    return None if sel is None else faiss.SearchParameters(sel=sel)


def stored_nprobe(index: Any) -> int | None:
    """The nprobe stored in the index (its IVF layer), or None when it has no IVF."""
    ivf = find_ivf(index)
    return None if ivf is None else int(ivf.nprobe)


def set_search_params(index: Any, nprobe: int | None = None, k_factor: float | None = None) -> None:
    """Store nprobe / refine k_factor in the index itself (the defaults written with it)."""
    if nprobe is not None:
        ivf = find_ivf(index)
        if ivf is not None:
            ivf.nprobe = int(nprobe)
    if k_factor is not None:
        ref = find_refine(index)
        if ref is not None:
            ref.k_factor = float(k_factor)


# ---- sizes -----------------------------------------------------------------------------------

def code_size(index: Any) -> int:
    """Bytes per vector of the primary codes (IVF lists or flat storage)."""
    ivf = find_ivf(index)
    if ivf is not None:
        return int(ivf.code_size)
    idx = downcast(index)
    inner = find_refine(idx)
    if inner is not None:
        return code_size(inner.base_index)
    while hasattr(idx, "index") and not hasattr(idx, "code_size"):
        idx = downcast(idx.index)
    return int(getattr(idx, "code_size", 0) or idx.d * 4)


def payload_bytes(index: Any) -> int:
    """Per-vector payload: primary codes + stored ids + refine codes."""
    import faiss

    total = code_size(index)
    idx = downcast(index)
    idmap = isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2))
    if idmap or find_ivf(index) is not None:
        total += ID_BYTES
    if idmap and find_ivf(index) is not None:
        total += ID_BYTES  # both the IDMap and the IVF lists store an id
    ref = find_refine(index)
    if ref is not None:
        total += code_size(ref.refine_index) if not isinstance(downcast(ref.refine_index), faiss.IndexFlat) \
            else ref.d * 4
    return total
