"""The demo's contact sheet: one row per query, its top hits as thumbnails with scores, positions and captions."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from vlsearch.core.progress import Progress

from vlsearch.app.demo_report import QueryResult

log = logging.getLogger(__name__)


#: Frame and label colours: the hit has the query's colour and shape (or position), or not.
FIT, MISFIT = (30, 170, 60), (220, 40, 40)
#: Pixels: the query column's width, the gap around cells, the text under a thumbnail.
LABEL_W, PAD, TEXT_H = 220, 6, 30


def draw_contact_sheet(
    results: Sequence[QueryResult],
    path: str | os.PathLike,
    roots: dict[str, str | os.PathLike],
    thumb: int = 96,
    progress: Optional[Progress] = None,
    attributes: Optional[Mapping[str, Mapping[str, str]]] = None,
) -> Path:
    """One row per query: the query (its text, or its picture and caption), then its hits with
    their scores and captions. Where the query names a colour and a shape, a green frame marks a
    hit that has both (what the demo's headline figure counts), a red one a hit that does not.

    ``roots["collection"]``/``roots["query"]``: folders the hits' / image queries' paths are
    relative to. ``attributes``: the collection's pictures' attributes by path (shapes mode); with
    them each label names the hit's position, green when it is the query's, red when the query
    names another. Written atomically as PNG.
    """
    from PIL import Image, ImageDraw

    from vlsearch.core.fsutil import atomic_path
    from vlsearch.data.images import open_image

    font = _font(12)
    k = max((len(r.hits) for r in results), default=1)
    cell_w, cell_h = thumb + PAD, thumb + TEXT_H + PAD
    sheet = Image.new("RGB", (LABEL_W + k * cell_w + PAD, max(1, len(results)) * cell_h + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for row, result in enumerate(results):
        y = PAD + row * cell_h
        picture = None
        if result.kind == "image":
            picture = _thumbnail(open_image, Path(roots["query"]) / result.query, thumb)
        _draw_query(sheet, draw, result, y, picture, thumb, font)
        fits = result.color_shape_matches
        for i, hit in enumerate(result.hits):
            x = LABEL_W + i * cell_w
            sheet.paste(_thumbnail(open_image, Path(roots["collection"]) / hit.path, thumb), (x, y))
            if fits is not None:
                colour = FIT if fits[i] else MISFIT
                draw.rectangle([x - 2, y - 2, x + thumb + 1, y + thumb + 1], outline=colour, width=2)
            position = (attributes or {}).get(hit.path, {}).get("position")
            label = hit_label(result, i, position)
            for j, (text, fill) in enumerate(label):
                _wrapped(draw, (x, y + thumb + 2 + 13 * j), text, thumb, font, lines=2 if len(label) == 1 else 1, fill=fill)
    out = Path(path)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    if progress is not None:
        progress(1, 1)
    return out


def hit_label(result: QueryResult, i: int, position: Optional[str]) -> list[tuple[str, Any]]:
    """The text under hit ``i`` as ``(line, colour)``: with the hit's ``position`` known, its score and
    position (green: the query's position, red: another, black: the query names none), then its
    caption; else one entry, score and caption (wrapped over two lines)."""
    hit = result.hits[i]
    caption = hit.caption or hit.path
    if position is None:
        return [(f"{hit.score:.2f} {caption}", "black")]
    wanted = (result.attribute_matches or {}).get("position")
    colour = "black" if wanted is None else (FIT if wanted[i] else MISFIT)
    return [(f"{hit.score:.2f} {position}", colour), (caption, "black")]


def _draw_query(sheet: Any, draw: Any, result: QueryResult, y: int, picture: Any, thumb: int, font: Any) -> None:
    """The row's query column: the text, or the picture and its caption; and how many hits fit."""
    if picture is not None:
        sheet.paste(picture, (PAD, y))
        draw.text((PAD + thumb + 4, y), "image query", fill="black", font=font)
        _wrapped(draw, (PAD, y + thumb + 2), result.caption or result.query, LABEL_W - 2 * PAD, font, lines=2)
    else:
        draw.text((PAD, y), "text query", fill="gray", font=font)
        _wrapped(draw, (PAD, y + 16), f'"{result.query}"', LABEL_W - 2 * PAD, font, lines=4)
    fits = result.color_shape_matches
    if fits is not None:
        xy = (PAD + thumb + 4, y + 16) if picture is not None else (PAD, y + thumb + PAD + 6)
        draw.text(xy, f"{sum(fits)}/{len(fits)} colour+shape", fill="black", font=font)


def _thumbnail(open_image: Callable[..., Any], path: Path, size: int) -> Any:
    from PIL import Image

    try:
        img = open_image(path)
    except Exception as exc:  # a hit whose file went away: show a grey square, not a crash
        log.warning("cannot show %s: %s", path, exc)
        return Image.new("RGB", (size, size), (200, 200, 200))
    scale = size / max(img.size)
    resample = Image.NEAREST if scale >= 1.5 else Image.BICUBIC  # keep tiny pictures crisp
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _wrapped(draw: Any, xy: tuple[int, int], text: str, width: int, font: Any, lines: int, fill: Any = "black") -> None:
    """Draw ``text`` word-wrapped to ``width`` pixels, at most ``lines`` lines (ellipsis if cut)."""
    words, out, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            out.append(line)
            line = word
    if line:
        out.append(line)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1].rstrip(".,") + "..."
    x, y = xy
    for i, text_line in enumerate(out):
        draw.text((x, y + i * 13), text_line, fill=fill, font=font)
