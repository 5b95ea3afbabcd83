"""The model layer: one factory, ``load_model``, over open_clip's registry of configs.

``load_model(name, pretrained)`` resolves ``pretrained`` in one place:

* ``None`` — the model's built-in vlsearch weights when it has some (see ``BUILTIN_WEIGHTS``),
  else random initialisation (useful for the tiny model, tests and pipeline checks);
* an open_clip tag (``laion2b_s34b_b79k``), downloaded by open_clip or taken from the HF cache;
* ``hf-hub:org/repo``, an open_clip checkpoint on the Hugging Face hub;
* a local checkpoint file (``.pt``/``.bin``/``.safetensors``), e.g. one written by ``save_checkpoint``.

The returned :class:`Encoder` maps images and texts into the shared, L2-normalised space.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from pathlib import Path
from typing import Any

import open_clip
import torch

from .encoder import Encoder, resolve_device, resolve_precision
from .errors import (
    CheckpointMismatchError,
    ModelNotFoundError,
    PretrainedNotFoundError,
    WeightsUnavailableError,
)
from .fsutil import atomic_path
from .hf_text import (
    checkpoint_has_keys,
    hf_text_ids,
    is_hf_text_model,
    load_without_text_backbone,
    prepare_text_tower,
    quiet_transformers,
    resolve_text_tower,
)
from .modelinfo import ModelInfo
from .precision import apply_precision, check_precision
from .precision import resolve_precision as resolve_inference_precision
from .threads import set_process_threads

__all__ = ["Encoder", "load_model", "create_model", "save_checkpoint", "available_models", "pretrained_tags",
           "check_model_name", "default_pretrained", "default_model", "image_transform", "get_tokenizer",
           "resolve_device", "resolve_precision", "TINY_MODEL", "SMALL_MODEL"]

log = logging.getLogger(__name__)

TINY_MODEL = "vlsearch-tiny"
#: The real offline retrieval model: MiniLM text tower (pretrained, locked) + an image tower
#: trained on Flickr8k, shipped in ``vlsearch/weights`` (see ``vlsearch-small.json`` beside it).
SMALL_MODEL = "vlsearch-small"
HF_HUB_PREFIX = "hf-hub:"

_PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CONFIG_DIR = _PACKAGE_DIR / "model_configs"
WEIGHTS_DIR = _PACKAGE_DIR / "weights"

#: Weights shipped inside the package: model name -> (default tag -> file under WEIGHTS_DIR).
BUILTIN_WEIGHTS: dict[str, dict[str, str]] = {
    # Trained by benchmarks/train_small.py; provenance in weights/vlsearch-small.json.
    SMALL_MODEL: {"flickr8k-v2": "vlsearch-small.pt"},
}

open_clip.add_model_config(MODEL_CONFIG_DIR)


def available_models() -> list[str]:
    """Every architecture name ``load_model`` accepts (open_clip's and vlsearch's own)."""
    return open_clip.list_models()


def pretrained_tags(name: str) -> list[str]:
    """Pretrained tags known for ``name``: open_clip's download tags plus built-in vlsearch weights."""
    return sorted(set(open_clip.list_pretrained_tags_by_model(name)) | set(BUILTIN_WEIGHTS.get(name, {})))


def load_model(
    name: str | None = None,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    threads: int | None = None,
) -> Encoder:
    """Create an :class:`Encoder` for an open_clip architecture with the given weights.

    Raises ModelNotFoundError, PretrainedNotFoundError, WeightsUnavailableError or
    CheckpointMismatchError with a message that says what to do. ``name=None`` means
    :func:`default_model`. ``threads`` sets torch's CPU threads for this process (not restored).
    ``precision``: ``auto`` (bf16 where this CPU/GPU runs it fast, see :mod:`vlsearch.precision`),
    ``fp32``, ``bf16``, ``fp16`` or ``int8`` (CPU); PrecisionError if unknown.
    """
    name = name or default_model()
    if threads:
        set_process_threads(threads)
    dev = resolve_device(device)
    check_precision(precision)  # a bad value fails before the model is built
    pretrained = default_pretrained(name, pretrained)
    model, tag = _create(name, pretrained)
    dim = int(_embed_dim(model))
    prec = resolve_inference_precision(precision, dev, model)
    model = apply_precision(model.to(dev), prec)
    preprocess = image_transform(model, is_train=False)
    tokenizer = get_tokenizer(name)
    info = ModelInfo(name=name, pretrained=tag, dim=dim)
    log.info("loaded %s (pretrained=%s, dim=%d) on %s, precision %s: %s", name, tag, dim, dev, prec.name, prec.reason)
    return Encoder(model, preprocess, tokenizer, info, dev, prec)


def image_transform(model: torch.nn.Module, is_train: bool = False, aug_cfg: Any = None):
    """The model's own open_clip preprocess (resize, crop, normalise); with augmentation when training."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=is_train, aug_cfg=aug_cfg)


def create_model(name: str, pretrained: str | os.PathLike | None = None, *,
                 default_weights: bool = True) -> tuple[torch.nn.Module, str | None]:
    """Build the raw open_clip ``nn.Module`` (CPU, fp32) and the canonical pretrained string.

    ``pretrained=None`` means the model's built-in weights, or with ``default_weights=False`` a
    fresh initialisation (what training from scratch wants). Training uses this directly;
    everyone else should use :func:`load_model`.
    """
    return _create(name, default_pretrained(name, pretrained) if default_weights else
                   (None if pretrained is None else os.fspath(pretrained)))


def default_pretrained(name: str, pretrained: str | os.PathLike | None) -> str | None:
    """``pretrained`` as a string; None becomes the model's first built-in weights tag, if any."""
    builtin = BUILTIN_WEIGHTS.get(name, {})
    if pretrained is None and builtin:
        return next(iter(builtin))
    return None if pretrained is None else os.fspath(pretrained)


def get_tokenizer(name: str):
    """open_clip's tokenizer for ``name``, with a packaged HF text tower resolved to its local copy."""
    if not name.startswith(HF_HUB_PREFIX):
        prepare_text_tower(name)
    return open_clip.get_tokenizer(name)


def _create(name: str, pretrained: str | None) -> tuple[torch.nn.Module, str | None]:
    if name.startswith(HF_HUB_PREFIX):
        return _create_from_hub_name(name), None
    check_model_name(name)
    prepare_text_tower(name)
    if pretrained is None:
        with quiet_transformers(name):
            return open_clip.create_model(name, pretrained=None), None
    builtin = BUILTIN_WEIGHTS.get(name, {})
    if pretrained in builtin:
        path = WEIGHTS_DIR / builtin[pretrained]
        if not path.is_file():
            raise WeightsUnavailableError(f"built-in weights for {name} missing from the package: {path}")
        return _create_from_file(name, path), pretrained
    if pretrained.startswith(HF_HUB_PREFIX):
        path = _download_hub_checkpoint(pretrained[len(HF_HUB_PREFIX):])
        return _create_from_file(name, path), pretrained
    if open_clip.get_pretrained_cfg(name, pretrained):
        return _create_from_tag(name, pretrained), pretrained
    path = Path(pretrained).expanduser()
    if path.is_file():
        return _create_from_file(name, path), str(path.resolve())
    tags = pretrained_tags(name)
    raise PretrainedNotFoundError(
        f"pretrained={pretrained!r} is not a tag of {name}, an 'hf-hub:org/repo' id, or an existing file. "
        + (f"Tags for {name}: {', '.join(tags)}" if tags else f"{name} has no published tags; pass a checkpoint file.")
    )


def check_model_name(name: str) -> None:
    """ModelNotFoundError (with close matches) unless ``name`` is a registered architecture."""
    models = available_models()
    if name in models:
        return
    close = difflib.get_close_matches(name, models, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelNotFoundError(f"unknown model {name!r}.{hint} `vlsearch models` lists them all.")


def _offline_help(what: str, exc: BaseException) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not fetch {what}: {exc}. Weights are downloaded from the network (Hugging Face hub) "
        "on first use and cached in ~/.cache/huggingface; offline, either copy that cache from a "
        "machine with network access, or pass a local checkpoint file as --pretrained PATH."
    )


def _create_from_tag(name: str, tag: str) -> torch.nn.Module:
    try:
        return open_clip.create_model(name, pretrained=tag)
    except RuntimeError as exc:
        if "Failed to download" in str(exc):
            raise _offline_help(f"weights {name}/{tag}", exc) from exc
        raise


def _create_from_hub_name(name: str) -> torch.nn.Module:
    try:
        return open_clip.create_model(name)
    except RuntimeError as exc:
        raise _offline_help(name, exc) from exc


def _download_hub_checkpoint(repo: str) -> str:
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        return download_pretrained_from_hf(repo)
    except Exception as exc:  # huggingface_hub raises many kinds when offline
        raise _offline_help(f"{HF_HUB_PREFIX}{repo}", exc) from exc


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns 'initialized randomly' before we load the file's weights: not true for us."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "initialized randomly" not in message and "initialized partially" not in message


def _create_from_file(name: str, path: str | os.PathLike) -> torch.nn.Module:
    # A checkpoint may omit a Hugging Face text tower's transformer (vlsearch-small ships only what
    # it trained): that part then comes from the tower's own pretrained weights.
    text_from_source = is_hf_text_model(name) and not checkpoint_has_keys(path, "text.transformer.")
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        with quiet_transformers(name):
            model = open_clip.create_model(name, pretrained=None, pretrained_text=text_from_source)
    finally:
        root.removeFilter(quiet)
    try:
        if text_from_source:
            load_without_text_backbone(model, path)
            return model
        open_clip.load_checkpoint(model, str(path), strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit architecture {name}: {str(exc).splitlines()[0]}"
        ) from exc
    except Exception as exc:  # unpickling garbage, truncated zip, wrong format
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    return model


def _embed_dim(model: torch.nn.Module) -> int:
    proj = getattr(model.visual, "output_dim", None)
    if proj:
        return proj
    with torch.no_grad():
        size = model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return model.encode_image(torch.zeros(1, 3, *size)).shape[-1]


def save_checkpoint(
    model: torch.nn.Module | Encoder,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    half: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model's weights atomically in a form ``load_model(name, pretrained=path)`` reads.

    ``half`` stores floating tensors as fp16 (half the size; loaded back as fp32).
    ``extra`` is stored beside the weights (e.g. training step, metrics, provenance).
    """
    if isinstance(model, Encoder):
        name = name or model.name
        model = model.model
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
             for k, v in model.state_dict().items()}
    payload = {"state_dict": state, "vlsearch": {"model": name, **(extra or {})}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def small_model_available() -> bool:
    """Whether vlsearch-small can load here: its weights shipped and its text tower resolvable."""
    files = BUILTIN_WEIGHTS.get(SMALL_MODEL, {})
    if not files or not all((WEIGHTS_DIR / f).is_file() for f in files.values()):
        return False
    try:
        resolve_text_tower(hf_text_ids(SMALL_MODEL)[0])
    except WeightsUnavailableError as exc:
        log.warning("vlsearch-small is unavailable (%s); the default model is %s", exc, TINY_MODEL)
        return False
    return True


@functools.lru_cache(maxsize=None)
def default_model() -> str:
    """The model used when a command is given none: vlsearch-small where it can load, else the
    tiny one. Decided on first use (it probes the package and the HF cache), then remembered."""
    return SMALL_MODEL if small_model_available() else TINY_MODEL


def __getattr__(name: str) -> Any:
    if name == "DEFAULT_MODEL":  # resolved lazily: importing this module probes nothing
        return default_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
