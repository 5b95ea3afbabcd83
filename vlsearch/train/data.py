"""Training data: image-caption manifests grouped by image, the seeded split and epoch order,
the batch loader and the training preprocess."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from vlsearch.core.errors import SourceError, TrainingError
from vlsearch.core.fsutil import MANIFEST_NAMES, find_manifest
from vlsearch.data.manifest import read_manifest
from vlsearch.models.factory import image_transform
from vlsearch.core.threads import set_process_threads
from vlsearch.train.images import AugmentConfig, ImageDataset


@dataclass(frozen=True)
class PairData:
    """A manifest of image-caption pairs, grouped by image."""

    root: Path  #: directory image paths are relative to
    images: list[str]  #: unique image paths (as written in the manifest), in first-seen order
    captions: list[str]  #: every caption, grouped by image (image 0's captions first, ...)
    caption_image: np.ndarray  #: (n_captions,) image index of each caption
    starts: np.ndarray  #: (n_images + 1,) caption offsets: image i owns captions[starts[i]:starts[i+1]]

    def path(self, i: int) -> Path:
        return self.root / self.images[i]


def read_pairs(data: str | os.PathLike) -> PairData:
    """Read a CSV/TSV/Parquet manifest (or a folder holding ``captions.csv``) of ``image,caption`` rows
    (:func:`vlsearch.data.manifest.read_manifest`; both columns read as text)."""
    path = Path(data).expanduser()
    if path.is_dir():
        found = find_manifest(path)
        if found is None:
            raise TrainingError(f"{path} is a folder without a manifest ({', '.join(MANIFEST_NAMES)})")
        path = found
    if not path.is_file():
        raise TrainingError(f"training manifest not found: {path}")
    try:
        table = read_manifest(path, text_columns=("image", "caption"))
    except SourceError as exc:
        raise TrainingError(str(exc)) from exc
    missing = {"image", "caption"} - set(table.column_names)
    if missing:
        raise TrainingError(f"{path} lacks column(s) {sorted(missing)}; it needs 'image' and 'caption' "
                            f"(has {table.column_names})")
    images_col = [None if v is None else str(v) for v in table.column("image").to_pylist()]
    captions_col = [None if v is None else str(v) for v in table.column("caption").to_pylist()]
    by_image: dict[str, list[str]] = {}
    for image, caption in zip(images_col, captions_col):
        if image and caption and caption.strip():
            by_image.setdefault(image, []).append(caption.strip())
    if len(by_image) < 2:
        raise TrainingError(f"{path} has {len(by_image)} usable image(s) with a caption; training needs at least 2")
    images = list(by_image)
    captions = [c for image in images for c in by_image[image]]
    counts = np.array([len(by_image[image]) for image in images])
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    caption_image = np.repeat(np.arange(len(images)), counts).astype(np.int64)
    return PairData(path.parent.resolve(), images, captions, caption_image, starts)


def split_images(n_images: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of image indices into (train, val); val has round(n * fraction) images."""
    n_val = int(round(n_images * val_fraction))
    if val_fraction > 0 and n_val == 0 and n_images >= 4:
        n_val = 1
    n_val = min(n_val, n_images - 2)
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n_images)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def epoch_order(train_images: np.ndarray, pairs: PairData, seed: int, epoch: int,
                captions_per_image: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's image order and the captions drawn for each: a pure function of (seed, epoch).

    With ``captions_per_image`` 1 the captions come back as one row id per image; with K > 1 as an
    (n, K) array of distinct captions of each image (cycling when an image has fewer than K)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(train_images)
    counts = pairs.starts[order + 1] - pairs.starts[order]
    if captions_per_image == 1:
        return order, pairs.starts[order] + (rng.random(len(order)) * counts).astype(np.int64)
    keys = rng.random((len(order), int(counts.max())))
    keys[np.arange(keys.shape[1])[None, :] >= counts[:, None]] = np.inf  # positions past an image's captions
    ranked = np.argsort(keys, axis=1)
    picks = ranked[np.arange(len(order))[:, None], np.arange(captions_per_image)[None, :] % counts[:, None]]
    return order, pairs.starts[order][:, None] + picks


def _collate(items):
    items = [it for it in items if it is not None]
    if not items:
        return None
    return torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items], dtype=torch.long)


def _worker_init(_: int) -> None:
    set_process_threads(1)


def batch_loader(dataset: ImageDataset, batches: Sequence[Sequence[int]], workers: int, seed: int, pin: bool):
    """A DataLoader yielding ``(images, image indices)`` per given batch (None when none decoded)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[list(map(int, b)) for b in batches],
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
    )


def train_transform(model: nn.Module, augment: Optional[AugmentConfig], size: Optional[int] = None):
    """The training preprocess: the model's eval transform when ``augment`` is None, else
    RandomResizedCrop + colour jitter, normalised like the model's inputs (flips are applied per
    batch, where the captions are known: see :func:`vlsearch.train.images.flip_allowed`); at
    ``size`` px instead of the model's own when given."""
    if augment is None:
        return image_transform(model, is_train=False, size=size)
    from torchvision import transforms as T

    cfg = model.visual.preprocess_cfg
    size = size or cfg["size"]
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    steps: list[Any] = [T.RandomResizedCrop(size, scale=tuple(augment.scale), ratio=tuple(augment.ratio),
                                            interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
    jitter = (augment.brightness, augment.contrast, augment.saturation, augment.hue)
    if augment.jitter_prob > 0 and any(jitter):
        steps.append(T.RandomApply([T.ColorJitter(*jitter)], p=augment.jitter_prob))
    if augment.grayscale_prob > 0:
        steps.append(T.RandomGrayscale(augment.grayscale_prob))
    steps += [T.ToTensor(), T.Normalize(mean=cfg["mean"], std=cfg["std"])]
    return T.Compose(steps)
