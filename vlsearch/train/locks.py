"""Locked towers (LiT): freeze the towers a training config locks, and keep locked towers in eval mode."""

from __future__ import annotations

import warnings

from torch import nn

from vlsearch.core.errors import TrainingError
from vlsearch.models.towers import is_hf_text
from vlsearch.train.config import TrainConfig

__all__ = ["apply_locks", "lock_hf_text", "set_train_mode"]


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
        with warnings.catch_warnings():  # open_clip's partial lock imports timm's deprecated alias module
            warnings.filterwarnings("ignore", "Importing from timm.models.helpers is deprecated", FutureWarning)
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
