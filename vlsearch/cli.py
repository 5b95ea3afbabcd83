"""The ``vlsearch`` command line: thin typer commands over the Python API.

This module is the only place that prints or exits. Library errors (``VlsearchError``) become a
one-line message on stderr and exit code 1; progress callbacks become tqdm bars. Heavy imports
(torch, open_clip, faiss) happen inside commands so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
from typing import Any, Callable, Optional

import typer

app = typer.Typer(
    name="vlsearch",
    help="Image-text retrieval: embed image galleries, build FAISS indexes, search by text or image, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Options shared by several commands (one definition, same flags and help everywhere).
_MODEL_OPT = typer.Option(None, "--model", "-m", help="Model name (default: the built-in default model).")
_PRETRAINED_OPT = typer.Option(None, "--pretrained", "-p", help="Tag, hf-hub:org/repo, or checkpoint file.")
_BATCH_OPT = typer.Option(64, "--batch-size", "-b", min=1, help="Images per forward pass.")
_WORKERS_OPT = typer.Option(2, "--workers", "-w", min=0, help="Decoding processes (0: decode in the main process).")
_DEVICE_OPT = typer.Option("auto", help="auto, cpu or cuda.")
_PRECISION_OPT = typer.Option("auto", "--precision", help="Inference precision: auto (bf16 where this CPU/GPU runs "
                              "it fast, else fp32; `vlsearch info` says which), fp32, bf16, fp16 or int8 (CPU).")
_SHARD_OPT = typer.Option(10_000, "--shard-size", min=1, help="Source records per Parquet shard.")
_SOURCE_ARG = typer.Argument(..., help="Image folder, .csv/.parquet manifest, .tar shard(s) (folder or glob).")
_COLLECTION_OUT_ARG = typer.Argument(..., help="Output collection directory (created, or resumed).")


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn vlsearch's typed exceptions into a clear message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import VlsearchError

        try:
            return fn(*args, **kwargs)
        except VlsearchError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


class TqdmProgress:
    """A progress callback for library functions, shown as a tqdm bar.

    Library functions call ``progress(done, total, **postfix)``; ``total`` may be None.
    """

    def __init__(self, desc: str, unit: str = "it"):
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit=unit, dynamic_ncols=True)

    def __call__(self, done: int, total: Optional[int] = None, **postfix: Any) -> None:
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details to stderr."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@app.command("models")
@handle_errors
def models_cmd(
    name: Optional[str] = typer.Argument(None, help="Show the pretrained tags of this model only."),
    tags: bool = typer.Option(False, "--tags", help="List every model with its pretrained tags."),
) -> None:
    """List model architectures (open_clip's and vlsearch's built-in ones) and pretrained tags."""
    from . import models

    if name:
        models._check_name(name)
        typer.echo("\n".join(models.pretrained_tags(name)) or f"{name}: no published tags (random init or a local file)")
        return
    for model_name in models.available_models():
        line = model_name
        if tags:
            line += "\t" + ",".join(models.pretrained_tags(model_name))
        typer.echo(line)


@app.command("info")
def info_cmd(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Print versions, the compute device and how many GPUs FAISS sees."""
    import faiss
    import open_clip
    import torch

    from . import __version__

    info = {
        "vlsearch": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "faiss": faiss.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
    }
    from .models import resolve_device
    from .precision import describe_auto

    info.update(describe_auto(resolve_device("auto")))
    if as_json:
        typer.echo(json.dumps(info))
    else:
        for key, value in info.items():
            typer.echo(f"{key:15} {value}")


@app.command("encode")
@handle_errors
def encode_cmd(
    texts: list[str] = typer.Argument(None, help="Texts to encode."),
    image: list[str] = typer.Option([], "--image", "-i", help="Image file to encode (repeatable)."),
    model: str = typer.Option(None, "--model", "-m", help="Model name (default: the built-in default model)."),
    pretrained: Optional[str] = _PRETRAINED_OPT,
    device: str = _DEVICE_OPT,
    precision: str = _PRECISION_OPT,
) -> None:
    """Encode texts and/or images and print one JSON line per input (its embedding)."""
    from .models import DEFAULT_MODEL, load_model

    enc = load_model(model or DEFAULT_MODEL, pretrained, device=device, precision=precision)
    rows = []
    if texts:
        rows += [("text", t, v) for t, v in zip(texts, enc.encode_texts(texts))]
    if image:
        rows += [("image", p, v) for p, v in zip(image, enc.encode_images(image))]
    if not rows:
        raise typer.BadParameter("give at least one text or --image")
    for kind, value, vec in rows:
        typer.echo(json.dumps({kind: value, "model": enc.name, "dim": enc.dim, "embedding": [round(float(x), 6) for x in vec]}))


def _int_list(value: str, option: str) -> tuple[int, ...]:
    try:
        items = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        items = ()
    if not items or any(v < 1 for v in items):
        raise typer.BadParameter(f"expected comma-separated positive integers, got {value!r}", param_hint=option)
    return items


@app.command("bench")
@handle_errors
def bench_cmd(
    collection_dir: str = typer.Argument(..., help="Collection with caption shards (e.g. built from captions.csv)."),
    k: str = typer.Option("1,5,10", "--k", help="Recall@K cut-offs, comma-separated; the largest is the ANN depth."),
    nprobe: str = typer.Option("1,4,16,64,256", "--nprobe", help="IVF lists probed, comma-separated."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write all results to this JSON file."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write a recall-vs-QPS plot (needs matplotlib)."),
    latency_queries: int = typer.Option(1000, "--latency-queries", min=0, help="Single queries timed for p50/p99."),
    max_queries: Optional[int] = typer.Option(None, "--max-queries", min=1, help="Evaluate a seeded sample of queries."),
) -> None:
    """Recall@K / MRR / median rank both ways (exact), and ANN recall, QPS and latency per nprobe."""
    from .bench import BenchConfig, format_table, plot_results, run_benchmark
    from .fsutil import write_json

    config = BenchConfig(ks=_int_list(k, "--k"), nprobes=_int_list(nprobe, "--nprobe"),
                         latency_queries=latency_queries, max_queries=max_queries)
    with TqdmProgress("bench", unit="setting") as progress:
        result = run_benchmark(collection_dir, config, progress=progress)
    typer.echo(format_table(result))
    if out:
        write_json(out, result)
        typer.echo(f"results: {out}")
    if plot:
        typer.echo(f"plot: {plot_results(result, plot)}")


_THREADS_OPT = typer.Option(None, "--threads", min=1, help="torch threads of the encoding process.")
_DECODE_TIMEOUT_OPT = typer.Option(30.0, "--decode-timeout", min=0.0, help="Seconds per image before it is refused (0: none).")
_SOURCE_TYPE_OPT = typer.Option("auto", "--source-type", help="auto, folder, manifest or webdataset.")
_IMAGE_COLUMN_OPT = typer.Option(None, "--image-column", help="Manifest column of image paths.")
_CAPTION_COLUMN_OPT = typer.Option(None, "--caption-column", help="Manifest column of captions.")


@app.command("embed")
@handle_errors
def embed_cmd(
    source: str = _SOURCE_ARG,
    collection_dir: str = _COLLECTION_OUT_ARG,
    model: Optional[str] = _MODEL_OPT,
    pretrained: Optional[str] = _PRETRAINED_OPT,
    batch_size: int = _BATCH_OPT,
    workers: int = _WORKERS_OPT,
    device: str = _DEVICE_OPT,
    precision: str = _PRECISION_OPT,
    shard_size: int = _SHARD_OPT,
    threads: Optional[int] = _THREADS_OPT,
    decode_timeout: float = _DECODE_TIMEOUT_OPT,
    source_type: str = _SOURCE_TYPE_OPT,
    image_column: Optional[str] = _IMAGE_COLUMN_OPT,
    caption_column: Optional[str] = _CAPTION_COLUMN_OPT,
) -> None:
    """Encode an image source into a resumable collection of Parquet shards (rerun to resume)."""
    _embed_and_report(source, collection_dir, locals())


def _embed_and_report(source: str, collection_dir: str, options: dict[str, Any]) -> None:
    """Run ``indexing.embed`` with a tqdm bar and print the counts (shared by ``embed`` and ``index``).

    ``options``: the command's embedding options by parameter name (model ... caption_column)."""
    import time

    from indexing.embed import EmbedConfig, embed
    from indexing.sources import open_source

    from .models import DEFAULT_MODEL

    config = EmbedConfig(model=options["model"] or DEFAULT_MODEL, pretrained=options["pretrained"],
                         batch_size=options["batch_size"], workers=options["workers"], device=options["device"],
                         precision=options["precision"],
                         shard_size=options["shard_size"], threads=options["threads"],
                         decode_timeout=options["decode_timeout"] or None)
    src = open_source(source, kind=options["source_type"], image_column=options["image_column"],
                      caption_column=options["caption_column"])
    start = time.perf_counter()
    with TqdmProgress("embed", unit="img") as bar:
        coll = embed(src, collection_dir, config, progress=bar)
    c = coll.manifest.counts
    typer.echo(f"{c.get('images', 0)} images, {c.get('captions', 0)} captions, {c.get('failures', 0)} failures "
               f"in {time.perf_counter() - start:.1f} s -> {coll.path}")


def _build_and_report(collection_dir: str, index_type: str, max_memory: str, nprobe_default: Optional[int],
                      train_size: Optional[int], seed: int) -> None:
    from indexing.build import build_index

    with TqdmProgress("build-index", unit="vec") as bar:
        entry = build_index(collection_dir, index_type=index_type, max_memory=max_memory, metric="ip",
                            nprobe_default=nprobe_default, train_size=train_size, seed=seed, progress=bar)
    typer.echo(f"{entry['factory']}: {entry['ntotal']} vectors, {entry['bytes_per_vector']} B/vector, "
               f"nprobe={entry['nprobe_default']} (recall@10 {entry['recall_at_10']:.3f} on held-out vectors), "
               f"{entry['build_seconds']:.1f} s, peak RSS {entry['peak_rss_mb']:.0f} MB")
    for reason in entry["reasons"]:
        typer.echo(f"  - {reason}")


_INDEX_TYPE_HELP = "'auto' or a FAISS factory string, e.g. 'IVF4096,PQ32x4fs,Refine(SQ8)' or 'Flat'."

_INDEX_TYPE_OPT = typer.Option("auto", "--index-type", "-t", help=_INDEX_TYPE_HELP)
_MAX_MEMORY_OPT = typer.Option("4GB", "--max-memory", help="Memory budget of the index and the build (e.g. 4GB).")
_NPROBE_DEFAULT_OPT = typer.Option(None, "--nprobe-default", min=1, help="Fix nprobe instead of tuning it.")
_TRAIN_SIZE_OPT = typer.Option(None, "--train-size", min=1, help="Training sample size (default: auto).")
_INDEX_SEED_OPT = typer.Option(0, "--seed", help="Seed of the training sample and k-means (reproducible builds).")

@app.command("build-index")
@handle_errors
def build_index_cmd(
    collection_dir: str = typer.Argument(..., help="Collection directory (from `vlsearch embed`)."),
    index_type: str = _INDEX_TYPE_OPT,
    max_memory: str = _MAX_MEMORY_OPT,
    nprobe_default: Optional[int] = _NPROBE_DEFAULT_OPT,
    train_size: Optional[int] = _TRAIN_SIZE_OPT,
    seed: int = _INDEX_SEED_OPT,
) -> None:
    """Build (or rebuild, atomically) the FAISS index of a collection and record it in its manifest."""
    _build_and_report(collection_dir, index_type, max_memory, nprobe_default, train_size, seed)


@app.command("index")
@handle_errors
def index_cmd(
    source: str = _SOURCE_ARG,
    collection_dir: str = _COLLECTION_OUT_ARG,
    model: Optional[str] = _MODEL_OPT,
    pretrained: Optional[str] = _PRETRAINED_OPT,
    batch_size: int = _BATCH_OPT,
    workers: int = _WORKERS_OPT,
    device: str = _DEVICE_OPT,
    precision: str = _PRECISION_OPT,
    shard_size: int = _SHARD_OPT,
    threads: Optional[int] = _THREADS_OPT,
    decode_timeout: float = _DECODE_TIMEOUT_OPT,
    source_type: str = _SOURCE_TYPE_OPT,
    image_column: Optional[str] = _IMAGE_COLUMN_OPT,
    caption_column: Optional[str] = _CAPTION_COLUMN_OPT,
    index_type: str = _INDEX_TYPE_OPT,
    max_memory: str = _MAX_MEMORY_OPT,
    nprobe_default: Optional[int] = _NPROBE_DEFAULT_OPT,
    train_size: Optional[int] = _TRAIN_SIZE_OPT,
    seed: int = _INDEX_SEED_OPT,
) -> None:
    """Embed a source into a collection, then build its index (`embed` + `build-index`; resumable)."""
    _embed_and_report(source, collection_dir, locals())
    _build_and_report(collection_dir, index_type, max_memory, nprobe_default, train_size, seed)


@app.command("train")
@handle_errors
def train_cmd(
    data: str = typer.Argument(..., help="CSV/Parquet manifest (columns image, caption) or a folder with captions.csv."),
    out_dir: str = typer.Argument(..., help="Output folder: last.pt (resumable), model.pt (final), train.json."),
    model: str = typer.Option("vlsearch-tiny", "--model", "-m", help="open_clip architecture to train."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", "-p", help="Start from these weights (tag or file)."),
    epochs: int = typer.Option(10, "--epochs", min=1),
    batch_size: int = typer.Option(128, "--batch-size", "-b", min=2),
    lr: float = typer.Option(5e-4, "--lr"),
    weight_decay: float = typer.Option(0.2, "--weight-decay", min=0.0),
    warmup_steps: int = typer.Option(100, "--warmup-steps", min=0),
    grad_clip: float = typer.Option(1.0, "--grad-clip", min=0.0, help="Max gradient norm (0: no clipping)."),
    lock_text: bool = typer.Option(False, "--lock-text", help="Freeze the text tower (LiT)."),
    unlocked_layers: int = typer.Option(0, "--unlocked-text-layers", min=0, help="With --lock-text: train its last N blocks."),
    lock_image: bool = typer.Option(False, "--lock-image", help="Freeze the image tower."),
    precompute_text: Optional[bool] = typer.Option(None, "--precompute-text/--no-precompute-text",
                                                   help="Cache locked-text features once (default: when fully locked)."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random resized crop + colour jitter."),
    crop_scale: float = typer.Option(0.8, "--crop-scale", min=0.05, max=1.0, help="Smallest crop area fraction."),
    hflip: float = typer.Option(0.0, "--hflip", min=0.0, max=1.0,
                               help="Horizontal flip probability (never for a caption that says left/right)."),
    color_jitter: float = typer.Option(0.3, "--color-jitter", min=0.0, help="Brightness/contrast jitter strength."),
    val_fraction: float = typer.Option(0.05, "--val-fraction", min=0.0, max=0.99, help="Images held out for validation."),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", min=0, help="Steps between last.pt saves."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1),
    seed: int = typer.Option(0, "--seed"),
    device: str = _DEVICE_OPT,
    precision: str = typer.Option("auto", help="auto, fp32, fp16 or bf16."),
    workers: int = typer.Option(2, "--workers", "-w", min=0, help="Image decoding processes."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
    captions_per_image: int = typer.Option(1, "--captions-per-image", min=1,
                                           help="Captions of each image per step (loss averaged over them)."),
    cache_images: bool = typer.Option(False, "--cache-images",
                                      help="Decode all images into memory once and augment batches as tensors (fast on CPU)."),
    half: bool = typer.Option(False, "--half", help="Save model.pt in fp16."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT_DIR from last.pt."),
) -> None:
    """Train a CLIP model contrastively on image-caption pairs (symmetric InfoNCE)."""
    from .train import AugmentConfig, TrainConfig, train

    aug = AugmentConfig(scale=(crop_scale, 1.0), hflip=hflip, brightness=color_jitter, contrast=color_jitter) if augment else None
    try:
        config = TrainConfig(model=model, pretrained=pretrained, epochs=epochs, batch_size=batch_size, lr=lr,
                             weight_decay=weight_decay, warmup_steps=warmup_steps, grad_clip=grad_clip or None,
                             lock_text=lock_text, lock_text_unlocked_layers=unlocked_layers, lock_image=lock_image,
                             precompute_text=precompute_text, augment=aug, val_fraction=val_fraction,
                             checkpoint_every=checkpoint_every, max_steps=max_steps, seed=seed, device=device,
                             precision=precision, workers=workers, threads=threads, cache_images=cache_images,
                             captions_per_image=captions_per_image,
                             half_final=half)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    with TqdmProgress("train", unit="step") as bar:
        result = train(data, out_dir, config, resume=resume, progress=bar)
    for v in result.val:
        t2i, i2t = v["t2i"], v["i2t"]
        typer.echo(f"epoch {v['epoch']:3d}  val T->I R@1/5/10 {t2i['R@1']:.3f}/{t2i['R@5']:.3f}/{t2i['R@10']:.3f}"
                   f"  I->T R@1/5/10 {i2t['R@1']:.3f}/{i2t['R@5']:.3f}/{i2t['R@10']:.3f}")
    typer.echo(f"{result.steps} steps in {result.seconds:.1f} s ({result.steps_per_second:.2f} steps/s), "
               f"final loss {result.losses[-1]:.4f} -> {result.checkpoint}")


@app.command("classify")
@handle_errors
def classify_cmd(
    images: str = typer.Argument(..., help="Image, image folder, folder of class sub-folders, or collection."),
    classes: Optional[str] = typer.Option(None, "--classes", "-c", help="Comma-separated class names "
                                          "(default: the sub-folder names)."),
    templates: list[str] = typer.Option([], "--templates", "-t", help="Prompt with one {} (repeatable), or a "
                                        "file with one per line (default: 'a photo of a {}.' and 5 more)."),
    model: Optional[str] = _MODEL_OPT,
    pretrained: Optional[str] = _PRETRAINED_OPT,
    device: str = _DEVICE_OPT,
    precision: str = _PRECISION_OPT,
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1),
) -> None:
    """Zero-shot classify images by their nearest class prompt; prints accuracy when labels are known."""
    from pathlib import Path

    from .models import DEFAULT_MODEL, load_model
    from .zeroshot import DEFAULT_TEMPLATES, zero_shot_classify

    if len(templates) == 1 and Path(templates[0]).is_file():
        templates = [t for t in Path(templates[0]).read_text(encoding="utf-8").splitlines() if t.strip()]
    templates = list(templates) or list(DEFAULT_TEMPLATES)
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    enc = load_model(model or DEFAULT_MODEL, pretrained, device=device, precision=precision)
    try:
        with TqdmProgress("classify", unit="img") as bar:
            result = zero_shot_classify(enc, images, names, templates, batch_size=batch_size, progress=bar)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    failed = f" ({len(result.failures)} unreadable, skipped)" if result.failures else ""
    if result.top1 is None:
        for path, pred, scores in zip(result.paths, result.predictions, result.scores):
            typer.echo(f"{path}\t{result.classnames[pred]}\t{scores[pred]:.4f}")
        typer.echo(f"{len(result.paths)} images{failed}", err=True)
        return
    typer.echo(f"{len(result.paths)} images{failed}, {len(result.classnames)} classes, "
               f"{len(templates)} templates, model {enc.name}")
    typer.echo(f"top-1 {result.top1:.3f}  top-{result.topk.shape[1]} {result.top5:.3f}  "
               f"(chance top-1 {1 / len(result.classnames):.3f})")
    for name, acc in result.per_class_accuracy().items():
        typer.echo(f"  {name:20} {acc:.3f}")


@app.command("search")
@handle_errors
def search_cmd(
    collection_dir: str = typer.Argument(..., help="Collection directory."),
    query: Optional[str] = typer.Argument(None, help="Query text (or give --image)."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Number of results."),
    image: Optional[str] = typer.Option(None, "--image", "-i", help="Search by this image file instead of text."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, help="IVF lists to probe (default: the index's)."),
    k_factor: Optional[float] = typer.Option(None, "--k-factor", min=1.0, help="Refine stage: re-rank k*F candidates."),
    exact: bool = typer.Option(False, "--exact", help="Exact brute-force search over the shards (no index needed)."),
    mmap: bool = typer.Option(False, "--mmap", help="Memory-map the index instead of reading it into RAM."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per hit."),
    device: str = _DEVICE_OPT,
    precision: str = _PRECISION_OPT,
) -> None:
    """Search a collection by text or by example image; print a table or JSON lines."""
    from .search import Searcher, format_hits, hits_to_json_lines

    if (query is None) == (image is None):
        raise typer.BadParameter("give either a query text or --image PATH (exactly one)")
    searcher = Searcher.open(collection_dir, mmap=mmap, device=device, precision=precision)
    options = dict(k=k, nprobe=nprobe, exact=exact, k_factor=k_factor)
    hits = searcher.search_image(image, **options) if image else searcher.search_text(query, **options)
    typer.echo(hits_to_json_lines(hits) if as_json else format_hits(hits))


class _StageBars:
    """Progress of a multi-stage library call (``progress(done, total, stage=...)``): one bar per stage."""

    def __init__(self) -> None:
        self.stage: Optional[str] = None
        self.bar: Optional[TqdmProgress] = None

    def __call__(self, done: int, total: Optional[int] = None, stage: str = "", **postfix: Any) -> None:
        if stage != self.stage:
            self.close()
            self.stage, self.bar = stage, TqdmProgress(stage)
        self.bar(done, total, **postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__()
            self.bar = None


@app.command("demo")
@handle_errors
def demo_cmd(
    out: str = typer.Option("vlsearch-demo", "--out", "-o", help="Output folder (new, empty, or an earlier demo's)."),
    size: Optional[int] = typer.Option(None, "--size", "-n", min=8, help="Generated training pictures [default: 2000]."),
    data: Optional[str] = typer.Option(None, "--data", help="Index this captioned folder or CSV/Parquet manifest "
                                       "with vlsearch-small instead of generating and training."),
    heldout: Optional[int] = typer.Option(None, "--heldout", min=16,
                                          help="Generated held-out pictures, indexed and benchmarked [default: 500]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, training and index."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Training epochs (default: the demo's)."),
    precision: str = _PRECISION_OPT,
) -> None:
    """Generate a captioned dataset, train a tiny CLIP, index, search and benchmark it: offline, on CPU."""
    from dataclasses import replace

    from .demo import DemoConfig, format_report, run_demo

    changes = {"heldout": heldout, "epochs": epochs, "precision": precision}
    config = replace(DemoConfig(), **{k: v for k, v in changes.items() if v is not None})
    bars = _StageBars()
    try:
        report = run_demo(out, size=size, seed=seed, data=data, progress=bars, config=config)
    finally:
        bars.close()
    typer.echo(format_report(report))


if __name__ == "__main__":  # pragma: no cover
    app()
