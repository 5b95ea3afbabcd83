"""The demo's contact sheet: one row per query, its top hits as thumbnails with captions and scores."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from vlsearch.core.progress import Progress

from vlsearch.app.demo_report import QueryResult

log = logging.getLogger(__name__)


def draw_contact_sheet(
    results: Sequence[QueryResult],
    path: str | os.PathLike,
    roots: dict[str, str | os.PathLike],
    thumb: int = 96,
    progress: Optional[Progress] = None,
) -> Path:
    """One row per query: the query (its text, or its picture and caption), then its hits with
    their captions and scores; a green frame marks a hit that fits the query, red one that does not.

    ``roots["collection"]``/``roots["query"]``: folders the hits' / image queries' paths are
    relative to. Written atomically as PNG.
    """
    from PIL import Image, ImageDraw

    from vlsearch.core.fsutil import atomic_path
    from vlsearch.data.images import open_image

    font = _font(12)
    k = max((len(r.hits) for r in results), default=1)
    label_w, pad, text_h = 220, 6, 30
    cell_w, cell_h = thumb + pad, thumb + text_h + pad
    sheet = Image.new("RGB", (label_w + k * cell_w + pad, max(1, len(results)) * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for row, result in enumerate(results):
        y = pad + row * cell_h
        if result.kind == "image":
            picture = _thumbnail(open_image, Path(roots["query"]) / result.query, thumb)
            sheet.paste(picture, (pad, y))
            draw.text((pad + thumb + 4, y), "image query", fill="black", font=font)
            _wrapped(draw, (pad, y + thumb + 2), result.caption or result.query, label_w - 2 * pad, font, lines=2)
        else:
            draw.text((pad, y), "text query", fill="gray", font=font)
            _wrapped(draw, (pad, y + 16), f'"{result.query}"', label_w - 2 * pad, font, lines=4)
        if result.matches is not None:
            fit = f"{sum(result.matches)}/{len(result.matches)} hits fit"
            fit_xy = (pad, y + cell_h - text_h + 6) if result.kind == "text" else (pad + thumb + 4, y + 16)
            draw.text(fit_xy, fit, fill="black", font=font)
        for i, hit in enumerate(result.hits):
            x = label_w + i * cell_w
            sheet.paste(_thumbnail(open_image, Path(roots["collection"]) / hit.path, thumb), (x, y))
            if result.matches is not None:
                color = (30, 170, 60) if result.matches[i] else (220, 40, 40)
                draw.rectangle([x - 2, y - 2, x + thumb + 1, y + thumb + 1], outline=color, width=2)
            _wrapped(draw, (x, y + thumb + 2), f"{hit.score:.2f} {hit.caption or hit.path}", thumb, font, lines=2)
    out = Path(path)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    if progress is not None:
        progress(1, 1)
    return out


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


def _wrapped(draw: Any, xy: tuple[int, int], text: str, width: int, font: Any, lines: int) -> None:
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
        draw.text((x, y + i * 13), text_line, fill="black", font=font)
