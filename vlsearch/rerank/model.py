"""Cross-attention re-ranking (ITM): a small fusion model that re-scores a dual encoder's top K.

The dual encoder embeds images and texts separately, so it cannot compare fine detail ("a dog
chasing a man" and "a man chasing a dog" embed alike). As in ALBEF and BLIP, a fusion module lets
the query's text token states cross-attend to a candidate image's spatial features, and a 2-way
image-text matching (ITM) head scores the pair. Retrieval is two-stage: the dual encoder proposes
the top K, the ITM head re-scores them, and the final score combines both (with a hubness
correction when the re-ranker carries a bank of training captions, see :class:`Reranker`)::

    score = first_stage_cosine + weight * itm_logit - hub_weight * hub_offset   # weights tuned on validation

    rr = load_reranker("vlsearch-small")               # the shipped re-ranker of a model
    rr.check_model(encoder.info)                       # RerankerMismatchError for another model
    kv = rr.image_kv(image_tokens(encoder, paths))     # (K, 49, width): what a collection may store
    states, mask = text_tokens(encoder, ["a dog"])
    itm = rr.itm_logits(states[0], mask[0], kv)        # (K,) match log-odds
    score = rr.combine(cosines, itm, rr.hub_offsets(image_vectors))  # minus hub_weight x hubness offset

Inputs come from the model's own towers, frozen while the re-ranker trains, so a re-ranker belongs
to a model name, its towers and the weights tag that set them (:func:`tower_identity`; not to the
trained head, which only sets the first-stage score):

* **image tokens**: the image trunk's final feature map before pooling, for the model's own
  preprocessing (224 px for vlsearch-small; smaller training images are resized to it, exactly as
  at query time), average-pooled to a fixed ``grid x grid`` (default :data:`GRID`: 7 x 7 = 49
  tokens, vlsearch-small's whole map at 224 px);
* **text tokens**: the text tower's last-layer token states with their attention mask.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vlsearch.core.errors import InvalidQueryError, RerankerMismatchError, RerankerNotFoundError
from vlsearch.core.fsutil import atomic_path
from vlsearch.core.inputs import ImageInput
from vlsearch.data.images import open_image
from vlsearch.core.modelinfo import ModelInfo

__all__ = ["GRID", "HUB_K", "FusionConfig", "FusionITM", "Reranker", "image_tokens", "text_tokens", "tower_identity",
           "load_reranker", "builtin_reranker_path", "check_rerank_k", "match_logit", "MAX_RERANK"]

#: Side of the pooled grid of image tokens (``GRID * GRID`` tokens per image) of a new re-ranker;
#: a re-ranker records its own. 7 x 7 (vlsearch-small's whole final map at 224 px) re-ranked
#: flickr8k-test better than 5 x 5 (R@1 +1.2 vs +0.9 over the dual encoder, ITM alone 15.1 vs 13.2 at K = 10).
GRID = 7
#: The most candidates one query may re-rank (``rerank=K``): beyond it a query would take seconds.
MAX_RERANK = 4096
RERANKER_FORMAT = 1
#: Bank captions a candidate's hubness offset averages over (:meth:`Reranker.hub_offsets`), by default.
HUB_K = 10
_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "models" / "weights"
#: Re-rankers shipped inside the package: (model name, weights tag) -> file under vlsearch/models/weights
#: (provenance: the JSON of the same stem beside it).
BUILTIN_RERANKERS: dict[tuple[str, str], str] = {("vlsearch-small", "flickr8k-v4"): "vlsearch-small-rerank.pt"}


# ---- the towers' inner outputs --------------------------------------------------------------

def image_tokens(encoder: Any, images: Iterable[ImageInput], grid: int = GRID,
                 with_embeddings: bool = False) -> torch.Tensor | tuple[torch.Tensor, np.ndarray]:
    """``(B, grid*grid, C)`` float32 image tokens: the image tower's final spatial map (a timm
    trunk's feature map before pooling, or a ViT's patch tokens), average-pooled to
    ``grid x grid``. ``with_embeddings`` also returns the dual encoder's unit image vectors (for a
    timm trunk from the same pass)."""
    from vlsearch.models.towers import image_feature_map

    visual = encoder.model.visual
    trunk = getattr(visual, "trunk", None)
    emb = None
    if trunk is not None and hasattr(trunk, "forward_features"):
        fmap = image_feature_map(encoder, images)
        if with_embeddings:
            with torch.inference_mode():
                emb = F.normalize(visual.head(trunk.forward_head(encoder.image_input(fmap))).float(), dim=-1)
    elif hasattr(visual, "_embeds") and hasattr(visual, "_pool"):  # open_clip's VisionTransformer
        pics = [open_image(img, draft_size=2 * encoder.image_size) for img in images]
        pixels = encoder.image_input(torch.stack([encoder.preprocess(p) for p in pics]))
        with torch.inference_mode(), encoder.autocast():
            tokens = visual._pool(visual.transformer(visual._embeds(pixels)))[1].float()
        side = int(round(tokens.shape[1] ** 0.5))
        fmap = tokens.transpose(1, 2).reshape(len(tokens), -1, side, side).cpu()
        emb = torch.from_numpy(encoder.encode_images(pics)) if with_embeddings else None
    else:
        raise TypeError(f"{encoder.name}'s image tower has no spatial feature map to re-rank with")
    out = F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2).contiguous()
    return (out, emb.cpu().numpy()) if with_embeddings else out


def text_tokens(encoder: Any, texts: Sequence[str], with_embeddings: bool = False):
    """``(states (B, T, width) float32, mask (B, T) bool)``: the text tower's last-layer token
    states (a Hugging Face tower's, or open_clip's built-in tower's after ``ln_final``), padding
    trimmed to the longest text; ``with_embeddings`` also returns the unit text vectors of the same
    pass, exactly ``encoder.encode_texts(texts)`` (see ``Encoder.encode_texts_with_states``)."""
    vectors, states, mask = encoder.encode_texts_with_states(list(texts))
    return (states, mask, vectors) if with_embeddings else (states, mask)


def tower_identity(model: ModelInfo | str, pretrained: str | None = None) -> dict[str, Any]:
    """What a re-ranker's inputs depend on: the model name, its image trunk and text tower (named by
    its config) and the weights it loads (``model.pretrained``, or for a bare name ``pretrained``,
    else its default tag): built-in weights may tune tower layers (vlsearch-small's ``flickr8k-v4``
    tunes MiniLM's last two, so its token states differ from ``flickr8k-v3``'s). A checkpoint file
    is recorded as ``"checkpoint"``: its path says nothing about its contents."""
    from vlsearch.models.hf_text import hf_text_ids, model_config
    from vlsearch.models.factory import default_pretrained

    if isinstance(model, str):
        name, weights = model, default_pretrained(model, pretrained)
    else:
        name, weights = model.name, model.pretrained
    if weights is not None and _is_checkpoint_path(weights):
        weights = "checkpoint"
    config = model_config(name) or {}
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    hf = hf_text_ids(name)  # the hub id the config names, not the local folder it resolved to
    return {"model": name, "weights": weights, "image_tower": vision.get("timm_model_name"),
            "text_tower": hf[0] if hf else text.get("hf_model_name")}


def _train_hint(identity: dict[str, Any]) -> str:
    """The train-rerank command line for a model identity (its weights when they are a tag)."""
    weights = identity.get("weights")
    pretrained = "" if weights is None else f" --pretrained {'CHECKPOINT' if weights == 'checkpoint' else weights}"
    return f"`vlsearch train-rerank DATA --model {identity['model']}{pretrained} --out RERANKER.pt`"


def _is_checkpoint_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))


# ---- the fusion model -----------------------------------------------------------------------

@dataclass(frozen=True)
class FusionConfig:
    """Shape of the fusion module. ``image_tokens`` sizes the learned position embedding."""

    text_dim: int = 384
    image_dim: int = 1280
    width: int = 256
    heads: int = 4
    layers: int = 2
    image_tokens: int = GRID * GRID
    dropout: float = 0.1
    pool: str = "mean"  #: what the match head reads: "mean" (masked mean of the text positions) or "cls"


class FusionITM(nn.Module):
    """Text token states (queries) cross-attend to projected image tokens (keys/values); a 2-way
    match head reads the masked mean of the text positions (or the first, [CLS], position).

    Each block is a pre-norm ``nn.TransformerDecoderLayer``: text self-attention, cross-attention
    to the image tokens, FFN, each with a residual connection and LayerNorm.
    """

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.text_proj = nn.Sequential(nn.LayerNorm(config.text_dim), nn.Linear(config.text_dim, w))
        self.image_proj = nn.Sequential(nn.LayerNorm(config.image_dim), nn.Linear(config.image_dim, w))
        self.image_pos = nn.Parameter(torch.randn(config.image_tokens, w) * 0.02)
        layer = nn.TransformerDecoderLayer(w, config.heads, 4 * w, config.dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(layer, config.layers, norm=nn.LayerNorm(w))
        self.head = nn.Linear(w, 2)

    def project_image(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, image_dim)`` -> ``(B, N, width)`` keys/values (what a collection may store)."""
        if image_tokens.shape[1] != self.config.image_tokens:
            raise ValueError(f"expected {self.config.image_tokens} image tokens, got {image_tokens.shape[1]}")
        return self.image_proj(image_tokens) + self.image_pos

    def forward(self, text_states: torch.Tensor, text_mask: torch.Tensor, image_kv: torch.Tensor) -> torch.Tensor:
        """Match logits ``(B, 2)`` for ``(B, T, text_dim)`` states and ``(B, N, width)`` keys/values."""
        x = self.text_proj(text_states)
        x = self.blocks(x, image_kv, tgt_key_padding_mask=~text_mask.bool())
        if self.config.pool == "cls":
            return self.head(x[:, 0])
        m = text_mask.to(x.dtype).unsqueeze(-1)
        return self.head((x * m).sum(1) / m.sum(1).clamp_min(1))


def match_logit(logits: torch.Tensor) -> torch.Tensor:
    """The ITM score of a pair: log-odds of "match" from the 2-way head."""
    return logits[:, 1] - logits[:, 0]


# ---- a trained re-ranker --------------------------------------------------------------------

@dataclass
class Reranker:
    """A trained fusion model plus what it is for (``towers``, see :func:`tower_identity`) and how
    its logit is combined with the first-stage cosine (``weight``, tuned on a validation split).

    A re-ranker may also carry a **hubness correction** (CSLS, as in cross-lingual retrieval and
    QB-Norm): ``bank`` holds the dual encoder's unit vectors of training captions, and a candidate
    image's ``hub_offset`` is its mean cosine to its ``hub_k`` nearest bank captions. Images close to
    many captions ("hubs") win first-stage rankings they should not; the combined score subtracts
    ``hub_weight * hub_offset`` (tuned with ``weight``; 0 or no bank: no correction)."""

    model: FusionITM
    towers: dict[str, Any]
    weight: float
    grid: int = GRID
    info: dict[str, Any] = field(default_factory=dict)  #: provenance: data, metrics, seed, ...
    bank: np.ndarray | None = None  #: (B, d) float16 unit text vectors of training captions
    hub_k: int = HUB_K
    hub_weight: float = 0.0

    def __post_init__(self) -> None:
        self.model.eval()
        if self.bank is not None:
            self.bank = np.ascontiguousarray(self.bank, dtype=np.float16)
            if self.bank.ndim != 2 or not 1 <= self.hub_k <= len(self.bank):
                raise ValueError(f"a hubness bank must be (B, d) with 1 <= hub_k <= B, got {self.bank.shape} "
                                 f"and hub_k={self.hub_k}")
        #: identifies stored keys/values and hubness offsets made by this re-ranker
        self.digest = _state_digest(self.model, self.bank, self.hub_k)

    @property
    def width(self) -> int:
        return self.model.config.width

    @property
    def tokens(self) -> int:
        return self.model.config.image_tokens

    @property
    def has_hub(self) -> bool:
        """Whether candidates need hubness offsets (a bank, and a nonzero weight on them)."""
        return self.bank is not None and self.hub_weight != 0.0

    def check_model(self, model: ModelInfo | str) -> None:
        """Raise :class:`RerankerMismatchError` unless this re-ranker was trained for ``model``'s
        name, towers and weights (a bare name: its default weights)."""
        identity = tower_identity(model)
        if identity != self.towers:
            raise RerankerMismatchError(
                f"this re-ranker was trained for {self.towers} but the model is {identity}; train one for it "
                f"with {_train_hint(identity)}")

    @torch.inference_mode()
    def image_kv(self, tokens: torch.Tensor | np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """Projected keys/values ``(B, N, width)`` float16 of ``(B, N, image_dim)`` image tokens."""
        tokens = torch.as_tensor(tokens)
        out = [self.model.project_image(tokens[i: i + batch_size].float()).half()
               for i in range(0, len(tokens), batch_size)]
        return torch.cat(out) if out else torch.zeros((0, self.tokens, self.width), dtype=torch.float16)

    @torch.inference_mode()
    def itm_logits(self, states: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor | np.ndarray,
                   batch_size: int = 128) -> np.ndarray:
        """ITM log-odds ``(K,)`` of one query's ``(T, D)`` token states against ``(K, N, width)``
        candidate keys/values."""
        kv = torch.as_tensor(kv)
        keep = mask.bool()
        states, mask = states[keep][None].float(), torch.ones((1, int(keep.sum())), dtype=torch.bool)
        out = []
        for start in range(0, len(kv), batch_size):
            part = kv[start: start + batch_size].float()
            n = len(part)
            out.append(match_logit(self.model(states.expand(n, -1, -1), mask.expand(n, -1), part)))
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)

    def hub_offsets(self, image_emb: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """``(N,)`` float32 hubness offsets of ``(N, d)`` unit image vectors: each one's mean cosine
        to its ``hub_k`` nearest bank captions (zeros without a bank)."""
        image_emb = np.asarray(image_emb, np.float32)
        if self.bank is None:
            return np.zeros(len(image_emb), np.float32)
        if image_emb.ndim != 2 or image_emb.shape[1] != self.bank.shape[1]:
            raise ValueError(f"expected (N, {self.bank.shape[1]}) image vectors, got {image_emb.shape}")
        bank, out = self.bank.astype(np.float32), np.empty(len(image_emb), np.float32)
        for start in range(0, len(image_emb), batch_size):
            sim = image_emb[start: start + batch_size] @ bank.T
            out[start: start + len(sim)] = -np.partition(-sim, self.hub_k - 1, axis=1)[:, : self.hub_k].mean(1)
        return out

    def combine(self, first_stage: np.ndarray, itm: np.ndarray, hub: np.ndarray | None = None) -> np.ndarray:
        """The re-rank score: ``first_stage + weight * itm - hub_weight * hub`` (``hub``: the
        candidates' :meth:`hub_offsets`; needed when :attr:`has_hub`)."""
        score = np.asarray(first_stage, np.float32) + np.float32(self.weight) * np.asarray(itm, np.float32)
        if self.has_hub:
            if hub is None:
                raise ValueError("this re-ranker corrects hubness: pass the candidates' hub offsets")
            score = score - np.float32(self.hub_weight) * np.asarray(hub, np.float32)
        return score

    def save(self, path: str | os.PathLike) -> Path:
        """Write the re-ranker (fp16 weights + its metadata) atomically."""
        path = Path(path)
        state = {k: v.half() if v.is_floating_point() else v for k, v in self.model.state_dict().items()}
        payload = {"format": RERANKER_FORMAT, "fusion": asdict(self.model.config), "towers": self.towers,
                   "weight": float(self.weight), "grid": self.grid, "info": self.info, "state_dict": state,
                   "hub_k": self.hub_k, "hub_weight": float(self.hub_weight),
                   "bank": None if self.bank is None else torch.from_numpy(self.bank)}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Reranker":
        """Read a re-ranker written by :meth:`save` (RerankerNotFoundError if missing or unreadable)."""
        path = Path(path)
        if not path.is_file():
            raise RerankerNotFoundError(f"no re-ranker at {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            model = FusionITM(FusionConfig(**payload["fusion"]))
            model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                   for k, v in payload["state_dict"].items()})
            bank = payload.get("bank")  # absent in re-rankers written before hubness correction
            return cls(model, payload["towers"], float(payload["weight"]), int(payload.get("grid", GRID)),
                       payload.get("info", {}), None if bank is None else bank.numpy(),
                       int(payload.get("hub_k", HUB_K)), float(payload.get("hub_weight", 0.0)))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            raise RerankerNotFoundError(f"{path} is not a vlsearch re-ranker: {exc}") from exc


def _state_digest(model: nn.Module, bank: np.ndarray | None, hub_k: int) -> str:
    """sha1 (16 hex) of what stored features depend on: the fp16 weights of the image projection
    (keys/values) and the hubness bank and ``hub_k`` (offsets; a re-ranker without a bank hashes as
    before banks existed)."""
    h = hashlib.sha1()
    if bank is not None:
        h.update(f"hub_k={hub_k}".encode())
        h.update(np.ascontiguousarray(bank, np.float16).tobytes())
    for key, value in sorted(model.state_dict().items()):
        if key.startswith(("image_proj", "image_pos")):
            h.update(key.encode())
            h.update(value.detach().half().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def builtin_reranker_path(model_name: str, pretrained: str | None = None) -> Path | None:
    """The re-ranker shipped for ``model_name`` with weights ``pretrained`` (None: the model's
    default weights), or None if there is none."""
    from vlsearch.models.factory import default_pretrained

    name = BUILTIN_RERANKERS.get((model_name, default_pretrained(model_name, pretrained) or ""))
    return None if name is None else _WEIGHTS_DIR / name


def load_reranker(model: ModelInfo | str, path: str | os.PathLike | None = None) -> Reranker:
    """The re-ranker at ``path``, else the one shipped for ``model`` (its name and weights);
    checked against ``model``.

    Raises :class:`RerankerNotFoundError` (saying how to train one) when there is none, and
    :class:`RerankerMismatchError` when it was trained for another model or other weights."""
    identity = tower_identity(model)
    name = identity["model"]
    if path is None:
        path = builtin_reranker_path(name, identity["weights"])
        if path is None or not path.is_file():
            raise RerankerNotFoundError(
                f"no re-ranker ships for model {name}"
                + (f" with weights {identity['weights']}" if identity["weights"] else "")
                + f": train one with {_train_hint(identity)} and pass it with --reranker")
    reranker = Reranker.load(path)
    reranker.check_model(model)
    return reranker


def check_rerank_k(rerank: Any, k: int) -> int:
    """Validate a ``rerank=K`` argument: 0/None (off) or an int >= k; returns K (0 = off)."""
    if rerank is None:
        return 0
    if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 0:
        raise InvalidQueryError(f"rerank must be a non-negative integer (0 = off), got {rerank!r}")
    if 0 < rerank < k:
        raise InvalidQueryError(f"rerank={rerank} re-scores fewer candidates than k={k}: use rerank >= k (or 0)")
    if rerank > MAX_RERANK:
        raise InvalidQueryError(f"rerank={rerank} is too many candidates to re-score (at most {MAX_RERANK})")
    return int(rerank)

