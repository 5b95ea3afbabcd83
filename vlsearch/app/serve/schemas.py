"""Typed request and response bodies of the HTTP API (they make the OpenAPI schema at /docs).

Item ids are 63-bit integers; responses send them as decimal strings because JavaScript numbers
hold only 53 bits. Requests accept either form.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator

from vlsearch.rerank.model import MAX_RERANK

from vlsearch.app.serve.config import MAX_RESULTS

MAX_TEXT_CHARS = 1000
MAX_VECTOR_DIM = 8192
MAX_ID = 2**63 - 1
QueryKind = Literal["text", "image", "vector", "id"]


def parse_id(value: Any) -> int:
    """An item id from an int or a decimal string; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("an item id is an integer (or its decimal string)")
    if isinstance(value, str) and not (value.isascii() and value.isdigit() and len(value) <= 19):
        raise ValueError("an item id is a non-negative decimal integer")
    number = int(value)
    if not 0 <= number <= MAX_ID:
        raise ValueError(f"an item id is in 0..{MAX_ID}")
    return number


class SearchParams(BaseModel):
    """Parameters every search takes."""

    model_config = ConfigDict(extra="forbid")

    k: StrictInt = Field(10, ge=1, le=MAX_RESULTS, description="Results to return.")
    offset: StrictInt = Field(0, ge=0, le=MAX_RESULTS, description="Skip this many results (pagination).")
    nprobe: Optional[StrictInt] = Field(None, ge=1, le=1 << 20,
                                        description="IVF lists to probe (default: the index's).")
    k_factor: Optional[Union[StrictInt, StrictFloat]] = Field(None, ge=1, le=1000,
                                                              description="Refine stage: re-rank k*F candidates.")
    exact: StrictBool = Field(False, description="Exact brute-force search over the shards instead of the ANN index.")
    where: Optional[str] = Field(None, max_length=2000,
                                 description="Metadata filter (only on collections that support filters).")
    rerank: StrictInt = Field(0, ge=0, le=MAX_RERANK, description="Text queries: re-score the top K (>= k + offset) "
                              "with the cross-attention re-ranker (0 = off).")

    @model_validator(mode="after")
    def _bounded(self) -> "SearchParams":
        if self.k + self.offset > MAX_RESULTS:
            raise ValueError(f"k + offset must be at most {MAX_RESULTS}, got {self.k + self.offset}")
        return self


class SearchRequest(SearchParams):
    """A search by exactly one of: ``text``, ``vector``, ``image_base64`` or ``id`` (more like this)."""

    text: Optional[str] = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    vector: Optional[list[Union[StrictFloat, StrictInt]]] = Field(None, min_length=1, max_length=MAX_VECTOR_DIM)
    image_base64: Optional[str] = Field(None, min_length=1, description="An encoded image (JPEG, PNG...), base64.")
    id: Optional[Union[StrictInt, str]] = Field(None, description="Items like this indexed item (excluded itself).")
    mode: Literal["vector", "keyword", "hybrid"] = Field(
        "vector", description="Text queries: vector (embedding k-NN, score = cosine), keyword (BM25 over captions, "
        "path words and text metadata; phrases, field prefixes like path:beach) or hybrid (both, fused by "
        "Reciprocal Rank Fusion, k=60).")
    alpha: Optional[Union[StrictFloat, StrictInt]] = Field(
        None, ge=0, le=1, description="mode=hybrid: weighted fusion of min-max normalised scores instead of RRF "
        "(alpha * vector + (1 - alpha) * keyword).")

    @field_validator("id")
    @classmethod
    def _id(cls, value: Any) -> Optional[int]:
        return None if value is None else parse_id(value)

    @field_validator("text")
    @classmethod
    def _text(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            raise ValueError("the query text is blank")
        return value

    @field_validator("vector")
    @classmethod
    def _finite(cls, value: Optional[list[float]]) -> Optional[list[float]]:
        if value is not None and not all(math.isfinite(v) for v in value):
            raise ValueError("the query vector has non-finite values")
        return value

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        given = [n for n in ("text", "vector", "image_base64", "id") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, vector, image_base64 or id (got {given or 'none'})")
        if self.mode != "vector" and self.text is None:
            raise ValueError(f"mode {self.mode!r} needs a text query")
        if self.alpha is not None and self.mode != "hybrid":
            raise ValueError("alpha applies to mode 'hybrid' only")
        return self

    @property
    def kind(self) -> QueryKind:
        return next(n for n in ("text", "vector", "id") if getattr(self, n) is not None) \
            if self.image_base64 is None else "image"


class HitModel(BaseModel):
    rank: int
    id: str
    score: float
    path: Optional[str]
    caption: Optional[str]
    metadata: dict[str, Any]
    first_stage_score: Optional[float] = Field(None, description="With rerank: the first stage's cosine "
                                               "(score is then the re-rank score).")


class SearchResponse(BaseModel):
    collection: str
    query: QueryKind
    k: int
    offset: int
    exact: bool
    hits: list[HitModel]
    next_offset: Optional[int] = Field(description="Offset of the next page, or null when this was the last.")
    took_ms: float = Field(description="Server time for the whole request.")
    embed_ms: float = Field(description="Time to turn the query into a vector.")
    search_ms: float = Field(description="Time of the index (or exact) search and the metadata lookup.")


class ModelModel(BaseModel):
    name: str
    pretrained: Optional[str]
    dim: int


class IndexModel(BaseModel):
    factory: Optional[str]
    metric: Optional[str]
    ntotal: Optional[int]
    nprobe_default: Optional[int]


class ServedVersion(BaseModel):
    version: int = Field(description="The collection version served now (the server moves to each new one a "
                         "sync commits, unless started with --pin-version).")
    loaded_at: str = Field(description="When the server loaded that version (ISO 8601, UTC).")


class CollectionInfo(ServedVersion):
    name: str
    images: int
    dim: int
    model: ModelModel
    index: Optional[IndexModel]
    source: Optional[str] = Field(description="folder, manifest or webdataset (null: images are not served).")
    filters: bool = Field(description="Whether `where` filters are supported.")


class ItemModel(BaseModel):
    collection: str
    id: str
    path: Optional[str]
    caption: Optional[str]
    captions: list[str]
    metadata: dict[str, Any]


class Health(BaseModel):
    status: Literal["ok"]
    collections: int
    versions: dict[str, ServedVersion] = Field(description="Each collection's served version, by name.")


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong, for a person.")
    type: str = Field(description="The vlsearch error class (clients re-raise it).")
