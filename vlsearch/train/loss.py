"""The CLIP loss (open_clip's :class:`~open_clip.ClipLoss`, in float32) and its temperature clamp."""

from __future__ import annotations

import math

import torch
from open_clip import ClipLoss
from torch import nn

#: The logit scale is clamped to at most 100 (temperature >= 0.01), as in CLIP / open_clip.
MAX_LOGIT_SCALE = math.log(100)

_CLIP_LOSS = ClipLoss()  # single process, labels not cached: holds no state between calls


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching pairs (row i of each is a positive pair).

    ``image_features``/``text_features`` are ``(B, D)`` L2-normalised embeddings and
    ``logit_scale`` the *multiplier* (``exp`` of the learnable log scale, i.e. 1/temperature).
    Returns the mean of the image->text and text->image cross-entropies, computed in float32
    even inside a bf16/fp16 autocast region (which would otherwise run the logits' matmul in
    half precision).
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"clip_loss needs two (B, D) tensors of one shape, got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    if isinstance(logit_scale, torch.Tensor):
        logit_scale = logit_scale.float()
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        return _CLIP_LOSS(image_features.float(), text_features.float(), logit_scale)


def clamp_logit_scale(model: nn.Module) -> None:
    """Clamp the model's log logit scale to [0, ln 100] in place (after every optimizer step)."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
