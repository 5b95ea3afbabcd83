"""The training run's configuration: :class:`TrainConfig`, and reading one from a file.

``load_train_config(path, overrides)`` reads TOML (or the JSON a run writes as
``train_config.json`` in its folder), starting from the defaults, then applies ``overrides``
(``{"epochs": 3, "augment.hflip": 0.5}``; dotted keys reach into ``augment`` and are
ignored when augmentation is off). Unknown keys and
invalid values raise :class:`~vlsearch.core.errors.TrainingError` naming them.

A TOML file::

    model = "vlsearch-tiny"
    epochs = 20
    lock_text = true

    [augment]            # or: augment = false
    scale = [0.5, 1.0]
    hflip = 0.5
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from vlsearch.core.errors import TrainingError
from vlsearch.models.factory import TINY_MODEL
from vlsearch.train.images import AugmentConfig

#: The resolved configuration of a run, written in its folder when it starts.
CONFIG_FILE = "train_config.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint)."""

    model: str = TINY_MODEL
    #: None: fresh initialisation (an HF text tower still loads its own pretrained weights);
    #: else a tag / file / hf-hub id to fine-tune from, as in ``load_model``.
    pretrained: Optional[str] = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    #: Max global gradient norm; None disables clipping.
    grad_clip: Optional[float] = 1.0
    lock_text: bool = False
    #: With ``lock_text``: leave the last N text blocks trainable (+ final norm and projection);
    #: 0 = fully locked (an HF tower's projection stays trainable either way, as in open_clip).
    lock_text_unlocked_layers: int = 0
    lock_image: bool = False
    #: With ``lock_image``: leave the last N groups of a timm trunk trainable (timm's
    #: ``group_matcher`` stages, counted as open_clip's ``lock_image_tower(unlocked_groups=N)``).
    #: The projection head trains either way (open_clip locks only the trunk).
    lock_image_unlocked_groups: int = 0
    #: Weights file of the image tower's timm trunk (timm or efficientnet_pytorch naming), loaded
    #: before training. None: the config's own (a ``timm_model_pretrained`` trunk loads its packaged
    #: ImageNet weights).
    pretrained_image: Optional[str] = None
    #: Run the locked part of the image tower over every image once and train on the cached
    #: activations (needs ``lock_image`` and a timm trunk). None = auto: on whenever ``lock_image``.
    precompute_image: Optional[bool] = None
    #: Precomputed views per image: the plain view plus ``image_views - 1`` augmented ones
    #: (``augment``); each step uses one view of each image drawn by (seed, step).
    image_views: int = 1
    #: Training input side in pixels (None: the model's own). The model keeps its own size for
    #: inference (a convolutional trunk pools over any size).
    image_size: Optional[int] = None
    #: Folder for the precomputed feature caches, shared by runs (None: the run's ``out_dir``).
    cache_dir: Optional[str] = None
    #: Cache the locked text tower's output once (needs ``lock_text``): the pooled features of a fully
    #: locked tower, or, with ``lock_text_unlocked_layers`` N of a Hugging Face tower, the token
    #: states entering its last N layers (only those layers run per step). None = auto: on whenever
    #: ``lock_text`` (and, for N > 0, the tower is a Hugging Face one).
    precompute_text: Optional[bool] = None
    #: None disables augmentation (the model's eval preprocess is used for training too).
    augment: Optional[AugmentConfig] = field(default_factory=AugmentConfig)
    #: Fraction of the *images* held out for validation (0 disables validation).
    val_fraction: float = 0.05
    #: Validate every N epochs (0: never); the last epoch is always validated when there is a split.
    val_every: int = 1
    #: Write ``last.pt`` every N optimizer steps (0: only at epoch ends).
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"
    #: auto (bf16/fp16 autocast on CUDA, fp32 on CPU), fp32, fp16 or bf16.
    precision: str = "auto"
    #: DataLoader worker processes decoding images (0: decode in the main process).
    workers: int = 2
    #: Captions of each image used in every step: the loss is the mean of the CLIP loss over K
    #: caption draws. With precomputed text features extra captions cost almost nothing and give
    #: the image tower K times the supervision per image it encodes.
    captions_per_image: int = 1
    #: Decode every image once into memory (uint8 squares at twice the model's input side) and
    #: augment whole batches as tensors (no decoding processes; needs the set to fit in RAM).
    cache_images: bool = False
    #: torch CPU threads (None: torch's default).
    threads: Optional[int] = None
    #: Stop after this many optimizer steps in total (None: ``epochs`` full epochs).
    max_steps: Optional[int] = None
    #: Save the final ``model.pt`` with fp16 weights (half the size; loads back as fp32).
    half_final: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2 (contrastive loss needs negatives)"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0 or None"),
            (self.lock_text_unlocked_layers >= 0, "lock_text_unlocked_layers must be >= 0"),
            (self.lock_image_unlocked_groups >= 0, "lock_image_unlocked_groups must be >= 0"),
            (self.image_views >= 1, "image_views must be >= 1"),
            (self.image_size is None or self.image_size >= 16, "image_size must be >= 16 or None"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.val_every >= 0, "val_every must be >= 0"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.workers >= 0, "workers must be >= 0"),
            (self.captions_per_image >= 1, "captions_per_image must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1 or None"),
            (self.precision in ("auto", "fp32", "fp16", "bf16"), "precision must be auto, fp32, fp16 or bf16"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")
        if self.cache_images and self.augment is not None and self.augment.hue:
            raise ValueError("TrainConfig: hue jitter is not supported with cache_images; use hue=0")
        if self.precompute_text and not self.lock_text:
            raise ValueError("TrainConfig: precompute_text needs lock_text=True")
        if self.precompute_image and not self.lock_image:
            raise ValueError("TrainConfig: precompute_image needs lock_image=True")
        if self.image_views > 1 and not (self.use_precomputed_image and self.augment is not None):
            raise ValueError("TrainConfig: image_views > 1 needs precomputed image features (lock_image) and augment")

    @property
    def text_fully_locked(self) -> bool:
        return self.lock_text and self.lock_text_unlocked_layers == 0

    @property
    def use_precomputed_text(self) -> bool:
        return self.lock_text if self.precompute_text is None else bool(self.precompute_text)

    @property
    def use_precomputed_image(self) -> bool:
        return self.lock_image if self.precompute_image is None else bool(self.precompute_image)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plain(value: Any) -> Any:
    """Config dicts with tuples as lists (so a stored and a fresh config compare equal)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def train_config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from plain values (lists for tuples, a table or None/False for ``augment``)."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainingError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = dict(values)
    if "augment" in values:
        values["augment"] = _augment(values["augment"])
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as exc:
        raise TrainingError(str(exc)) from None


def _augment(value: Any) -> Optional[AugmentConfig]:
    if value is None or value is False:
        return None
    if value is True:
        return AugmentConfig()
    if isinstance(value, AugmentConfig):
        return value
    known = {f.name for f in fields(AugmentConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise TrainingError(f"unknown augment setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    items = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    try:
        return AugmentConfig(**items)
    except (TypeError, ValueError) as exc:
        raise TrainingError(str(exc)) from None


def load_train_config(path: str | os.PathLike | None = None,
                      overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults <- the TOML/JSON file at ``path`` (if any) <- ``overrides`` (see the module docstring)."""
    values = plain(asdict(TrainConfig()))
    if path is not None:
        values.update(_read(Path(path).expanduser()))
    overrides = dict(overrides or {})
    values.update({k: v for k, v in overrides.items() if "." not in k})
    for key, value in overrides.items():  # augment.* after the plain keys: augment=False wins
        head, dot, sub = key.partition(".")
        if not dot:
            continue
        if head != "augment":
            raise TrainingError(f"unknown training setting {key}")
        if values.get("augment") in (None, False):
            continue
        table = values["augment"]
        table = plain(asdict(AugmentConfig())) if table is True else dict(table)
        table[sub] = value
        values["augment"] = table
    return train_config_from_dict(values)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainingError(f"training config not found: {path}")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            data = _toml().loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrainingError(f"cannot read training config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise TrainingError(f"training config {path} must hold a table of settings")
    return data.get("config", data) if path.suffix.lower() == ".json" and "config" in data else data


def _toml() -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib
