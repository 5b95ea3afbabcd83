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
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import open_clip
import torch

from .errors import (
    CheckpointMismatchError,
    ModelNotFoundError,
    PretrainedNotFoundError,
    WeightsUnavailableError,
)
from .fsutil import atomic_path
from .images import ImageInput, open_image

log = logging.getLogger(__name__)

TINY_MODEL = "vlsearch-tiny"
#: The model used when a command is given none.
DEFAULT_MODEL = TINY_MODEL
HF_HUB_PREFIX = "hf-hub:"

_PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CONFIG_DIR = _PACKAGE_DIR / "model_configs"
WEIGHTS_DIR = _PACKAGE_DIR / "weights"

#: Weights shipped inside the package: model name -> (default tag -> file under WEIGHTS_DIR).
BUILTIN_WEIGHTS: dict[str, dict[str, str]] = {}

open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass(frozen=True)
class ModelInfo:
    """What identifies an embedding space: recorded in every collection manifest."""

    name: str
    pretrained: str | None
    dim: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pretrained": self.pretrained, "dim": self.dim}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelInfo":
        return cls(name=data["name"], pretrained=data.get("pretrained"), dim=int(data["dim"]))


def available_models() -> list[str]:
    """Every architecture name ``load_model`` accepts (open_clip's and vlsearch's own)."""
    return open_clip.list_models()


def pretrained_tags(name: str) -> list[str]:
    """Pretrained tags known for ``name``: open_clip's download tags plus built-in vlsearch weights."""
    return sorted(set(open_clip.list_pretrained_tags_by_model(name)) | set(BUILTIN_WEIGHTS.get(name, {})))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` means CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: bf16 (or fp16) autocast on CUDA, fp32 on CPU."""
    if precision != "auto":
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be auto, fp32, fp16 or bf16, not {precision!r}")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class Encoder:
    """A loaded dual encoder: images and texts -> float32, L2-normalised numpy vectors."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Any,
        tokenizer: Any,
        info: ModelInfo,
        device: torch.device,
        precision: str,
    ):
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        self.precision = precision

    name = property(lambda self: self.info.name)
    pretrained = property(lambda self: self.info.pretrained)
    dim = property(lambda self: self.info.dim)

    @property
    def image_size(self) -> int:
        size = getattr(self.model.visual, "image_size", 224)
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    def autocast(self):
        """Autocast context for this encoder's device/precision (a no-op in fp32)."""
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def encode_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        """Encode an already preprocessed ``(B, 3, H, W)`` batch."""
        with torch.inference_mode(), self.autocast():
            pixels = pixels.to(self.device, non_blocking=True)
            feats = self.model.encode_image(pixels, normalize=True)
        return _normalised_numpy(feats)

    def encode_images(self, images: Iterable[ImageInput], batch_size: int = 64) -> np.ndarray:
        """Encode PIL images, file paths or encoded bytes; returns ``(N, dim)`` float32.

        Unreadable inputs raise :class:`~vlsearch.errors.DecodeError`.
        """
        out: list[np.ndarray] = []
        batch: list[torch.Tensor] = []
        for img in images:
            batch.append(self.preprocess(open_image(img, draft_size=2 * self.image_size)))
            if len(batch) == batch_size:
                out.append(self.encode_image_tensors(torch.stack(batch)))
                batch = []
        if batch:
            out.append(self.encode_image_tensors(torch.stack(batch)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenise with the model's own tokenizer, truncated to its context length."""
        return self.tokenizer(list(texts))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Encode strings; returns ``(N, dim)`` float32, L2-normalised."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a sequence of strings; wrap a single string in a list")
        texts = list(texts)
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[start : start + batch_size])
            with torch.inference_mode(), self.autocast():
                feats = self.model.encode_text(tokens.to(self.device), normalize=True)
            out.append(_normalised_numpy(feats))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def _normalised_numpy(feats: torch.Tensor) -> np.ndarray:
    feats = feats.float()
    feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return feats.cpu().numpy().astype(np.float32, copy=False)


def load_model(
    name: str = DEFAULT_MODEL,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    threads: int | None = None,
) -> Encoder:
    """Create an :class:`Encoder` for an open_clip architecture with the given weights.

    Raises ModelNotFoundError, PretrainedNotFoundError, WeightsUnavailableError or
    CheckpointMismatchError with a message that says what to do.
    """
    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    pretrained = _default_pretrained(name, pretrained)
    model, tag = _create(name, pretrained)
    model.to(dev)
    preprocess = image_transform(model, is_train=False)
    tokenizer = open_clip.get_tokenizer(name)
    dim = int(_embed_dim(model))
    info = ModelInfo(name=name, pretrained=tag, dim=dim)
    log.info("loaded %s (pretrained=%s, dim=%d) on %s/%s", name, tag, dim, dev, prec)
    return Encoder(model, preprocess, tokenizer, info, dev, prec)


def image_transform(model: torch.nn.Module, is_train: bool = False, aug_cfg: Any = None):
    """The model's own open_clip preprocess (resize, crop, normalise); with augmentation when training."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=is_train, aug_cfg=aug_cfg)


def create_model(name: str, pretrained: str | os.PathLike | None = None) -> tuple[torch.nn.Module, str | None]:
    """Build the raw open_clip ``nn.Module`` (CPU, fp32) and the canonical pretrained string.

    Training uses this directly; everyone else should use :func:`load_model`.
    """
    return _create(name, _default_pretrained(name, pretrained))


def _default_pretrained(name: str, pretrained: str | os.PathLike | None) -> str | None:
    builtin = BUILTIN_WEIGHTS.get(name, {})
    if pretrained is None and builtin:
        return next(iter(builtin))
    return None if pretrained is None else os.fspath(pretrained)


def _create(name: str, pretrained: str | None) -> tuple[torch.nn.Module, str | None]:
    if name.startswith(HF_HUB_PREFIX):
        return _create_from_hub_name(name), None
    _check_name(name)
    if pretrained is None:
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


def _check_name(name: str) -> None:
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
        return "initialized randomly" not in record.getMessage()


def _create_from_file(name: str, path: str | os.PathLike) -> torch.nn.Module:
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        model = open_clip.create_model(name, pretrained=None, pretrained_text=False)
    finally:
        root.removeFilter(quiet)
    try:
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
