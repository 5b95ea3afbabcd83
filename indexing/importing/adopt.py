"""Adopting clip-retrieval's autofaiss ``image.index`` as a collection's index.

autofaiss builds ``image.index`` over the ``img_emb`` vectors in row order, so its ids are row
positions: exactly the ids ``vlsearch import`` gives. Before it is adopted, :func:`check_index`
searches it for a seeded sample of rows (plus the first and the last) with every inverted list
probed and requires each row's own position among its top hits, with the stored vector's score:
an index of other vectors, or in another order, fails with a message that names the mismatch.
The adopted copy goes to ``index.faiss`` with a manifest entry like a built one (factory string
from autofaiss's ``image.json`` ``index_key``, else from the index type; ``nprobe`` from its
``index_param``), so ``Searcher`` and syncs treat it the same.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlsearch.ann.faiss_index import (
    code_size, downcast, find_ivf, is_l2, payload_bytes, read_index, search_parameters, stored_nprobe,
)
from vlsearch.core.errors import ImportFolderError
from vlsearch.core.fsutil import atomic_path
from vlsearch.store.collection import Collection
from vlsearch.store.layout import INDEX_FILE, now_iso

from indexing.build import peak_rss_mb
from indexing.importing.folder import ImportFolder, NpyRows

log = logging.getLogger(__name__)

IMAGE_INDEX, IMAGE_INFOS, TEXT_INDEX = "image.index", "image.json", "text.index"
#: sampled rows that must find themselves in their own top-k (ANN codes may rank a near twin first)
SAMPLE, CHECK_K, MIN_FOUND = 64, 10, 0.9
REBUILD_HINT = "rerun with --rebuild-index to build vlsearch's own index instead"


def find_image_index(folder: ImportFolder, index_dir: str | Path | None) -> Path | None:
    """``image.index`` in ``index_dir`` (given: it must be there), else in the folder or ``folder/index``."""
    if index_dir is not None:
        path = Path(index_dir).expanduser() / IMAGE_INDEX
        if not path.is_file():
            raise ImportFolderError(f"no {IMAGE_INDEX} in {index_dir}")
        return path
    for path in (folder.path / IMAGE_INDEX, folder.path / "index" / IMAGE_INDEX):
        if path.is_file():
            return path
    return None


def check_index(path: Path, folder: ImportFolder, seed: int = 0) -> None:
    """Check that the index at ``path`` indexes the folder's vectors by row position.

    ImportFolderError naming what differs (dimension, count, or rows not found at their ids)."""
    index = read_index(path)
    if index.d != folder.dim or index.ntotal != folder.rows:
        raise ImportFolderError(f"{path} holds {index.ntotal} vectors of dimension {index.d}, the folder "
                                f"{folder.rows} of dimension {folder.dim}; {REBUILD_HINT}")
    positions = _sample(folder.rows, seed)
    vectors = vectors_at(folder, positions)
    ivf = find_ivf(index)
    params = search_parameters(index, int(ivf.nlist) if ivf is not None else None)
    _, ids = index.search(vectors, min(CHECK_K, folder.rows), params=params)
    found = (ids == positions[:, None]).any(axis=1)
    if found.mean() < MIN_FOUND:
        missed = positions[~found][:3].tolist()
        raise ImportFolderError(
            f"{path} does not index the folder's vectors by row position: only {int(found.sum())} of "
            f"{len(positions)} sampled rows are found at their own id (e.g. not rows {missed}); {REBUILD_HINT}")


def _sample(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = rng.choice(n, size=min(n, SAMPLE), replace=False)
    return np.unique(np.concatenate([picked, [0, n - 1]])).astype(np.int64)


def vectors_at(folder: ImportFolder, positions: np.ndarray) -> np.ndarray:
    """The float32 image vectors at sorted global ``positions`` (one small read per row)."""
    out = np.empty((len(positions), folder.dim), np.float32)
    for part in folder.partitions:
        lo, hi = np.searchsorted(positions, [part.start, part.stop])
        rows = NpyRows(part.image) if hi > lo else None
        for i in range(lo, hi):
            row = int(positions[i]) - part.start
            out[i] = rows.read(row, row + 1)[0]
    return out


def adopt_index(coll: Collection, path: Path) -> dict[str, Any]:
    """Copy ``path`` (checked by :func:`check_index`) to the collection's ``index.faiss`` and commit
    its manifest entry; the entry."""
    t0 = time.perf_counter()
    index = read_index(path)
    infos = _infos(path.with_name(IMAGE_INFOS))
    factory = infos.get("index_key") or describe(index)
    nprobe = _nprobe(infos.get("index_param")) or stored_nprobe(index)
    with atomic_path(coll.path / INDEX_FILE) as tmp:
        shutil.copyfile(path, tmp)
    ivf = find_ivf(index)
    message = f"adopted {path} (autofaiss): nprobe {nprobe} as autofaiss chose it, not tuned by vlsearch"
    entry: dict[str, Any] = {
        "factory": factory, "metric": "l2" if is_l2(index) else "ip",
        "nlist": int(ivf.nlist) if ivf is not None else None, "nprobe_default": nprobe, "k_factor_default": None,
        "refine": None, "code_size": code_size(index), "bytes_per_vector": payload_bytes(index),
        "ntotal": int(index.ntotal), "built_ntotal": int(index.ntotal), "model": coll.model.to_dict(),
        "file": INDEX_FILE, "layout": "memory", "engine": "adopted", "adopted_from": str(path),
        "reasons": [f"adopted from clip-retrieval's {path.name}: its sampled rows match the vectors by position"],
        "tuning_message": message, "target_met": None, "file_bytes": (coll.path / INDEX_FILE).stat().st_size,
        "build_seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": peak_rss_mb(), "built_at": now_iso(),
    }
    entry["resident_bytes_per_vector"] = round(entry["file_bytes"] / max(index.ntotal, 1), 1)
    coll.commit_version(index=entry)
    if path.with_name(TEXT_INDEX).is_file():
        log.info("%s not adopted: caption searches run over the captions shards", path.with_name(TEXT_INDEX))
    return entry


def _infos(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _nprobe(param: Any) -> int | None:
    match = re.search(r"nprobe=(\d+)", param) if isinstance(param, str) else None
    return int(match.group(1)) if match else None


def describe(index: Any) -> str:
    """A factory-style name for an index read from a file (faiss 1.15 has no reverse factory)."""
    ivf = find_ivf(index)
    kind = type(downcast(index)).__name__.removeprefix("Index")
    return f"IVF{ivf.nlist},{kind.removeprefix('IVF')}" if ivf is not None else kind
