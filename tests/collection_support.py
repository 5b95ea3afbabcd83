"""Helpers of tests that need a collection with an ANN index without paying for a real build."""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss

from vlsearch.store.collection import Collection


def copy_with_flat_index(src: Path, dest: Path) -> Path:
    """A copy of collection ``src`` at ``dest`` with an exact ``IDMap,Flat`` inner-product index of
    its stored vectors (written and recorded in the manifest as a build would, no tuning)."""
    shutil.copytree(src, dest)
    coll = Collection.open(dest)
    ids, vectors = coll.read_embeddings()
    index = faiss.IndexIDMap(faiss.IndexFlatIP(coll.dim))
    index.add_with_ids(vectors, ids)
    faiss.write_index(index, str(coll.index_path))
    coll.update_manifest(index={"factory": "IDMap,Flat", "metric": "ip", "ntotal": index.ntotal,
                                "model": coll.model.to_dict(), "file": "index.faiss"})
    return dest
