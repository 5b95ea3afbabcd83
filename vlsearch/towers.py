"""Locked towers (LiT) and the text tower's split into a frozen backbone and a trainable head.

``text_head(model, text_backbone(model, tokens)) == model.encode_text(tokens)``: with the text
tower fully locked, training caches the backbone's output once and runs only the head.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .encoder import trim_padding
from .errors import TrainingError
from .progress import Progress
from .train_config import TrainConfig

__all__ = ["apply_locks", "lock_hf_text", "set_train_mode", "text_backbone", "text_backbone_features", "text_head",
           "encode_text_tokens", "trim_padding"]


def _is_hf_text(model: nn.Module) -> bool:
    from open_clip.hf_model import HFTextEncoder

    return isinstance(getattr(model, "text", None), HFTextEncoder)


def text_backbone(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The part of the text tower that ``lock_text`` freezes, applied to tokens.

    For a Hugging Face tower: the pooled transformer output (before ``text.proj``, which stays
    trainable). For open_clip's built-in tower (locked including its projection): the unnormalised
    text embedding. ``text_head(model, text_backbone(model, t)) == model.encode_text(t)``.
    """
    if _is_hf_text(model):
        text = model.text
        tokens = trim_padding(model, tokens)
        attn_mask = (tokens != text.config.pad_token_id).long()
        out = text.transformer(input_ids=tokens, attention_mask=attn_mask)
        return text.pooler(out, attn_mask)
    return model.encode_text(tokens)


@torch.no_grad()
def text_backbone_features(model: nn.Module, tokens: torch.Tensor, device: torch.device | str = "cpu",
                           batch_size: int = 256, progress: Optional[Progress] = None) -> torch.Tensor:
    """:func:`text_backbone` over all ``tokens`` (float32, on CPU, in input order), in batches of
    similar length, which waste little compute on padding (HF towers trim it).
    ``progress(done, total, stage="text")`` is called after each batch."""
    order = torch.argsort((tokens != 0).sum(dim=1), stable=True)
    out = []
    for i in range(0, len(order), batch_size):
        out.append(text_backbone(model, tokens[order[i : i + batch_size]].to(device)).float().cpu())
        if progress is not None:
            progress(min(i + batch_size, len(order)), len(order), stage="text")
    features = torch.empty((len(order), out[0].shape[1]), dtype=torch.float32)
    features[order] = torch.cat(out)
    return features


def encode_text_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` (unnormalised), with padding trimmed where that is exact."""
    return model.encode_text(trim_padding(model, tokens))


def text_head(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The trainable rest of a locked text tower (see :func:`text_backbone`)."""
    return model.text.proj(features) if _is_hf_text(model) else features


def _text_tower(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "text"):
        return [model.text]
    return [m for m in (getattr(model, "transformer", None), getattr(model, "token_embedding", None),
                        getattr(model, "ln_final", None)) if isinstance(m, nn.Module)]


def apply_locks(model: nn.Module, config: TrainConfig) -> None:
    """Freeze towers as configured (open_clip's LiT-style lock functions)."""
    if config.lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    if config.lock_text:
        n = config.lock_text_unlocked_layers
        if _is_hf_text(model):
            lock_hf_text(model.text, n)
        else:
            # open_clip counts a built-in tower's unlocked *groups* from the end (projection, then
            # last block + ln_final, ...); we mean "the last n blocks (+ ln_final and projection)".
            model.lock_text_tower(unlocked_layers=n + 1 if n else 0, freeze_layer_norm=True)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingError("every parameter is frozen; unlock a tower")


def lock_hf_text(text: nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze a Hugging Face text tower's transformer except its last ``unlocked_layers`` layers.

    Same result as open_clip's ``HFTextEncoder.lock`` (embeddings and LayerNorms frozen, the
    projection ``text.proj`` left trainable), which in open_clip 3.3 fails for partial unlocking of
    BERT-like models (no ``layer_attr`` in its arch table): the layer list is found here as the
    transformer's longest ``ModuleList``.
    """
    for p in text.transformer.parameters():
        p.requires_grad = False
    if not unlocked_layers:
        return
    lists = [m for m in text.transformer.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise TrainingError(f"cannot find the layers of {type(text.transformer).__name__} to unlock")
    layers = max(lists, key=len)
    if unlocked_layers > len(layers):
        raise TrainingError(f"lock_text_unlocked_layers={unlocked_layers} but the text tower has {len(layers)} layers")
    for layer in layers[-unlocked_layers:]:
        for p in layer.parameters():
            p.requires_grad = True


def set_train_mode(model: nn.Module, config: TrainConfig) -> None:
    """Train mode, except fully locked towers stay in eval mode (no dropout / BN updates)."""
    model.train()
    if config.lock_image:
        model.visual.eval()
    if config.text_fully_locked:
        for module in _text_tower(model):
            module.eval()
