"""Typed request and response bodies of the HTTP API (they make the OpenAPI schema at /docs).

Item ids are 63-bit integers; responses send them as decimal strings because JavaScript numbers
hold only 53 bits. Requests accept either form.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator

from vlsearch.query.shaping import FACET_LIMIT, MAX_DEPTH
from vlsearch.rerank.model import MAX_RERANK

from vlsearch.app.serve.config import MAX_RESULTS

MAX_TEXT_CHARS = 1000
MAX_VECTOR_DIM = 8192
MAX_ID = 2**63 - 1
MAX_TERMS = 32
MAX_EXAMPLES = 1000
QueryKind = Literal["text", "image", "vector", "id", "terms", "more_like"]


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
    # shaping the list (vlsearch.query.shaping)
    min_score: Optional[Union[StrictFloat, StrictInt]] = Field(None, description="Keep only hits scoring at least "
                                                               "this (cosine; its scale depends on model and query kind).")
    autocut: Optional[StrictInt] = Field(None, ge=1, le=100, description="Cut the list before its N-th score jump "
                                         "(Weaviate's autocut).")
    group_by: Optional[str] = Field(None, min_length=1, max_length=256, description="A metadata column (or `folder`): "
                                    "at most `per_group` hits per value.")
    per_group: Optional[StrictInt] = Field(None, ge=1, le=MAX_RESULTS, description="Hits kept per group (default 1).")
    order_by: Optional[str] = Field(None, min_length=1, max_length=300, description="`column [ASC|DESC]`: sort the "
                                    "relevant set (hits passing min_score/autocut, else the top `depth`).")
    depth: Optional[StrictInt] = Field(None, ge=1, le=MAX_DEPTH, description="Candidates the list is shaped from "
                                       "(default: k, or max(k, 100) with group_by/order_by/facets).")
    facets: Optional[list[str]] = Field(None, max_length=16, description="Columns whose values are counted among the "
                                        "relevant set.")
    dedup: Optional[Union[StrictBool, StrictFloat, StrictInt]] = Field(
        None, description="Collapse near-duplicate hits into their best-ranked one (true: the default cosine "
        "threshold; a number: that threshold, in (0, 1]); still k hits when enough distinct ones exist.")

    @model_validator(mode="after")
    def _bounded(self) -> "SearchParams":
        if self.k + self.offset > MAX_RESULTS:
            raise ValueError(f"k + offset must be at most {MAX_RESULTS}, got {self.k + self.offset}")
        return self


class TermModel(BaseModel):
    """One weighted term of a ``terms`` query: exactly one of ``text``, ``image_base64`` or ``id``."""

    model_config = ConfigDict(extra="forbid")

    text: Optional[str] = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    image_base64: Optional[str] = Field(None, min_length=1, description="An encoded image (JPEG, PNG...), base64.")
    id: Optional[Union[StrictInt, str]] = Field(None, description="A stored item (its stored vector).")
    weight: Union[StrictFloat, StrictInt] = Field(1.0, description="Negative: away from the term.")

    @field_validator("id")
    @classmethod
    def _id(cls, value: Any) -> Optional[int]:
        return None if value is None else parse_id(value)

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("a term's weight is a finite number")
        return value

    @field_validator("text")
    @classmethod
    def _text(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            raise ValueError("a text term is blank")
        return value

    @model_validator(mode="after")
    def _one_value(self) -> "TermModel":
        given = [n for n in ("text", "image_base64", "id") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"a term has exactly one of text, image_base64 or id (got {given or 'none'})")
        return self


class SearchRequest(SearchParams):
    """A search by exactly one of: ``text``, ``vector``, ``image_base64``, ``id`` (more like this)
    or ``terms`` (a weighted list; the query vector is the normalised weighted sum of the
    normalised term embeddings)."""

    text: Optional[str] = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    vector: Optional[list[Union[StrictFloat, StrictInt]]] = Field(None, min_length=1, max_length=MAX_VECTOR_DIM)
    image_base64: Optional[str] = Field(None, min_length=1, description="An encoded image (JPEG, PNG...), base64.")
    id: Optional[Union[StrictInt, str]] = Field(None, description="Items like this indexed item (excluded itself).")
    terms: Optional[list[TermModel]] = Field(None, min_length=1, max_length=MAX_TERMS, description="Weighted "
                                             "terms: texts, images, items (the items are left out of the hits).")
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
        given = [n for n in ("text", "vector", "image_base64", "id", "terms") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, vector, image_base64, id or terms (got {given or 'none'})")
        if self.mode != "vector" and self.text is None:
            raise ValueError(f"mode {self.mode!r} needs a text query")
        if self.alpha is not None and self.mode != "hybrid":
            raise ValueError("alpha applies to mode 'hybrid' only")
        return self

    @property
    def kind(self) -> QueryKind:
        return next(n for n in ("text", "vector", "id", "terms") if getattr(self, n) is not None) \
            if self.image_base64 is None else "image"


class MoreLikeRequest(SearchParams):
    """Recommend from stored examples: ``normalise(mean(positives) - negative_weight * mean(negatives))``
    of their vectors (Rocchio-like)."""

    positive_ids: list[Union[StrictInt, str]] = Field(..., min_length=1, max_length=MAX_EXAMPLES)
    negative_ids: list[Union[StrictInt, str]] = Field([], max_length=MAX_EXAMPLES)
    negative_weight: Union[StrictFloat, StrictInt] = Field(0.5, ge=0, le=100, description="Weight of the "
                                                           "negatives' mean against the positives'.")
    exclude_examples: StrictBool = Field(True, description="Leave the examples out of the hits.")

    @field_validator("positive_ids", "negative_ids")
    @classmethod
    def _ids(cls, value: list[Any]) -> list[int]:
        return [parse_id(v) for v in value]


class HitModel(BaseModel):
    rank: int
    id: str
    score: float
    path: Optional[str]
    caption: Optional[str]
    metadata: dict[str, Any]
    first_stage_score: Optional[float] = Field(None, description="With rerank: the first stage's cosine "
                                               "(score is then the re-rank score).")


class FacetValue(BaseModel):
    value: Any
    count: int


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
    facets: Optional[dict[str, list[FacetValue]]] = Field(
        None, description=f"With `facets`: each column's values among the relevant set, most frequent first (at most "
        f"{FACET_LIMIT}).")
    relevant: Optional[int] = Field(None, description="With shaping: how many candidates passed min_score/autocut.")
    version: Optional[int] = Field(None, description="The collection version the hits come from (one per request, "
                                   "even while the server follows a sync).")


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
    columns: list[str] = Field([], description="The columns a `where` filter may name.")
    facets: list[str] = Field([], description="Columns worth counting as `facets` (the page's): the text metadata "
                              "columns and `folder`, the directory part of `path`.")
    list_columns: list[str] = Field([], description="The columns holding lists (`captions`, `tags`): order_by and "
                                    "group_by cannot take them; filter one by element: `list_contains(tags, 'dog')`.")


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
