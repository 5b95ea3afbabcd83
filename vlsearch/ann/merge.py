"""Merging indexes built in parts: the same trained empty index, filled with consecutive groups of
vectors, merged in order into the index one add over all of them gives (same ids, same results).

* :func:`merge_index` moves one part into another. FAISS's own ``Index.merge_from`` does the work
  for every layer it merges: IVF (``add_id`` shifts ids), flat codes, flat fast-scan,
  ``IndexPreTransform`` and ``IndexIDMap``/``IDMap2`` (ids appended). By hand, only what FAISS
  refuses (faiss 1.15): ``IndexRefine`` ("merge_from() not implemented") and the IDMap /
  PreTransform layers above one ("check_compatible_for_merge() not implemented" on the Refine).
* :func:`merge_files` merges part files in memory; :func:`merge_on_disk` merges their inverted
  lists into one ``.ivfdata`` file (``faiss.contrib.ondisk.merge_ondisk``: the codes are never all
  in RAM).
* Fast-scan IVF lists are not merged by FAISS: ``BlockInvertedLists::add_entries`` copies whole
  blocks to the wrong offset when a list already holds a multiple of ``block_size`` entries, past
  the end of the list (faiss 1.15). Parts hold the same codes as plain 4-bit ``IVFPQ``
  (:func:`as_plain_ivfpq`), converted back after the merge (:func:`as_fastscan`).
* :func:`trained_digest`: what every part must share (quantizer, codebooks) before a merge.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from vlsearch.ann.faiss_index import downcast, find_ivf, find_refine, keep_referenced, read_index
from vlsearch.core.errors import IndexConfigError


def merge_index(dst: Any, src: Any, add_id: int = 0) -> None:
    """Append ``src``'s vectors to ``dst`` (same trained structure), in the order one add of both
    would give; ``src`` is left empty or unusable. ``add_id`` is added to ``src``'s ids (as FAISS's)."""
    import faiss

    d, s = downcast(dst), downcast(src)
    if isinstance(d, faiss.IndexRefine):
        _merge_refine(d, s)
    elif find_refine(d) is not None:
        _merge_above_refine(d, s, add_id)
    else:
        if isinstance(d, faiss.IndexIDMap) and find_ivf(d.index) is not None:
            # IndexIDMap::merge_from merges its sub-index with add_id 0, but an IVF under an IDMap
            # numbers its entries by position: move them first, shifted (FAISS then merges an empty one)
            merge_index(d.index, s.index, _position_offset(d.index))
        try:
            d.merge_from(s, add_id)
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()[-1].rsplit(": ", 1)[-1]  # past FAISS's "Error in <function> at <file>"
            raise IndexConfigError(f"FAISS cannot merge {_layers(d)} indexes ({detail}); build this index type "
                                   "with the local engine") from None


def _layers(index: Any) -> str:
    """``"IndexIDMap(IndexHNSWFlat)"``: the index's types down its ``index`` sub-indexes."""
    import faiss

    sub = getattr(index, "index", None)
    inner = f"({_layers(downcast(sub))})" if isinstance(sub, faiss.Index) else ""
    return type(index).__name__ + inner


def _position_offset(index: Any) -> int:
    """``add_id`` for a sub-index whose labels are positions: its size where it stores them as ids
    (an IVF), 0 where they are implicit (flat codes, which refuse any other ``add_id``)."""
    return int(index.ntotal) if find_ivf(index) is not None else 0


def _merge_refine(d: Any, s: Any) -> None:
    """``IndexRefine``: the base labels are positions into the refine codes; merge both, in order."""
    merge_index(d.base_index, s.base_index, _position_offset(d.base_index))
    merge_index(d.refine_index, s.refine_index)
    d.ntotal = d.ntotal + s.ntotal


def _merge_above_refine(d: Any, s: Any, add_id: int) -> None:
    """An IDMap or PreTransform over a Refine: the sub-indexes merged here, then the ids appended."""
    import faiss

    merge_index(d.index, s.index, add_id)
    d.ntotal = d.index.ntotal
    if isinstance(d, faiss.IndexIDMap):  # (and IDMap2)
        ids = faiss.vector_to_array(d.id_map), faiss.vector_to_array(s.id_map) + add_id
        faiss.copy_array_to_vector(np.concatenate(ids), d.id_map)
        if isinstance(d, faiss.IndexIDMap2):
            d.construct_rev_map()  # over ntotal entries: after ntotal is updated


def merge_files(paths: list[str | os.PathLike]) -> Any:
    """The index files ``paths`` (parts of one build, in order) merged in memory."""
    merged = read_index(paths[0])
    for path in paths[1:]:
        merge_index(merged, read_index(path))
    return merged


def merge_on_disk(template: Any, paths: list[str | os.PathLike], ivfdata: str | os.PathLike) -> Any:
    """A copy of the trained empty ``template`` whose inverted lists are those of the part files
    ``paths``, merged in order into the on-disk lists file ``ivfdata`` (an IVF, under PreTransforms)."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.clone_index(template)
    merge_ondisk(index, [str(p) for p in paths], str(ivfdata))
    return index


# ---- fast-scan <-> plain 4-bit IVFPQ ---------------------------------------------------------------
def fastscan_ivf(index: Any) -> Any | None:
    """The ``IndexIVFPQFastScan`` inside ``index``, or None."""
    import faiss

    ivf = find_ivf(index)  # typed IndexIVF when ``index`` is the IVF itself
    ivf = None if ivf is None else faiss.downcast_index(ivf)
    return ivf if isinstance(ivf, faiss.IndexIVFPQFastScan) else None


def as_plain_ivfpq(index: Any) -> Any:
    """A copy of ``index`` with its fast-scan IVF replaced by a plain 4-bit ``IVFPQ`` (same quantizer
    and codebooks); ``index`` itself is left as it was."""
    import faiss

    index = faiss.clone_index(index)
    fs = faiss.downcast_index(find_ivf(index))
    new = faiss.IndexIVFPQ(fs.quantizer, fs.d, fs.nlist, fs.pq.M, fs.pq.nbits, fs.metric_type)
    new.pq, new.by_residual, new.is_trained = fs.pq, fs.by_residual, True
    new.nprobe = fs.nprobe
    return _replace_ivf(index, new)


def as_fastscan(index: Any) -> Any:
    """``index`` with its plain 4-bit ``IVFPQ`` converted back to fast-scan (same codes, in 32-vector blocks)."""
    import faiss

    plain = faiss.downcast_index(find_ivf(index))
    new = faiss.IndexIVFPQFastScan(plain)
    new.nprobe = plain.nprobe
    # frees the plain copy of the codes, in RAM or a mapped on-disk file; the object stays (it owns the quantizer)
    empty = faiss.ArrayInvertedLists(plain.nlist, plain.code_size)
    plain.replace_invlists(empty, True)
    empty.this.disown()  # the index owns (and deletes) it now
    return _replace_ivf(index, new)


def _replace_ivf(index: Any, new: Any) -> Any:
    """``index`` with ``new`` in place of its IVF (``new`` itself when ``index`` is the IVF)."""
    import faiss

    parent = _ivf_parent(index)
    if parent is None:
        keep_referenced(new, index)  # shares its quantizer
        return new
    new.this.disown()  # the wrapper deletes it; the replaced IVF stays alive: it owns the shared quantizer
    setattr(parent, "base_index" if isinstance(parent, faiss.IndexRefine) else "index", new)
    return index


def _ivf_parent(index: Any) -> Any | None:
    """The wrapper (Refine, IDMap, PreTransform) whose sub-index is the IVF; None if ``index`` is it."""
    import faiss

    node = faiss.downcast_index(index)
    while not isinstance(node, faiss.IndexIVF):
        sub = node.base_index if isinstance(node, faiss.IndexRefine) else getattr(node, "index", None)
        if sub is None:
            return None
        child = faiss.downcast_index(sub)
        if isinstance(child, faiss.IndexIVF):
            return node
        node = child
    return None


def trained_digest(index: Any) -> str:
    """Hash of the trained state every part must share: coarse centroids and PQ codebooks (faiss #2970)."""
    import faiss

    h = hashlib.blake2b(digest_size=16)
    ivf = find_ivf(index)
    if ivf is not None:
        h.update(faiss.serialize_index(ivf.quantizer).tobytes())
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        if pq is not None:
            h.update(faiss.vector_to_array(pq.centroids).tobytes())
    return h.hexdigest()
