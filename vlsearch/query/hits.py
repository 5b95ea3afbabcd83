"""Hit building: ``knn`` arrays (scores, ids) -> :class:`~vlsearch.query.results.Results`, with
each hit's path, caption and metadata read from its shard row (no embedding column)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlsearch.core.errors import CollectionError
from vlsearch.query.results import Hits, Results, make_hit
from vlsearch.store.rows import MetadataReader, RowLocator


class HitBuilder:
    """Turns result ids into Hits through the id -> (shard, row) map and the metadata reader."""

    def __init__(self, rows: RowLocator, reader: MetadataReader, collection_path: Path):
        self.rows, self.reader, self.collection_path = rows, reader, collection_path

    def build(self, scores: np.ndarray, ids: np.ndarray, first_stage: np.ndarray | None = None) -> Results:
        """One :class:`Hits` per query row, id -1 slots skipped (``first_stage``: the first-stage
        scores of re-ranked hits). CollectionError for an id no shard holds (a stale index)."""
        valid = ids >= 0
        flat_ids = ids[valid]
        shard, row, found = self.rows.locate(flat_ids)
        if not found.all():
            raise CollectionError(
                f"the index returned id {int(flat_ids[~found][0])} that no shard of {self.collection_path} holds: "
                "the index is stale, rebuild it")
        records = iter(self.reader.rows(shard, row))
        results = Results()
        for q in range(ids.shape[0]):
            hits = Hits()
            for j in np.flatnonzero(valid[q]):
                first = None if first_stage is None else float(first_stage[q, j])
                hits.append(make_hit(next(records), int(ids[q, j]), float(scores[q, j]), len(hits) + 1, first))
            results.append(hits)
        return results
