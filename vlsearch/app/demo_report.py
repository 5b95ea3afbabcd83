"""What a demo run made and measured: :class:`QueryResult`, :class:`DemoReport` (written as
``report.json``) and :func:`format_report`, its plain-text summary for the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from vlsearch.eval.bench import format_table


@dataclass(frozen=True)
class QueryResult:
    """One example query and its hits.

    Shapes mode: ``attribute_matches[attr][i]`` says whether hit i has the query's value of
    ``attr`` (the attributes a text query names; all four of a query picture's), ``matches[i]``
    whether it has all of them, and ``color_shape_matches[i]`` whether it has the query's colour
    and shape (the demo's headline figure). All are None when unknown (e.g. on photos).
    """

    kind: str  #: "text" or "image"
    query: str  #: the text, or the query image's path
    hits: list[Any]  #: ``vlsearch.query.searcher.Hit`` s, best first
    caption: Optional[str] = None  #: an image query's own caption
    attribute_matches: Optional[dict[str, list[bool]]] = None

    @property
    def matches(self) -> Optional[list[bool]]:
        if self.attribute_matches is None:
            return None
        return [all(per_attr[i] for per_attr in self.attribute_matches.values()) for i in range(len(self.hits))]

    @property
    def color_shape_matches(self) -> Optional[list[bool]]:
        """Per hit, whether it has the query's colour and shape (None unless the query names both)."""
        if self.attribute_matches is None or not {"color", "shape"} <= set(self.attribute_matches):
            return None
        return [c and s for c, s in zip(self.attribute_matches["color"], self.attribute_matches["shape"])]

    @property
    def attribute_precision(self) -> Optional[dict[str, float]]:
        """Per attribute, the fraction of the hits that have the query's value."""
        if self.attribute_matches is None or not self.hits:
            return None
        return {attr: sum(m) / len(m) for attr, m in self.attribute_matches.items()}

    @property
    def precision(self) -> Optional[float]:
        """Fraction of the hits that match the query (None when unknown)."""
        if not self.matches:
            return None
        return sum(self.matches) / len(self.matches)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "query": self.query, "caption": self.caption, "precision": self.precision,
                "attribute_precision": self.attribute_precision,
                "hits": [{**h.to_dict(), "match": None if self.matches is None else self.matches[i]}
                         for i, h in enumerate(self.hits)]}


@dataclass(frozen=True)
class DemoReport:
    """Everything the demo made and measured (see ``report.json`` in ``out_dir``)."""

    out_dir: Path
    mode: str  #: "shapes" (generated data, trained model) or "data" (the user's data)
    model: dict[str, Any]  #: name, pretrained (checkpoint path or tag), dim
    collection: Path
    index: dict[str, Any]  #: the collection manifest's index entry
    text_queries: list[QueryResult]
    image_queries: list[QueryResult]
    benchmark: dict[str, Any]  #: :func:`vlsearch.eval.bench.run_benchmark`'s result on the collection
    chance: dict[str, float]  #: Recall@K of a random ranking of the collection's images
    contact_sheet: Path
    timings: dict[str, float]  #: seconds per stage
    seconds: float
    dataset: dict[str, Any] = field(default_factory=dict)  #: manifests and counts (shapes mode) or the source
    training: Optional[dict[str, Any]] = None  #: steps, epochs, seconds, first/last loss (shapes mode)
    notes: list[str] = field(default_factory=list)  #: caveats worth reading (e.g. an untrained model)

    @property
    def report_path(self) -> Path:
        return self.out_dir / "report.json"

    @property
    def color_shape_precision(self) -> Optional[float]:
        """Share of all queries' hits whose picture has the query's colour and shape (None on photos)."""
        fits = [fit for q in (*self.text_queries, *self.image_queries) for fit in q.color_shape_matches or ()]
        return sum(fits) / len(fits) if fits else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "color_shape_precision": self.color_shape_precision,
            "out_dir": str(self.out_dir), "mode": self.mode, "model": self.model, "dataset": self.dataset,
            "training": self.training, "collection": str(self.collection), "index": self.index,
            "text_queries": [q.to_dict() for q in self.text_queries],
            "image_queries": [q.to_dict() for q in self.image_queries],
            "benchmark": self.benchmark, "chance": self.chance, "contact_sheet": str(self.contact_sheet),
            "timings": self.timings, "seconds": self.seconds, "notes": self.notes,
        }


def format_report(report: DemoReport, show: int = 3) -> str:
    """A plain-text summary of a demo run: queries and their top hits, the benchmark table,
    chance levels, timings and where everything was written."""
    lines: list[str] = []
    for title, results in (("text queries", report.text_queries), ("image queries", report.image_queries)):
        if not results:
            continue
        lines.append(f"== {title} (top {len(results[0].hits)} of {report.benchmark.get('n_images', '?')} images) ==")
        for r in results:
            head = f'"{r.query}"' if r.kind == "text" else f"{r.query} ({r.caption})"
            fit = ""
            if r.attribute_matches is not None:
                parts = ", ".join(f"{a} {sum(m)}/{len(m)}" for a, m in r.attribute_matches.items())
                fit = f"  -> {sum(r.matches)}/{len(r.matches)} fit all ({parts})"
            lines.append(f"{head}{fit}")
            for i, h in enumerate(r.hits[:show]):
                mark = "" if r.matches is None else ("ok " if r.matches[i] else "no ")
                lines.append(f"   {h.rank}. {h.score:.3f} {mark}{h.caption or h.path}")
    lines += ["", "== benchmark (held-out collection; recalls in %) ==", format_table(report.benchmark)]
    chance = ", ".join(f"{k} {100 * v:.1f}%" for k, v in report.chance.items())
    lines.append(f"chance (random ranking): {chance}")
    exact = report.benchmark["exact"]
    lines.append(f"text->image R@10 {100 * exact['t2i']['R@10']:.1f}% vs chance {100 * report.chance.get('R@10', 0):.1f}%;"
                 f" image->text R@10 {100 * exact['i2t']['R@10']:.1f}%")
    if report.color_shape_precision is not None:
        lines.append(f"hits with the query's colour and shape: {100 * report.color_shape_precision:.0f}% "
                     f"(all queries' top {len(report.text_queries[0].hits) if report.text_queries else '?'})")
    lines += [f"note: {n}" for n in report.notes]
    if report.training:
        t = report.training
        lines.append(f"training: {t['steps']} steps, {t['epochs']} epochs, {t['seconds']:.0f}s, "
                     f"loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}")
    lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in report.timings.items())
                 + f"; total {report.seconds:.0f}s")
    lines += [f"model:         {report.model['name']} ({report.model['pretrained']})",
              f"collection:    {report.collection}  (index {report.index.get('factory')})",
              f"contact sheet: {report.contact_sheet}",
              f"report:        {report.report_path}"]
    if report.mode == "shapes":
        lines.append(f"try:           vlsearch search {report.collection} \"a small green star at the top right\"")
    return "\n".join(lines)
