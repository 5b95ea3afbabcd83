"""Weighted multi-term queries and recommendation from examples: the query types and the vector
arithmetic, without any model (light: the HTTP client imports it too).

::

    from pathlib import Path
    from vlsearch.query.terms import Item, Query, Term
    hits = s.search([("a golden retriever", 2.0), (Path("pool.jpg"), 1.0), ("fruit", -1.0)])
    hits = s.search(Query.of(["a dog", Item(123)]))               # weight 1 each
    hits = s.more_like([12, 40], negative_ids=[7], k=10)

**Terms.** A term is a text (``str``), an image (a ``pathlib.Path`` or other ``os.PathLike``,
encoded ``bytes``, or a PIL image) or a stored item (:class:`Item`, its id: a bare ``int`` could be
a weight or a vector component, so ids are a kind of their own). A plain ``str`` is always a text:
give a file as a ``Path``. Each term has a finite weight, positive (towards) or negative (away).

**The query vector** is the normalised weighted sum of the normalised term embeddings::

    q = normalise(sum_i w_i * u_i / |u_i|)

* Each term embedding is normalised first, so that a term counts by its weight alone: CLIP-like
  text and image embeddings (and stored item vectors) need not have the same norm, and without
  this a modality would outweigh another whatever the weights say.
* The sum is normalised so that scores stay cosine similarities in [-1, 1], comparable with a
  plain text or image query's; only the weights' ratios matter (``2:a, 1:b`` ranks as ``4:a, 2:b``).
* A negative weight moves the query away from that term, as rclip's ``- fruit`` and Weaviate's
  ``moveAwayFrom`` do: a hit now scores ``sum_i w_i cos(x, u_i)`` (up to the sum's norm), so
  items close to a negative term drop.
* When the weighted sum is (about) zero, e.g. ``a - a``, there is no direction to search:
  :class:`ZeroQueryError` (an InvalidQueryError), never a vector of NaNs. "About" is relative:
  the sum's norm under ``1e-4`` times the sum of the absolute weights.

**Recommendation from examples** (:func:`feedback_vector`, ``Searcher.more_like``) is Rocchio's
feedback without an initial query::

    q = normalise(mean_p(u_p) - negative_weight * mean_n(u_n))

over the unit vectors of the positive and negative examples. ``negative_weight`` is 0.5 by
default: that a hit is wrong is weaker evidence than that one is right (Rocchio's classic settings
weigh it lower still, 0.15 against 0.75), and with 1 a single positive and a single negative
example would search for their difference alone, far from both.

**The CLI syntax** (:func:`parse_cli_terms`) is rclip's:
``"2:golden retriever" + ./pool.jpg - fruit``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vlsearch.core.errors import InvalidQueryError

#: The sum's norm below this fraction of the summed absolute weights counts as zero.
ZERO_TOLERANCE = 1e-4
#: The default weight of the negative examples' mean in :func:`feedback_vector`.
NEGATIVE_WEIGHT = 0.5


class ZeroQueryError(InvalidQueryError):
    """The weighted sum of a query's terms is (about) the zero vector: no direction to search."""


class TermSyntaxError(InvalidQueryError):
    """A command-line term list that does not parse."""


@dataclass(frozen=True)
class Item:
    """A stored item as a query term, by its id (its stored embedding is the term's vector)."""

    id: int

    def __post_init__(self) -> None:
        if isinstance(self.id, bool) or not isinstance(self.id, (int, np.integer)) or self.id < 0:
            raise InvalidQueryError(f"an item id is a non-negative integer, got {self.id!r}")
        object.__setattr__(self, "id", int(self.id))


def _is_image(value: Any) -> bool:
    """A path, encoded bytes or a PIL image (told by its type's module, without importing PIL)."""
    if isinstance(value, (os.PathLike, bytes, bytearray, memoryview)):
        return True
    return any(c.__module__ == "PIL.Image" and c.__name__ == "Image" for c in type(value).__mro__)


@dataclass(frozen=True)
class Term:
    """One weighted term: ``value`` is a text (str), an image (os.PathLike, bytes, PIL image) or
    an :class:`Item`; ``weight`` a finite number, negative to move away from the term."""

    value: Any
    weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, Real) or not math.isfinite(self.weight):
            raise InvalidQueryError(f"a term's weight is a finite number, got {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))
        if isinstance(self.value, str):
            if not self.value.strip():
                raise InvalidQueryError("a text term is empty")
        elif not isinstance(self.value, Item) and not _is_image(self.value):
            raise InvalidQueryError(
                f"a term is a text (str), an image (Path, bytes or PIL image) or an Item(id), "
                f"not a {type(self.value).__name__}")

    @property
    def kind(self) -> str:
        """``"text"``, ``"image"`` or ``"item"``."""
        if isinstance(self.value, str):
            return "text"
        return "item" if isinstance(self.value, Item) else "image"


#: What :meth:`Query.of` takes as one term: a :class:`Term`, a ``(value, weight)`` pair or a bare value.
TermLike = Any


@dataclass(frozen=True)
class Query:
    """A weighted list of terms (at least one). Build it with :meth:`of`."""

    terms: tuple[Term, ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise InvalidQueryError("a query needs at least one term")

    @classmethod
    def of(cls, query: "Query | TermLike | Sequence[TermLike]") -> "Query":
        """A Query from a Query, one term, or a list of terms; a term is a :class:`Term`, a
        ``(value, weight)`` pair, or a bare value (weight 1)."""
        if isinstance(query, Query):
            return query
        if isinstance(query, (list, tuple)):
            return cls(tuple(_term(t, i) for i, t in enumerate(query)))
        return cls((_term(query, 0),))

    @property
    def items(self) -> list[int]:
        """The ids of the item terms, in order."""
        return [t.value.id for t in self.terms if isinstance(t.value, Item)]

    @property
    def weights(self) -> np.ndarray:
        return np.array([t.weight for t in self.terms], np.float32)


def _term(value: Any, i: int) -> Term:
    if isinstance(value, Term):
        return value
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise InvalidQueryError(f"term {i} is a sequence of {len(value)}: give (value, weight) pairs")
        return Term(*value)
    if isinstance(value, (bool, Real)):
        raise InvalidQueryError(f"term {i} is a number ({value!r}): give a weighted term as a (value, weight) "
                                f"pair, and an item id as Item(id)")
    return Term(value)


def combine(vectors: np.ndarray, weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """The unit vector ``normalise(sum_i w_i * v_i / |v_i|)`` of ``(n, d)`` term vectors (see the
    module's docstring); ZeroQueryError when the sum is about zero."""
    vectors = np.asarray(vectors, np.float32)
    w = np.asarray(weights, np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(norms > 0) or not np.all(np.isfinite(vectors)):
        raise InvalidQueryError("a term's embedding is zero or not finite: it has no direction")
    total = (w[:, None] * (vectors / norms)).sum(axis=0)
    norm = float(np.linalg.norm(total))
    if not norm > ZERO_TOLERANCE * float(np.abs(w).sum()):
        raise ZeroQueryError("the query's terms cancel out (their weighted sum is about zero): "
                             "change a weight or add a term")
    return (total / norm).astype(np.float32)


def feedback_vector(positives: np.ndarray, negatives: np.ndarray | None = None,
                    negative_weight: float = NEGATIVE_WEIGHT) -> np.ndarray:
    """``normalise(mean(positives) - negative_weight * mean(negatives))`` over unit vectors
    (Rocchio without an initial query; see the module's docstring)."""
    positives = np.asarray(positives, np.float32)
    if not len(positives):
        raise InvalidQueryError("more_like needs at least one positive example")
    if isinstance(negative_weight, bool) or not isinstance(negative_weight, Real) \
            or not math.isfinite(negative_weight) or negative_weight < 0:
        raise InvalidQueryError(f"negative_weight is a finite number >= 0, got {negative_weight!r}")
    n_pos = len(positives)
    vectors, weights = [positives], [np.full(n_pos, 1.0 / n_pos)]
    if negatives is not None and len(negatives):
        vectors.append(np.asarray(negatives, np.float32))
        weights.append(np.full(len(negatives), -float(negative_weight) / len(negatives)))
    return combine(np.concatenate(vectors), np.concatenate(weights))


def check_examples(positive_ids: Sequence[int], negative_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """The example ids as ints (each an :class:`Item`'s), at least one positive, none on both sides."""
    if isinstance(positive_ids, (int, np.integer)) or isinstance(negative_ids, (int, np.integer)):
        raise InvalidQueryError("give the example ids as lists")
    pos, neg = [Item(i).id for i in positive_ids], [Item(i).id for i in negative_ids]
    if not pos:
        raise InvalidQueryError("more_like needs at least one positive example id")
    both = sorted(set(pos) & set(neg))
    if both:
        raise InvalidQueryError(f"item {both[0]} is both a positive and a negative example")
    return pos, neg


# ---- the command line: rclip's syntax ----------------------------------------------------------
_WEIGHT = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?):(.*)$", re.DOTALL)
_ID = re.compile(r"^id:(.*)$", re.DOTALL)
SIGNS = {"+": 1.0, "-": -1.0}


def parse_cli_terms(args: Sequence[str], is_file: Callable[[str], bool] = os.path.isfile) -> Query:
    """Command-line words -> a Query, rclip's way: ``"2:golden retriever" + ./pool.jpg - fruit``.

    * Terms are separated by the words ``+`` and ``-`` (the sign of the next term); the first
      term may have a sign too (``- fruit`` alone: away from fruit).
    * ``N:term`` weighs a term by N (a decimal number; ``2:dog``, ``0.5:id:12``); the sign
      multiplies it.
    * ``id:123``: the stored item 123; a word naming an existing file (``is_file``): that image;
      anything else: a text.

    TermSyntaxError for two terms without a sign between them (quote a multi-word text), a sign
    with no term after it, an empty term, or a bad id."""
    terms: list[Term] = []
    sign: float | None = 1.0  # None: a term was just read, a sign must come next
    signed = False  # the last word was a sign
    for word in args:
        if word in SIGNS:
            if signed:
                raise TermSyntaxError(f"two signs in a row before {word!r}: put a term between them")
            sign, signed = SIGNS[word], True
            continue
        if sign is None:
            raise TermSyntaxError(f"{word!r} follows the term {_shown(terms[-1])!r} without a + or - between "
                                  "them (quote a text of several words: \"a red car\")")
        terms.append(_cli_term(word, sign, is_file))
        sign, signed = None, False
    if signed:
        raise TermSyntaxError("the query ends with a sign and no term after it")
    if not terms:
        raise TermSyntaxError("no query term given")
    return Query(tuple(terms))


def plain_text(args: Sequence[str]) -> str | None:
    """The text, when the command-line words are one plain text (no sign, ``N:`` or ``id:``, and
    not checked for a file: ``search COLL dog`` searches the text whatever files exist); else None."""
    if len(args) != 1 or args[0] in SIGNS or _WEIGHT.match(args[0]) or _ID.match(args[0]):
        return None
    return args[0]


def _cli_term(word: str, sign: float, is_file: Callable[[str], bool]) -> Term:
    weight, body = 1.0, word
    match = _WEIGHT.match(word)
    if match:
        weight, body = float(match.group(1)), match.group(2)
    if not body.strip():
        raise TermSyntaxError(f"the term {word!r} is empty")
    item = _ID.match(body)
    if item:
        value = item.group(1).strip()
        if not (value.isascii() and value.isdigit()):
            raise TermSyntaxError(f"bad item id in {word!r}: id:N takes a non-negative integer")
        return Term(Item(int(value)), sign * weight)
    return Term(Path(body) if is_file(body) else body, sign * weight)


def _shown(term: Term) -> str:
    """A term as the command line would write it (for messages)."""
    value = term.value
    return f"id:{value.id}" if isinstance(value, Item) else str(value)
