"""Captions for uncaptioned photos: an open_clip CoCa's text decoder, written into the ``captions`` column.

::

    report = caption_collection("photos.vls", CaptionConfig(model="coca_ViT-B-32",
                                                            pretrained="mscoco_finetuned_laion2b_s13b_b90k"))

The rows to caption are the live rows whose ``captions`` is null or empty (every row with
``overwrite``). Their images are decoded from the collection's source (the folder or manifest
recorded in the manifest, as re-rank features locate them:
:func:`vlsearch.rerank.features.image_file`), in batches, and captioned by greedy decoding over the
model's forward (:func:`greedy_tokens`; open_clip's own ``generate`` with
``generation_type="beam_search"`` where the installed transformers still has the generation
classes it needs: open_clip 3.3 refuses every kind of generation with transformers 5). The
weights come from the one model factory (:func:`vlsearch.models.factory.create_model`): an
open_clip pretrained tag, ``hf-hub:org/repo`` or a local checkpoint file; a model without
``generate`` (not a CoCa) is a :class:`~vlsearch.core.errors.TaggingError`.

**Resumable like embed.** Each batch's captions are appended to :data:`CHECKPOINT` in the
collection folder (JSON lines, flushed and fsynced per batch; a line torn by a crash is ignored).
A rerun with the same model and weights skips the rows already there; a checkpoint of another
model is discarded; a second run on the same collection meanwhile is refused
(:class:`~vlsearch.core.errors.CollectionLockedError`: :data:`CHECKPOINT_LOCK`). The collection's
writer lock is taken only at the end, when every caption is written at once through
:func:`vlsearch.store.columns.set_columns` (one new version: ``captions = [generated]`` and
``caption_model`` = ``model/pretrained``, so generated captions stay distinguishable from
human ones), then the checkpoint is removed.

**No caption embeddings.** The collection's ``captions/`` shards hold the embeddings of the
source's own captions, the pairs ``vlsearch bench`` measures retrieval with; a model's guess is
not ground truth, so it is not added there. Generated captions are searchable as text: keyword
search (the ``caption`` field), filters (``caption``/``captions``) and hits show them, while
vector search keeps using the image embeddings.

Rows whose image cannot be read now are reported in ``failures`` and stay uncaptioned (a rerun
tries them again).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlsearch.core.errors import CollectionLockedError, DecodeError, RerankFeaturesError, TaggingError
from vlsearch.core.progress import Progress
from vlsearch.data.images import open_image
from vlsearch.models.encoder import resolve_device
from vlsearch.models.factory import create_model, image_transform
from vlsearch.rerank.features import image_file
from vlsearch.store.collection import Collection
from vlsearch.store.columns import set_columns
from vlsearch.store.lock import CollectionLock

log = logging.getLogger(__name__)

#: Generated captions not yet committed, in the collection folder (JSON lines; see module docstring).
CHECKPOINT = "captions.checkpoint.jsonl"
#: Held by the one caption run of a collection (its writer lock is taken only to commit).
CHECKPOINT_LOCK = "captions.checkpoint.lock"
CAPTION_MODEL = "caption_model"
DEFAULT_CAPTION_MODEL = "coca_ViT-B-32"
_SOURCES = ("folder", "manifest")
#: open_clip's tokenizer: start and end of text
_SOT, _EOT = 49406, 49407


@dataclass(frozen=True)
class CaptionConfig:
    """Which CoCa model writes the captions, and how: ``pretrained`` (tag, ``hf-hub:`` id or file;
    required), ``batch_size`` images per ``generate`` call, ``overwrite`` (caption every row),
    ``seq_len`` (longest caption in tokens) and open_clip's ``generation_type``."""

    model: str = DEFAULT_CAPTION_MODEL
    pretrained: str | None = None
    batch_size: int = 16
    overwrite: bool = False
    device: str = "auto"
    seq_len: int = 30
    generation_type: str = "greedy"


@dataclass(frozen=True)
class CaptionReport:
    """``rows`` to caption, ``generated`` by this run, ``resumed`` from a checkpoint, rows
    ``failed`` (``failures``: (path, reason)), ``empty`` generations (rows left uncaptioned), and
    the new ``version`` (None when nothing was written)."""

    rows: int
    generated: int
    resumed: int
    empty: int
    version: int | None
    failures: list[tuple[str, str]] = field(default_factory=list)


def load_captioner(config: CaptionConfig) -> tuple[Any, Any, str]:
    """``(model, preprocess, "model/pretrained")`` through the model factory; TaggingError when the
    model cannot caption or no weights are given (PretrainedNotFoundError etc. from the factory)."""
    if not config.pretrained:
        raise TaggingError(f"captions need trained weights: give {config.model}'s pretrained tag, an "
                           "'hf-hub:org/repo' id or a checkpoint file (--pretrained)")
    model, tag = create_model(config.model, config.pretrained)
    if not callable(getattr(model, "generate", None)):
        raise TaggingError(f"{config.model} cannot write captions (it has no generate: use a CoCa model, "
                           "e.g. coca_ViT-B-32)")
    model = model.to(resolve_device(config.device)).eval()
    return model, image_transform(model), f"{config.model}/{tag}"


def clean_caption(text: str) -> str:
    """A decoded token sequence as a caption: the text between the start and end tokens, tidied."""
    text = text.split("<end_of_text>")[0].replace("<start_of_text>", "")
    text = " ".join(text.split()).replace(" .", ".").replace(" ,", ",")
    return text.strip()


def generate_captions(model: Any, images: Any, config: CaptionConfig) -> list[str]:
    """Captions of a batch of preprocessed images (a tensor ``(B, 3, H, W)``)."""
    import open_clip
    import torch

    images = images.to(next(model.parameters()).device)
    with torch.no_grad():
        if config.generation_type == "greedy":
            tokens = greedy_tokens(model, images, config.seq_len)
        else:
            from open_clip import coca_model

            if not getattr(coca_model, "_has_transformers", False):
                raise TaggingError(f"open_clip's generate ({config.generation_type}) needs transformers' generation "
                                   "classes, which this transformers lacks (BeamSearchScorer left transformers 5): "
                                   "use generation_type='greedy'")
            tokens = model.generate(images, seq_len=config.seq_len, generation_type=config.generation_type)
    return [clean_caption(open_clip.decode(t)) for t in tokens.cpu()]


def greedy_tokens(model: Any, images: Any, seq_len: int, min_len: int = 5) -> Any:
    """Greedy decoding with CoCa's own forward (the image encoded once, as open_clip's generate
    does): the most likely token at each step, at least ``min_len`` tokens, until the end token or
    ``seq_len``. ``(B, <= seq_len)`` token ids starting with the start token."""
    import torch

    latent, embs = model._encode_image(images)
    out = torch.full((len(images), 1), _SOT, dtype=torch.long, device=images.device)
    finished = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    for step in range(seq_len - 1):
        logits = model(images, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
        logits = logits.float()
        logits[:, _SOT] = -torch.inf
        if step < min_len:
            logits[:, _EOT] = -torch.inf
        token = torch.where(finished, torch.full_like(finished, _EOT, dtype=torch.long), logits.argmax(-1))
        out = torch.cat([out, token[:, None]], dim=1)
        finished |= token == _EOT
        if bool(finished.all()):
            break
    return out


def rows_to_caption(coll: Collection, overwrite: bool) -> tuple[np.ndarray, list[str]]:
    """Ids and stored paths of the live rows without captions (every live row with ``overwrite``)."""
    table = coll.read_table(columns=["id", "path", "captions"])
    if not overwrite:
        empty = pc.fill_null(pc.equal(pc.list_value_length(table.column("captions")), 0), True)
        table = table.filter(empty)
    return table.column("id").to_numpy().astype(np.int64), table.column("path").to_pylist()


class Checkpoint:
    """The JSON-lines checkpoint of one caption run: a header naming the model, then one line per
    captioned row ``{"id": ..., "caption": ...}``."""

    def __init__(self, coll: Collection, model: str):
        self.path = coll.path / CHECKPOINT
        self.model = model

    def read(self) -> dict[int, str]:
        """Captions of an earlier run of the same model ({} if none, or of another model)."""
        if not self.path.is_file():
            return {}
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            model = json.loads(lines[0]).get("model") if lines else None
        except json.JSONDecodeError:
            model = None
        if model != self.model:
            log.warning("discarding %s: written by %s, not %s", self.path, model, self.model)
            return {}
        done: dict[int, str] = {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the torn last line of a killed run
                continue
            done[int(entry["id"])] = str(entry["caption"])
        return done

    def start(self, resumed: bool) -> None:
        """Begin a fresh checkpoint (its header), unless resuming a valid one."""
        if not resumed:
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"model": self.model}) + "\n")
                _sync(fh)

    def append(self, ids: Sequence[int], captions: Sequence[str]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps({"id": int(i), "caption": c}) + "\n" for i, c in zip(ids, captions)))
            _sync(fh)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _batches(coll: Collection, ids: np.ndarray, paths: list[str], preprocess: Any, batch_size: int,
             failures: list[tuple[str, str]]) -> Iterator[tuple[list[int], "Any"]]:
    """``(ids, image tensor)`` batches of the rows' decoded images; unreadable ones go to ``failures``."""
    import torch

    source = coll.manifest.source or {}
    batch_ids, batch = [], []
    for image_id, rel in zip(ids.tolist(), paths):
        try:
            batch.append(preprocess(open_image(image_file(source, rel))))
            batch_ids.append(image_id)
        except (DecodeError, RerankFeaturesError) as exc:
            failures.append((rel, str(exc)))
        if len(batch) == batch_size:
            yield batch_ids, torch.stack(batch)
            batch_ids, batch = [], []
    if batch:
        yield batch_ids, torch.stack(batch)


def caption_collection(collection: str | Path | Collection, config: CaptionConfig,
                       progress: Progress | None = None, captioner: tuple[Any, Any, str] | None = None
                       ) -> CaptionReport:
    """Caption the rows without captions (see the module docstring) as one new version.
    ``captioner``: :func:`load_captioner`'s result, already loaded. Resumes an interrupted run;
    CollectionLockedError while another caption run works on the collection."""
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    kind = (coll.manifest.source or {}).get("type")
    if kind not in _SOURCES:
        raise TaggingError(f"the collection's source ({kind or 'unknown'}) gives no image files to caption: "
                           "captions need a folder or manifest source")
    model, preprocess, name = captioner if captioner is not None else load_captioner(config)
    with ExitStack() as stack:
        try:
            stack.enter_context(CollectionLock(coll.path / CHECKPOINT_LOCK, wait=0))
        except CollectionLockedError as exc:
            raise CollectionLockedError(f"another caption run is captioning {coll.path}: {exc}") from None
        return _caption(coll, config, model, preprocess, name, progress)


def _caption(coll: Collection, config: CaptionConfig, model: Any, preprocess: Any, name: str,
             progress: Progress | None) -> CaptionReport:
    ids, paths = rows_to_caption(coll, config.overwrite)
    checkpoint = Checkpoint(coll, name)
    prior = checkpoint.read()
    checkpoint.start(resumed=bool(prior))
    wanted = set(ids.tolist())
    done = {i: c for i, c in prior.items() if i in wanted}
    todo = np.array([i not in done for i in ids.tolist()], bool)
    resumed, failures = len(done), []
    for batch_ids, images in _batches(coll, ids[todo], [p for p, t in zip(paths, todo) if t], preprocess,
                                      config.batch_size, failures):
        captions = generate_captions(model, images, config)
        checkpoint.append(batch_ids, captions)
        done.update(zip(batch_ids, captions))
        if progress is not None:
            progress(len(done) + len(failures), len(ids), stage="caption")
    written = {i: c for i, c in done.items() if c}
    version = None
    if written:
        values = pa.table({"id": pa.array(list(written), pa.int64()),
                           "captions": pa.array([[c] for c in written.values()], pa.list_(pa.string())),
                           CAPTION_MODEL: pa.array([name] * len(written), pa.string())})
        version = set_columns(coll, values)["version"]
    checkpoint.remove()
    return CaptionReport(rows=len(ids), generated=len(done) - resumed, resumed=resumed,
                         empty=len(done) - len(written), version=version, failures=failures)


__all__ = ["CAPTION_MODEL", "CHECKPOINT", "CaptionConfig", "CaptionReport", "Checkpoint", "caption_collection",
           "clean_caption", "generate_captions", "load_captioner", "rows_to_caption"]
