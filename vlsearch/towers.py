"""Locked towers (LiT) and the text tower's split into a frozen backbone and a trainable head.

``text_head(model, text_backbone(model, tokens)) == model.encode_text(tokens)``: with the text
tower fully locked, training caches the backbone's output once and runs only the head.

The towers' inner outputs, for models that look past the pooled embedding (e.g. re-rankers):
an image tower's final spatial feature map (before pooling) and a text tower's token states.

    enc = load_model("vlsearch-small")
    fmap = image_feature_map(enc, ["a.jpg"])          # (1, 1280, 7, 7) at 224 px
    states, mask = text_token_states(enc, ["a dog"])  # (1, T, 384), (1, T)

Both run in the encoder's device and precision and return float32 CPU tensors.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .encoder import trim_padding
from .errors import TrainingError
from .images import ImageInput, open_image
from .progress import Progress
from .train_config import TrainConfig

__all__ = ["apply_locks", "lock_hf_text", "set_train_mode", "text_backbone", "text_backbone_features", "text_head",
           "encode_text_tokens", "trim_padding", "is_hf_text", "image_feature_map", "text_token_states"]


def is_hf_text(model: nn.Module) -> bool:
    from open_clip.hf_model import HFTextEncoder

    return isinstance(getattr(model, "text", None), HFTextEncoder)


def text_backbone(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The part of the text tower that ``lock_text`` freezes, applied to tokens.

    For a Hugging Face tower: the pooled transformer output (before ``text.proj``, which stays
    trainable). For open_clip's built-in tower (locked including its projection): the unnormalised
    text embedding. ``text_head(model, text_backbone(model, t)) == model.encode_text(t)``.
    """
    if is_hf_text(model):
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
    return model.text.proj(features) if is_hf_text(model) else features


def _text_tower(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "text"):
        return [model.text]
    return [m for m in (getattr(model, "transformer", None), getattr(model, "token_embedding", None),
                        getattr(model, "ln_final", None)) if isinstance(m, nn.Module)]


def apply_locks(model: nn.Module, config: TrainConfig) -> None:
    """Freeze towers as configured (open_clip's LiT-style lock functions)."""
    if config.lock_image:
        # BN statistics of locked parts are kept by eval mode (set_train_mode), not by open_clip's
        # freeze_bn_stats: that swaps timm's BatchNormAct2d for a plain frozen BN, dropping its activation.
        model.lock_image_tower(unlocked_groups=config.lock_image_unlocked_groups, freeze_bn_stats=False)
    if config.lock_text:
        n = config.lock_text_unlocked_layers
        if is_hf_text(model):
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
        for module in model.visual.modules():  # unlocked layers (and the head's dropout) train
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                module.train()
    if config.text_fully_locked:
        for module in _text_tower(model):
            module.eval()


def image_feature_map(encoder, images: Iterable[ImageInput]) -> torch.Tensor:
    """(N, C, H, W) final feature map of a timm image trunk before global pooling (the input of
    the pooled embedding's head), for PIL images, paths or encoded bytes."""
    trunk = getattr(encoder.model.visual, "trunk", None)
    if trunk is None or not hasattr(trunk, "forward_features"):
        raise TypeError(f"{encoder.name} has no timm image trunk with a spatial feature map")
    pixels = torch.stack([encoder.preprocess(open_image(img, draft_size=2 * encoder.image_size)) for img in images])
    with torch.inference_mode(), encoder.autocast():
        return trunk.forward_features(encoder.image_input(pixels)).float().cpu().contiguous()


def text_token_states(encoder, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T, width) last-layer token states of a Hugging Face text tower and the (N, T) attention
    mask (1 for real tokens), padding trimmed to the longest text."""
    text = encoder.model.text
    if not hasattr(text, "transformer") or not hasattr(text, "config"):
        raise TypeError(f"{encoder.name} has no Hugging Face text tower")
    tokens = trim_padding(encoder.model, encoder.tokenize(list(texts))).to(encoder.device)
    mask = (tokens != text.config.pad_token_id).long()
    with torch.inference_mode(), encoder.autocast():
        states = text.transformer(input_ids=tokens, attention_mask=mask).last_hidden_state
    return states.float().cpu(), mask.cpu()
