"""Contrastive (CLIP) training of an open_clip dual encoder on image-caption pairs.

``train(data, out_dir, TrainConfig(...))`` reads a manifest (CSV or Parquet with columns
``image`` — a path relative to the manifest — and ``caption``; several rows per image allowed),
carves a seeded validation split *by image*, and optimises the symmetric InfoNCE loss
(:func:`clip_loss`) with a learnable temperature, AdamW, a cosine schedule with linear warm-up,
gradient clipping and autocast (+ GradScaler for fp16) on GPU.

Design choices:

* **One caption per image per epoch.** An epoch is one pass over the training *images* in a
  seeded random order; each image is paired with one of its captions drawn by the same seed. A
  batch therefore never holds the same image twice (a duplicate would be a false negative for
  InfoNCE), and over epochs every caption is seen. ``captions_per_image`` K > 1 pairs each image
  with K of its captions at once (the loss is the mean over the K draws).
* **Locked towers (LiT).** ``lock_text`` freezes the text tower with open_clip's
  ``lock_text_tower`` (``lock_text_unlocked_layers`` leaves the last N blocks trainable);
  ``lock_image`` freezes the image tower. Fully locked towers run in eval mode (no dropout).
  open_clip freezes a built-in text tower *including* its projection, but for a Hugging Face
  text tower (``hf_model_name``) only the transformer: its projection ``text.proj`` stays
  trainable — we keep exactly those semantics.
* **Precomputed text features.** With the text tower fully locked, every caption goes through
  the frozen part once and is cached (``text_features.pt`` in ``out_dir``); training then runs
  only the image tower plus the trainable text head (the HF projection, or nothing for a built-in
  tower). The loss is identical to running the frozen tower every step, at a fraction of the cost.
* **Checkpoints.** ``last.pt`` (weights + optimizer, scheduler, scaler, RNG, step) is written
  atomically every ``checkpoint_every`` steps and at each epoch end; ``resume=True`` continues from
  it at the exact step (the batch order of an epoch is a function of ``(seed, epoch)``).
  ``model.pt`` (weights and provenance) is written at the end; both load with
  ``load_model(config.model, pretrained=path)``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlsearch.core.errors import CheckpointMismatchError, TrainingError
from vlsearch.core.fsutil import write_json
from vlsearch.train.images import ImageDataset, MemoryImages, augment_batch, flip_allowed, resize_batch
from vlsearch.core.metrics import retrieval_metrics
from vlsearch.models.factory import check_model_name, create_model, image_transform, resolve_device, resolve_precision
from vlsearch.train.locks import apply_locks, set_train_mode
from vlsearch.models.towers import (
    encode_text_tokens,
    is_hf_text,
    text_backbone_features,
    text_head,
)
from vlsearch.train.checkpoint import LAST_CHECKPOINT, load_last, save_final, save_last
from vlsearch.train.config import CONFIG_FILE, TrainConfig, plain
from vlsearch.train.data import PairData, batch_loader, epoch_order, read_pairs, split_images, train_transform
from vlsearch.core.progress import Progress
from vlsearch.core.allocator import reusing_freed_memory
from vlsearch.core.threads import cpu_threads

log = logging.getLogger(__name__)

#: The CLIP initial temperature 0.07, as a log logit scale.
INIT_LOGIT_SCALE = math.log(1 / 0.07)
#: The logit scale is clamped to at most 100 (temperature >= 0.01), as in CLIP / open_clip.
MAX_LOGIT_SCALE = math.log(100)

TEXT_CACHE = "text_features.pt"
TRAIN_LOG = "train.json"


@dataclass(frozen=True)
class TrainResult:
    """What a finished ``train`` call produced."""

    checkpoint: Path  #: final weights (``model.pt``), loadable with ``load_model(model, pretrained=...)``
    last_checkpoint: Path  #: full training state (``last.pt``), for ``resume=True``
    steps: int  #: optimizer steps done in total (including resumed ones)
    epochs: int  #: epochs completed
    losses: list[float]  #: training loss of every step
    val: list[dict[str, Any]]  #: per validated epoch: epoch, step, t2i/i2t retrieval metrics
    seconds: float  #: wall time of this call
    steps_per_second: float  #: optimizer steps per second in this call


# ---------------------------------------------------------------------------------------------
# Loss


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching pairs (row i of each is a positive pair).

    ``image_features``/``text_features`` are ``(B, D)`` L2-normalised embeddings and
    ``logit_scale`` the *multiplier* (``exp`` of the learnable log scale, i.e. 1/temperature).
    Returns the mean of the image->text and text->image cross-entropies, computed in float32.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"clip_loss needs two (B, D) tensors of one shape, got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    logits_per_image = logit_scale * image_features.float() @ text_features.float().T
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def clamp_logit_scale(model: nn.Module) -> None:
    """Clamp the model's log logit scale to [0, ln 100] in place (after every optimizer step)."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as in open_clip: no weight decay on biases, norms, 1-d params and logit_scale."""

    def no_decay(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
    ]


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        decay = max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / decay)))

    return factor


def _load_pretrained_image(model: nn.Module, path: str) -> None:
    """Load the image tower's timm trunk from ``path`` (``TrainConfig.pretrained_image``)."""
    from vlsearch.models.trunks import load_trunk

    try:
        load_trunk(model, path)
    except CheckpointMismatchError as exc:
        raise TrainingError(f"pretrained_image: {exc}") from exc


def _autocast(device: torch.device, precision: str):
    from contextlib import nullcontext

    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ---------------------------------------------------------------------------------------------
# Training


class _Run:
    """State of one training run (model, optimiser, data); ``train`` drives it."""

    def __init__(self, pairs: PairData, out_dir: Path, config: TrainConfig, progress: Optional[Progress] = None):
        self.pairs, self.out_dir, self.config = pairs, out_dir, config
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        if not config.model.startswith("hf-hub:"):
            check_model_name(config.model)
        self.model, self.pretrained_tag = create_model(config.model, config.pretrained, default_weights=False)
        if config.pretrained_image:
            _load_pretrained_image(self.model, config.pretrained_image)
        if getattr(self.model, "logit_bias", None) is not None:
            raise TrainingError(f"{config.model} is a SigLIP-style model (logit_bias); only the CLIP loss is supported")
        self.model.to(self.device)
        apply_locks(self.model, config)
        import open_clip

        self.tokenizer = open_clip.get_tokenizer(config.model)
        self.train_images, self.val_images = split_images(len(pairs.images), config.val_fraction, config.seed)
        self.batch_size = min(config.batch_size, len(self.train_images))
        if self.batch_size < config.batch_size:
            log.warning("batch_size %d > %d training images; using %d", config.batch_size, len(self.train_images),
                        self.batch_size)
        self.steps_per_epoch = len(self.train_images) // self.batch_size
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config.weight_decay), lr=config.lr,
                                           betas=tuple(config.betas), eps=config.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(config.warmup_steps, self.total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step, self.losses, self.val = 0, [], []
        self.precompute_seconds: dict[str, float] = {}  #: time spent computing feature caches (not reused ones)
        self.tokens = self._tokenize(pairs.captions)
        self.text_features, self.text_states = None, None
        if config.use_precomputed_text and config.text_fully_locked:
            self.text_features = self._precompute_text(progress=progress)
        elif config.use_precomputed_text and is_hf_text(self.model):
            self.text_states = self._precompute_text_states(progress)
        elif config.precompute_text:
            raise TrainingError("precompute_text with unlocked text layers needs a Hugging Face text tower")
        self.image_size = config.image_size or int(np.max(self.model.visual.preprocess_cfg["size"]))
        paths = [pairs.path(i) for i in range(len(pairs.images))]
        self.train_data = ImageDataset(paths, train_transform(self.model, config.augment, self.image_size),
                                       2 * self.image_size)
        self.eval_data = ImageDataset(paths, image_transform(self.model, is_train=False, size=self.image_size),
                                      2 * self.image_size)
        self.flip_ok = flip_allowed(pairs.captions)
        self.memory = None
        self.image_rest, self.image_features = None, None
        if config.use_precomputed_image:
            self.image_rest, self.image_features = self._precompute_image(paths, progress)
        elif config.cache_images:
            self.memory = MemoryImages.load(paths, 2 * self.image_size, config.workers, progress)
        set_train_mode(self.model, config)

    # -- images -------------------------------------------------------------------------------

    def _precompute_image(self, paths: list[Path], progress: Optional[Progress]) -> tuple[nn.Module, torch.Tensor]:
        """Split the image tower at its first trainable group and run the frozen part over every
        image (``image_views`` views) once; cached on disk under a key of everything it depends on."""
        from vlsearch.train.features import precompute_views, split_visual

        config = self.config
        frozen, rest = split_visual(self.model.visual, config.lock_image_unlocked_groups)
        key = {"kind": "image", "model": self._tower_id("vision"), "pretrained": self.pretrained_tag,
               "pretrained_image": config.pretrained_image, "groups": config.lock_image_unlocked_groups,
               "size": self.image_size, "views": config.image_views, "seed": config.seed,
               "augment": plain(asdict(config.augment)) if config.augment and config.image_views > 1 else None,
               "images_sha1": hashlib.sha1("\n".join(map(str, paths)).encode("utf-8")).hexdigest()}
        cache = self._cache_file("image-features", key)
        if cache.is_file():
            stored = torch.load(cache, map_location="cpu", weights_only=True)
            if stored.get("key") == key:
                log.info("using cached image features %s", cache)
                return rest, stored["features"]
        started = time.perf_counter()
        memory = MemoryImages.load(paths, 2 * self.image_size, config.workers, progress)
        cfg = self.model.visual.preprocess_cfg
        starts = self.pairs.starts
        flip_ok = torch.tensor([bool(self.flip_ok[starts[i]:starts[i + 1]].all()) for i in range(len(paths))])
        with _autocast(self.device, self.precision):
            features = precompute_views(frozen, memory, self.image_size, cfg["mean"], cfg["std"], config.image_views,
                                        config.augment, config.seed, flip_ok, device=self.device, progress=progress)
        features[~memory.ok] = float("nan")  # marks unreadable images (left out of every batch)
        from vlsearch.core.fsutil import atomic_path

        with atomic_path(cache) as tmp:
            torch.save({"key": key, "features": features}, tmp)
        self.precompute_seconds["image"] = round(time.perf_counter() - started, 2)
        log.info("precomputed %s image features in %.1fs", tuple(features.shape), self.precompute_seconds["image"])
        return rest, features

    def _tower_id(self, tower: str) -> str:
        """What a frozen tower's cached output depends on: the model's ``vision_cfg`` / ``text_cfg``
        without the (trainable) projection settings; the model name for an unregistered one."""
        from vlsearch.models.hf_text import model_config

        cfg = model_config(self.config.model)
        if cfg is None:
            return self.config.model
        part = {k: v for k, v in cfg[f"{tower}_cfg"].items() if not k.endswith(("proj", "proj_type", "proj_bias"))}
        if tower == "text" and not is_hf_text(self.model):
            part["embed_dim"] = cfg["embed_dim"]  # a built-in tower's features include its projection
        return repr(sorted(part.items()))

    def _cache_file(self, stem: str, key: dict[str, Any]) -> Path:
        if not self.config.cache_dir:
            return self.out_dir / f"{stem}.pt"
        folder = Path(self.config.cache_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(repr(sorted(key.items())).encode("utf-8")).hexdigest()[:16]
        return folder / f"{stem}-{digest}.pt"

    def readable(self, index: torch.Tensor) -> torch.Tensor:
        """The entries of ``index`` whose image could be read."""
        if self.image_features is not None:
            return index[~torch.isnan(self.image_features[index, 0].flatten(1)[:, 0])]
        return self.memory.readable(index)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (unnormalised) of pixels, or of cached frozen-tower activations."""
        images = images.to(self.device, non_blocking=True)
        return self.model.encode_image(images) if self.image_rest is None else self.image_rest(images)

    # -- text ---------------------------------------------------------------------------------

    def _tokenize(self, captions: list[str]) -> torch.Tensor:
        chunks = [self.tokenizer(captions[i : i + 4096]) for i in range(0, len(captions), 4096)]
        return torch.cat(chunks)

    def _cache_key(self) -> dict[str, Any]:
        digest = hashlib.sha1("\n".join(self.pairs.captions).encode("utf-8")).hexdigest()
        return {"model": self.config.model, "pretrained": self.pretrained_tag, "captions_sha1": digest}

    def _precompute_text(self, batch_size: int = 256, progress: Optional[Progress] = None) -> torch.Tensor:
        """Run the frozen text backbone over every caption once (cached in out_dir).

        ``progress(done, total, stage="text")`` is called as captions are encoded."""
        key = self._cache_key()
        cache = self.out_dir / TEXT_CACHE
        if self.config.cache_dir:  # shared by runs whose models differ only after the text backbone
            key = dict(key, model=self._tower_id("text"))
            cache = self._cache_file("text-features", key)
        if cache.is_file():
            stored = torch.load(cache, map_location="cpu", weights_only=True)
            if stored.get("key") == key:
                log.info("using cached text features %s", cache)
                return stored["features"].to(self.device)
        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        with _autocast(self.device, self.precision):
            features = text_backbone_features(self.model, self.tokens, self.device, batch_size, progress)
        self.model.train(was_training)
        from vlsearch.core.fsutil import atomic_path

        with atomic_path(cache) as tmp:
            torch.save({"key": key, "features": features}, tmp)
        self.precompute_seconds["text"] = round(time.perf_counter() - started, 2)
        log.info("precomputed %d text features in %.1fs", len(features), self.precompute_seconds["text"])
        return features.to(self.device)

    def _precompute_text_states(self, progress: Optional[Progress]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states entering the unlocked top text layers, every caption once (cached)."""
        from vlsearch.train.features import text_states_below

        key = dict(self._cache_key(), model=self._tower_id("text"), kind="text states",
                   unlocked_layers=self.config.lock_text_unlocked_layers)
        cache = self._cache_file("text-states", key)
        if cache.is_file():
            stored = torch.load(cache, map_location="cpu", weights_only=True)
            if stored.get("key") == key:
                log.info("using cached text states %s", cache)
                return stored["packed"], stored["offsets"]
        started = time.perf_counter()
        with _autocast(self.device, self.precision):
            packed, offsets = text_states_below(self.model.text, self.tokens, self.config.lock_text_unlocked_layers,
                                                device=self.device, progress=progress)
        from vlsearch.core.fsutil import atomic_path

        with atomic_path(cache) as tmp:
            torch.save({"key": key, "packed": packed, "offsets": offsets}, tmp)
        self.precompute_seconds["text"] = round(time.perf_counter() - started, 2)
        log.info("precomputed %d text token states in %.1fs", len(packed), self.precompute_seconds["text"])
        return packed, offsets

    def encode_captions(self, caption_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings (unnormalised) of the given caption rows, with gradients where trainable."""
        if self.text_features is not None:
            return text_head(self.model, self.text_features[caption_ids.to(self.text_features.device)])
        if self.text_states is not None:
            from vlsearch.train.features import gather_states, text_top

            states, mask = gather_states(*self.text_states, caption_ids.cpu())
            pooled = text_top(self.model.text, states.to(self.device), mask.to(self.device),
                              self.config.lock_text_unlocked_layers)
            return text_head(self.model, pooled)
        return encode_text_tokens(self.model, self.tokens[caption_ids].to(self.device, non_blocking=True))

    # -- steps --------------------------------------------------------------------------------

    def loss(self, images: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device, self.precision):
            image_features = F.normalize(self.encode_image(images).float(), dim=-1)
            text_features = F.normalize(self.encode_captions(caption_ids.flatten()).float(), dim=-1)
            scale = self.model.logit_scale.exp().float()
            if caption_ids.dim() == 1:
                return clip_loss(image_features, text_features, scale)
            text_features = text_features.view(*caption_ids.shape, -1)
            return torch.stack([clip_loss(image_features, text_features[:, k], scale)
                                for k in range(caption_ids.shape[1])]).mean()

    def step_generator(self) -> torch.Generator:
        """The augmentation randomness of the current step: a function of (seed, step), so resumes are exact."""
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step)

    def flips(self, caption_ids: torch.Tensor, generator: torch.Generator) -> Optional[torch.Tensor]:
        """Which images of the batch to mirror: with probability ``hflip`` where the caption allows it."""
        augment = self.config.augment
        if augment is None or not augment.hflip:
            return None
        allowed = self.flip_ok[caption_ids]
        if allowed.dim() == 2:  # several captions per image: every one must allow the mirror
            allowed = allowed.all(dim=1)
        return (torch.rand(len(caption_ids), generator=generator) < augment.hflip) & allowed

    def batch_images(self, index: torch.Tensor, caption_ids: torch.Tensor,
                     decoded: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The step's model inputs: augmented from memory, or the decoded batch with its flips applied."""
        generator = self.step_generator()
        if self.image_features is not None:
            views = torch.randint(self.config.image_views, (len(index),), generator=generator)
            return self.image_features[index, views].float()
        flip = self.flips(caption_ids, generator)
        if self.memory is not None:
            cfg = self.model.visual.preprocess_cfg
            pixels = self.memory.pixels[index]
            if self.config.augment is None:
                return resize_batch(pixels, self.image_size, cfg["mean"], cfg["std"])
            return augment_batch(pixels, self.image_size, self.config.augment, cfg["mean"], cfg["std"], generator, flip)
        if flip is not None and flip.any():
            decoded = torch.where(flip.view(-1, 1, 1, 1), decoded.flip(-1), decoded)
        return decoded

    def train_step(self, images: torch.Tensor, caption_ids: torch.Tensor) -> float:
        loss = self.loss(images, caption_ids)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {loss.item()} at step {self.step}; lower the lr or use fp32/bf16")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        clamp_logit_scale(self.model)
        self.step += 1
        return float(loss.detach())

    def skip_step(self) -> None:
        """Count a batch that could not be used, so step numbers stay tied to the data order."""
        self.scheduler.step()
        self.step += 1
        self.losses.append(float("nan"))

    # -- validation ---------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, batch_size: int = 256) -> Optional[dict[str, Any]]:
        """Recall@K of the validation images against all their captions."""
        if len(self.val_images) < 2:
            return None
        self.model.eval()
        try:
            batches = [self.val_images[i : i + batch_size] for i in range(0, len(self.val_images), batch_size)]
            feats, kept = [], []
            for batch in self._eval_batches(batches):
                if batch is None:
                    continue
                images, index = batch
                with _autocast(self.device, self.precision):
                    feats.append(F.normalize(self.encode_image(images).float(), dim=-1).cpu())
                kept.append(index)
            if not feats:
                return None
            image_feats, kept_images = torch.cat(feats), torch.cat(kept).numpy()
            column = {int(img): j for j, img in enumerate(kept_images)}
            caption_ids = np.concatenate([np.arange(self.pairs.starts[i], self.pairs.starts[i + 1]) for i in kept_images])
            text_feats = []
            for i in range(0, len(caption_ids), batch_size):
                with _autocast(self.device, self.precision):
                    ids = torch.from_numpy(caption_ids[i : i + batch_size])
                    text_feats.append(F.normalize(self.encode_captions(ids).float(), dim=-1).cpu())
            sim = (torch.cat(text_feats) @ image_feats.T).numpy()
            text_image = np.array([column[int(self.pairs.caption_image[c])] for c in caption_ids])
            return retrieval(sim, text_image)
        finally:
            set_train_mode(self.model, self.config)

    def _eval_batches(self, batches: list[np.ndarray]):
        if self.image_features is not None:
            for batch in batches:
                index = self.readable(torch.from_numpy(batch))
                yield (self.image_features[index, 0].float(), index) if len(index) else None
            return
        if self.memory is None:
            yield from batch_loader(self.eval_data, batches, self.config.workers, self.config.seed, False)
            return
        cfg = self.model.visual.preprocess_cfg
        for batch in batches:
            index = self.memory.readable(torch.from_numpy(batch))
            yield (resize_batch(self.memory.pixels[index], self.image_size, cfg["mean"], cfg["std"]), index) if len(index) else None


def retrieval(sim_t2i: np.ndarray, text_image: np.ndarray) -> dict[str, Any]:
    """t2i / i2t Recall@1/5/10, MRR and median rank (``vlsearch.core.metrics.retrieval_metrics``)."""
    return retrieval_metrics(sim_t2i, text_image)


def train(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig = TrainConfig(),
    resume: bool = False,
    progress: Optional[Progress] = None,
) -> TrainResult:
    """Train ``config.model`` contrastively on the manifest ``data``; write checkpoints to ``out_dir``.

    ``progress(step, total, loss=..., temperature=...)`` is called after every step (and
    ``progress(captions_done, n_captions, stage="text")`` while text features are precomputed). Raises
    :class:`TrainingError` on unusable data, an existing run in ``out_dir`` without ``resume``,
    or a diverging loss. See the module docstring for the data and checkpoint conventions.
    """
    started = time.perf_counter()
    out = Path(out_dir).expanduser()
    if not resume and (out / LAST_CHECKPOINT).exists():
        raise TrainingError(f"{out} already holds a training run ({LAST_CHECKPOINT}); pass resume=True "
                            "(--resume) to continue it or choose another output folder")
    if resume and not (out / LAST_CHECKPOINT).exists():
        raise TrainingError(f"nothing to resume: {out / LAST_CHECKPOINT} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, plain(config.to_dict()))  # reusable: `vlsearch train --config`
    with cpu_threads(config.threads), reusing_freed_memory():
        return _train(data, out, config, resume, progress, started)


def _train(data: str | os.PathLike, out: Path, config: TrainConfig, resume: bool, progress: Optional[Progress],
           started: float) -> TrainResult:
    pairs = read_pairs(data)
    run = _Run(pairs, out, config, progress)
    if resume:
        load_last(run)
    first_step = run.step
    log.info("training %s: %d train / %d val images, %d captions, batch %d, %d steps (%d/epoch), %s/%s",
             config.model, len(run.train_images), len(run.val_images), len(pairs.captions), run.batch_size,
             run.total_steps, run.steps_per_epoch, run.device, run.precision)
    set_train_mode(run.model, config)
    while run.step < run.total_steps:
        epoch, offset = divmod(run.step, run.steps_per_epoch)
        _train_epoch(run, epoch, offset, progress)
        epoch_done = run.step % run.steps_per_epoch == 0 or run.step >= run.total_steps
        last = run.step >= run.total_steps
        if epoch_done and config.val_every and ((epoch + 1) % config.val_every == 0 or last):
            metrics = run.validate()
            if metrics is not None:
                run.val.append({"epoch": epoch + 1, "step": run.step, **metrics})
                log.info("epoch %d: val t2i R@1/5/10 %.3f/%.3f/%.3f", epoch + 1, metrics["t2i"]["R@1"],
                         metrics["t2i"]["R@5"], metrics["t2i"]["R@10"])
        save_last(run)
    seconds = time.perf_counter() - started
    final = save_final(run, seconds)
    done = run.step - first_step
    write_json(out / TRAIN_LOG, {"config": plain(config.to_dict()), "steps": run.step, "losses": run.losses,
                                 "val": run.val, "seconds": round(seconds, 2),
                                 "precompute_seconds": run.precompute_seconds})
    return TrainResult(
        checkpoint=final,
        last_checkpoint=out / LAST_CHECKPOINT,
        steps=run.step,
        epochs=math.ceil(run.step / run.steps_per_epoch),
        losses=list(run.losses),
        val=list(run.val),
        seconds=seconds,
        steps_per_second=done / seconds if seconds > 0 else 0.0,
    )


def _train_epoch(run: _Run, epoch: int, offset: int, progress: Optional[Progress]) -> None:
    """Steps ``offset..`` of ``epoch`` (stops early at ``total_steps``), checkpointing as configured."""
    order, captions = epoch_order(run.train_images, run.pairs, run.config.seed, epoch, run.config.captions_per_image)
    caption_of = dict(zip(order.tolist(), captions.tolist()))
    bs = run.batch_size
    n_batches = min(run.steps_per_epoch, run.total_steps - epoch * run.steps_per_epoch)
    batches = [order[i * bs : (i + 1) * bs] for i in range(offset, n_batches)]
    for batch in _epoch_batches(run, batches, epoch):
        if batch is None or len(batch[1]) < 2:
            log.warning("skipping a batch with fewer than 2 readable images at step %d", run.step)
            run.skip_step()
            continue
        decoded, index = batch
        caption_ids = torch.tensor([caption_of[int(i)] for i in index], dtype=torch.long)
        loss = run.train_step(run.batch_images(index, caption_ids, decoded), caption_ids)
        run.losses.append(loss)
        if progress is not None:
            progress(run.step, run.total_steps, loss=round(loss, 4),
                     temperature=round(float(1 / run.model.logit_scale.detach().exp()), 4))
        if run.config.checkpoint_every and run.step % run.config.checkpoint_every == 0:
            save_last(run)


def _epoch_batches(run: _Run, batches: list[np.ndarray], epoch: int):
    """(decoded images or None, image indices) per batch; None for a batch with no readable image."""
    if run.memory is None and run.image_features is None:
        yield from batch_loader(run.train_data, batches, run.config.workers, hash((run.config.seed, epoch)) & 0x7FFFFFFF,
                           run.device.type == "cuda")
        return
    for batch in batches:
        index = run.readable(torch.from_numpy(np.asarray(batch)))
        yield (None, index) if len(index) else None
