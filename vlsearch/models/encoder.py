"""A loaded dual encoder: images and texts -> L2-normalised float32 vectors in one space.

:func:`vlsearch.models.factory.load_model` builds one; :func:`resolve_device` / :func:`resolve_precision`
turn ``"auto"`` into what this machine has.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from vlsearch.data.images import NORMALISE_TILE, open_image, split_preprocess
from vlsearch.core.inputs import ImageInput
from vlsearch.core.modelinfo import ModelInfo
from vlsearch.models.precision import PrecisionChoice


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` means CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    return dev


def prefers_channels_last(visual: torch.nn.Module, device: torch.device | str) -> bool:
    """Whether an image tower runs faster with channels-last activations: a convolutional trunk
    (more than a patch-embedding convolution) on CPU, where oneDNN's channels-last kernels for
    depthwise and pointwise convolutions are ~1.8x faster (EfficientNet-Lite0 at 224 px, batch 32,
    2 cores: 41 against 22 images/s)."""
    if torch.device(device).type != "cpu":
        return False
    return sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules()) > 4


def resolve_precision(precision: str, device: torch.device) -> str:
    """Training's autocast precision. ``"auto"``: bf16 (or fp16) autocast on CUDA, fp32 on CPU.

    Inference (``load_model``) resolves with :func:`vlsearch.models.precision.resolve_precision` instead."""
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
        folded_batchnorms: int = 0,
    ):
        if isinstance(precision, str):
            mode = "none" if precision == "fp32" else "autocast"
            precision = PrecisionChoice(precision, mode, f"requested {precision}")
        self.model = model.eval()
        self.preprocess = preprocess
        self._split = split_preprocess(preprocess)
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        #: how the model computes (fp32, bf16, fp16, int8); outputs are float32 whatever it is.
        self.precision = precision.name
        self.precision_choice = precision
        #: BatchNorm layers of the image tower folded into its convolutions (``load_model(fold=True)``).
        self.folded_batchnorms = folded_batchnorms
        self._input_dtype = torch.bfloat16 if precision.mode == "weights" else None
        self._memory_format = torch.preserve_format
        if prefers_channels_last(model.visual, device):
            model.visual.to(memory_format=torch.channels_last)  # same numbers, faster convolutions
            self._memory_format = torch.channels_last

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

    @property
    def decode_transform(self) -> Any:
        """What decode workers run on each image: the PIL half of the preprocess (uint8 pixels, which
        :meth:`image_input` normalises a batch at a time) when it splits, else the whole preprocess."""
        return self._split.pil if self._split is not None else self.preprocess

    def image_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """A preprocessed batch (or an image tower's float32 feature map, or uint8 pixels from
        :attr:`decode_transform`) moved to the device, in the dtype and memory format the image
        tower's weights take (bf16 weights take bf16)."""
        if pixels.dtype == torch.uint8:
            if self._split is None:
                raise TypeError(f"{self.name}'s preprocess does not split: it cannot take uint8 pixels")
            return self._split.normalise(pixels.to(self.device, non_blocking=True), self._input_dtype,
                                         self._memory_format, tile=NORMALISE_TILE if self.device.type == "cpu" else None)
        return pixels.to(self.device, dtype=self._input_dtype, non_blocking=True, memory_format=self._memory_format)

    def encode_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        """Encode an already preprocessed ``(B, 3, H, W)`` batch."""
        with torch.inference_mode(), self.autocast():
            feats = self.model.encode_image(self.image_input(pixels), normalize=True)
        return _normalised_numpy(feats)

    def encode_images(self, images: Iterable[ImageInput], batch_size: int = 64) -> np.ndarray:
        """Encode PIL images, file paths or encoded bytes; returns ``(N, dim)`` float32.

        Unreadable inputs raise :class:`~vlsearch.core.errors.DecodeError`.
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
        return trim_padding(self.model, tokens)

    def _text_batches(self, texts: Sequence[str], batch_size: int) -> Iterator[torch.Tensor]:
        """Token batches of ``texts``, each trimmed of the padding its tower does not need."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a sequence of strings; wrap a single string in a list")
        texts = list(texts)
        for start in range(0, len(texts), batch_size):
            yield self._trim(self.tokenize(texts[start : start + batch_size]))

    def _encode_text_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        """The one path from tokens to unit text vectors (every text embedding goes through it)."""
        with torch.inference_mode(), self.autocast():
            feats = self.model.encode_text(tokens.to(self.device), normalize=True)
        return _normalised_numpy(feats)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Encode strings; returns ``(N, dim)`` float32, L2-normalised."""
        out = [self._encode_text_tokens(tokens) for tokens in self._text_batches(texts, batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_texts_with_states(self, texts: Sequence[str], batch_size: int = 256
                                 ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """:meth:`encode_texts` that also keeps the text tower's last-layer token states from the
        same forward pass (a Hugging Face tower's, or open_clip's built-in tower's after
        ``ln_final``): ``(vectors (N, dim), states (N, T, width) float32, mask (N, T) bool)``, the
        vectors bit-identical to :meth:`encode_texts`'s and the tensors on CPU. T is the longest
        text's length (a Hugging Face tower's padding is trimmed per batch; states of a shorter
        batch are zero-padded). TypeError for a text tower without token states."""
        vectors, states, masks = [], [], []
        for tokens in self._text_batches(texts, batch_size):
            with TokenStates(self.model, tokens, self.name) as kept:
                vectors.append(self._encode_text_tokens(tokens))
            states.append(kept.states)
            masks.append(kept.mask)
        if not vectors:
            raise ValueError("encode_texts_with_states needs at least one text")
        length = max(m.shape[1] for m in masks)
        return (np.concatenate(vectors), torch.cat([F.pad(s, (0, 0, 0, length - s.shape[1])) for s in states]),
                torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks]))


class TokenStates:
    """While open, keeps the last-layer token states of the text tower's next forward pass in this
    thread (a forward hook on the module that outputs them; passes of other threads are ignored).

    ``mask`` (B, T) bool marks the real tokens of ``tokens``; ``states`` (B, T, width) float32 on
    CPU, once the pass ran."""

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor, name: str = "this model"):
        text = getattr(model, "text", None)
        if text is not None and hasattr(text, "transformer") and hasattr(text, "config"):  # a Hugging Face tower
            self._module, pad = text.transformer, text.config.pad_token_id
            self._pick: Callable[[Any], torch.Tensor] = lambda out: out.last_hidden_state
        elif hasattr(model, "token_embedding") and hasattr(model, "ln_final"):  # open_clip's built-in tower
            self._module, pad = model.ln_final, 0
            self._pick = lambda out: out
        else:
            raise TypeError(f"{name}'s text tower has no token states to re-rank with")
        self.mask = (tokens != pad).cpu()
        self._thread = threading.get_ident()
        self._states: torch.Tensor | None = None
        self._handle: Any = None

    def __enter__(self) -> "TokenStates":
        self._handle = self._module.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _keep(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._states is None and threading.get_ident() == self._thread:
            self._states = self._pick(output)

    @property
    def states(self) -> torch.Tensor:
        if self._states is None:
            raise RuntimeError("the text tower's forward pass has not run")
        return self._states.float().cpu()


def trim_padding(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Drop trailing all-padding columns for a Hugging Face text tower (its attention and mean
    pooling are masked, so the output is unchanged, for a fraction of the compute). Built-in
    open_clip towers need the full context (fixed positional embedding, causal mask): left alone."""
    text = getattr(model, "text", None)
    pad = getattr(getattr(text, "config", None), "pad_token_id", None)
    if pad is None or type(text).__name__ != "HFTextEncoder" or tokens.ndim != 2 or tokens.shape[1] == 0:
        return tokens
    used = (tokens != pad).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]


def _normalised_numpy(feats: torch.Tensor) -> np.ndarray:
    feats = feats.float()
    feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return feats.cpu().numpy().astype(np.float32, copy=False)
