"""The images as a training run's image tower sees them.

Three ways, by configuration: decoded (and augmented) by DataLoader workers every step; decoded
once into memory (``cache_images``) and augmented as whole batches; or, with the image tower
locked, the output of its frozen part computed once per view (``precompute_image``), so each step
runs only the trainable ``rest`` of the tower. Every step's randomness is a function of
``(seed, step)``, so a resumed run draws what an uninterrupted one draws.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from vlsearch.core.progress import Progress
from vlsearch.models.factory import image_transform
from vlsearch.train.cache import FeatureCache, tower_id
from vlsearch.train.compute import Compute
from vlsearch.train.config import TrainConfig, plain
from vlsearch.train.data import PairData, batch_loader, train_transform
from vlsearch.train.features import precompute_views, split_visual
from vlsearch.train.images import ImageDataset, MemoryImages, augment_batch, flip_allowed, resize_batch

log = logging.getLogger(__name__)

#: A batch: (images, or None when the pixels come from memory or the cache, and image indices),
#: or None when none of its images could be read.
Batch = Optional[tuple[Optional[torch.Tensor], torch.Tensor]]


class ImageInputs:
    """The training images of a run: datasets, in-memory pixels or cached frozen-tower features."""

    def __init__(self, model: nn.Module, pairs: PairData, config: TrainConfig, compute: Compute,
                 cache: FeatureCache, pretrained_tag: Optional[str], progress: Optional[Progress] = None):
        self.model, self.config, self.compute = model, config, compute
        self.size = config.image_size or int(np.max(model.visual.preprocess_cfg["size"]))
        paths = [pairs.path(i) for i in range(len(pairs.images))]
        self.train_data = ImageDataset(paths, train_transform(model, config.augment, self.size), 2 * self.size)
        self.eval_data = ImageDataset(paths, image_transform(model, is_train=False, size=self.size), 2 * self.size)
        self.flip_ok = flip_allowed(pairs.captions)  #: per caption: may its image be mirrored
        self.memory: Optional[MemoryImages] = None
        self.rest: Optional[nn.Module] = None  #: the trainable part of a split image tower
        self.features: Optional[torch.Tensor] = None  #: (images, views, ...) output of its frozen part
        self.seconds: Optional[float] = None  #: time spent computing ``features`` (None when reused or none)
        if config.use_precomputed_image:
            frozen, self.rest = split_visual(model.visual, config.lock_image_unlocked_groups)
            self.features = self._precompute(frozen, paths, pairs, cache, pretrained_tag, progress)
        elif config.cache_images:
            self.memory = MemoryImages.load(paths, 2 * self.size, config.workers, progress)

    def readable(self, index: torch.Tensor) -> torch.Tensor:
        """The entries of ``index`` whose image could be read."""
        if self.features is not None:
            return index[~torch.isnan(self.features[index, 0].flatten(1)[:, 0])]
        return self.memory.readable(index)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (unnormalised) of pixels, or of cached frozen-tower activations."""
        images = images.to(self.compute.device, non_blocking=True)
        return self.model.encode_image(images) if self.rest is None else self.rest(images)

    def train_batches(self, batches: list[np.ndarray], epoch: int) -> Iterator[Batch]:
        """The training steps' batches of image indices, decoded unless the pixels are at hand."""
        if self.memory is None and self.features is None:
            seed = hash((self.config.seed, epoch)) & 0x7FFFFFFF
            yield from batch_loader(self.train_data, batches, self.config.workers, seed,
                                    self.compute.device.type == "cuda")
            return
        for batch in batches:
            index = self.readable(torch.from_numpy(np.asarray(batch)))
            yield (None, index) if len(index) else None

    def step_inputs(self, index: torch.Tensor, caption_ids: torch.Tensor, step: int,
                    decoded: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Step ``step``'s model inputs: a drawn view of the cached features, augmented pixels from
        memory, or the decoded batch with its flips applied."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        if self.features is not None:
            views = torch.randint(self.config.image_views, (len(index),), generator=generator)
            return self.features[index, views].float()
        flip = self._flips(caption_ids, generator)
        if self.memory is not None:
            cfg = self.model.visual.preprocess_cfg
            pixels = self.memory.pixels[index]
            if self.config.augment is None:
                return resize_batch(pixels, self.size, cfg["mean"], cfg["std"])
            return augment_batch(pixels, self.size, self.config.augment, cfg["mean"], cfg["std"], generator, flip)
        if flip is not None and flip.any():
            decoded = torch.where(flip.view(-1, 1, 1, 1), decoded.flip(-1), decoded)
        return decoded

    def eval_batches(self, batches: list[np.ndarray]) -> Iterator[Optional[tuple[torch.Tensor, torch.Tensor]]]:
        """``(model inputs, image indices)`` of validation batches, un-augmented (None: none readable)."""
        if self.features is not None:
            for batch in batches:
                index = self.readable(torch.from_numpy(batch))
                yield (self.features[index, 0].float(), index) if len(index) else None
            return
        if self.memory is None:
            yield from batch_loader(self.eval_data, batches, self.config.workers, self.config.seed, False)
            return
        cfg = self.model.visual.preprocess_cfg
        for batch in batches:
            index = self.memory.readable(torch.from_numpy(batch))
            pixels = self.memory.pixels[index]
            yield (resize_batch(pixels, self.size, cfg["mean"], cfg["std"]), index) if len(index) else None

    def _flips(self, caption_ids: torch.Tensor, generator: torch.Generator) -> Optional[torch.Tensor]:
        """Which images of the batch to mirror: with probability ``hflip`` where the caption allows it."""
        augment = self.config.augment
        if augment is None or not augment.hflip:
            return None
        allowed = self.flip_ok[caption_ids]
        if allowed.dim() == 2:  # several captions per image: every one must allow the mirror
            allowed = allowed.all(dim=1)
        return (torch.rand(len(caption_ids), generator=generator) < augment.hflip) & allowed

    def _precompute(self, frozen: nn.Module, paths: list[Path], pairs: PairData, cache: FeatureCache,
                    pretrained_tag: Optional[str], progress: Optional[Progress]) -> torch.Tensor:
        """The frozen part of the image tower over every image (``image_views`` views) once, cached
        under a key of everything it depends on; unreadable images are NaN."""
        config = self.config
        key = {"kind": "image", "model": tower_id(config.model, self.model, "vision"), "pretrained": pretrained_tag,
               "pretrained_image": config.pretrained_image, "groups": config.lock_image_unlocked_groups,
               "size": self.size, "views": config.image_views, "seed": config.seed,
               "augment": plain(asdict(config.augment)) if config.augment and config.image_views > 1 else None,
               "images_sha1": hashlib.sha1("\n".join(map(str, paths)).encode("utf-8")).hexdigest()}
        path = cache.path("image-features", key)
        stored = cache.load(path, key, "image features")
        if stored is not None:
            return stored["features"]
        started = time.perf_counter()
        memory = MemoryImages.load(paths, 2 * self.size, config.workers, progress)
        cfg, starts = self.model.visual.preprocess_cfg, pairs.starts
        flip_ok = torch.tensor([bool(self.flip_ok[starts[i] : starts[i + 1]].all()) for i in range(len(paths))])
        with self.compute.autocast():
            features = precompute_views(frozen, memory, self.size, cfg["mean"], cfg["std"], config.image_views,
                                        config.augment, config.seed, flip_ok, device=self.compute.device,
                                        progress=progress)
        features[~memory.ok] = float("nan")  # marks unreadable images (left out of every batch)
        cache.save(path, key, features=features)
        self.seconds = round(time.perf_counter() - started, 2)
        log.info("precomputed %s image features in %.1fs", tuple(features.shape), self.seconds)
        return features
