"""In-memory training images: batched crops, flips and jitter; caption-aware flips; cached training."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlsearch.train.loop import _Run, train
from vlsearch.train.loss import clip_loss
from vlsearch.train.config import TrainConfig
from vlsearch.train.data import epoch_order, read_pairs, split_images
from vlsearch.train.images import (
    AugmentConfig,
    MemoryImages,
    augment_batch,
    crop_boxes,
    flip_allowed,
    resize_batch,
    square_pixels,
)

from test_train import FAST, make_shapes

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
IDENTITY = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), brightness=0, contrast=0, saturation=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), 24, broken=True)


def gradient_pixels(n: int = 2, side: int = 32) -> torch.Tensor:
    """uint8 images whose red channel rises left to right (so a mirror is easy to see)."""
    ramp = torch.linspace(0, 255, side).round().to(torch.uint8)
    x = torch.zeros(n, 3, side, side, dtype=torch.uint8)
    x[:, 0] = ramp.view(1, 1, side)
    x[:, 1] = 128
    return x


def test_flip_allowed_only_for_captions_without_left_or_right():
    got = flip_allowed(["a dog on the Left", "a man turns right.", "a bright red car", "leftover pizza", "two dogs"])
    assert got.tolist() == [False, False, True, True, True]


def test_crop_boxes_stay_inside_the_image_and_respect_scale():
    g = torch.Generator().manual_seed(0)
    theta = crop_boxes(2000, (0.3, 0.9), (3 / 4, 4 / 3), g)
    w, h, cx, cy = theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2]
    assert (w <= 1).all() and (h <= 1).all()
    assert ((cx.abs() + w) <= 1 + 1e-6).all() and ((cy.abs() + h) <= 1 + 1e-6).all()
    area = w * h  # fraction of the square (clipping to the image can only shrink it)
    assert area.max() <= 0.9 + 1e-5 and area.min() >= 0.3 * 0.75 - 1e-5
    assert 0.5 < area.mean() < 0.7


def test_identity_augmentation_is_a_resize_and_flip_mirrors_the_image():
    pixels, g = gradient_pixels(), torch.Generator().manual_seed(0)
    plain = augment_batch(pixels, 16, IDENTITY, MEAN, STD, g)
    assert plain.shape == (2, 3, 16, 16)
    expected = F.avg_pool2d(pixels.float() / 255, 2)
    torch.testing.assert_close(plain, expected, atol=2e-2, rtol=0)
    flipped = augment_batch(pixels, 16, replace(IDENTITY, hflip=1.0), MEAN, STD, g, flip=torch.tensor([True, False]))
    torch.testing.assert_close(flipped[0], plain[0].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped[1], plain[1], atol=1e-5, rtol=0)
    assert plain[0, 0, :, -1].mean() > 0.9 and flipped[0, 0, :, -1].mean() < 0.1


def test_jitter_is_seeded_per_image_and_grayscale_equalises_channels():
    pixels = gradient_pixels(8)
    aug = AugmentConfig(scale=(0.5, 1.0), brightness=0.4, contrast=0.4, saturation=0.2, jitter_prob=1.0)
    a = augment_batch(pixels, 16, aug, MEAN, STD, torch.Generator().manual_seed(3))
    b = augment_batch(pixels, 16, aug, MEAN, STD, torch.Generator().manual_seed(3))
    c = augment_batch(pixels, 16, aug, MEAN, STD, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert len({round(float(v), 4) for v in a.mean(dim=(1, 2, 3))}) == 8  # every image drew its own crop/jitter
    gray = augment_batch(pixels, 16, replace(IDENTITY, grayscale_prob=1.0), MEAN, STD, torch.Generator().manual_seed(0))
    torch.testing.assert_close(gray[:, 0], gray[:, 1]) and torch.testing.assert_close(gray[:, 1], gray[:, 2])
    with pytest.raises(ValueError, match="hue"):
        augment_batch(pixels, 16, replace(aug, hue=0.1), MEAN, STD, torch.Generator())
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=(0.0, 1.0))


def test_resize_batch_normalises_with_the_model_statistics():
    pixels = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    out = resize_batch(pixels, 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert out.shape == (1, 3, 4, 4)
    torch.testing.assert_close(out, torch.full_like(out, 2.0))


def test_memory_images_decode_once_and_mark_unreadable(shapes):
    pairs = read_pairs(shapes)
    paths = [pairs.path(i) for i in range(len(pairs.images))]
    calls = []
    memory = MemoryImages.load(paths, 32, workers=0, progress=lambda d, t, **kw: calls.append((d, t, kw)))
    broken = [i for i, p in enumerate(paths) if p.name == "broken.png"]
    assert memory.pixels.shape == (25, 3, 32, 32) and memory.side == 32
    assert (~memory.ok).nonzero().flatten().tolist() == broken
    assert calls[-1] == (25, 25, {"stage": "decode"})
    from vlsearch.data.images import open_image

    torch.testing.assert_close(memory.pixels[0], square_pixels(open_image(paths[0]), 32))


def test_cached_training_learns_and_resumes_exactly(shapes, tmp_path):
    config = replace(FAST, epochs=6, cache_images=True, augment=AugmentConfig(hflip=0.5), val_fraction=0.2,
                     checkpoint_every=2)
    full = train(shapes, tmp_path / "full", config)
    assert full.steps == 12
    first, last = np.mean(full.losses[:2]), np.mean(full.losses[-2:])
    assert last < first - 0.2, full.losses
    assert len(full.val) == 6 and full.val[-1]["t2i"]["R@10"] > 0
    cut = tmp_path / "cut"

    class Stop(Exception):
        pass

    def stop_at_7(step, total, **kw):
        if step == 7 and "stage" not in kw:
            raise Stop

    with pytest.raises(Stop):
        train(shapes, cut, config, progress=stop_at_7)
    resumed = train(shapes, cut, config, resume=True)
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-4)


def test_cached_and_decoded_batches_match_without_augmentation(shapes, tmp_path):
    pairs = read_pairs(shapes)
    cached = _Run(pairs, tmp_path / "a", replace(FAST, cache_images=True))
    index = torch.tensor([0, 1, 2])
    from_memory = cached.images.step_inputs(index, torch.tensor([0, 2, 4]), cached.step)
    decoded = torch.stack([cached.images.eval_data[i][0] for i in range(3)])
    assert from_memory.shape == decoded.shape
    # the same view, resized by torch instead of PIL: close, and far closer than another image is
    error = (from_memory - decoded).abs().mean()
    assert error < 0.1 and error < (from_memory - decoded.roll(1, dims=0)).abs().mean() / 3
    with pytest.raises(ValueError, match="hue"):
        TrainConfig(cache_images=True, augment=AugmentConfig(hue=0.1))


def test_several_captions_per_image_are_distinct_and_the_loss_is_their_mean(shapes, tmp_path):
    pairs = read_pairs(shapes)
    train_idx, _ = split_images(len(pairs.images), 0.0, 0)
    order, captions = epoch_order(train_idx, pairs, seed=0, epoch=3, captions_per_image=3)
    assert captions.shape == (len(order), 3)
    for image, row in zip(order, captions):
        lo, hi = pairs.starts[image], pairs.starts[image + 1]
        assert ((row >= lo) & (row < hi)).all()
        assert len(set(row.tolist())) == min(3, hi - lo)  # distinct, cycling when an image has fewer
    assert captions[:, :2].tolist() == epoch_order(train_idx, pairs, 0, 3, captions_per_image=2)[1].tolist()

    run = _Run(pairs, tmp_path / "k", replace(FAST, captions_per_image=2, lock_text=True))
    images, ids = torch.randn(4, 3, 64, 64), torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    with torch.no_grad():
        got = run.loss(images, ids)
        img = F.normalize(run.model.encode_image(images), dim=-1)
        txt = F.normalize(run.text.encode(ids.flatten()), dim=-1).view(4, 2, -1)
        scale = run.model.logit_scale.exp()
        want = (clip_loss(img, txt[:, 0], scale) + clip_loss(img, txt[:, 1], scale)) / 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    result = train(shapes, tmp_path / "k2", replace(FAST, epochs=2, captions_per_image=2, cache_images=True))
    assert result.steps == 2 * 3 and all(np.isfinite(result.losses))
    with pytest.raises(ValueError, match="captions_per_image"):
        TrainConfig(captions_per_image=0)
