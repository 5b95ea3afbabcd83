"""The captions as a training run's text tower sees them.

Every caption is tokenised once. With the text tower fully locked, the frozen backbone runs over
every caption once (``features``, cached as ``text_features.pt``) and each step runs only the
trainable head; with the last N layers of a Hugging Face tower unlocked, the token states entering
them are cached instead (``states``) and each step runs those N layers. Otherwise the whole tower
runs on the tokens every step. The loss is the same either way.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import open_clip
import torch
from torch import nn

from vlsearch.core.errors import TrainingError
from vlsearch.core.progress import Progress
from vlsearch.models.towers import encode_text_tokens, is_hf_text, text_backbone_features, text_head
from vlsearch.train.cache import FeatureCache, captions_key, tower_id
from vlsearch.train.compute import Compute
from vlsearch.train.config import TrainConfig
from vlsearch.train.features import gather_states, text_states_below, text_top

log = logging.getLogger(__name__)

#: The cached text features of a fully locked tower, in the run's folder (no ``cache_dir``).
TEXT_CACHE = "text_features.pt"


class TextInputs:
    """Token ids of every caption, and the cached output of the frozen text layers when there is one."""

    def __init__(self, model: nn.Module, captions: list[str], config: TrainConfig, compute: Compute,
                 cache: FeatureCache, pretrained_tag: Optional[str], progress: Optional[Progress] = None):
        self.model, self.config, self.compute, self.cache = model, config, compute, cache
        tokenizer = open_clip.get_tokenizer(config.model)
        self.tokens = torch.cat([tokenizer(captions[i : i + 4096]) for i in range(0, len(captions), 4096)])
        self.features: Optional[torch.Tensor] = None  #: (captions, width) frozen backbone output, on the device
        self.states: Optional[tuple[torch.Tensor, torch.Tensor]] = None  #: packed token states, offsets
        self.seconds: Optional[float] = None  #: time spent computing the cache (None when reused or none)
        key = captions_key(config.model, pretrained_tag, captions)
        if config.use_precomputed_text and config.text_fully_locked:
            self.features = self._precompute_features(key, progress)
        elif config.use_precomputed_text and is_hf_text(model):
            self.states = self._precompute_states(key, progress)
        elif config.precompute_text:
            raise TrainingError("precompute_text with unlocked text layers needs a Hugging Face text tower")

    def encode(self, caption_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings (unnormalised) of the given caption rows, with gradients where trainable."""
        device = self.compute.device
        if self.features is not None:
            return text_head(self.model, self.features[caption_ids.to(self.features.device)])
        if self.states is not None:
            states, mask = gather_states(*self.states, caption_ids.cpu())
            pooled = text_top(self.model.text, states.to(device), mask.to(device), self.config.lock_text_unlocked_layers)
            return text_head(self.model, pooled)
        return encode_text_tokens(self.model, self.tokens[caption_ids].to(device, non_blocking=True))

    def _precompute_features(self, key: dict[str, Any], progress: Optional[Progress],
                             batch_size: int = 256) -> torch.Tensor:
        """The frozen backbone over every caption once; ``progress(done, total, stage="text")``."""
        path = self.cache.out_dir / TEXT_CACHE
        if self.cache.shared is not None:  # shared by runs whose models differ only after the text backbone
            key = dict(key, model=tower_id(self.config.model, self.model, "text"))
            path = self.cache.path("text-features", key)
        stored = self.cache.load(path, key, "text features")
        if stored is not None:
            return stored["features"].to(self.compute.device)
        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        with self.compute.autocast():
            features = text_backbone_features(self.model, self.tokens, self.compute.device, batch_size, progress)
        self.model.train(was_training)
        self.cache.save(path, key, features=features)
        self.seconds = round(time.perf_counter() - started, 2)
        log.info("precomputed %d text features in %.1fs", len(features), self.seconds)
        return features.to(self.compute.device)

    def _precompute_states(self, key: dict[str, Any], progress: Optional[Progress]) -> tuple[torch.Tensor, torch.Tensor]:
        """The token states entering the unlocked top text layers, every caption once."""
        key = dict(key, model=tower_id(self.config.model, self.model, "text"), kind="text states",
                   unlocked_layers=self.config.lock_text_unlocked_layers)
        path = self.cache.path("text-states", key)
        stored = self.cache.load(path, key, "text states")
        if stored is not None:
            return stored["packed"], stored["offsets"]
        started = time.perf_counter()
        with self.compute.autocast():
            packed, offsets = text_states_below(self.model.text, self.tokens, self.config.lock_text_unlocked_layers,
                                                device=self.compute.device, progress=progress)
        self.cache.save(path, key, packed=packed, offsets=offsets)
        self.seconds = round(time.perf_counter() - started, 2)
        log.info("precomputed %d text token states in %.1fs", len(packed), self.seconds)
        return packed, offsets
