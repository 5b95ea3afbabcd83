"""Search results: :class:`Hit`, the per-query :class:`Hits` and batch :class:`Results` lists
(convertible to Arrow / pandas tables), and their plain-text and JSON-lines renderings."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import pyarrow as pa

from vlsearch.store.layout import FILE_COLUMNS

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

#: Columns of an image shard that are not copied into ``Hit.metadata``.
NOT_METADATA = ("id", "path", "captions", "embedding", *FILE_COLUMNS)


@dataclass(frozen=True)
class Hit:
    """One search result. ``rank`` starts at 1; ``score`` is the cosine similarity to the query;
    ``caption`` is the image's first caption (None if it has none); ``metadata`` holds width,
    height and any extra columns of the image shard. With re-ranking (``rerank=K``), ``score`` is the
    re-rank score and ``first_stage_score`` the first stage's cosine (else None)."""

    id: int
    score: float
    rank: int
    path: str
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    first_stage_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"rank": self.rank, "id": self.id, "score": self.score, "path": self.path,
               "caption": self.caption, "metadata": dict(self.metadata)}
        if self.first_stage_score is not None:
            out["first_stage_score"] = self.first_stage_score
        return out


_RESERVED = ("query", "rank", "id", "score", "path", "caption", "first_stage_score")


def _rows(batch: Sequence[Sequence[Hit]], with_query: bool) -> list[dict[str, Any]]:
    rows = []
    for q, hits in enumerate(batch):
        for h in hits:
            row: dict[str, Any] = {"query": q} if with_query else {}
            row.update(rank=h.rank, id=h.id, score=h.score, path=h.path, caption=h.caption)
            if h.first_stage_score is not None:
                row["first_stage_score"] = h.first_stage_score
            for key, value in h.metadata.items():
                row[f"metadata.{key}" if key in _RESERVED else key] = value
            rows.append(row)
    return rows


def _to_arrow(batch: Sequence[Sequence[Hit]], with_query: bool) -> pa.Table:
    types = {"query": pa.int64(), "rank": pa.int32(), "id": pa.int64(), "score": pa.float32(),
             "path": pa.string(), "caption": pa.string(), "first_stage_score": pa.float32()}
    rows = _rows(batch, with_query)
    names = list(types)[:-1] if with_query else list(types)[1:-1]
    for row in rows:  # metadata columns: union over all rows, in first-seen order
        names += [n for n in row if n not in names]
    return pa.table({n: pa.array([r.get(n) for r in rows], type=types.get(n)) for n in names})


class Hits(list):
    """The ranked hits of one query (a ``list[Hit]``), convertible to a table."""

    def to_arrow(self) -> pa.Table:
        """One row per hit: rank, id, score, path, caption, then one column per metadata key."""
        return _to_arrow([self], with_query=False)

    def to_pandas(self) -> "pd.DataFrame":
        return self.to_arrow().to_pandas()


class Results(list):
    """Hits of a batch of queries (a ``list[list[Hit]]``), convertible to one long table."""

    def to_arrow(self) -> pa.Table:
        """One row per hit, with a ``query`` column (the query's position in the batch)."""
        return _to_arrow(self, with_query=True)

    def to_pandas(self) -> "pd.DataFrame":
        return self.to_arrow().to_pandas()


def format_hits(hits: Sequence[Hit], caption_width: int = 70) -> str:
    """A plain-text table (rank, score, path, caption) of one query's hits."""
    if not hits:
        return "no results"

    def cut(text: str | None) -> str:
        text = (text or "").replace("\n", " ")
        return text if len(text) <= caption_width else text[: caption_width - 1] + "…"

    rows = [("rank", "score", "path", "caption")]
    rows += [(str(h.rank), f"{h.score:.4f}", h.path or "", cut(h.caption)) for h in hits]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:>{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows)


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for metadata values: dates and times as ISO 8601 (as the HTTP API
    gives them: ``2024-06-15T12:30:00+00:00``), anything else as its ``str``."""
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    return str(value)


def hits_to_json_lines(hits: Sequence[Hit]) -> str:
    """One JSON object per hit (rank, id, score, path, caption, metadata), newline-separated."""
    return "\n".join(json.dumps(h.to_dict(), default=json_default, ensure_ascii=False) for h in hits)


def make_hit(record: dict[str, Any], hit_id: int, score: float, rank: int,
             first_stage_score: float | None = None) -> Hit:
    """A Hit from a shard record (path, captions, metadata columns)."""
    captions = record.get("captions") or []
    meta = {key: value for key, value in record.items() if key not in NOT_METADATA}
    return Hit(id=hit_id, score=score, rank=rank, path=record.get("path"), caption=captions[0] if captions else None,
               metadata=meta, first_stage_score=first_stage_score)
