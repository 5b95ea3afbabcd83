"""Locked-tower features computed once (LiT): the frozen part of an image tower, run over every
training image (and K augmented views of it) a single time, so that training runs only the
trainable rest — a few layers and the head — on cached activations.

:func:`split_visual` cuts an open_clip timm tower into ``frozen`` and ``rest`` with
``rest(frozen(x)) == visual(x)``: the trunk's top-level stages in forward order, grouped as timm's
``group_matcher`` groups them (the groups open_clip's ``lock_image_tower(unlocked_groups=N)``
counts), then global pooling and the projection head. The cut is checked on a random input when it
is made: a trunk whose forward is not its stages in order is refused with a clear error.

:func:`precompute_views` runs ``frozen`` over in-memory images: view 0 is the plain (evaluation)
view, views 1..K-1 are seeded random augmentations (:func:`vlsearch.train.images.augment_batch`).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from vlsearch.core.errors import TrainingError
from vlsearch.train.images import AugmentConfig, MemoryImages, augment_batch, resize_batch

log = logging.getLogger(__name__)

#: Parts of a timm trunk that are not stages of its feature path (pooling / classifier come after).
_HEAD_PARTS = ("global_pool", "head_drop", "classifier", "fc", "head")


def trunk_stages(trunk: nn.Module) -> list[tuple[int, nn.Module]]:
    """The trunk's feature path as (group id, module) pieces in forward order: its top-level
    children, a child split into its own children where those fall into different ``group_matcher``
    groups (EfficientNet's ``blocks``). Parameter-free pieces take the group of the piece before."""
    from timm.models import group_parameters

    if not hasattr(trunk, "group_matcher"):
        raise TrainingError(f"{type(trunk).__name__} has no timm group_matcher: it cannot be split into stages")
    groups = group_parameters(trunk, trunk.group_matcher(coarse=True))
    group_of = {name: gid for gid, names in groups.items() for name in names}

    def gids(prefix: str) -> set[int]:
        return {g for n, g in group_of.items() if n.startswith(prefix + ".")}

    pieces: list[tuple[int, nn.Module]] = []
    for name, child in trunk.named_children():
        if name in _HEAD_PARTS:
            continue
        if len(gids(name)) > 1:
            pieces += [(max(gids(f"{name}.{sub}") or {-1}), grandchild) for sub, grandchild in child.named_children()]
        else:
            pieces.append((max(gids(name) or {-1}), child))
    last = -1
    for i, (gid, module) in enumerate(pieces):
        last = gid if gid >= 0 else last
        pieces[i] = (last, module)
    return pieces


def split_visual(visual: nn.Module, unlocked_groups: int = 0, check_size: int = 64) -> tuple[nn.Module, nn.Module]:
    """(frozen, rest) of an open_clip timm image tower with the last ``unlocked_groups`` trunk groups
    in ``rest``; ``rest(frozen(x))`` equals ``visual(x)`` (checked here, in eval mode)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not hasattr(trunk, "forward_head"):
        raise TrainingError("precomputed image features need an open_clip timm image tower (timm_model_name)")
    pieces = trunk_stages(trunk)
    group_ids = sorted({g for g, _ in pieces})
    if unlocked_groups > len(group_ids):
        raise TrainingError(f"lock_image_unlocked_groups={unlocked_groups} but the trunk has {len(group_ids)} groups")
    first_unlocked = group_ids[len(group_ids) - unlocked_groups] if unlocked_groups else None
    frozen = [m for g, m in pieces if first_unlocked is None or g < first_unlocked]
    unlocked = [m for g, m in pieces if first_unlocked is not None and g >= first_unlocked]
    pool = _Pool(trunk)
    frozen_part = nn.Sequential(*frozen, *([] if unlocked else [pool]))
    rest = nn.Sequential(*unlocked, *([pool] if unlocked else []), visual.head)
    _check_split(visual, frozen_part, rest, check_size)
    return frozen_part, rest


class _Pool(nn.Module):
    """The trunk's own ``forward_head`` (global pooling; its classifier is open_clip's Identity)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self._trunk = [trunk]  # not a submodule: no parameters of its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._trunk[0].forward_head(x)


@torch.no_grad()
def _check_split(visual: nn.Module, frozen: nn.Module, rest: nn.Module, size: int) -> None:
    was_training = visual.training
    visual.eval()
    try:
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        x = x.to(next(visual.parameters()).device)
        if not torch.allclose(rest(frozen(x)), visual(x), atol=1e-4, rtol=1e-4):
            raise TrainingError(f"{type(visual.trunk).__name__}'s forward is not its stages in order: its image "
                                "features cannot be precomputed (set precompute_image=False)")
    finally:
        visual.train(was_training)


@torch.no_grad()
def precompute_views(frozen: nn.Module, memory: MemoryImages, size: int, mean: Sequence[float],
                     std: Sequence[float], views: int, augment: Optional[AugmentConfig], seed: int,
                     flip_ok: Optional[torch.Tensor] = None, batch_size: int = 32,
                     device: torch.device | str = "cpu",
                     progress: Optional[Callable[..., None]] = None) -> torch.Tensor:
    """``frozen`` over every image of ``memory``: (N, views, *feature shape) fp16 on CPU.

    View 0 is the plain resized image, views 1.. are augmented with ``augment``, seeded by (seed,
    view, batch); ``flip_ok`` (N,) bool says which images may be mirrored. Unreadable images get zeros.
    ``progress(done, total, stage="image features")`` after each batch."""
    if views > 1 and augment is None:
        raise TrainingError("image_views > 1 needs augmentation (augment is None)")
    from vlsearch.models.encoder import prefers_channels_last

    n = memory.pixels.shape[0]
    frozen.eval()
    layout = torch.channels_last if prefers_channels_last(frozen, device) else torch.contiguous_format
    frozen.to(memory_format=layout)
    out: Optional[torch.Tensor] = None
    total, done = n * views, 0
    for view in range(views):
        for start in range(0, n, batch_size):
            pixels = memory.pixels[start : start + batch_size]
            if view == 0:
                x = resize_batch(pixels, size, mean, std)
            else:
                gen = torch.Generator().manual_seed(hash((seed, view, start)) & 0x7FFFFFFF)
                flip = None
                if augment.hflip and flip_ok is not None:
                    flip = (torch.rand(len(pixels), generator=gen) < augment.hflip) & flip_ok[start : start + batch_size]
                x = augment_batch(pixels, size, augment, mean, std, gen, flip)
            feats = frozen(x.to(device, memory_format=layout)).to("cpu", torch.float16)
            if out is None:
                out = torch.zeros((n, views, *feats.shape[1:]), dtype=torch.float16)
            out[start : start + len(pixels), view] = feats
            done += len(pixels)
            if progress is not None:
                progress(done, total, stage="image features")
    out[~memory.ok] = 0
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face text towers: token states below the unlocked top layers, computed once


def hf_text_layers(text: nn.Module) -> nn.ModuleList:
    """The transformer layers of an open_clip HF text tower (its transformer's longest ModuleList)."""
    lists = [m for m in text.transformer.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise TrainingError(f"cannot find the layers of {type(text.transformer).__name__}")
    return max(lists, key=len)


@torch.no_grad()
def text_states_below(text: nn.Module, tokens: torch.Tensor, unlocked_layers: int, batch_size: int = 256,
                      device: torch.device | str = "cpu",
                      progress: Optional[Callable[..., None]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The token states entering the last ``unlocked_layers`` layers of an HF text tower, for every
    row of ``tokens``: (packed (total tokens, width) fp16 on CPU, offsets (n + 1,)) — caption i's
    non-padding tokens are ``packed[offsets[i]:offsets[i + 1]]``."""
    layers = hf_text_layers(text)
    if not 0 < unlocked_layers <= len(layers):
        raise TrainingError(f"unlocked text layers must be in 1..{len(layers)}, got {unlocked_layers}")
    pad = text.config.pad_token_id
    lengths = (tokens != pad).sum(dim=1).clamp_min(1)
    offsets = torch.zeros(len(tokens) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    packed = torch.empty((int(offsets[-1]), text.config.hidden_size), dtype=torch.float16)
    order = torch.argsort(lengths, stable=True)
    was_training = text.training
    text.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max())
        ids = tokens[rows, :width].to(device)
        mask = (ids != pad).long()
        out = text.transformer(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = out.hidden_states[len(layers) - unlocked_layers].to("cpu", torch.float16)
        for j, row in enumerate(rows.tolist()):
            packed[offsets[row] : offsets[row + 1]] = states[j, : int(lengths[row])]
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order), stage="text states")
    text.train(was_training)
    return packed, offsets


def gather_states(packed: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption rows of a packed state table as a padded (B, T, width) float batch and its (B, T) mask."""
    lengths = offsets[rows + 1] - offsets[rows]
    width = int(lengths.max())
    index = offsets[rows][:, None] + torch.arange(width)[None, :]
    mask = torch.arange(width)[None, :] < lengths[:, None]
    states = packed[index.clamp_max(len(packed) - 1)].float() * mask[..., None]
    return states, mask.long()


def text_top(text: nn.Module, states: torch.Tensor, mask: torch.Tensor, unlocked_layers: int) -> torch.Tensor:
    """The last ``unlocked_layers`` layers and the pooler of an HF text tower over entering token
    states (see :func:`text_states_below`); the pooled features before ``text.proj``."""
    from types import SimpleNamespace

    layers = hf_text_layers(text)
    additive = (1.0 - mask[:, None, None, :].to(states.dtype)) * torch.finfo(states.dtype).min
    for layer in layers[len(layers) - unlocked_layers :]:
        out = layer(states, attention_mask=additive)
        states = out[0] if isinstance(out, tuple) else out
    return text.pooler(SimpleNamespace(last_hidden_state=states), mask)
