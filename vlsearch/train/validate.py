"""Validation of a training run: retrieval between its held-out images and all their captions."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from vlsearch.core.metrics import retrieval_metrics
from vlsearch.train.data import PairData
from vlsearch.train.image_inputs import ImageInputs
from vlsearch.train.locks import set_train_mode
from vlsearch.train.text_inputs import TextInputs


@torch.no_grad()
def validate(images: ImageInputs, text: TextInputs, pairs: PairData, val_images: np.ndarray,
             batch_size: int = 256) -> Optional[dict[str, Any]]:
    """t2i / i2t Recall@1/5/10, MRR and median rank (:func:`~vlsearch.core.metrics.retrieval_metrics`)
    of the readable ``val_images`` against all their captions; None with fewer than 2 images.
    The model runs in eval mode and is left in its training mode."""
    if len(val_images) < 2:
        return None
    model, compute = images.model, images.compute
    model.eval()
    try:
        image_feats, kept = _image_features(images, val_images, batch_size)
        if image_feats is None:
            return None
        column = {int(img): j for j, img in enumerate(kept)}
        caption_ids = np.concatenate([np.arange(pairs.starts[i], pairs.starts[i + 1]) for i in kept])
        text_feats = []
        for i in range(0, len(caption_ids), batch_size):
            with compute.autocast():
                ids = torch.from_numpy(caption_ids[i : i + batch_size])
                text_feats.append(F.normalize(text.encode(ids).float(), dim=-1).cpu())
        sim = (torch.cat(text_feats) @ image_feats.T).numpy()
        text_image = np.array([column[int(pairs.caption_image[c])] for c in caption_ids])
        return retrieval_metrics(sim, text_image)
    finally:
        set_train_mode(model, images.config)


def _image_features(images: ImageInputs, val_images: np.ndarray,
                    batch_size: int) -> tuple[Optional[torch.Tensor], np.ndarray]:
    """Normalised embeddings of the readable validation images (None if there is none) and their indices."""
    batches = [val_images[i : i + batch_size] for i in range(0, len(val_images), batch_size)]
    feats, kept = [], []
    for batch in images.eval_batches(batches):
        if batch is None:
            continue
        pixels, index = batch
        with images.compute.autocast():
            feats.append(F.normalize(images.encode(pixels).float(), dim=-1).cpu())
        kept.append(index)
    if not feats:
        return None, np.zeros(0, np.int64)
    return torch.cat(feats), torch.cat(kept).numpy()
