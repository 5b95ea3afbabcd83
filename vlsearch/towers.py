"""The towers' inner outputs, for models that look past the pooled embedding (e.g. re-rankers):
an image tower's final spatial feature map (before pooling) and a text tower's token states.

    enc = load_model("vlsearch-small")
    fmap = image_feature_map(enc, ["a.jpg"])          # (1, 1280, 7, 7) at 224 px
    states, mask = text_token_states(enc, ["a dog"])  # (1, T, 384), (1, T)

Both run in the encoder's device and precision and return float32 CPU tensors.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .images import ImageInput, open_image


def image_feature_map(encoder, images: Iterable[ImageInput]) -> torch.Tensor:
    """(N, C, H, W) final feature map of a timm image trunk before global pooling (the input of
    the pooled embedding's head), for PIL images, paths or encoded bytes."""
    trunk = getattr(encoder.model.visual, "trunk", None)
    if trunk is None or not hasattr(trunk, "forward_features"):
        raise TypeError(f"{encoder.name} has no timm image trunk with a spatial feature map")
    pixels = torch.stack([encoder.preprocess(open_image(img, draft_size=2 * encoder.image_size)) for img in images])
    with torch.inference_mode(), encoder.autocast():
        return trunk.forward_features(pixels.to(encoder.device)).float().cpu()


def text_token_states(encoder, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T, width) last-layer token states of a Hugging Face text tower and the (N, T) attention
    mask (1 for real tokens), padding trimmed to the longest text."""
    from .train import trim_padding

    text = encoder.model.text
    if not hasattr(text, "transformer") or not hasattr(text, "config"):
        raise TypeError(f"{encoder.name} has no Hugging Face text tower")
    tokens = trim_padding(encoder.model, encoder.tokenize(list(texts))).to(encoder.device)
    mask = (tokens != text.config.pad_token_id).long()
    with torch.inference_mode(), encoder.autocast():
        states = text.transformer(input_ids=tokens, attention_mask=mask).last_hidden_state
    return states.float().cpu(), mask.cpu()
