"""``vlsearch import``: folders of already computed vectors -> collections, without re-encoding.

* :func:`import_clip_retrieval` — clip-retrieval's output (``img_emb/``, ``text_emb/``,
  ``metadata/``, optionally autofaiss's ``image.index``), :mod:`indexing.importing.folder`;
* :func:`import_embeddings` — a plain folder of ``*.npy`` + ``*.parquet`` (embedding-reader layout).

Both return an :class:`ImportReport`; ids are row positions, a re-import adds only new rows
(:mod:`indexing.importing.run`).
"""

from __future__ import annotations

import os

from vlsearch.core.progress import Progress

from indexing.importing.folder import scan_clip_retrieval, scan_embeddings
from indexing.importing.run import ImportConfig, ImportReport, import_folder

__all__ = ["ImportConfig", "ImportReport", "import_clip_retrieval", "import_embeddings"]


def import_clip_retrieval(folder: str | os.PathLike, collection_dir: str | os.PathLike, config: ImportConfig,
                          progress: Progress | None = None) -> ImportReport:
    """Import a clip-retrieval output folder into ``collection_dir`` (created, resumed or grown)."""
    return import_folder(scan_clip_retrieval(folder), collection_dir, config, progress)


def import_embeddings(folder: str | os.PathLike, collection_dir: str | os.PathLike, config: ImportConfig,
                      progress: Progress | None = None) -> ImportReport:
    """Import a folder of ``*.npy`` vectors with their ``*.parquet`` metadata into ``collection_dir``."""
    return import_folder(scan_embeddings(folder), collection_dir, config, progress)
