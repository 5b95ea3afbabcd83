"""Precomputed features on disk: what a frozen tower produced once, reused while its key matches.

A cache lives in the run's folder, or under ``TrainConfig.cache_dir`` where runs share it (the
file is then named by a digest of its key, so runs that differ only after a frozen part reuse
each other's features).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from vlsearch.core.fsutil import atomic_path
from vlsearch.models.hf_text import model_config
from vlsearch.models.towers import is_hf_text

log = logging.getLogger(__name__)


class FeatureCache:
    """Reads and writes ``{"key": ..., **tensors}`` files for one run."""

    def __init__(self, out_dir: Path, cache_dir: Optional[str]):
        self.out_dir = out_dir
        self.shared = Path(cache_dir).expanduser() if cache_dir else None

    def path(self, stem: str, key: dict[str, Any]) -> Path:
        """``out_dir/<stem>.pt``, or ``cache_dir/<stem>-<digest of key>.pt``."""
        if self.shared is None:
            return self.out_dir / f"{stem}.pt"
        self.shared.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(repr(sorted(key.items())).encode("utf-8")).hexdigest()[:16]
        return self.shared / f"{stem}-{digest}.pt"

    def load(self, path: Path, key: dict[str, Any], what: str) -> Optional[dict[str, Any]]:
        """The stored payload when ``path`` holds ``what`` (for the log) made under ``key``, else None."""
        if not path.is_file():
            return None
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") != key:
            return None
        log.info("using cached %s %s", what, path)
        return stored

    def save(self, path: Path, key: dict[str, Any], **tensors: Any) -> None:
        """Write ``tensors`` under ``key`` atomically."""
        with atomic_path(path) as tmp:
            torch.save({"key": key, **tensors}, tmp)


def tower_id(model_name: str, model: nn.Module, tower: str) -> str:
    """What a frozen tower's cached output depends on: the model's ``vision_cfg`` / ``text_cfg``
    without the (trainable) projection settings; the model name for an unregistered one."""
    cfg = model_config(model_name)
    if cfg is None:
        return model_name
    part = {k: v for k, v in cfg[f"{tower}_cfg"].items() if not k.endswith(("proj", "proj_type", "proj_bias"))}
    if tower == "text" and not is_hf_text(model):
        part["embed_dim"] = cfg["embed_dim"]  # a built-in tower's features include its projection
    return repr(sorted(part.items()))


def captions_key(model_name: str, pretrained_tag: Optional[str], captions: list[str]) -> dict[str, Any]:
    """The key part every text cache shares: the model, its initial weights and the captions."""
    digest = hashlib.sha1("\n".join(captions).encode("utf-8")).hexdigest()
    return {"model": model_name, "pretrained": pretrained_tag, "captions_sha1": digest}
