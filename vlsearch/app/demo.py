"""The offline demo: the whole system, end to end, from nothing, in a few minutes on a CPU.

``run_demo(out_dir)``:

1. generates a captioned image set of coloured shapes (:mod:`vlsearch.data.shapes`) with a
   held-out split;
2. fits ``vlsearch-small`` to the training split LiT-style with :func:`vlsearch.train.loop.train`:
   the MiniLM text tower locked and the ImageNet EfficientNet-Lite0 trunk locked up to its last
   ``image_groups`` stage groups (their outputs computed once), those groups and the heads trained
   (the tiny built-in CLIP, trained from scratch, where vlsearch-small is not installed or
   ``shapes_model`` says so);
3. embeds the held-out split into a collection with :func:`indexing.embed.embed` and builds an
   ANN index with :func:`indexing.build.build_index` (IVF-PQ, so the approximate path is used);
4. runs example text queries and image queries (training pictures, which are not in the
   collection) through :class:`vlsearch.query.searcher.Searcher`, and scores each hit by whether its
   shape attributes match the query's;
5. benchmarks the collection with :func:`vlsearch.eval.bench.run_benchmark` (text->image and
   image->text Recall@K, MRR, median rank, exact vs ANN);
6. draws a contact sheet (one row per query, its top hits with their captions).

With ``data`` (a captioned folder or a CSV/Parquet manifest, e.g. the Flickr8k test split)
steps 1-2 are skipped: the data is indexed with ``vlsearch-small`` when available (else the
default model) and the same queries, benchmark and contact sheet are made on real photos.

Nothing here prints: :func:`run_demo` returns a :class:`DemoReport` (also written as
``report.json``), and the CLI (``vlsearch demo``) shows it. Like the CLI, this module is an entry
point over both halves of the package: it drives ``indexing`` (imported lazily, inside functions).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from vlsearch.core.fsutil import write_json
from vlsearch.models.factory import (SMALL_MODEL, TINY_MODEL, available_models, default_model, load_model,
                                     small_model_available)
from vlsearch.core.progress import Progress
from vlsearch.data.shapes import ShapesConfig, generate_shapes, parse_attributes, read_attributes
from vlsearch.core.threads import cpu_threads

from vlsearch.app.contact_sheet import draw_contact_sheet
from vlsearch.app.demo_report import DemoReport, QueryResult, format_report

__all__ = ["DemoConfig", "DemoReport", "QueryResult", "run_demo", "format_report", "draw_contact_sheet"]

log = logging.getLogger(__name__)


#: Example text queries on the generated shapes (partial descriptions included on purpose).
SHAPES_TEXT_QUERIES: tuple[str, ...] = (
    "a large red circle in the center",
    "a small blue star at the top left",
    "a yellow triangle on the right",
    "a large green square at the bottom",
    "a purple cross",
)
#: Example text queries on real photos (``data`` mode).
PHOTO_TEXT_QUERIES: tuple[str, ...] = (
    "a dog running on the grass",
    "children playing in the water",
    "a man riding a bike",
    "a group of people standing in the snow",
    "a black and white dog",
)
#: Demo training epochs: the tiny model from scratch; vlsearch-small's heads and last trunk stages on cached inputs.
TINY_EPOCHS, SMALL_LIT_EPOCHS = 10, 15
#: Demo training pictures: the tiny model learns its whole image tower from them; vlsearch-small's
#: head fits on 600 (more cost feature extraction time and, at the same steps, gave no better hits).
TINY_SIZE, SMALL_LIT_SIZE = 2000, 600
#: The attributes of a generated picture, as named in ``attributes.csv``.
ATTRIBUTES = ("color", "size", "shape", "position")


@dataclass(frozen=True)
class DemoConfig:
    """Knobs of the demo. The defaults finish in a few minutes on 2 CPU cores."""

    #: Training pictures generated (None: the fitted model's demo default, TINY_SIZE or SMALL_LIT_SIZE).
    size: Optional[int] = None
    heldout: int = 500  #: held-out pictures: the collection that is indexed, searched and benchmarked
    seed: int = 0
    #: Training epochs (None: the model's demo default, TINY_EPOCHS or SMALL_LIT_EPOCHS).
    epochs: Optional[int] = None
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 20
    #: Train-time augmentation (crops move shapes across grid cells and change their size, which
    #: captions name; off, the tiny model learns faster in the demo's few steps).
    augment: bool = False
    #: Shorter captions per training picture ("a red circle", ``vlsearch.data.shapes.PARTIAL_TEMPLATES``)
    #: besides its full ones: with full captions only, a fitted model weighs the place and size of a
    #: shape as much as its colour and kind, and most hits of "a red circle" are other shapes.
    partial_captions: int = 4
    #: vlsearch-small only: the image trunk's last N stage groups tuned with the heads (their input
    #: computed once). Pooled ImageNet features barely tell the shapes' colours apart: with the
    #: trunk locked 69 % of the hits had the query's colour and shape, with 1 group 75-84 %, with 2
    #: groups 86-88 % (seeds 0 and 1; 15 epochs, 2 cores: 95 s of training).
    image_groups: int = 2
    #: Index factory for the collection; None picks IVF-PQ sized to the collection (see :func:`vlsearch.ann.plan.demo_index_type`).
    index_type: Optional[str] = None
    k: int = 8  #: hits shown per query
    n_image_queries: int = 3
    #: torch threads for training and encoding (None: torch's default).
    threads: Optional[int] = None
    #: DataLoader workers decoding images while training / embedding.
    workers: int = 1
    #: In data mode: the model (None: vlsearch-small when available, else the default model).
    model: Optional[str] = None
    #: In shapes mode: the model fitted to the generated pictures (None: vlsearch-small, LiT-style,
    #: when available, else vlsearch-tiny from scratch with ``epochs``/``lr``).
    shapes_model: Optional[str] = None
    #: Inference precision of embedding and queries (see vlsearch.models.precision); training stays fp32 on CPU.
    precision: str = "auto"

    def __post_init__(self) -> None:
        checks = [
            (self.size is None or self.size >= 8, "size must be >= 8 training pictures"),
            (self.heldout >= 16, "heldout must be >= 16 pictures"),
            (self.epochs is None or self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2"),
            (self.k >= 1, "k must be >= 1"),
            (self.n_image_queries >= 0, "n_image_queries must be >= 0"),
            (self.partial_captions >= 0, "partial_captions must be >= 0"),
            (self.image_groups >= 0, "image_groups must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DemoConfig: {message}")


class _Stages:
    """Times each stage and forwards library progress as ``progress(done, total, stage=..., **postfix)``."""

    def __init__(self, progress: Optional[Progress]):
        self.progress, self.timings = progress, {}

    def forward(self, name: str, done: int, total: Optional[int], postfix: dict[str, Any]) -> None:
        if "stage" in postfix:  # a library's own sub-stage (e.g. the index builder's) becomes "step"
            postfix["step"] = postfix.pop("stage")
        self.progress(done, total, stage=name, **postfix)

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        if self.progress is not None:
            kwargs["progress"] = lambda done, total=None, **post: self.forward(name, done, total, post)
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings[name] = round(time.perf_counter() - started, 2)


def run_demo(
    out_dir: str | os.PathLike,
    size: Optional[int] = None,
    seed: Optional[int] = None,
    data: Optional[str | os.PathLike] = None,
    progress: Optional[Progress] = None,
    config: DemoConfig = DemoConfig(),
) -> DemoReport:
    """Run the demo into ``out_dir`` (see the module docstring) and return its report.

    ``size``/``seed`` override ``config.size``/``config.seed``; ``data`` switches to indexing a
    captioned folder or manifest instead of generated shapes. ``progress(done, total, stage=...)``
    reports each stage. ``out_dir`` must be new, empty, or an earlier demo's folder (whose
    outputs are replaced); anything else raises :class:`~vlsearch.core.errors.VlsearchError`.
    """
    started = time.perf_counter()
    config = replace(config, **{k: v for k, v in (("size", size), ("seed", seed)) if v is not None})
    out = _fresh_out_dir(Path(out_dir).expanduser())
    with cpu_threads(config.threads):
        report = _run(out, data, config, _Stages(progress), started)
    write_json(report.report_path, report.to_dict())
    return report


def _run(out: Path, data: Optional[str | os.PathLike], config: DemoConfig, stages: _Stages,
         started: float) -> DemoReport:
    """The demo's stages (see the module docstring), timed; returns the report."""
    if data is None:
        prepared = _prepare_shapes(out, config, stages)
    else:
        prepared = _prepare_data(Path(data).expanduser(), config)
    collection = out / "collection"
    encoder = _load_encoder(prepared["model"], prepared["mode"], config.precision)
    stages.run("embed", _embed, prepared["source"], collection, encoder, config)
    index = stages.run("index", _build_index, collection, config)
    text_q, image_q = stages.run("queries", _queries, collection, encoder, prepared, config)
    bench = stages.run("benchmark", _benchmark, collection)
    sheet = stages.run("contact sheet", draw_contact_sheet, [*text_q, *image_q], out / "contact_sheet.png",
                       roots=prepared["roots"], attributes=prepared["attributes"])
    from vlsearch.store.collection import Collection

    coll = Collection.open(collection)
    n_images = coll.count()
    report = DemoReport(
        out_dir=out, mode=prepared["mode"], model=coll.manifest.model.to_dict(), collection=collection,
        index=index, text_queries=text_q, image_queries=image_q, benchmark=bench,
        chance={f"R@{k}": min(1.0, k / n_images) for k in bench.get("ks", (1, 5, 10))},
        contact_sheet=sheet, timings=dict(stages.timings), seconds=round(time.perf_counter() - started, 2),
        dataset=prepared["dataset"], training=prepared.get("training"), notes=_notes(encoder),
    )
    return report


MARKER = ".vlsearch-demo"
#: What a demo writes in its folder (removed when a demo is rerun into the same folder).
_OUTPUTS = ("data", "model", "collection", "contact_sheet.png", "report.json")


def _fresh_out_dir(out: Path) -> Path:
    """Create ``out``, or clear an earlier demo's outputs from it; refuse any other non-empty folder."""
    import shutil

    from vlsearch.core.errors import VlsearchError

    if out.exists() and not out.is_dir():
        raise VlsearchError(f"demo output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise VlsearchError(f"demo output folder {out} is not empty and holds no earlier demo; "
                                "choose a new or empty folder with --out")
        for name in _OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("a vlsearch demo folder: `vlsearch demo` may clear it\n", encoding="utf-8")
    return out


# ---- stages --------------------------------------------------------------------------------

def _shapes_model(config: DemoConfig) -> str:
    """The model fitted to the shapes: ``config.shapes_model``, else vlsearch-small when it can load, else vlsearch-tiny."""
    return config.shapes_model or (SMALL_MODEL if small_model_available() else TINY_MODEL)


def _shapes_train_config(config: DemoConfig, model: str) -> Any:
    """vlsearch-small fitted LiT-style (locked, precomputed towers but the trunk's last
    ``image_groups`` stage groups, which train with the heads), or
    vlsearch-tiny from scratch. ``config.size`` is set."""
    from vlsearch.train.config import TrainConfig
    from vlsearch.train.images import AugmentConfig

    common = dict(model=model, batch_size=min(config.batch_size, config.size), val_fraction=0.0, checkpoint_every=0,
                  augment=AugmentConfig() if config.augment else None, seed=config.seed, workers=config.workers,
                  threads=config.threads)
    if model == SMALL_MODEL:
        return TrainConfig(epochs=config.epochs or SMALL_LIT_EPOCHS, lr=1e-3, warmup_steps=config.warmup_steps, lock_image=True,
                           lock_text=True, lock_image_unlocked_groups=config.image_groups, **common)
    return TrainConfig(epochs=config.epochs or TINY_EPOCHS, lr=config.lr, warmup_steps=config.warmup_steps, **common)


def _prepare_shapes(out: Path, config: DemoConfig, stages: _Stages) -> dict[str, Any]:
    from vlsearch.train.loop import train

    model = _shapes_model(config)
    if config.size is None:
        config = replace(config, size=SMALL_LIT_SIZE if model == SMALL_MODEL else TINY_SIZE)
    shapes = ShapesConfig(n_train=config.size, n_heldout=config.heldout, seed=config.seed,
                          partial_captions=config.partial_captions)
    dataset = stages.run("generate", generate_shapes, out / "data", shapes)
    tconfig = _shapes_train_config(config, model)
    result = stages.run("train", train, dataset.train_manifest, out / "model", tconfig)
    return {
        "mode": "shapes",
        "source": dataset.heldout_manifest,
        "model": (tconfig.model, str(result.checkpoint)),
        "dataset": {"train_manifest": str(dataset.train_manifest), "heldout_manifest": str(dataset.heldout_manifest),
                    "counts": dataset.counts, "captions_per_image": shapes.captions_per_image,
                    "partial_captions": shapes.partial_captions},
        "training": {"checkpoint": str(result.checkpoint), "steps": result.steps, "epochs": result.epochs,
                     "seconds": round(result.seconds, 2), "first_loss": result.losses[0] if result.losses else None,
                     "last_loss": result.losses[-1] if result.losses else None,
                     "image_groups_tuned": tconfig.lock_image_unlocked_groups if tconfig.lock_image else None},
        "text_queries": SHAPES_TEXT_QUERIES,
        "image_queries": _shape_image_queries(dataset, config.n_image_queries),
        "attributes": read_attributes(dataset.split_dir("heldout")),
        "query_attributes": read_attributes(dataset.split_dir("train")),
        "roots": {"collection": dataset.split_dir("heldout"), "query": dataset.split_dir("train")},
    }


def _shape_image_queries(dataset: Any, n: int) -> list[tuple[str, str]]:
    """``n`` training pictures (not in the collection) as image queries: (relative path, caption)."""
    import csv

    seen: dict[str, str] = {}
    with open(dataset.train_manifest, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            seen.setdefault(row["image"], row["caption"])
            if len(seen) >= n:
                break
    return list(seen.items())[:n]


def _prepare_data(data: Path, config: DemoConfig) -> dict[str, Any]:
    from vlsearch.data.sources import open_source

    source = open_source(data)
    root = source.root if source.root.is_dir() else source.root.parent
    image_queries = []
    for record in source:
        image_queries.append((record.path, record.captions[0] if record.captions else None))
        if len(image_queries) >= config.n_image_queries:
            break
    return {
        "mode": "data",
        "source": source,
        "model": (_data_model(config), None),  # the model's built-in weights
        "dataset": {"source": str(data), **source.describe()},
        "text_queries": PHOTO_TEXT_QUERIES,
        "image_queries": image_queries,
        "attributes": None,
        "query_attributes": None,
        "roots": {"collection": root, "query": root},
    }


def _data_model(config: DemoConfig) -> str:
    """``config.model``, else vlsearch-small when it is registered, else the default model."""
    if config.model:
        return config.model
    if SMALL_MODEL in available_models():
        return SMALL_MODEL
    log.warning("%s is not installed; using %s", SMALL_MODEL, default_model())
    return default_model()


def _load_encoder(model: tuple[str, Optional[str]], mode: str, precision: str = "auto") -> Any:
    """Load the model once (for embedding and queries). In data mode an unavailable
    vlsearch-small falls back to the default model, with a warning."""
    from vlsearch.core.errors import WeightsUnavailableError

    name, pretrained = model
    try:
        return load_model(name, pretrained, precision=precision)
    except WeightsUnavailableError as exc:
        if mode != "data" or name != SMALL_MODEL:
            raise
        log.warning("%s is unavailable (%s); using %s", SMALL_MODEL, exc, default_model())
        return load_model(default_model(), precision=precision)


def _notes(encoder: Any) -> list[str]:
    if encoder.pretrained is None:
        return [f"{encoder.name} has no trained weights in this install (random initialisation): "
                "its search results and figures are at chance level"]
    return []


def _embed(source: Any, collection: Path, encoder: Any, config: DemoConfig,
           progress: Optional[Progress] = None) -> None:
    from indexing.embed import EmbedConfig, embed

    embed(source, collection, EmbedConfig(model=encoder.name, pretrained=encoder.pretrained,
                                          workers=config.workers, threads=config.threads),
          progress=progress, encoder=encoder)


def _build_index(collection: Path, config: DemoConfig, progress: Optional[Progress] = None) -> dict[str, Any]:
    """IVF-PQ even for the demo's small collection, so the approximate search path is exercised:
    the builder's own ``auto`` choice with its exact-search threshold removed (or, below
    ``4 * dim`` vectors, a small IVF-PQ): :func:`vlsearch.ann.plan.demo_index_type`, unless
    ``config.index_type`` names one."""
    from indexing.build import build_index
    from vlsearch.ann.plan import ALWAYS_ANN, demo_index_type

    from vlsearch.store.collection import Collection

    coll = Collection.open(collection)
    n, dim = coll.count(), coll.dim
    index_type = config.index_type or demo_index_type(n, dim)
    with _captured_stderr():  # FAISS warns on stderr that a few hundred points are few for k-means
        return build_index(collection, index_type=index_type, seed=config.seed, progress=progress,
                           policy=ALWAYS_ANN)


@contextmanager
def _captured_stderr() -> Iterator[None]:
    """Send what C++ code writes to file descriptor 2 to the debug log instead of the terminal."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                log.debug("FAISS said: %s", text)


def _queries(collection: Path, encoder: Any, prepared: dict[str, Any], config: DemoConfig,
             progress: Optional[Progress] = None) -> tuple[list[QueryResult], list[QueryResult]]:
    from vlsearch.query.searcher import Searcher

    searcher = Searcher.open(collection, encoder=encoder)
    options = dict(k=config.k, exact=not searcher.has_index)
    attributes = prepared["attributes"]
    texts = list(prepared["text_queries"])
    text_results = []
    for text, hits in zip(texts, searcher.search_text(texts, **options)):
        matches = None if attributes is None else _attribute_matches(hits, attributes, parse_attributes(text))
        text_results.append(QueryResult("text", text, list(hits), attribute_matches=matches))
    image_results = []
    queries = prepared["image_queries"]
    if queries:
        root = Path(prepared["roots"]["query"])
        paths = [str(root / rel) for rel, _ in queries]
        for (rel, caption), hits in zip(queries, searcher.search_image(paths, **options)):
            matches = None
            if attributes is not None:
                own = prepared["query_attributes"][rel]
                matches = _attribute_matches(hits, attributes, {a: own[a] for a in ATTRIBUTES})
            image_results.append(QueryResult("image", rel, list(hits), caption=caption, attribute_matches=matches))
    if progress is not None:
        progress(1, 1)
    return text_results, image_results


def _attribute_matches(hits: Sequence[Any], attributes: dict[str, dict[str, str]],
                       wanted: dict[str, str]) -> dict[str, list[bool]]:
    rows = [attributes.get(h.path) or {} for h in hits]
    return {attr: [row.get(attr) == wanted[attr] for row in rows] for attr in ATTRIBUTES if attr in wanted}


def _benchmark(collection: Path, progress: Optional[Progress] = None) -> dict[str, Any]:
    from vlsearch.eval.bench import BenchConfig, run_benchmark

    return run_benchmark(collection, BenchConfig(nprobes=(1, 4, 16), latency_queries=200), progress=progress)


