"""Contrastive (CLIP) training of an open_clip dual encoder on image-caption pairs.

``train(data, out_dir, TrainConfig(...))`` reads a manifest (CSV, TSV or Parquet with columns
``image`` — a path relative to the manifest — and ``caption``; several rows per image allowed),
carves a seeded validation split *by image*, and optimises the symmetric InfoNCE loss
(open_clip's ``ClipLoss``, in float32: :func:`vlsearch.train.loss.clip_loss`) with a learnable
temperature, AdamW, open_clip's cosine schedule with linear warm-up, gradient clipping and
autocast (+ GradScaler for fp16) on GPU (:mod:`vlsearch.train.optim`).

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
  tower). The loss is identical to running the frozen tower every step, at a fraction of the cost
  (:mod:`vlsearch.train.text_inputs`; a locked image tower likewise: :mod:`vlsearch.train.image_inputs`).
* **Checkpoints.** ``last.pt`` (weights + optimizer, scaler, RNG, step) is written
  atomically every ``checkpoint_every`` steps and at each epoch end; ``resume=True`` continues from
  it at the exact step (the batch order of an epoch is a function of ``(seed, epoch)``).
  ``model.pt`` (weights and provenance) is written at the end; both load with
  ``load_model(config.model, pretrained=path)``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlsearch.core.allocator import reusing_freed_memory
from vlsearch.core.errors import CheckpointMismatchError, TrainingError
from vlsearch.core.fsutil import write_json
from vlsearch.core.progress import Progress
from vlsearch.core.threads import cpu_threads
from vlsearch.models.factory import check_model_name, create_model
from vlsearch.models.trunks import load_trunk
from vlsearch.train.cache import FeatureCache
from vlsearch.train.checkpoint import LAST_CHECKPOINT, load_last, save_final, save_last
from vlsearch.train.compute import Compute
from vlsearch.train.config import CONFIG_FILE, TrainConfig, plain
from vlsearch.train.data import PairData, epoch_order, read_pairs, split_images
from vlsearch.train.image_inputs import ImageInputs
from vlsearch.train.locks import apply_locks, set_train_mode
from vlsearch.train.loss import clamp_logit_scale, clip_loss
from vlsearch.train.optim import Optimization
from vlsearch.train.text_inputs import TextInputs
from vlsearch.train.validate import validate

log = logging.getLogger(__name__)

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


def _build_model(config: TrainConfig, device: torch.device) -> tuple[nn.Module, Optional[str]]:
    """The model to train, with its initial weights and locks, on ``device``; and its pretrained tag."""
    if not config.model.startswith("hf-hub:"):
        check_model_name(config.model)
    model, pretrained_tag = create_model(config.model, config.pretrained, default_weights=False)
    if config.pretrained_image:
        try:
            load_trunk(model, config.pretrained_image)
        except CheckpointMismatchError as exc:
            raise TrainingError(f"pretrained_image: {exc}") from exc
    if getattr(model, "logit_bias", None) is not None:
        raise TrainingError(f"{config.model} is a SigLIP-style model (logit_bias); only the CLIP loss is supported")
    model.to(device)
    apply_locks(model, config)
    return model, pretrained_tag


class _Run:
    """One training run: the model, its data, its inputs and optimisation, and the step it is at;
    ``train`` drives it, :mod:`vlsearch.train.checkpoint` saves and restores it."""

    def __init__(self, pairs: PairData, out_dir: Path, config: TrainConfig, progress: Optional[Progress] = None):
        self.pairs, self.out_dir, self.config = pairs, out_dir, config
        self.compute = Compute.resolve(config.device, config.precision)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.model, self.pretrained_tag = _build_model(config, self.compute.device)
        self.train_images, self.val_images = split_images(len(pairs.images), config.val_fraction, config.seed)
        self.batch_size = min(config.batch_size, len(self.train_images))
        if self.batch_size < config.batch_size:
            log.warning("batch_size %d > %d training images; using %d", config.batch_size, len(self.train_images),
                        self.batch_size)
        self.steps_per_epoch = len(self.train_images) // self.batch_size
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.optim = Optimization(self.model, config, self.total_steps, self.compute.device,
                                  scale_gradients=self.compute.precision == "fp16")
        self.step, self.losses, self.val = 0, [], []
        cache = FeatureCache(out_dir, config.cache_dir)
        self.text = TextInputs(self.model, pairs.captions, config, self.compute, cache, self.pretrained_tag, progress)
        self.images = ImageInputs(self.model, pairs, config, self.compute, cache, self.pretrained_tag, progress)
        set_train_mode(self.model, config)

    @property
    def precompute_seconds(self) -> dict[str, float]:
        """Time spent computing feature caches in this call (reused caches cost none)."""
        spent = (("text", self.text.seconds), ("image", self.images.seconds))
        return {name: seconds for name, seconds in spent if seconds is not None}

    def loss(self, images: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        """The CLIP loss of a batch; with (B, K) ``caption_ids``, the mean over the K caption draws."""
        with self.compute.autocast():
            image_features = F.normalize(self.images.encode(images).float(), dim=-1)
            text_features = F.normalize(self.text.encode(caption_ids.flatten()).float(), dim=-1)
            scale = self.model.logit_scale.exp().float()
            if caption_ids.dim() == 1:
                return clip_loss(image_features, text_features, scale)
            text_features = text_features.view(*caption_ids.shape, -1)
            return torch.stack([clip_loss(image_features, text_features[:, k], scale)
                                for k in range(caption_ids.shape[1])]).mean()

    def train_step(self, images: torch.Tensor, caption_ids: torch.Tensor) -> float:
        """One optimizer step on a batch; returns its loss."""
        loss = self.loss(images, caption_ids)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {loss.item()} at step {self.step}; lower the lr or use fp32/bf16")
        self.optim.step(loss, self.step)
        clamp_logit_scale(self.model)
        self.step += 1
        return float(loss.detach())

    def skip_step(self) -> None:
        """Count a batch that could not be used, so step numbers stay tied to the data order."""
        self.step += 1
        self.losses.append(float("nan"))

    def validate(self) -> Optional[dict[str, Any]]:
        """Retrieval metrics of the validation images (None without a usable split)."""
        return validate(self.images, self.text, self.pairs, self.val_images)


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
             run.total_steps, run.steps_per_epoch, run.compute.device, run.compute.precision)
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
    for batch in run.images.train_batches(batches, epoch):
        if batch is None or len(batch[1]) < 2:
            log.warning("skipping a batch with fewer than 2 readable images at step %d", run.step)
            run.skip_step()
            continue
        decoded, index = batch
        caption_ids = torch.tensor([caption_of[int(i)] for i in index], dtype=torch.long)
        loss = run.train_step(run.images.step_inputs(index, caption_ids, run.step, decoded), caption_ids)
        run.losses.append(loss)
        if progress is not None:
            progress(run.step, run.total_steps, loss=round(loss, 4),
                     temperature=round(float(1 / run.model.logit_scale.detach().exp()), 4))
        if run.config.checkpoint_every and run.step % run.config.checkpoint_every == 0:
            save_last(run)
