from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlsearch.data import shapes
from vlsearch.data.shapes import (
    COLORS, generate_shapes, n_combinations, parse_attributes, PARTIAL_TEMPLATES, POSITIONS, read_attributes,
    render, SHAPES, ShapesConfig, SIZES, specs_for_split, TEMPLATES,
)

SMALL = ShapesConfig(n_train=40, n_heldout=20, captions_per_image=2, seed=3)


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _pictures(split: str, n: int, seed: int = 0, image_size: int = 64):
    """The first ``n`` pictures of ``split`` with their specs, drawn as :func:`generate_shapes` draws them."""
    for index, spec in enumerate(specs_for_split(n, split, seed, image_size)):
        yield render(spec, image_size, shapes._image_rng(seed, split, index, 1)), spec


def _shape_mask(image: Image.Image) -> np.ndarray:
    """Pixels of the (saturated) shape, not of the (low-saturation) background."""
    a = np.asarray(image).astype(int)
    return (a.max(-1) - a.min(-1)) > 100


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), SMALL)


def test_layout_and_manifest_format(dataset):
    for split, n in (("train", 40), ("heldout", 20)):
        rows = _rows(dataset.manifest(split))
        assert list(rows[0]) == ["image", "caption"]
        assert len(rows) == n * SMALL.captions_per_image
        images = {r["image"] for r in rows}
        assert len(images) == n
        for rel in images:  # paths are relative to the manifest, like the Flickr8k splits
            with Image.open(dataset.split_dir(split) / rel) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
    assert dataset.counts == {"train": 40, "heldout": 20}


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    again = generate_shapes(tmp_path / "again", SMALL)
    other = generate_shapes(tmp_path / "other", ShapesConfig(n_train=40, n_heldout=20, seed=4))
    for split in ("train", "heldout"):
        assert again.manifest(split).read_bytes() == dataset.manifest(split).read_bytes()
        assert other.manifest(split).read_bytes() != dataset.manifest(split).read_bytes()
    a = np.asarray(Image.open(again.split_dir("train") / "images/000007.png"))
    b = np.asarray(Image.open(dataset.split_dir("train") / "images/000007.png"))
    c = np.asarray(Image.open(other.split_dir("train") / "images/000007.png"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_pictures_are_drawn_from_their_specs(dataset):
    for i, (image, _) in enumerate(_pictures("train", 3, seed=SMALL.seed)):
        written = np.asarray(Image.open(dataset.split_dir("train") / f"images/{i:06d}.png"))
        assert np.array_equal(np.asarray(image), written)


def test_smaller_dataset_is_a_prefix_and_splits_differ():
    assert specs_for_split(10, "train", seed=1) == specs_for_split(30, "train", seed=1)[:10]
    assert specs_for_split(10, "train", seed=1) != specs_for_split(10, "heldout", seed=1)


def test_captions_name_every_attribute_of_their_image(dataset):
    for split in ("train", "heldout"):
        attrs = read_attributes(dataset.split_dir(split))
        by_image: dict[str, list[str]] = {}
        for row in _rows(dataset.manifest(split)):
            by_image.setdefault(row["image"], []).append(row["caption"])
        for rel, captions in by_image.items():
            a = attrs[rel]
            assert len(set(captions)) == len(captions)  # distinct phrasings
            assert captions[0] == f"a {a['size']} {a['color']} {a['shape']} " + (
                "in the center" if a["position"] == "center"
                else f"on the {a['position']}" if a["position"] in ("left", "right")
                else f"at the {a['position']}")
            for cap in captions:
                words = cap.replace(",", "").split()
                assert a["color"] in words and a["shape"] in words and a["size"] in words
                assert a["position"].split()[-1] in words
                others = [c for c in COLORS if c != a["color"]] + [s for s in SHAPES if s != a["shape"]]
                assert not set(others) & set(words)


def test_pictures_show_what_the_attributes_say():
    masks = {}
    for image, spec in _pictures("heldout", 120, seed=0):
        mask = _shape_mask(image)
        assert mask.sum() > 20, spec
        pixels = np.asarray(image)[mask].astype(float)
        assert np.abs(np.median(pixels, 0) - COLORS[spec.color]).max() < 40, spec  # the named colour
        ys, xs = np.nonzero(mask)
        row, col = divmod(POSITIONS.index(spec.position), 3)
        assert int(xs.mean() // (64 / 3)) == col and int(ys.mean() // (64 / 3)) == row, spec  # the named cell
        masks.setdefault((spec.shape, spec.size), []).append(mask.sum())
    for shape in SHAPES:  # for each kind, small and large never overlap in area
        assert max(masks[shape, "small"]) < min(masks[shape, "large"]), shape


def test_held_out_combinations_are_distinct_and_balanced():
    specs = specs_for_split(n_combinations(), "heldout", seed=0)
    assert len({s.attributes for s in specs}) == n_combinations() == len(SHAPES) * len(COLORS) * len(SIZES) * 9
    twice = specs_for_split(2 * n_combinations(), "train", seed=0)
    assert set(Counter(s.color for s in twice).values()) == {2 * n_combinations() // len(COLORS)}


@pytest.mark.parametrize("bad", [dict(n_train=-1), dict(image_size=16), dict(captions_per_image=0),
                                 dict(captions_per_image=9), dict(image_format="gif")])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        ShapesConfig(**bad)


def test_jpeg_output(tmp_path):
    ds = generate_shapes(tmp_path, ShapesConfig(n_train=3, n_heldout=1, image_format="jpg", captions_per_image=1))
    rows = _rows(ds.train_manifest)
    assert [r["image"] for r in rows] == ["images/000000.jpg", "images/000001.jpg", "images/000002.jpg"]
    with Image.open(ds.split_dir("train") / rows[0]["image"]) as im:
        assert im.format == "JPEG"


def test_parse_attributes_reads_back_every_caption_phrasing():
    for spec in specs_for_split(60, "train", seed=2):
        for t in range(len(TEMPLATES)):
            found = parse_attributes(spec.caption(t))
            assert found == dict(zip(("shape", "color", "size", "position"), spec.attributes)), spec.caption(t)
    assert parse_attributes("a purple cross") == {"shape": "cross", "color": "purple"}
    assert parse_attributes("a red or blue thing at the top") == {"position": "top"}  # ambiguous colour dropped


def test_partial_captions_only_for_training_pictures(tmp_path):
    """Training pictures get ``partial_captions`` extra, shorter captions (colour and shape, some of
    size and place, what the picture shows); the held-out split keeps full captions only."""
    config = ShapesConfig(n_train=30, n_heldout=10, captions_per_image=2, partial_captions=2, seed=4)
    ds = generate_shapes(tmp_path, config)
    plain = generate_shapes(tmp_path / "plain", ShapesConfig(n_train=30, n_heldout=10, captions_per_image=2, seed=4))
    attrs = read_attributes(ds.split_dir("train"))
    by_image: dict[str, list[str]] = {}
    for row in _rows(ds.train_manifest):
        by_image.setdefault(row["image"], []).append(row["caption"])
    full = {}
    for row in _rows(plain.train_manifest):
        full.setdefault(row["image"], []).append(row["caption"])
    kinds = set()
    for rel, captions in by_image.items():
        assert len(captions) == 4 and captions[:2] == full[rel]  # the full captions first, unchanged
        for cap in captions[2:]:
            found = parse_attributes(cap)
            assert found["color"] == attrs[rel]["color"] and found["shape"] == attrs[rel]["shape"]
            assert all(attrs[rel][k] == v for k, v in found.items())
            assert len(found) < 4  # it leaves something out
            kinds.add(frozenset(found))
    assert len(kinds) >= 3  # the partial phrasings vary
    assert _rows(ds.heldout_manifest) == _rows(plain.heldout_manifest)
    with pytest.raises(ValueError, match="partial_captions"):
        ShapesConfig(partial_captions=len(PARTIAL_TEMPLATES) + 1)
