"""The text tower's split into a frozen backbone and a trainable head (locking is :mod:`vlsearch.train.locks`).

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

from vlsearch.models.encoder import trim_padding
from vlsearch.core.inputs import ImageInput
from vlsearch.data.images import open_image
from vlsearch.core.progress import Progress

__all__ = ["text_backbone", "text_backbone_features", "text_head",
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
