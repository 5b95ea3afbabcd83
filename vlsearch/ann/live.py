"""Keeping an index's ids live as a collection changes: remove ids (or mark them dead where the index
type cannot remove), refill a trained index with the live vectors, the selector that hides dead
entries, and when to retrain. See :mod:`vlsearch.store.update` for when each is used."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from vlsearch.ann.faiss_index import supports_ids
from vlsearch.core.errors import CollectionError

#: Id written over an IDMap entry whose vector was removed from an index that cannot remove.
DEAD_ID = -1
#: Retraining is advised once the index holds this many times the vectors it was trained with.
RETRAIN_GROWTH = 4.0


def drop_ids(index: Any, ids: np.ndarray) -> int:
    """Remove ``ids`` from the index: ``remove_ids`` if the type supports it (returns 0), else
    overwrite their IDMap entries with :data:`DEAD_ID` (returns how many entries are now dead)."""
    import faiss

    if not len(ids):
        return 0
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, np.int64))
    try:
        index.remove_ids(selector)
        return 0
    except RuntimeError:
        pass
    idmap = faiss.downcast_index(index)
    if not isinstance(idmap, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        raise CollectionError(f"index type {type(idmap).__name__} can neither remove ids nor mark them dead; "
                              "rebuild it with `vlsearch build-index`")
    table = faiss.vector_to_array(idmap.id_map)
    hit = np.isin(table, ids)
    table[hit] = DEAD_ID
    faiss.copy_array_to_vector(table, idmap.id_map)
    if isinstance(idmap, faiss.IndexIDMap2):
        idmap.construct_rev_map()
    return int(hit.sum())


def refill(index: Any, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> Any:
    """A copy of the trained ``index``, emptied and filled with ``batches`` of ``(ids, vectors)``
    (no retraining); wrapped in an IDMap2 when the type cannot store ids."""
    import faiss

    fresh = faiss.clone_index(index)
    fresh.reset()
    if not supports_ids(fresh):
        fresh = faiss.IndexIDMap2(fresh)
    for ids, vectors in batches:
        fresh.add_with_ids(np.ascontiguousarray(vectors), ids)
    return fresh


def live_selector(index: Any, entry: dict[str, Any] | None) -> Any | None:
    """The ``IDSelector`` (on image ids) excluding dead index entries, or None when there are none."""
    import faiss

    if not entry or not entry.get("dead_entries"):
        return None
    return faiss.IDSelectorNot(faiss.IDSelectorBatch(np.array([DEAD_ID], np.int64)))


def retrain_advice(entry: dict[str, Any] | None, live: int) -> str | None:
    """A message when the index holds far more vectors than its quantizer was trained with."""
    if not entry or not entry.get("nlist"):
        return None
    built = int(entry.get("built_ntotal") or entry.get("ntotal") or 0)
    if built and live >= RETRAIN_GROWTH * built:
        return (f"the collection has grown to {live / built:.1f}x the {built:,} vectors its index was trained on; "
                "recall may have dropped: run `vlsearch build-index` to retrain it")
    return None
