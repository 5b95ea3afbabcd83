"""A procedural captioned image set: coloured shapes on textured backgrounds.

Each picture holds one shape with four visible attributes — kind, colour, size and position on a
3x3 grid — drawn on a noisy, low-saturation background, and is described by captions such as
"a small red circle at the top left" (training pictures optionally also get shorter ones such as
"a red circle"). Everything is deterministic by seed and needs no network
or data, so the demo, the tests and the trainer have a dataset whose answers are known.

Layout written by :func:`generate_shapes` (each split is a "captioned folder" in the same format
as the Flickr8k splits: ``captions.csv`` with columns ``image,caption``, paths relative to it)::

    out/
      train/captions.csv     image,caption (``captions_per_image`` + ``partial_captions`` rows per image)
      train/attributes.csv   image,shape,color,size,position,x,y,radius,angle
      train/images/000000.png
      heldout/...            the same, for the held-out split

Attribute combinations are dealt from a seeded permutation of all combinations, cycled, so the
splits are balanced and a held-out split of at most ``n_combinations`` images has a distinct
attribute set (and so a distinct first caption) per image. Image ``i`` of a split depends only on
``(seed, split, i)``: a smaller dataset is a prefix of a larger one.
"""

from __future__ import annotations

import csv
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from vlsearch.core.fsutil import atomic_path
from vlsearch.core.progress import Progress

#: Saturated colours with well-separated hues, against a low-saturation background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "yellow": (240, 220, 30),
    "green": (30, 190, 50),
    "cyan": (30, 215, 225),
    "blue": (35, 70, 235),
    "purple": (160, 40, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SIZES: dict[str, float] = {"small": 0.09, "large": 0.16}  # radius as a fraction of the image side
#: 3x3 grid, row-major: (row, col) -> name.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
_POSITION_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
#: Caption phrasings; every one names all four attributes. The first is the canonical one.
TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} {where}",
    "{where} there is a {size} {color} {shape}",
    "a {color} {shape}, {size}, {where}",
    "a picture of a {size} {shape} in {color} {where}",
)
#: Shorter descriptions that name the shape and its colour and leave out the size and/or the place,
#: as people describing a picture often do. Training pictures get ``partial_captions`` of them
#: besides their full captions: they teach a model that colour and shape are what the pictures
#: are about, while position and size refine. The held-out split keeps full captions only.
PARTIAL_TEMPLATES: tuple[str, ...] = (
    "a {color} {shape}",
    "a {size} {color} {shape}",
    "a {color} {shape} {where}",
    "a {shape} in {color}",
)
SPLITS = ("train", "heldout")
CAPTIONS_FILE = "captions.csv"
ATTRIBUTES_FILE = "attributes.csv"


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that decides one picture: its attributes and the exact geometry drawn."""

    shape: str
    color: str
    size: str
    position: str
    x: float  # centre, in pixels
    y: float
    radius: float  # circumscribed radius, in pixels
    angle: float  # rotation, degrees

    @property
    def attributes(self) -> tuple[str, str, str, str]:
        return (self.shape, self.color, self.size, self.position)

    def caption(self, template: int = 0, partial: bool = False) -> str:
        """The caption of this picture in phrasing ``template``: an index into ``TEMPLATES``, or
        into ``PARTIAL_TEMPLATES`` when ``partial``."""
        return (PARTIAL_TEMPLATES if partial else TEMPLATES)[template].format(
            size=self.size, color=self.color, shape=self.shape, where=_POSITION_PHRASES[self.position]
        )


@dataclass(frozen=True)
class ShapesConfig:
    """How many pictures, how large, how many captions each, and the seed."""

    n_train: int = 3000
    n_heldout: int = 500
    image_size: int = 64
    captions_per_image: int = 2
    #: Extra captions per *training* picture from ``PARTIAL_TEMPLATES`` (seeded choice, after its full ones).
    partial_captions: int = 0
    seed: int = 0
    image_format: str = "png"

    def __post_init__(self) -> None:
        if self.n_train < 0 or self.n_heldout < 0:
            raise ValueError("n_train and n_heldout must be >= 0")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 pixels, not {self.image_size}")
        if not 1 <= self.captions_per_image <= len(TEMPLATES):
            raise ValueError(f"captions_per_image must be in 1..{len(TEMPLATES)}")
        if not 0 <= self.partial_captions <= len(PARTIAL_TEMPLATES):
            raise ValueError(f"partial_captions must be in 0..{len(PARTIAL_TEMPLATES)}")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be png or jpg, not {self.image_format!r}")


@dataclass(frozen=True)
class ShapesDataset:
    """What :func:`generate_shapes` wrote: one captioned folder per split."""

    root: Path
    config: ShapesConfig
    counts: dict[str, int] = field(default_factory=dict)

    def split_dir(self, split: str) -> Path:
        return self.root / split

    def manifest(self, split: str) -> Path:
        """``<root>/<split>/captions.csv``."""
        return self.root / split / CAPTIONS_FILE

    @property
    def train_manifest(self) -> Path:
        return self.manifest("train")

    @property
    def heldout_manifest(self) -> Path:
        return self.manifest("heldout")


def all_combinations() -> list[tuple[str, str, str, str]]:
    """Every (shape, color, size, position) combination, in a fixed order."""
    return list(itertools.product(SHAPES, COLORS, SIZES, POSITIONS))


def n_combinations() -> int:
    return len(SHAPES) * len(COLORS) * len(SIZES) * len(POSITIONS)


def _split_number(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return SPLITS.index(split)


def _combination_order(seed: int, split: str) -> np.ndarray:
    return np.random.default_rng([seed, _split_number(split), 7919]).permutation(n_combinations())


def sample_spec(combo: tuple[str, str, str, str], image_size: int, rng: np.random.Generator) -> ShapeSpec:
    """Place a shape with the given attributes inside its grid cell, with a little jitter."""
    shape, color, size, position = combo
    row, col = divmod(POSITIONS.index(position), 3)
    cell = image_size / 3
    radius = SIZES[size] * image_size * rng.uniform(0.9, 1.1)
    slack = max(0.0, cell / 2 - radius)  # keep the shape inside its cell
    x = (col + 0.5) * cell + rng.uniform(-slack, slack)
    y = (row + 0.5) * cell + rng.uniform(-slack, slack)
    angle = float(rng.uniform(-20, 20)) if shape != "circle" else 0.0
    return ShapeSpec(shape, color, size, position, float(x), float(y), float(radius), angle)


def specs_for_split(n: int, split: str, seed: int = 0, image_size: int = 64) -> list[ShapeSpec]:
    """The first ``n`` pictures' specs of ``split`` (a prefix of any larger ``n``)."""
    order, combos = _combination_order(seed, split), all_combinations()
    return [_spec(combos, order, split, i, seed, image_size) for i in range(n)]


def _image_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, _split_number(split), index, stream])


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A textured, low-saturation background: smooth blobs + a gradient + pixel noise."""
    base = rng.uniform(70, 150)
    tint = rng.normal(0, 6, size=3)
    coarse = rng.normal(0, 18, size=(4, 4, 1))
    blobs = np.asarray(Image.fromarray(coarse[..., 0].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
    gy, gx = np.mgrid[0:size, 0:size] / size
    gradient = rng.uniform(-20, 20) * gx + rng.uniform(-20, 20) * gy
    noise = rng.normal(0, 8, size=(size, size, 3))
    img = base + tint + (blobs + gradient)[..., None] + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(spec: ShapeSpec, scale: float) -> list[tuple[float, float]]:
    r, cx, cy = spec.radius * scale, spec.x * scale, spec.y * scale
    if spec.shape == "square":
        pts = [(math.cos(math.radians(45 + 90 * k)), math.sin(math.radians(45 + 90 * k))) for k in range(4)]
    elif spec.shape == "triangle":
        pts = [(math.cos(math.radians(-90 + 120 * k)), math.sin(math.radians(-90 + 120 * k))) for k in range(3)]
        cy += 0.2 * r  # centre the triangle's bounding box on the cell
    elif spec.shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * k)),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * k))) for k in range(10)]
    elif spec.shape == "cross":
        a, b = 0.33, 1.0
        pts = [(a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a), (-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a)]
        pts = [(x * 0.9, y * 0.9) for x, y in pts]
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")
    t = math.radians(spec.angle)
    cos, sin = math.cos(t), math.sin(t)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in pts]


def render(spec: ShapeSpec, image_size: int, rng: np.random.Generator, supersample: int = 4) -> Image.Image:
    """Draw ``spec`` on a fresh textured background (anti-aliased by supersampling)."""
    background = Image.fromarray(_background(image_size, rng))
    big = image_size * supersample
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if spec.shape == "circle":
        r, cx, cy = spec.radius * supersample, spec.x * supersample, spec.y * supersample
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(spec, supersample), fill=255)
    mask = mask.resize((image_size, image_size), Image.LANCZOS)
    color = np.clip(np.array(COLORS[spec.color]) + rng.normal(0, 10, size=3), 0, 255)
    shade = np.clip(color[None, None, :] + rng.normal(0, 6, size=(image_size, image_size, 3)), 0, 255)
    fill = Image.fromarray(shade.astype(np.uint8))
    return Image.composite(fill, background, mask)


def _spec(combos: list, order: np.ndarray, split: str, index: int, seed: int, image_size: int) -> ShapeSpec:
    combo = combos[order[index % len(order)]]
    return sample_spec(combo, image_size, _image_rng(seed, split, index, 0))


def caption_templates(split: str, index: int, seed: int, k: int) -> list[int]:
    """Which ``k`` phrasings picture ``index`` gets: the canonical one first, then seeded others."""
    others = _image_rng(seed, split, index, 2).permutation(np.arange(1, len(TEMPLATES)))
    return [0, *[int(t) for t in others[: k - 1]]]


def split_captions(spec: ShapeSpec, split: str, index: int, config: ShapesConfig) -> list[str]:
    """Picture ``index``'s captions: its full ones, then (training split) ``partial_captions`` partial ones."""
    captions = [spec.caption(t) for t in caption_templates(split, index, config.seed, config.captions_per_image)]
    if split == "train" and config.partial_captions:
        partial = _image_rng(config.seed, split, index, 3).permutation(len(PARTIAL_TEMPLATES))
        captions += [spec.caption(int(t), partial=True) for t in partial[: config.partial_captions]]
    return captions


def generate_shapes(
    out_dir: str | Path,
    config: ShapesConfig = ShapesConfig(),
    progress: Optional[Progress] = None,
) -> ShapesDataset:
    """Write the train and held-out splits under ``out_dir`` (see the module docstring).

    Manifests are written atomically after their images, so a present ``captions.csv`` means a
    complete split. ``progress(done, total)`` is called as pictures are written.
    """
    root = Path(out_dir)
    sizes = {"train": config.n_train, "heldout": config.n_heldout}
    total, done = sum(sizes.values()), 0
    for split, n in sizes.items():
        split_dir = root / split
        (split_dir / "images").mkdir(parents=True, exist_ok=True)
        rows: list[tuple[str, str]] = []
        attrs: list[dict[str, Any]] = []
        for i, spec in enumerate(specs_for_split(n, split, config.seed, config.image_size)):
            image = render(spec, config.image_size, _image_rng(config.seed, split, i, 1))
            rel = f"images/{i:06d}.{config.image_format}"
            _save_image(image, split_dir / rel, config.image_format)
            rows += [(rel, caption) for caption in split_captions(spec, split, i, config)]
            attrs.append({"image": rel, "shape": spec.shape, "color": spec.color, "size": spec.size,
                          "position": spec.position, "x": round(spec.x, 2), "y": round(spec.y, 2),
                          "radius": round(spec.radius, 2), "angle": round(spec.angle, 2)})
            done += 1
            if progress is not None and (done % 100 == 0 or done == total):
                progress(done, total)
        _write_csv(split_dir / ATTRIBUTES_FILE, list(attrs[0]) if attrs else ["image"], [list(a.values()) for a in attrs])
        _write_csv(split_dir / CAPTIONS_FILE, ["image", "caption"], rows)
    return ShapesDataset(root=root, config=config, counts=dict(sizes))


def _save_image(image: Image.Image, path: Path, fmt: str) -> None:
    with atomic_path(path) as tmp:
        if fmt == "jpg":
            image.save(tmp, format="JPEG", quality=92)
        else:
            image.save(tmp, format="PNG")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)


def parse_attributes(text: str) -> dict[str, str]:
    """The attributes a description names: ``{"shape", "color", "size", "position"}`` keys, each
    present only when the text names exactly one value ("a red circle" -> color and shape).
    """
    words = re.findall(r"[a-z]+", text.lower())
    found: dict[str, str] = {}
    for key, values in (("shape", SHAPES), ("color", tuple(COLORS)), ("size", tuple(SIZES))):
        named = {v for v in values if v in words}
        if len(named) == 1:
            found[key] = named.pop()
    joined = " ".join(words)
    for position in sorted(POSITIONS, key=len, reverse=True):  # "top left" before "top" and "left"
        if re.search(rf"\b{position}\b", joined):
            found["position"] = position
            break
    return found


def read_attributes(split_dir: str | Path) -> dict[str, dict[str, str]]:
    """``attributes.csv`` of a split as ``{image relative path: {shape, color, size, position, ...}}``."""
    with open(Path(split_dir) / ATTRIBUTES_FILE, newline="", encoding="utf-8") as f:
        return {row["image"]: row for row in csv.DictReader(f)}
