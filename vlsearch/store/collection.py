"""``Collection``: a collection directory (:class:`~vlsearch.store.directory.CollectionDir`) that changes
by whole versions — add rows, remove ids, compact; the index follows (:mod:`vlsearch.store.update`).
The format itself is described in :mod:`vlsearch.store.directory`."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from vlsearch.store.columns import set_columns
from vlsearch.store.directory import CollectionDir
from vlsearch.store.update import Update, build_keyword_index, compact


class Collection(CollectionDir):
    """A collection: open it with ``Collection.open(path)``; read it as a :class:`CollectionDir`;
    change it by versions with :meth:`update`, :meth:`add`, :meth:`remove` and :meth:`compact`."""

    def update(self) -> Update:
        """``with coll.update() as u: u.add(...); u.remove(...)`` — one new version (vlsearch.store.update)."""
        return Update(self)

    def compact(self) -> dict[str, int]:
        """Rewrite shards holding dead rows and drop dead index entries (:func:`vlsearch.store.update.compact`)."""
        return compact(self)

    def build_keyword_index(self, rebuild: bool = False, **columns: Any) -> dict[str, int]:
        """Write the keyword index of shards written before keyword search existed (``rebuild``:
        of all; ``columns=[...]``: index these metadata columns, None: every text column); see
        :func:`vlsearch.store.update.build_keyword_index`."""
        return build_keyword_index(self, rebuild, **columns)

    def set_columns(self, values: pa.Table, keep: bool = True) -> dict[str, int]:
        """Set metadata columns of existing rows (``values``: ``id`` + the columns) as one new
        version, without re-encoding (:func:`vlsearch.store.columns.set_columns`)."""
        return set_columns(self, values, keep)

    def add(self, images: pa.Table, captions: pa.Table | None = None) -> int:
        """Add rows (id, path, embedding, ...) and their captions as a new version; the index
        follows. Returns the new version."""
        with self.update() as u:
            u.add(images, captions)
        return self.manifest.version

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Delete the rows of these image ids as a new version; the index follows. Returns the version."""
        with self.update() as u:
            u.remove(ids)
        return self.manifest.version
