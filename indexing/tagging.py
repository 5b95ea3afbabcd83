"""Auto-tags: zero-shot tags for a collection's photos, from their stored image embeddings.

::

    report = tag_collection("photos.vls")                      # built-in vocabulary, calibrated min score
    report = tag_collection("photos.vls", TagConfig(vocabulary="my-tags.txt", min_score=0.3, max_tags=3))
    Searcher.open("photos.vls").search_text("beach", where="list_contains(tags, 'dog')")

Each tag of a vocabulary gets a text prototype, the mean of its prompt-template embeddings
(:func:`vlsearch.eval.zeroshot.zero_shot_classifier`, "a photo of a {}." ...). A photo's score for
a tag is the cosine of its *stored* image embedding with that prototype: nothing is decoded or
re-encoded. A photo keeps its best ``max_tags`` tags scoring at least ``min_score``, written as two
columns through :func:`vlsearch.store.columns.set_columns` (one new version):

* ``tags`` (list<string>): best first; an empty list when no tag reached ``min_score`` (a tagged
  photo), null for photos never tagged (what ``only_new`` tags);
* ``tag_scores`` (list<float32>): their cosines, in the same order.

**Vocabulary.** The built-in one (:data:`BUILTIN_VOCABULARY`, everyday objects, people, animals and
scenes, a few hundred tags) or the user's file: JSON (``[{"tag": "dog", "synonyms": ["puppy"]}]``
or a list of strings) or text, one tag per line, ``tag: synonym, synonym`` for synonyms, ``#`` for
comments. Synonyms are what the tag also counts as when tags are measured against captions; only
the tag itself is prompted and stored.

**Calibration.** Cosine scales differ between models, and between tags of one model (some tag
texts sit close to many photos), so without ``min_score`` each tag's threshold is the model's
calibrated one in :data:`CALIBRATION_FILE`, measured by ``benchmarks/bench_tags.py`` on
Flickr8k-train, never the test split (:func:`calibrate_min_score`: the lowest score at which the
photos' top tags are still right at the target precision): a photo's best tag needs its own
threshold (``tag_scores``) where that tag is the top tag of enough calibration photos
(:data:`MIN_CALIBRATION_PHOTOS`), else the model's (``min_score``, all tags together); its other
tags need both (they were never calibrated as a second tag). A model without a calibration needs
an explicit ``min_score`` (:class:`~vlsearch.core.errors.TaggingError` otherwise), which then
applies to every tag.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlsearch.core.errors import TaggingError
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.core.progress import Progress
from vlsearch.eval.zeroshot import DEFAULT_TEMPLATES, zero_shot_classifier
from vlsearch.models.factory import load_model
from vlsearch.store.collection import Collection
from vlsearch.store.columns import set_columns

log = logging.getLogger(__name__)

VOCABULARY_DIR = Path(__file__).resolve().parent / "vocabularies"
#: The built-in vocabulary: everyday objects, people, animals and scenes.
BUILTIN_VOCABULARY = VOCABULARY_DIR / "everyday.json"
#: Calibrated ``min_score`` per model (``name/pretrained``), written by benchmarks/bench_tags.py.
CALIBRATION_FILE = VOCABULARY_DIR / "calibration.json"
TAGS, TAG_SCORES = "tags", "tag_scores"
DEFAULT_MAX_TAGS = 5
#: A tag gets its own calibrated threshold when it is the top tag of this many calibration photos.
MIN_CALIBRATION_PHOTOS = 40
#: Photos scored per block (bounds the (block, tags) score matrix).
_BLOCK = 16_384
_WORD_RE = re.compile(r"[a-z0-9]+")


def words(text: str) -> str:
    """``text`` as lower-case words joined by single spaces (how tags are matched against captions)."""
    return " ".join(_WORD_RE.findall(str(text).lower()))


@dataclass(frozen=True)
class Vocabulary:
    """Tags, each with the synonyms it also counts as (see the module docstring)."""

    tags: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    name: str = "custom"

    @classmethod
    def of(cls, entries: Sequence[Any], name: str = "custom") -> "Vocabulary":
        """From ``[{"tag": t, "synonyms": [...]}, ...]`` or ``["t", ...]``; TaggingError when malformed."""
        tags, synonyms = [], []
        for entry in entries:
            tag, syns = (entry, []) if isinstance(entry, str) else _entry(entry, name)
            tags.append(str(tag).strip())
            synonyms.append(tuple(s.strip() for s in syns if str(s).strip()))
        empty = [i for i, t in enumerate(tags) if not t]
        if len(tags) < 2 or empty:
            raise TaggingError(f"vocabulary {name} needs at least 2 non-empty tags"
                               + (f" (entry {empty[0] + 1} is empty)" if empty else ""))
        if len({words(t) for t in tags}) != len(tags):
            raise TaggingError(f"vocabulary {name} lists a tag twice")
        return cls(tuple(tags), tuple(synonyms), name)

    def terms(self, i: int) -> tuple[str, ...]:
        """Tag ``i`` and its synonyms, as :func:`words`."""
        return tuple(words(t) for t in (self.tags[i], *self.synonyms[i]))

    def matches(self, i: int, text: str) -> bool:
        """Whether tag ``i`` or one of its synonyms is a word (or phrase) of ``text``."""
        padded = f" {words(text)} "
        return any(f" {term} " in padded for term in self.terms(i) if term)


def _entry(entry: Any, name: str) -> tuple[str, Sequence[str]]:
    if not isinstance(entry, dict) or not isinstance(entry.get("tag"), str):
        raise TaggingError(f"vocabulary {name}: each entry must be a string or {{\"tag\": ..., \"synonyms\": [...]}}, "
                           f"got {entry!r}")
    syns = entry.get("synonyms") or []
    if isinstance(syns, str) or not all(isinstance(s, str) for s in syns):
        raise TaggingError(f"vocabulary {name}: the synonyms of {entry['tag']!r} must be a list of strings")
    return entry["tag"], syns


def read_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """The vocabulary in ``path`` (JSON or text, see the module docstring); None: the built-in one."""
    if path is None:
        return Vocabulary.of(json.loads(BUILTIN_VOCABULARY.read_text(encoding="utf-8")), "everyday")
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaggingError(f"cannot read vocabulary {path}: {exc}") from exc
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaggingError(f"vocabulary {path} is not valid JSON: {exc}") from exc
        if not isinstance(entries, list):
            raise TaggingError(f"vocabulary {path} must hold a JSON list of tags")
        return Vocabulary.of(entries, str(path))
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            tag, _, syns = line.partition(":")
            entries.append({"tag": tag, "synonyms": [s for s in syns.split(",") if s.strip()]})
    return Vocabulary.of(entries, str(path))


def _model_key(model: ModelInfo) -> str:
    return f"{model.name}/{model.pretrained}"


def read_calibration() -> dict[str, dict[str, Any]]:
    """Every recorded calibration: ``"model/pretrained"`` -> ``{"min_score": ..., provenance}``."""
    if not CALIBRATION_FILE.is_file():
        return {}
    return json.loads(CALIBRATION_FILE.read_text(encoding="utf-8"))


def calibrated_min_score(model: ModelInfo) -> float:
    """The calibrated ``min_score`` of ``model`` (all tags together); TaggingError when it has none."""
    return float(_calibration(model)["min_score"])


def calibrated_tag_scores(model: ModelInfo, tags: Sequence[str]) -> np.ndarray:
    """Each tag's calibrated threshold for ``model``: its own where calibrated, else the model's."""
    entry = _calibration(model)
    own = {words(t): float(v) for t, v in (entry.get("tag_scores") or {}).items()}
    return np.array([own.get(words(t), float(entry["min_score"])) for t in tags], np.float32)


def _calibration(model: ModelInfo) -> dict[str, Any]:
    entry = read_calibration().get(_model_key(model))
    if entry is None:
        known = ", ".join(read_calibration()) or "none"
        raise TaggingError(f"no calibrated tag score for {_model_key(model)} (calibrated: {known}); "
                           "pass min_score (--min-score), e.g. measured with benchmarks/bench_tags.py")
    return entry


def calibrate_tag_scores(top_tags: Sequence[str], top_scores: np.ndarray, top_correct: np.ndarray,
                         precision: float, min_photos: int = MIN_CALIBRATION_PHOTOS) -> dict[str, float]:
    """Per-tag thresholds (:func:`calibrate_min_score` over the photos whose top tag it is) for
    each tag that is the top tag of at least ``min_photos`` calibration photos."""
    names = np.asarray(top_tags, dtype=object)
    scores, correct = np.asarray(top_scores), np.asarray(top_correct, bool)
    out = {}
    for tag in sorted(set(names.tolist())):
        mine = names == tag
        if mine.sum() >= min_photos:
            out[tag] = round(calibrate_min_score(scores[mine], correct[mine], precision, min_kept=5), 4)
    return out


def calibrate_min_score(top_scores: np.ndarray, top_correct: np.ndarray, precision: float,
                        min_kept: int = 20) -> float:
    """The lowest score ``t`` at which the photos whose top tag scores ``>= t`` have a correct top
    tag at least ``precision`` of the time (at least ``min_kept`` photos kept; the highest score if
    no such ``t``). ``top_scores``/``top_correct``: each held-out photo's top-tag score and whether
    that tag is right."""
    order = np.argsort(-np.asarray(top_scores, np.float64), kind="stable")
    scores, correct = np.asarray(top_scores)[order], np.asarray(top_correct, bool)[order]
    running = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    ok = np.flatnonzero((running >= precision) & (np.arange(1, len(correct) + 1) >= min_kept))
    return float(scores[ok[-1]] if len(ok) else scores[0])


def top_tags(vectors: np.ndarray, prototypes: np.ndarray, min_score: float | np.ndarray, max_tags: int,
             rest_min_score: float | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """For each row of ``vectors`` (unit norm), the indices and cosines of its best ``max_tags``
    prototypes scoring at least ``min_score`` (one for all, or one per prototype), best first.
    ``rest_min_score``: what every tag but a row's best must score at least, too."""
    threshold = np.broadcast_to(np.asarray(min_score, np.float32), (len(prototypes),))
    rest = threshold if rest_min_score is None else np.maximum(threshold, np.float32(rest_min_score))
    indices: list[list[int]] = []
    scores: list[list[float]] = []
    n = min(max_tags, len(prototypes))
    for start in range(0, len(vectors), _BLOCK):
        sims = vectors[start:start + _BLOCK] @ prototypes.T
        best = np.argpartition(-sims, n - 1, axis=1)[:, :n] if n < sims.shape[1] else np.tile(
            np.arange(sims.shape[1]), (len(sims), 1))
        best_scores = np.take_along_axis(sims, best, axis=1)
        order = np.argsort(-best_scores, axis=1, kind="stable")
        best, best_scores = np.take_along_axis(best, order, 1), np.take_along_axis(best_scores, order, 1)
        for row, row_scores in zip(best, best_scores):
            keep = row_scores >= np.concatenate([threshold[row[:1]], rest[row[1:]]])
            indices.append(row[keep].tolist())
            scores.append(row_scores[keep].tolist())
    return indices, scores


@dataclass(frozen=True)
class TagConfig:
    """How :func:`tag_collection` tags: vocabulary file (None: built-in), ``min_score`` (None: the
    model's calibrated thresholds), at most ``max_tags`` per photo, only untagged rows (``only_new``)."""

    vocabulary: str | None = None
    min_score: float | None = None
    max_tags: int = DEFAULT_MAX_TAGS
    only_new: bool = False
    templates: tuple[str, ...] = DEFAULT_TEMPLATES


@dataclass(frozen=True)
class TagReport:
    """What :func:`tag_collection` did: ``rows`` tagged (``tagged`` of them got at least one tag),
    ``skipped`` rows (already tagged, with ``only_new``), the score and count limits used
    (``min_score``: the lowest tag threshold; ``calibrated``: whether they were the model's), the
    vocabulary, the most frequent tags (tag -> photos) and the new ``version`` (None: nothing to tag)."""

    rows: int
    tagged: int
    skipped: int
    min_score: float
    calibrated: bool
    max_tags: int
    vocabulary: str
    vocabulary_size: int
    top: dict[str, int]
    version: int | None


def tag_collection(collection: str | Path | Collection, config: TagConfig = TagConfig(), encoder: Any = None,
                   progress: Progress | None = None) -> TagReport:
    """Tag the collection's photos (see the module docstring) as one new version. ``encoder``: the
    collection's model, already loaded (default: loaded from the manifest). Raises TaggingError
    (vocabulary, uncalibrated model) and CollectionMismatchError (an encoder of another model)."""
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    if isinstance(config.max_tags, bool) or not isinstance(config.max_tags, int) or config.max_tags < 1:
        raise TaggingError(f"max_tags must be a positive integer, got {config.max_tags!r}")
    vocabulary = read_vocabulary(config.vocabulary)
    calibrated = config.min_score is None
    min_score = calibrated_tag_scores(coll.model, vocabulary.tags) if calibrated else float(config.min_score)
    encoder = encoder if encoder is not None else load_model(coll.model.name, coll.model.pretrained)
    coll.check_model(encoder.info)
    prototypes = zero_shot_classifier(encoder, vocabulary.tags, config.templates)
    rest = calibrated_min_score(coll.model) if calibrated else None  # tags' own scores count for the best only
    ids, indices, scores = _score(coll, config.only_new, prototypes, min_score, config.max_tags, rest)
    skipped = coll.count() - len(ids)
    report = dict(rows=len(ids), skipped=skipped, min_score=float(np.min(min_score)), calibrated=calibrated,
                  max_tags=config.max_tags, vocabulary=vocabulary.name, vocabulary_size=len(vocabulary.tags))
    if not len(ids):
        return TagReport(tagged=0, top={}, version=None, **report)
    names = [[vocabulary.tags[i] for i in row] for row in indices]
    values = pa.table({"id": pa.array(ids, pa.int64()),
                       TAGS: pa.array(names, pa.list_(pa.string())),
                       TAG_SCORES: pa.array(scores, pa.list_(pa.float32()))})
    result = set_columns(coll, values, progress=None if progress is None else
                         lambda done, total: progress(done, total, stage="write"))
    top = dict(Counter(name for row in names for name in row).most_common(10))
    log.info("tagged %d rows of %s (version %d)", len(ids), coll.path, result["version"])
    return TagReport(tagged=sum(1 for row in names if row), top=top, version=result["version"], **report)


def _rows_to_tag(coll: Collection, only_new: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of the live rows' ids and unit-norm embeddings (streamed: memory stays bounded);
    with ``only_new``, of rows whose tags are null (rows of shards without a ``tags`` column,
    written by a later sync, count as null)."""
    tagged = np.zeros(0, np.int64)
    if only_new:
        parts = [table.filter(table.column(TAGS).is_valid()).column("id").to_numpy()
                 for table in (coll.read_shard(p, columns=["id", TAGS]) for p in coll.shard_paths()
                               if TAGS in pq.read_schema(p).names)]
        tagged = np.concatenate(parts) if parts else tagged
    for ids, vectors in coll.iter_embeddings(batch_size=_BLOCK):
        keep = ~np.isin(ids, tagged)
        vectors = vectors[keep] / np.linalg.norm(vectors[keep], axis=1, keepdims=True).clip(1e-12)
        yield ids[keep], vectors.astype(np.float32)


def _score(coll: Collection, only_new: bool, prototypes: np.ndarray, min_score: float | np.ndarray,
           max_tags: int, rest: float | None) -> tuple[np.ndarray, list[list[int]], list[list[float]]]:
    """The ids of the rows to tag and their :func:`top_tags`, batch by batch."""
    ids, indices, scores = [], [], []
    for batch_ids, vectors in _rows_to_tag(coll, only_new):
        batch_indices, batch_scores = top_tags(vectors, prototypes, min_score, max_tags, rest)
        ids.append(batch_ids)
        indices += batch_indices
        scores += batch_scores
    return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), indices, scores


__all__ = ["BUILTIN_VOCABULARY", "CALIBRATION_FILE", "DEFAULT_MAX_TAGS", "MIN_CALIBRATION_PHOTOS", "TAGS", "TAG_SCORES", "TagConfig",
           "TagReport", "Vocabulary", "calibrate_min_score", "calibrate_tag_scores", "calibrated_min_score",
           "calibrated_tag_scores", "read_calibration",
           "read_vocabulary", "tag_collection", "top_tags", "words"]
