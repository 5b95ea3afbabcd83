"""Training a re-ranker (:mod:`vlsearch.rerank.model`) on an image-caption manifest, towers frozen.

::

    enc = load_model("vlsearch-small")
    result = train_reranker(enc, "../shared/data/flickr8k-train", RerankTrainConfig(), cache_dir="bench-data/rr")
    result.reranker.save("rr.pt")          # weight tuned on the validation split, metrics in .info

1. **Features, once** (:func:`extract_features`, cached as ``.npz``): each image's pooled grid of
   trunk tokens and dual-encoder vector, each caption's token states and dual-encoder vector.
2. **ITM training** (:func:`train_itm`): ALBEF's loss over 3 B pairs per batch: B positives, for
   each caption a negative image and for each image a negative caption. The first
   ``random_epochs`` draw negatives uniformly (a curriculum); later ones draw *hard* negatives in
   proportion to ``softmax(sim / temperature)`` of the dual encoder's in-batch similarities.
3. **Hubness bank**: a seeded sample of ``bank_size`` training captions' dual-encoder vectors
   (:class:`~vlsearch.rerank.model.Reranker` ``bank``; a candidate's offset is its mean cosine to its
   ``hub_k`` nearest bank captions).
4. **Weight tuning** (:func:`tune_weight`) on a seeded validation split of the images: the
   ``weight`` and ``hub_weight`` of ``cosine + weight * itm_logit - hub_weight * hub_offset``
   maximising validation R@1 (then MRR) over every caption of those images, re-ranking the dual
   encoder's top ``tune_k``.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from open_clip_train.scheduler import cosine_lr
from torch.nn import functional as F

from vlsearch.core.errors import TrainingError
from vlsearch.core.metrics import metrics_from_ranks
from vlsearch.core.progress import Progress
from vlsearch.rerank.model import (
    GRID,
    HUB_K,
    FusionConfig,
    FusionITM,
    Reranker,
    image_tokens,
    text_tokens,
    tower_identity,
)
from vlsearch.train.config import plain
from vlsearch.train.data import PairData, epoch_order, read_pairs, split_images

__all__ = ["PairFeatures", "RerankTrainConfig", "RerankTrainResult", "extract_features", "train_itm",
           "tune_weight", "hub_bank", "rerank_metrics", "rerank_ranks", "rank_metrics", "candidate_itm",
           "train_reranker", "hard_negatives", "provenance"]


@dataclass
class PairFeatures:
    """Frozen-tower outputs of an image-caption set (row i of the image arrays is image i)."""

    image_tokens: np.ndarray  #: (N, GRID*GRID, C) float16
    image_emb: np.ndarray  #: (N, d) float32, unit
    text_states: np.ndarray  #: (M, T, D) float16
    text_mask: np.ndarray  #: (M, T) bool
    text_emb: np.ndarray  #: (M, d) float32, unit
    caption_image: np.ndarray  #: (M,) image row of each caption

    def subset(self, images: np.ndarray) -> "PairFeatures":
        """The features of the given image rows and their captions (images renumbered 0..)."""
        keep = np.isin(self.caption_image, images)
        remap = np.full(len(self.image_emb), -1, np.int64)
        remap[images] = np.arange(len(images))
        return PairFeatures(self.image_tokens[images], self.image_emb[images], self.text_states[keep],
                            self.text_mask[keep], self.text_emb[keep], remap[self.caption_image[keep]])


def _cache_key(encoder: Any, pairs: PairData, grid: int) -> str:
    h = hashlib.sha1(f"{encoder.name}|{encoder.pretrained}|{grid}|{pairs.root}".encode())
    for image in pairs.images:
        h.update(image.encode() + b"\0")
    for caption in pairs.captions:
        h.update(caption.encode() + b"\0")
    return h.hexdigest()[:16]


def extract_features(encoder: Any, pairs: PairData, grid: int = GRID, batch_size: int = 64,
                     cache_dir: str | os.PathLike | None = None, progress: Optional[Progress] = None) -> PairFeatures:
    """Run the frozen towers over every image and caption of ``pairs`` (cached under
    ``cache_dir`` by model, weights, grid and data)."""
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"rerank-features-{_cache_key(encoder, pairs, grid)}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                return PairFeatures(**{k: z[k] for k in z.files})
    toks, embs = [], []
    n = len(pairs.images)
    for start in range(0, n, batch_size):
        t, e = image_tokens(encoder, [pairs.path(i) for i in range(start, min(n, start + batch_size))], grid,
                            with_embeddings=True)
        toks.append(t.half().numpy())
        embs.append(e)
        if progress is not None:
            progress(min(n, start + batch_size), n, stage="images")
    states, masks, temb = _text_features(encoder, pairs.captions, 4 * batch_size, progress)
    feats = PairFeatures(np.concatenate(toks), np.concatenate(embs), states, masks, temb,
                         pairs.caption_image.astype(np.int64))
    if cache is not None:
        from vlsearch.core.fsutil import atomic_path

        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **asdict(feats))
    return feats


def _text_features(encoder: Any, captions: Sequence[str], batch_size: int,
                   progress: Optional[Progress]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts = []
    for start in range(0, len(captions), batch_size):
        parts.append(text_tokens(encoder, captions[start: start + batch_size], with_embeddings=True))
        if progress is not None:
            progress(min(len(captions), start + batch_size), len(captions), stage="captions")
    length = max(p[0].shape[1] for p in parts)
    states = np.zeros((len(captions), length, parts[0][0].shape[2]), np.float16)
    masks = np.zeros((len(captions), length), bool)
    row = 0
    for s, m, _ in parts:
        states[row: row + len(s), : s.shape[1]] = s.half().numpy()
        masks[row: row + len(s), : s.shape[1]] = m.numpy()
        row += len(s)
    return states, masks, np.concatenate([p[2] for p in parts])


# ---- ITM training -----------------------------------------------------------------------------

@dataclass(frozen=True)
class RerankTrainConfig:
    """How a re-ranker is trained: fusion shape, ALBEF ITM schedule, validation and tuning."""

    fusion: FusionConfig = field(default_factory=FusionConfig)
    epochs: int = 20  #: passes over the training images (one caption of each image per pass)
    random_epochs: int = 2  #: first epochs with uniform negatives (curriculum), then hard ones
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup: float = 0.1  #: fraction of steps of linear warm-up (then cosine decay)
    temperature: float = 0.05  #: of the dual encoder's similarities when sampling hard negatives
    #: hard epochs build each batch from neighbourhoods of this many images (similar under the
    #: dual encoder), so in-batch hard negatives resemble the top-K a re-ranker sees; 0: random
    #: batches (ALBEF). 8 at lr 1e-3 collapsed to the constant predictor in a trial run.
    group_size: int = 0
    val_fraction: float = 0.1
    tune_k: tuple[int, ...] = (10, 20, 50)  #: re-rank depths the weight is tuned for (mean R@1)
    weights: tuple[float, ...] = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
    #: training captions whose dual-encoder vectors form the hubness bank (0: no hubness correction)
    bank_size: int = 4096
    hub_k: int = HUB_K  #: a candidate's hubness offset: mean cosine to its hub_k nearest bank captions
    hub_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  #: tuned jointly with ``weights``
    seed: int = 0
    threads: int | None = None  #: torch threads while training (None: leave as is)
    #: "fp32", or "bf16": the forward under CPU bf16 autocast (weights and optimizer stay fp32),
    #: ~2x faster on CPUs with bf16 units (:mod:`vlsearch.models.precision`)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or not 0 <= self.random_epochs <= self.epochs:
            raise TrainingError("rerank training needs epochs >= 1, batch_size >= 2, 0 <= random_epochs <= epochs")
        if not 0 < self.val_fraction < 1:
            raise TrainingError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.precision not in ("fp32", "bf16"):
            raise TrainingError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.bank_size < 0 or (self.bank_size and not 1 <= self.hub_k <= self.bank_size):
            raise TrainingError(f"bank_size must be >= 0 and hub_k in [1, bank_size], got {self.bank_size} "
                                f"and {self.hub_k}")


def hard_negatives(sim: torch.Tensor, same: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each row of ``sim`` (B, B) one column sampled with probability softmax(row), never a
    column marked ``same`` (a positive); a row whose weights vanish falls back to uniform."""
    weights = torch.softmax(sim.float(), dim=1).masked_fill(same, 0.0)
    empty = weights.sum(1) <= 1e-20
    weights[empty] = (~same[empty]).float()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_batch_loss(model: FusionITM, text: torch.Tensor, mask: torch.Tensor, image_kv: torch.Tensor,
                   sim: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ALBEF's ITM loss for one batch of B matched pairs: the B positives, for each caption a
    negative image and for each image a negative caption, drawn from ``sim`` (B captions x B
    images; all zeros = uniform)."""
    b = text.shape[0]
    same = torch.eye(b, dtype=torch.bool)
    neg_img = hard_negatives(sim, same, generator)  # for each caption, an image
    neg_txt = hard_negatives(sim.t(), same, generator)  # for each image, a caption
    logits = model(torch.cat([text, text, text[neg_txt]]), torch.cat([mask, mask, mask[neg_txt]]),
                   torch.cat([image_kv, image_kv[neg_img], image_kv]))
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long()
    return F.cross_entropy(logits.float(), labels)


def train_itm(feats: PairFeatures, config: RerankTrainConfig, progress: Optional[Progress] = None) -> FusionITM:
    """Train a :class:`FusionITM` on precomputed features (towers frozen); seeded.

    Each epoch visits every image once with one of its captions (so a batch never holds two
    captions of one image, which would be false negatives)."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    fusion = FusionConfig(**{**asdict(config.fusion), "text_dim": feats.text_states.shape[2],
                             "image_dim": feats.image_tokens.shape[2], "image_tokens": feats.image_tokens.shape[1]})
    model = FusionITM(fusion)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    pairs = _pairs_of(feats)
    per_epoch = math.ceil(len(pairs.images) / config.batch_size)
    total = config.epochs * per_epoch
    set_lr = cosine_lr(opt, config.lr, int(config.warmup * total), total)
    step = 0
    for epoch in range(config.epochs):
        model.train()
        order, caps = epoch_order(np.arange(len(pairs.images)), pairs, config.seed, epoch)
        if epoch >= config.random_epochs and config.group_size > 1:
            order, caps = _neighbourhood_order(feats.image_emb, order, caps, config.group_size, config.batch_size)
        for start in range(0, len(order), config.batch_size):
            imgs, cap = order[start: start + config.batch_size], caps[start: start + config.batch_size]
            if len(imgs) < 2:
                continue
            set_lr(step)
            loss = _train_step(model, opt, feats, imgs, cap, gen, config, hard=epoch >= config.random_epochs)
            step += 1
            if progress is not None:
                progress(step, total, stage="train", loss=round(loss, 4), epoch=epoch + 1)
    return model.eval()


def _neighbourhood_order(image_emb: np.ndarray, order: np.ndarray, caps: np.ndarray, group: int,
                         batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Reorder an epoch (images ``order``, their ``caps``) into groups of ``group`` mutually similar
    images: each group is a seed (in ``order``'s random order) and its nearest not yet used
    images; groups are then shuffled into batches (deterministic given ``order``)."""
    n = len(order)
    emb = image_emb[order]
    used = np.zeros(n, bool)
    groups = []
    for seed in range(n):
        if used[seed]:
            continue
        sim = emb @ emb[seed]
        sim[used] = -np.inf
        members = np.argsort(-sim, kind="stable")[:group]
        members = members[np.isfinite(sim[members])]
        used[members] = True
        groups.append(members)
    rng = np.random.default_rng(int(order[0]) if n else 0)
    picked = np.concatenate([groups[g] for g in rng.permutation(len(groups))]) if groups else np.zeros(0, np.int64)
    return order[picked], caps[picked]


def _pairs_of(feats: PairFeatures) -> PairData:
    """A caption-grouped view of ``feats`` (captions must be grouped by image, as read_pairs gives)."""
    ci = feats.caption_image
    if len(ci) and (np.diff(ci) < 0).any():
        raise TrainingError("captions must be grouped by image")
    counts = np.bincount(ci, minlength=len(feats.image_emb))
    if (counts == 0).any():
        raise TrainingError(f"{int((counts == 0).sum())} image(s) have no caption")
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return PairData(Path("."), [""] * len(counts), [""] * len(ci), ci, starts)


def _train_step(model: FusionITM, opt: torch.optim.Optimizer, feats: PairFeatures, imgs: np.ndarray,
                caps: np.ndarray, gen: torch.Generator, config: RerankTrainConfig, hard: bool) -> float:
    text = torch.from_numpy(feats.text_states[caps]).float()
    mask = torch.from_numpy(feats.text_mask[caps])
    used = int(mask.any(0).nonzero().max()) + 1  # trim common padding
    sim = torch.from_numpy(feats.text_emb[caps] @ feats.image_emb[imgs].T) / config.temperature
    if not hard:
        sim = torch.zeros_like(sim)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16"):
        kv = model.project_image(torch.from_numpy(feats.image_tokens[imgs]).float())
        loss = itm_batch_loss(model, text[:, :used], mask[:, :used], kv, sim, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


# ---- evaluation and weight tuning ---------------------------------------------------------------

def candidate_itm(reranker: Reranker, feats: PairFeatures, k: int,
                  progress: Optional[Progress] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each caption's dual-encoder top ``k`` images and their scores: ``(sim (M, N), top (M, k),
    itm (M, k))`` (full cosine matrix, candidate rows, ITM logits of the candidates)."""
    sim = feats.text_emb @ feats.image_emb.T
    k = min(k, sim.shape[1])
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    kv = reranker.image_kv(feats.image_tokens)
    itm = np.empty(top.shape, np.float32)
    for q in range(len(top)):
        states, mask = torch.from_numpy(feats.text_states[q]), torch.from_numpy(feats.text_mask[q])
        itm[q] = reranker.itm_logits(states, mask, kv[top[q]])
        if progress is not None and (q + 1) % 500 == 0:
            progress(q + 1, len(top), stage="score")
    return sim, top, itm


def rerank_ranks(sim: np.ndarray, top: np.ndarray, itm: np.ndarray, target: np.ndarray, k: int,
                 weight: float | None, penalty: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each query's ``target`` image after re-ranking the top ``k`` with
    ``cosine + weight * itm - penalty`` (``weight=None``: ITM alone; 0 and no penalty: the dual
    encoder alone; ``penalty``: per image, e.g. ``hub_weight * hub_offsets``). A target outside
    the top ``k`` keeps its first-stage rank."""
    rows = np.arange(len(top))[:, None]
    first = sim[rows, top[:, :k]]
    if penalty is not None:
        first = first - np.asarray(penalty, np.float32)[top[:, :k]]
    score = itm[:, :k] if weight is None else first + np.float32(weight) * itm[:, :k]
    reordered = top[:, :k][rows, np.argsort(-score, axis=1, kind="stable")]
    base = (sim > sim[np.arange(len(sim)), target][:, None]).sum(1) + 1
    found = reordered == target[:, None]
    return np.where(found.any(1), found.argmax(1) + 1, np.maximum(base, k + 1))


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
    """Recall@1/5/10 (percent, 2 decimals) and MRR (4 decimals) of 1-based ranks
    (:func:`vlsearch.core.metrics.metrics_from_ranks`, rounded for reports)."""
    m = metrics_from_ranks(ranks, (1, 5, 10))
    out = {f"R@{k}": round(100 * m[f"R@{k}"], 2) for k in (1, 5, 10)}
    out["MRR"] = round(m["mrr"], 4)
    return out


def rerank_metrics(sim: np.ndarray, top: np.ndarray, itm: np.ndarray, target: np.ndarray,
                   ks: Sequence[int], weight: float, penalty: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Metrics of the dual encoder alone, and per K of ITM alone, the combined score and (with a
    ``penalty``) the hubness correction alone (``hub@K``: ``cosine - penalty``, no ITM)."""
    out = {"dual": rank_metrics(rerank_ranks(sim, top, itm, target, 1, 0.0))}
    for k in ks:
        out[f"itm@{k}"] = rank_metrics(rerank_ranks(sim, top, itm, target, k, None))
        out[f"combined@{k}"] = rank_metrics(rerank_ranks(sim, top, itm, target, k, weight, penalty))
        if penalty is not None:
            out[f"hub@{k}"] = rank_metrics(rerank_ranks(sim, top, itm, target, k, 0.0, penalty))
    return out


def tune_weight(sim: np.ndarray, top: np.ndarray, itm: np.ndarray, target: np.ndarray,
                ks: Sequence[int], weights: Sequence[float], hub: np.ndarray | None = None,
                hub_weights: Sequence[float] = (0.0,)) -> tuple[float, float, dict[str, list[float]]]:
    """The ``(weight, hub_weight)`` with the best mean R@1 over ``ks`` (ties: mean MRR, then the
    smaller weights) of ``cosine + weight * itm - hub_weight * hub`` (``hub``: per image offsets;
    None: no correction), and the table of every pair's mean (R@1, MRR), keyed ``"weight"`` or,
    with ``hub``, ``"weight/hub_weight"``."""
    table, pairs = {}, [(w, h) for h in (hub_weights if hub is not None else (0.0,)) for w in weights]
    for w, h in pairs:
        penalty = None if hub is None else np.float32(h) * hub
        ranks = [rerank_ranks(sim, top, itm, target, k, w, penalty) for k in ks]
        table[_key(w, h, hub is not None)] = [round(float(np.mean([100 * (r <= 1).mean() for r in ranks])), 3),
                                              round(float(np.mean([(1.0 / r).mean() for r in ranks])), 5)]
    best = max(pairs, key=lambda p: (*table[_key(*p, hub is not None)], -p[1], -p[0]))
    return float(best[0]), float(best[1]), table


def _key(weight: float, hub_weight: float, with_hub: bool) -> str:
    return f"{weight}/{hub_weight}" if with_hub else str(weight)


def hub_bank(text_emb: np.ndarray, size: int, seed: int) -> np.ndarray | None:
    """A seeded sample of ``size`` rows of ``text_emb`` (all of them when fewer) as float16, or
    None for ``size`` 0."""
    if size == 0:
        return None
    rows = np.random.default_rng(seed).permutation(len(text_emb))[:size]
    return np.ascontiguousarray(text_emb[np.sort(rows)], dtype=np.float16)


# ---- the whole recipe ---------------------------------------------------------------------------

@dataclass
class RerankTrainResult:
    reranker: Reranker
    metrics: dict[str, Any]  #: validation metrics, the weight table, timings


def train_reranker(encoder: Any, data: str | os.PathLike, config: RerankTrainConfig = RerankTrainConfig(),
                   cache_dir: str | os.PathLike | None = None, progress: Optional[Progress] = None) -> RerankTrainResult:
    """Extract features (cached), train the ITM head on the training images, tune the combination
    weight on the validation images, and return the :class:`Reranker` (its ``info`` holds the
    config, split and validation metrics)."""
    from vlsearch.core.threads import set_process_threads

    if config.threads:
        set_process_threads(config.threads)
    t0 = time.perf_counter()
    pairs = read_pairs(data)
    feats = extract_features(encoder, pairs, _grid(config), cache_dir=cache_dir,
                             progress=progress)
    t_feats = time.perf_counter() - t0
    train_idx, val_idx = split_images(len(pairs.images), config.val_fraction, config.seed)
    train = feats.subset(train_idx)
    model = train_itm(train, config, progress)
    t_train = time.perf_counter() - t0 - t_feats
    bank = hub_bank(train.text_emb, config.bank_size, config.seed)
    reranker = Reranker(model, tower_identity(encoder.info), 0.0, _grid(config), bank=bank, hub_k=config.hub_k)
    val = feats.subset(val_idx)  # every caption: 5x the queries of first captions alone, a steadier choice
    sim, top, itm = candidate_itm(reranker, val, max(config.tune_k))
    hub = None if bank is None else reranker.hub_offsets(val.image_emb)
    reranker.weight, reranker.hub_weight, table = tune_weight(sim, top, itm, val.caption_image, config.tune_k,
                                                              config.weights, hub, config.hub_weights)
    penalty = None if hub is None else np.float32(reranker.hub_weight) * hub
    metrics = {"val": rerank_metrics(sim, top, itm, val.caption_image, config.tune_k, reranker.weight, penalty),
               "weight_table": table, "images": {"train": len(train_idx), "val": len(val_idx)},
               "seconds": {"features": round(t_feats, 1), "train": round(t_train, 1),
                           "tune": round(time.perf_counter() - t0 - t_feats - t_train, 1)}}
    reranker.info = {"config": plain(asdict(config)), "model_pretrained": encoder.pretrained,
                     "metrics": metrics}
    return RerankTrainResult(reranker, metrics)


def _grid(config: RerankTrainConfig) -> int:
    side = int(round(math.sqrt(config.fusion.image_tokens)))
    if side * side != config.fusion.image_tokens:
        raise TrainingError(f"fusion.image_tokens must be a square (a grid of tokens), got {config.fusion.image_tokens}")
    return side


def provenance(result: RerankTrainResult, out: str | os.PathLike, data: str | os.PathLike, command: str,
               git_commit: str | None, machine: str | None = None) -> dict[str, Any]:
    """The JSON written beside a trained re-ranker: what it is for, data (path relative to the
    re-ranker file's project root when inside it), command, seed, commit, config, validation metrics."""
    rr, out = result.reranker, Path(out)
    size = out.stat().st_size if out.is_file() else None
    return {"file": out.name, "bytes": size, "dtype": "float16", "towers": rr.towers,
            "model_pretrained_when_trained": rr.info.get("model_pretrained"), "weight": rr.weight,
            "hub_weight": rr.hub_weight, "hub_k": rr.hub_k, "bank_captions": 0 if rr.bank is None else len(rr.bank),
            "grid": rr.grid, "tokens_per_image": rr.tokens, "width": rr.width, "digest": rr.digest,
            "data": os.path.relpath(Path(data).absolute()), "data_relative_to": "the directory the command ran in",
            "command": command, "seed": rr.info.get("config", {}).get("seed"), "git_commit": git_commit,
            "machine": machine, "config": rr.info.get("config"), "metrics": result.metrics,
            "split": "validation images are a seeded fraction of the training manifest's images; the weight "
                     "was tuned on them, never on a test split"}
