"""Zero-shot classification with a dual encoder: class names + prompt templates -> text prototypes.

Each class's prototype is the mean of its L2-normalised template embeddings ("a photo of a
{}."...), renormalised (CLIP's prompt ensembling). An image is assigned the class whose prototype
has the highest cosine similarity. Inputs are a list of images, a folder of images, a folder
with one sub-folder per class (labels known: accuracy is reported), or a collection (its stored
image embeddings are classified without re-encoding).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from vlsearch.core.allocator import reusing_freed_memory
from vlsearch.core.errors import DecodeError, SourceError
from vlsearch.core.inputs import ImageInput
from vlsearch.data.images import open_image
from vlsearch.data.sources import FolderSource, is_image_name
from vlsearch.core.progress import Progress

log = logging.getLogger(__name__)

#: Generic prompt ensemble (a subset of CLIP's ImageNet templates).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
)


@dataclass(frozen=True)
class ZeroShotResult:
    """Predictions for every classified image (failed images are listed in ``failures``)."""

    classnames: list[str]
    paths: list[str]  #: one per classified image ("" for in-memory images)
    scores: np.ndarray  #: (n, n_classes) cosine similarity of each image to each class prototype
    predictions: np.ndarray  #: (n,) index of the best class
    topk: np.ndarray  #: (n, min(5, n_classes)) class indices, best first
    labels: Optional[np.ndarray] = None  #: (n,) true class indices when known
    failures: list[tuple[str, str]] = field(default_factory=list)  #: (path, reason) of skipped images

    @property
    def top1(self) -> Optional[float]:
        """Top-1 accuracy (None without labels)."""
        return None if self.labels is None else float((self.predictions == self.labels).mean())

    @property
    def top5(self) -> Optional[float]:
        """Top-5 accuracy (top-k with k = min(5, classes); None without labels)."""
        return None if self.labels is None else float((self.topk == self.labels[:, None]).any(axis=1).mean())

    def per_class_accuracy(self) -> dict[str, float]:
        """Top-1 accuracy of each class that has labelled images."""
        if self.labels is None:
            return {}
        return {name: float((self.predictions[self.labels == c] == c).mean())
                for c, name in enumerate(self.classnames) if (self.labels == c).any()}

    def predicted_names(self) -> list[str]:
        return [self.classnames[i] for i in self.predictions]


def zero_shot_classifier(encoder: Any, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
    """``(n_classes, dim)`` float32 unit-norm prototypes: mean of normalised template embeddings, renormalised."""
    classnames, templates = _check_classes(classnames), _check_templates(templates)
    texts = [t.format(c) for c in classnames for t in templates]
    emb = np.asarray(encoder.encode_texts(texts), dtype=np.float32).reshape(len(classnames), len(templates), -1)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True).clip(1e-12)
    protos = emb.mean(axis=1)
    return (protos / np.linalg.norm(protos, axis=-1, keepdims=True).clip(1e-12)).astype(np.float32)


def zero_shot_classify(
    encoder: Any,
    images: str | os.PathLike | Sequence[ImageInput],
    classnames: Optional[Sequence[str]] = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    labels: Optional[Sequence[int | str]] = None,
    batch_size: int = 64,
    progress: Optional[Progress] = None,
) -> ZeroShotResult:
    """Classify images among ``classnames`` by nearest text prototype.

    ``images``: a list of images (paths, PIL images, bytes); a folder of images; a folder with one
    sub-folder per class (``classnames`` then defaults to the sub-folder names, and folder names
    give the labels — each must be one of ``classnames``, compared ignoring case and ``_``/``-``);
    or a collection directory (stored embeddings, which must come from ``encoder``'s model).
    ``labels`` (class indices or names, one per image) overrides folder labels.
    Unreadable images are skipped and listed in ``failures``.
    """
    paths, items, folder_labels = _gather(images)
    if classnames is None:
        if folder_labels is None:
            raise SourceError("give the class names (classnames=...): the images are not in one folder per class")
        classnames = sorted(set(folder_labels))
    classnames = _check_classes(classnames)
    prototypes = zero_shot_classifier(encoder, classnames, templates)
    if items is None:  # a collection
        paths, feats = _collection_embeddings(encoder, Path(images))
        failures: list[tuple[str, str]] = []
        keep = np.arange(len(paths))
    else:
        with reusing_freed_memory():
            feats, keep, failures = _encode(encoder, items, paths, batch_size, progress)
        paths = [paths[i] for i in keep]
    label_source = labels if labels is not None else folder_labels
    true = None
    if label_source is not None:
        if len(label_source) != len(items if items is not None else paths):
            raise ValueError(f"{len(label_source)} labels for {len(items if items is not None else paths)} images")
        true = np.array([_label_index(label_source[i], classnames) for i in keep], dtype=np.int64)
    scores = feats @ prototypes.T if len(feats) else np.zeros((0, len(classnames)), np.float32)
    k = min(5, len(classnames))
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ZeroShotResult(list(classnames), paths, scores, topk[:, 0].copy(), topk, true, failures)


def _check_classes(classnames: Sequence[str]) -> list[str]:
    if isinstance(classnames, str):
        raise TypeError("classnames must be a sequence of strings, not one string")
    names = [str(c).strip() for c in classnames]
    if len(names) < 2 or not all(names):
        raise ValueError(f"need at least 2 non-empty class names, got {names}")
    if len({_norm(n) for n in names}) != len(names):
        raise ValueError(f"duplicate class names in {names}")
    return names


def _check_templates(templates: Sequence[str]) -> list[str]:
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"each template needs exactly one '{{}}' for the class name; bad: {bad or templates}")
    return templates


def _norm(name: str) -> str:
    return name.lower().replace("_", " ").replace("-", " ").strip()


def _label_index(label: int | str, classnames: list[str]) -> int:
    if isinstance(label, (int, np.integer)):
        if not 0 <= int(label) < len(classnames):
            raise ValueError(f"label {label} out of range for {len(classnames)} classes")
        return int(label)
    wanted = _norm(str(label))
    for i, name in enumerate(classnames):
        if _norm(name) == wanted:
            return i
    raise ValueError(f"label {label!r} is not one of the classes {classnames}")


def _is_image(path: Path) -> bool:
    return not path.name.startswith(".") and is_image_name(path.name) and path.is_file()


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder`` (:class:`FolderSource`'s walk; hidden files and broken
    links left out), sorted by path."""
    return sorted(p for p in map(Path, FolderSource(folder).image_files()) if _is_image(p))


def _gather(images: Any) -> tuple[list[str], Optional[list[Any]], Optional[list[str]]]:
    """(paths, items to decode or None for a collection, folder labels or None)."""
    if isinstance(images, (str, os.PathLike)):
        root = Path(images).expanduser()
        if (root / "manifest.json").is_file():
            return [], None, None
        if not root.is_dir():
            if _is_image(root):
                return [str(root)], [root], None
            raise SourceError(f"{root} is not an image, an image folder or a collection")
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        files = sorted(p for p in root.iterdir() if _is_image(p))
        if subdirs and not files:
            pairs = [(p, d.name) for d in subdirs for p in _images_under(d)]
            if not pairs:
                raise SourceError(f"no images under the class folders of {root}")
            return [str(p) for p, _ in pairs], [p for p, _ in pairs], [c for _, c in pairs]
        files = files or _images_under(root)
        if not files:
            raise SourceError(f"no images in {root}")
        return [str(p) for p in files], list(files), None
    items = list(images)
    if not items:
        raise SourceError("no images to classify")
    return [str(x) if isinstance(x, (str, os.PathLike)) else "" for x in items], items, None


def _encode(encoder: Any, items: list[Any], paths: list[str], batch_size: int,
            progress: Optional[Progress]) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    feats, keep, failures, batch, batch_idx = [], [], [], [], []

    def flush() -> None:
        if batch:
            import torch

            feats.append(encoder.encode_image_tensors(torch.stack(batch)))
            keep.extend(batch_idx)
            batch.clear()
            batch_idx.clear()

    for i, item in enumerate(items):
        try:
            batch.append(encoder.preprocess(open_image(item, draft_size=2 * encoder.image_size)))
            batch_idx.append(i)
        except DecodeError as exc:
            log.warning("skipping unreadable image %s (%s)", paths[i] or f"#{i}", exc)
            failures.append((paths[i], str(exc)))
        if len(batch) == batch_size:
            flush()
        if progress is not None and ((i + 1) % batch_size == 0 or i + 1 == len(items)):
            progress(i + 1, len(items))
    flush()
    out = np.concatenate(feats) if feats else np.zeros((0, encoder.dim), np.float32)
    return out, keep, failures


def _collection_embeddings(encoder: Any, path: Path) -> tuple[list[str], np.ndarray]:
    from vlsearch.store.collection import Collection

    coll = Collection.open(path)
    coll.check_model(encoder.info)
    table = coll.read_table("images", columns=["id", "path"])
    ids, vectors = coll.read_embeddings("images")
    path_of = dict(zip(table.column("id").to_pylist(), table.column("path").to_pylist()))
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    return [str(path_of.get(int(i), "")) for i in ids], vectors.astype(np.float32)
