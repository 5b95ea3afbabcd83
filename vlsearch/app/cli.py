"""The ``vlsearch`` command line: thin typer commands over the Python API.

This module is the only place that prints or exits. Library errors (``VlsearchError``) become a
one-line message on stderr and exit code 1; progress callbacks become tqdm bars. Heavy imports
(torch, open_clip, faiss) happen inside commands so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer

from vlsearch.app.options import (
    BENCH,
    BUILD,
    COLLECTION_OUT_ARG,
    DEVICE_OPT,
    DUPLICATES,
    PRECISION_OPT,
    EMBED,
    ENGINE,
    MODEL,
    PARTS,
    PROMPTS,
    QUERY,
    RERANK_TRAIN,
    SERVE,
    SOURCE_ARG,
    COLLECTION_ARG,
    TRAIN,
    WAIT_OPT,
    WATCH,
    BenchOptions,
    BuildOptions,
    DuplicatesOptions,
    EmbedOptions,
    EngineOptions,
    ModelOptions,
    PartsOptions,
    PromptOptions,
    QueryOptions,
    RerankTrainOptions,
    ServeOptions,
    WatchOptions,
    with_groups,
)
from vlsearch.core import allocator
from vlsearch.core.errors import VlsearchError
from vlsearch.core.fsutil import write_json
from vlsearch.core.threads import set_process_threads
from vlsearch.store.layout import MANIFEST
from vlsearch.store.lock import lock_wait

app = typer.Typer(
    name="vlsearch",
    help="Image-text retrieval: embed image galleries, build FAISS indexes, search by text or image, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn vlsearch's typed exceptions into a clear message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
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
    allocator.enable_huge_pages()  # the CLI process opts in before torch's first allocation
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
    from vlsearch.models import factory as models

    if name:
        models.check_model_name(name)
        typer.echo("\n".join(models.pretrained_tags(name)) or f"{name}: no published tags (random init or a local file)")
        return
    for model_name in models.available_models():
        line = model_name
        if tags:
            line += "\t" + ",".join(models.pretrained_tags(model_name))
        typer.echo(line)


@app.command("info")
@handle_errors
def info_cmd(collection_dir: Optional[str] = typer.Argument(None, help="Also describe this collection's index."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Print versions, the compute device and how many GPUs FAISS sees (and a collection's index)."""
    info = system_info()
    if collection_dir is not None:
        info["index"] = _index_info(collection_dir)
    if as_json:
        typer.echo(json.dumps(info))
    else:
        for key, value in info.items():
            typer.echo(f"{key:15} {value}" if key != "index" else "index\n" + "\n".join(f"  {v}" for v in value))


def _index_info(collection_dir: str) -> list[str]:
    """Plain lines on a collection's index: plan, tuned defaults, and whether the recall target is met."""
    from indexing.build import index_summary
    from vlsearch.store.collection import Collection

    entry = Collection.open(collection_dir).manifest.index
    return index_summary(entry) if entry else [f"no index: run `vlsearch build-index {collection_dir}`"]


def system_info() -> dict[str, Any]:
    """Versions of vlsearch and its engines, the compute device, torch threads, FAISS GPUs and the
    default number of decode workers."""
    import faiss
    import open_clip
    import torch

    from indexing.decode import default_workers
    from vlsearch import __version__
    from vlsearch.models.factory import resolve_device
    from vlsearch.models.precision import describe_auto

    device = resolve_device("auto")
    return {
        "vlsearch": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "faiss": faiss.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "decode_workers": default_workers(device.type),  # what embed/index start without --workers
        "encoding_malloc": "reuse freed memory (glibc)" if allocator.enabled() else "system",
        **describe_auto(device),
    }


@app.command("encode")
@handle_errors
@with_groups(MODEL)
def encode_cmd(
    texts: list[str] = typer.Argument(None, help="Texts to encode."),
    image: list[str] = typer.Option([], "--image", "-i", help="Image file to encode (repeatable)."),
    model_options: ModelOptions = None,
) -> None:
    """Encode texts and/or images and print one JSON line per input (its embedding)."""
    if not texts and not image:
        raise typer.BadParameter("give at least one text or --image")
    enc = model_options.load()
    rows = []
    if texts:
        rows += [("text", t, v) for t, v in zip(texts, enc.encode_texts(texts))]
    if image:
        rows += [("image", p, v) for p, v in zip(image, enc.encode_images(image))]
    for kind, value, vec in rows:
        typer.echo(json.dumps({kind: value, "model": enc.name, "dim": enc.dim, "embedding": [round(float(x), 6) for x in vec]}))


@app.command("bench")
@handle_errors
@with_groups(BENCH)
def bench_cmd(
    collection_dir: str = typer.Argument(..., help="Collection with caption shards (e.g. built from captions.csv)."),
    bench: BenchOptions = None,
) -> None:
    """Recall@K / MRR / median rank both ways (exact), and ANN recall, QPS and latency per nprobe."""
    from vlsearch.eval.bench import format_table, plot_results, run_benchmark

    config = bench.config()
    with TqdmProgress("bench", unit="setting") as progress:
        result = run_benchmark(collection_dir, config, progress=progress)
    typer.echo(format_table(result))
    if bench.out:
        write_json(bench.out, result)
        typer.echo(f"results: {bench.out}")
    if bench.plot:
        typer.echo(f"plot: {plot_results(result, bench.plot)}")


RERANK_FEATURES_OPT = typer.Option(
    False, "--rerank-features", help="Also store the shipped re-ranker's candidate features (rerank/, "
    "fp16, 25.1 KB per image for vlsearch-small) so `search --rerank K` need not decode images.")


@app.command("embed")
@handle_errors
@with_groups(EMBED, ENGINE)
def embed_cmd(source: str = SOURCE_ARG, collection_dir: str = COLLECTION_OUT_ARG,
              rerank_features: bool = RERANK_FEATURES_OPT, wait: float = WAIT_OPT, embed: EmbedOptions = None,
              engine: EngineOptions = None) -> None:
    """Encode an image source into a collection of Parquet shards (rerun: resume, or sync when finished)."""
    with lock_wait(wait):
        _embed_and_report(source, collection_dir, embed, engine)
        if rerank_features and not embed.dry_run:
            _store_rerank_features(collection_dir, None, "auto")


@app.command("build-index")
@handle_errors
@with_groups(BUILD, ENGINE, PARTS)
def build_index_cmd(collection_dir: str = COLLECTION_ARG, wait: float = WAIT_OPT, build: BuildOptions = None,
                    engine: EngineOptions = None, parts: PartsOptions = None) -> None:
    """Build (or rebuild, atomically) the FAISS index of a collection and record it in its manifest."""
    with lock_wait(wait):
        _build_and_report(collection_dir, build, engine, parts)


REFRESH_METADATA_OPT = typer.Option(
    False, "--refresh-metadata", help="Only re-read the photo metadata columns (taken_at, camera, lens, GPS, "
    "orientation, folder) of every row from its file's EXIF, as one new version: no sync, no re-encoding "
    "(for a collection embedded before these columns existed).")


@app.command("index")
@handle_errors
@with_groups(EMBED, BUILD, ENGINE, PARTS)
def index_cmd(source: str = SOURCE_ARG, collection_dir: str = COLLECTION_OUT_ARG,
              rerank_features: bool = RERANK_FEATURES_OPT, wait: float = WAIT_OPT, embed: EmbedOptions = None,
              build: BuildOptions = None, engine: EngineOptions = None, parts: PartsOptions = None,
              refresh_metadata: bool = REFRESH_METADATA_OPT) -> None:
    """Embed a source into a collection and build its index (resumable); rerun on a finished
    collection to sync it with its source — the index follows without a rebuild."""
    from vlsearch.store.collection import Collection

    if refresh_metadata:
        with lock_wait(wait):
            _refresh_and_report(source, collection_dir, embed)
        return
    with lock_wait(wait):
        synced = _embed_and_report(source, collection_dir, embed, engine)
        if not embed.dry_run and not (synced and Collection.open(collection_dir).has_index()):
            _build_and_report(collection_dir, build, engine, parts)
        if rerank_features and not embed.dry_run:
            _store_rerank_features(collection_dir, None, "auto")


@app.command("compact")
@handle_errors
def compact_cmd(collection_dir: str = COLLECTION_ARG, wait: float = WAIT_OPT) -> None:
    """Rewrite the shards holding deleted rows without them and drop dead entries from the index."""
    from vlsearch.store.collection import Collection

    with lock_wait(wait):
        result = Collection.open(collection_dir).compact()
    typer.echo(f"{result['rows_dropped']} dead rows dropped from {result['shards_rewritten']} shards -> "
               f"{collection_dir} version {result['version']}")


@app.command("duplicates")
@handle_errors
@with_groups(DUPLICATES)
def duplicates_cmd(collection_dir: str = COLLECTION_ARG, dups: DuplicatesOptions = None, wait: float = WAIT_OPT,
                   write_columns: bool = typer.Option(False, "--write-columns", help="Write dup_group / dup_keeper "
                                                      "columns as a new version (where=\"dup_keeper\" hides copies).")) -> None:
    """Find groups of duplicate images (same file content, or embeddings with cosine >= T); the first
    of each group is the suggested keeper (largest, then oldest). Writes nothing unless --write-columns."""
    from indexing.duplicates import write_duplicate_columns

    with _StageBars() as bars:
        report = dups.find(collection_dir, bars)
    typer.echo(dups.format(report.groups))
    typer.echo(report.summary(), err=dups.machine_readable)
    if write_columns:
        with lock_wait(wait):
            version = write_duplicate_columns(collection_dir, report.groups)["version"]
        typer.echo(f"dup_group / dup_keeper written -> {collection_dir} version {version}", err=dups.machine_readable)


@app.command("keyword-index")
@handle_errors
def keyword_index_cmd(collection_dir: str = COLLECTION_ARG, wait: float = WAIT_OPT,
                      rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild every shard's keyword index."),
                      columns: Optional[str] = typer.Option(None, "--columns", help="Comma-separated metadata "
                                                            "columns to index from now on ('all': every text "
                                                            "column, the default; '': none); rebuilds every shard.")) -> None:
    """Build the keyword (BM25) index of shards written before keyword search existed (new embeds and
    syncs write it themselves)."""
    from vlsearch.store.collection import Collection

    chosen = {} if columns is None else {"columns": None if columns == "all" else
                                         [c.strip() for c in columns.split(",") if c.strip()]}
    with lock_wait(wait):
        result = Collection.open(collection_dir).build_keyword_index(rebuild=rebuild, **chosen)
    typer.echo(f"keyword index built for {result['shards_built']} of {result['shards']} shards of {collection_dir}")


def _embed_and_report(source: str, collection_dir: str, options: EmbedOptions, engine: EngineOptions) -> bool:
    """Run ``indexing.embed`` (its Ray engine, or ``indexing.sync`` on a finished collection) with a
    tqdm bar and print the counts (shared by ``embed`` and ``index``). Returns whether it synced."""
    from indexing.embed import embed
    from vlsearch.store.collection import Collection

    src = options.open_source(source)
    ray_config = engine.ray_config()
    path = Path(collection_dir)
    if (path / MANIFEST).is_file() and Collection.open(path).manifest.complete:  # synced here, whatever the engine
        _sync_and_report(src, path, options.config(), options.dry_run)
        return True
    if options.dry_run:
        raise typer.BadParameter("--dry-run needs a finished collection to compare with")
    start = time.perf_counter()
    with TqdmProgress("embed", unit="img") as bar:
        if ray_config is None:
            coll = embed(src, collection_dir, options.config(), progress=bar)
        else:
            from indexing.ray_engine import embed_ray

            coll = embed_ray(src, collection_dir, options.config(), ray_config, progress=bar)
    c = coll.manifest.counts
    failed = [(r["path"], r["kind"], r["message"]) for r in coll.failures().to_pylist()]
    typer.echo(f"{c.get('images', 0)} images, {c.get('captions', 0)} captions, {c.get('failures', 0)} failures"
               f"{_failure_kinds(failed)} in {time.perf_counter() - start:.1f} s -> {coll.path}")
    _echo_failures(failed)
    return False


#: Failed files named one per line after a summary (all of them are in the collection's failures table).
SHOWN_FAILURES = 10


def _failure_kinds(failed: Sequence[tuple[str, str, str]]) -> str:
    """`` (2 raw, 1 missing-decoder)``: the failures counted by kind, most frequent first ("" for none)."""
    from collections import Counter

    counts = Counter(kind for _, kind, _ in failed).most_common()
    return f" ({', '.join(f'{n} {kind}' for kind, n in counts)})" if counts else ""


def _echo_failures(failed: Sequence[tuple[str, str, str]]) -> None:
    """One line per failed file, with its reason and fix, the first :data:`SHOWN_FAILURES` of them."""
    for path, kind, message in failed[:SHOWN_FAILURES]:
        typer.echo(f"  not indexed: {path}: {kind}: {message}")
    if len(failed) > SHOWN_FAILURES:
        typer.echo(f"  ... and {len(failed) - SHOWN_FAILURES} more in the collection's failures table")


def _refresh_and_report(source: str, collection_dir: str, options: EmbedOptions) -> None:
    from indexing.photos import refresh_metadata

    with TqdmProgress("refresh-metadata", unit="img") as bar:
        result = refresh_metadata(options.open_source(source), collection_dir, options.config(), progress=bar)
    typer.echo(f"photo metadata of {result['rows_updated']} rows re-read ({result['files_unread']} files "
               f"unreadable or gone, kept as they were) -> {collection_dir} version {result['version']}")


def _sync_and_report(src: Any, path: Path, config: Any, dry_run: bool) -> None:
    from indexing.sync import sync

    with TqdmProgress("sync", unit="img") as bar:
        report = sync(src, path, config, dry_run=dry_run, progress=bar)
    if dry_run:
        for sign, paths in (("+", report.new), ("~", report.changed), ("-", report.deleted)):
            for p in paths:
                typer.echo(f"{sign} {p}")
        typer.echo(f"{report.summary()} (dry run: nothing written)")
        return
    typer.echo(f"{report.summary()}; {report.reused} vectors reused, {report.encoded} encoded, "
               f"{report.failures} failures{_failure_kinds(report.failed)} in {report.seconds:.1f} s -> {path} "
               f"version {report.version}")
    _echo_failures(report.failed)
    for advice in report.advice:
        typer.echo(f"note: {advice}")


def _build_and_report(collection_dir: str, options: BuildOptions, engine: EngineOptions,
                      parts: PartsOptions) -> None:
    """Run ``indexing.build`` (or its Ray engine) with a tqdm bar and print the index entry."""
    from indexing.build import build_index, index_summary

    ray_config = engine.ray_config()
    if ray_config is None and (parts.on_disk or parts.parts):
        raise typer.BadParameter("--on-disk and --parts need --engine ray")
    with TqdmProgress("build-index", unit="vec") as bar:
        if ray_config is None:
            entry = build_index(collection_dir, progress=bar, **options.kwargs())
        else:
            from indexing.ray_engine import build_index_ray

            entry = build_index_ray(collection_dir, progress=bar, ray_config=ray_config, parts=parts.parts,
                                    on_disk=parts.on_disk, **options.kwargs())
    for line in index_summary(entry):
        typer.echo(line)
    if entry.get("engine") == "ray":
        typer.echo(f"  ray: {entry['parts']} parts merged {'through a file' if entry.get('merge') == 'ondisk' else 'in RAM'}"
                   f", inverted lists {'on disk' if entry['layout'] == 'ondisk' else 'in RAM'}"
                   + (f" ({entry['ivfdata']})" if entry.get("ivfdata") else ""))
    for reason in entry["reasons"]:
        typer.echo(f"  - {reason}")


@app.command("watch")
@handle_errors
@with_groups(WATCH)
def watch_cmd(source: str = typer.Argument(..., help="Image folder (or .csv/.tsv/.parquet manifest) to follow."),
              collection_dir: str = COLLECTION_OUT_ARG, watch: WatchOptions = None) -> None:
    """Keep a collection in step with a folder: sync on every change (the collection is created on the
    first sync if missing); one line per sync that changed something. Ctrl-C stops."""
    from indexing.watch import FolderWatcher

    watcher = FolderWatcher(source, collection_dir, watch.config(), watch.embed_config())
    typer.echo(f"watching {source} -> {collection_dir} (Ctrl-C stops)")
    running = watcher.start(on_sync=_echo_watch_sync, on_error=_echo_watch_error)
    try:
        running.wait()
    except KeyboardInterrupt:
        running.stop()  # the sync in progress finishes first; a second Ctrl-C exits at once (130)
        typer.echo("stopped")


def _echo_watch_sync(report: Any, prefix: str = "") -> None:
    """``HH:MM:SS +N new, ~N changed, -N deleted -> version V`` for a sync that changed something."""
    if not report.has_changes:
        return
    extra = "".join(f", {n} {what}" for n, what in ((report.failures, "failures"),
                                                      (len(report.deferred), "deferred (still being written)")) if n)
    typer.echo(f"{time.strftime('%H:%M:%S')} {prefix}{report.changes()} -> version {report.version}{extra}")


def _echo_watch_error(exc: Exception, prefix: str = "") -> None:
    what = str(exc) if isinstance(exc, VlsearchError) else f"{type(exc).__name__}: {exc}"
    typer.secho(f"{time.strftime('%H:%M:%S')} {prefix}sync failed (retried at the next change): {what}", err=True,
                fg=typer.colors.RED)


@app.command("train")
@handle_errors
@with_groups(TRAIN)
def train_cmd(
    data: str = typer.Argument(..., help="CSV/Parquet manifest (columns image, caption) or a folder with captions.csv."),
    out_dir: str = typer.Argument(..., help="Output folder: last.pt (resumable), model.pt (final), train.json, "
                                            "train_config.json (the resolved config)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="TOML (or a run's train_config.json) of "
                                         "TrainConfig settings; the flags below override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT_DIR from last.pt."),
    overrides: Any = None,
) -> None:
    """Train a CLIP model contrastively on image-caption pairs (symmetric InfoNCE)."""
    from vlsearch.train.loop import train
    from vlsearch.train.config import load_train_config

    settings = load_train_config(config, overrides)
    with TqdmProgress("train", unit="step") as bar:
        result = train(data, out_dir, settings, resume=resume, progress=bar)
    typer.echo(format_train_result(result))


def format_train_result(result: Any) -> str:
    """Validation recalls per epoch, then steps, speed, final loss and the checkpoint."""
    lines = []
    for v in result.val:
        t2i, i2t = v["t2i"], v["i2t"]
        lines.append(f"epoch {v['epoch']:3d}  val T->I R@1/5/10 {t2i['R@1']:.3f}/{t2i['R@5']:.3f}/{t2i['R@10']:.3f}"
                     f"  I->T R@1/5/10 {i2t['R@1']:.3f}/{i2t['R@5']:.3f}/{i2t['R@10']:.3f}")
    lines.append(f"{result.steps} steps in {result.seconds:.1f} s ({result.steps_per_second:.2f} steps/s), "
                 f"final loss {result.losses[-1]:.4f} -> {result.checkpoint}")
    return "\n".join(lines)


@app.command("train-rerank")
@handle_errors
@with_groups(RERANK_TRAIN)
def train_rerank_cmd(
    data: str = typer.Argument(..., help="CSV/Parquet manifest (columns image, caption) or a folder with captions.csv."),
    out: str = typer.Option(..., "--out", "-o", help="Re-ranker file to write (fp16); its provenance goes beside "
                            "it as .json."),
    train: RerankTrainOptions = None,
) -> None:
    """Train a cross-attention (ITM) re-ranker on frozen tower features; tune its weights on validation."""
    from vlsearch.rerank.training import train_reranker

    if train.threads:
        set_process_threads(train.threads)
    config = train.config()
    encoder = train.encoder()
    with _StageBars() as bars:
        result = train_reranker(encoder, data, config, cache_dir=train.cache_dir, progress=bars)
    path = _save_reranker(result, out, data)
    typer.echo(format_rerank_result(result, path))


def _save_reranker(result: Any, out: str, data: str) -> Path:
    """Write a trained re-ranker to ``out`` and its provenance (this command line, the git commit,
    the machine) beside it as .json; returns the re-ranker's path."""
    from vlsearch.models.precision import describe_machine
    from vlsearch.rerank.training import provenance

    path = result.reranker.save(out)
    command = shlex.join(["vlsearch", *sys.argv[1:]])
    write_json(path.with_suffix(".json"), provenance(result, path, data, command, git_commit(), describe_machine()))
    return path


def format_rerank_result(result: Any, path: Path) -> str:
    """Validation recalls per ranking, then the tuned weights and the file written."""
    lines = [f"val {name:12s} R@1/5/10 {row['R@1']:.1f}/{row['R@5']:.1f}/{row['R@10']:.1f}  MRR {row['MRR']:.4f}"
             for name, row in result.metrics["val"].items()]
    rr = result.reranker
    lines.append(f"weight {rr.weight}, hub weight {rr.hub_weight} -> {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return "\n".join(lines)


@app.command("rerank-features")
@handle_errors
def rerank_features_cmd(
    collection_dir: str = COLLECTION_ARG,
    reranker: Optional[str] = typer.Option(None, "--reranker", help="Re-ranker file (default: the model's shipped one)."),
    device: str = DEVICE_OPT,
    wait: float = WAIT_OPT,
) -> None:
    """Store the re-ranker's candidate features in a collection (rerank/), for fast --rerank."""
    with lock_wait(wait):
        _store_rerank_features(collection_dir, reranker, device)


def _store_rerank_features(collection_dir: str, reranker: Optional[str], device: str) -> None:
    from vlsearch.store.collection import Collection
    from vlsearch.models.factory import load_model
    from vlsearch.rerank.model import load_reranker
    from vlsearch.rerank.features import store_rerank_features

    coll = Collection.open(collection_dir)
    rr = load_reranker(coll.model, reranker)
    encoder = load_model(coll.model.name, coll.model.pretrained, device=device)
    with TqdmProgress("rerank-features", unit="shard") as bar:
        info = store_rerank_features(coll, rr, encoder, progress=bar)
    typer.echo(f"re-rank features of {len(info['shards'])} shard(s) stored in {coll.path / 'rerank'} "
               f"({2 * rr.tokens * rr.width + (4 if rr.bank is not None else 0)} bytes per image)")


@app.command("tag")
@handle_errors
def tag_cmd(
    collection_dir: str = COLLECTION_ARG, wait: float = WAIT_OPT,
    vocabulary: Optional[str] = typer.Option(None, "--vocabulary", help="Tags file: one per line, 'tag: syn1, syn2' "
                                             "for synonyms, or JSON (default: the built-in everyday vocabulary)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Keep tags scoring at least this cosine "
                                              "(default: the model's calibrated thresholds, per tag)."),
    max_tags: int = typer.Option(5, "--max-tags", min=1, help="At most this many tags per photo."),
    only_new: bool = typer.Option(False, "--only-new", help="Tag only the photos never tagged (tags null)."),
) -> None:
    """Zero-shot tags from the stored image embeddings, as `tags` and `tag_scores` columns (a new version)."""
    from indexing.tagging import TagConfig, tag_collection

    with lock_wait(wait), TqdmProgress("tag", unit="shard") as bar:
        r = tag_collection(collection_dir, TagConfig(vocabulary, min_score, max_tags, only_new), progress=bar)
    top = ", ".join(f"{t} ({n})" for t, n in r.top.items()) or "-"
    typer.echo(f"{r.rows} photos tagged, {r.tagged} with a tag ({r.skipped} skipped), min score {r.min_score:.3f}"
               f"{' (calibrated per tag: the lowest)' if r.calibrated else ''}, "
               f"{r.vocabulary_size} tags ({r.vocabulary}); "
               + ("no new version" if r.version is None else f"version {r.version}") + f"; most frequent: {top}")


@app.command("caption")
@handle_errors
def caption_cmd(
    collection_dir: str = COLLECTION_ARG, wait: float = WAIT_OPT, device: str = DEVICE_OPT,
    model: str = typer.Option("coca_ViT-B-32", "--model", help="A CoCa architecture (open_clip name)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Its weights: an open_clip tag, "
                                             "hf-hub:org/repo or a checkpoint file."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per generation batch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Caption every photo, replacing existing captions."),
) -> None:
    """Fill empty captions with CoCa-generated ones (resumable; a new version, tagged caption_model)."""
    from indexing.captioning import CaptionConfig, caption_collection

    config = CaptionConfig(model=model, pretrained=pretrained, batch_size=batch_size, overwrite=overwrite, device=device)
    with lock_wait(wait), TqdmProgress("caption", unit="img") as bar:
        r = caption_collection(collection_dir, config, progress=bar)
    typer.echo(f"{r.generated + r.resumed} of {r.rows} photos captioned ({r.resumed} from an interrupted run, "
               f"{r.empty} empty, {len(r.failures)} unreadable); "
               + ("no new version" if r.version is None else f"version {r.version}"))
    for path, reason in r.failures[:10]:
        typer.echo(f"  unreadable: {path}: {reason}", err=True)


def git_commit(cwd: str | os.PathLike | None = None, paths: Sequence[str] = ()) -> Optional[str]:
    """HEAD of the git checkout at ``cwd`` (default: here), with ``+uncommitted-changes`` when any
    file (under ``paths``) differs from it; None outside a checkout. Provenance of trained weights."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=cwd, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+uncommitted-changes" if dirty else "")


@app.command("classify")
@handle_errors
@with_groups(PROMPTS, MODEL)
def classify_cmd(
    images: str = typer.Argument(..., help="Image, image folder, folder of class sub-folders, or collection."),
    prompts: PromptOptions = None,
    model_options: ModelOptions = None,
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1),
) -> None:
    """Zero-shot classify images by their nearest class prompt; prints accuracy when labels are known."""
    from vlsearch.eval.zeroshot import zero_shot_classify

    templates = prompts.prompts()
    names = prompts.names()
    enc = model_options.load()
    try:
        with TqdmProgress("classify", unit="img") as bar:
            result = zero_shot_classify(enc, images, names, templates, batch_size=batch_size, progress=bar)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    _echo_classification(result, len(templates), enc.name)


def _echo_classification(result: Any, n_templates: int, model: str) -> None:
    """Per image (no labels: path, class, score) or accuracy overall and per class (labels known)."""
    failed = f" ({len(result.failures)} unreadable, skipped)" if result.failures else ""
    if result.top1 is None:
        for path, pred, scores in zip(result.paths, result.predictions, result.scores):
            typer.echo(f"{path}\t{result.classnames[pred]}\t{scores[pred]:.4f}")
        typer.echo(f"{len(result.paths)} images{failed}", err=True)
        return
    typer.echo(f"{len(result.paths)} images{failed}, {len(result.classnames)} classes, "
               f"{n_templates} templates, model {model}")
    typer.echo(f"top-1 {result.top1:.3f}  top-{result.topk.shape[1]} {result.top5:.3f}  "
               f"(chance top-1 {1 / len(result.classnames):.3f})")
    for name, acc in result.per_class_accuracy().items():
        typer.echo(f"  {name:20} {acc:.3f}")


@app.command("search")
@handle_errors
@with_groups(QUERY)
def search_cmd(
    collection_dir: str = typer.Argument(..., help="Collection directory."),
    query: Optional[list[str]] = typer.Argument(
        None, help="Query text, or weighted terms rclip's way: \"2:golden retriever\" + ./pool.jpg - fruit "
        "(N: weighs a term, + and - separate terms, an existing file is an image, id:N a stored item)."),
    query_options: QueryOptions = None,
) -> None:
    """Search a collection by text, example image, weighted terms or example items; print a table or JSON lines."""
    from vlsearch.query.results import format_hits, hits_to_json_lines, json_default
    from vlsearch.query.shaping import format_facets

    hits = query_options.run(collection_dir, query)
    typer.echo(hits_to_json_lines(hits) if query_options.as_json else format_hits(hits))
    facets = getattr(hits, "facets", None)
    if facets:  # only when --facet was given: the JSON lines then end with one {"facets": ...} line
        typer.echo(json.dumps({"facets": {c: [{"value": v, "count": n} for v, n in counts.items()]
                                          for c, counts in facets.items()}}, default=json_default, ensure_ascii=False)
                   if query_options.as_json else format_facets(facets))


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

    def __enter__(self) -> "_StageBars":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@app.command("demo")
@handle_errors
def demo_cmd(
    out: str = typer.Option("vlsearch-demo", "--out", "-o", help="Output folder (new, empty, or an earlier demo's)."),
    size: Optional[int] = typer.Option(None, "--size", "-n", min=8, help="Generated training pictures [default: 600 for vlsearch-small, 2000 for vlsearch-tiny]."),
    data: Optional[str] = typer.Option(None, "--data", help="Index this captioned folder or CSV/Parquet manifest "
                                       "with vlsearch-small instead of generating and training."),
    heldout: Optional[int] = typer.Option(None, "--heldout", min=16,
                                          help="Generated held-out pictures, indexed and benchmarked [default: 500]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, training and index."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Training epochs (default: the demo's)."),
    precision: str = PRECISION_OPT,
) -> None:
    """Generate captioned shapes, fit vlsearch-small's head to them (LiT), index, search and benchmark: offline, on CPU."""
    from vlsearch.app.demo import DemoConfig, format_report, run_demo

    changes = {"heldout": heldout, "epochs": epochs, "precision": precision}
    config = replace(DemoConfig(), **{k: v for k, v in changes.items() if v is not None})
    with _StageBars() as bars:
        report = run_demo(out, size=size, seed=seed, data=data, progress=bars, config=config)
    typer.echo(format_report(report))


@app.command("serve")
@handle_errors
@with_groups(SERVE)
def serve_cmd(
    collections: list[str] = typer.Argument(..., help="Collection directories (named by folder), or NAME=DIR."),
    server: ServeOptions = None,
) -> None:
    """Serve collections over HTTP: a JSON API (docs at /docs), a search page at /, metrics at /metrics."""
    try:
        from vlsearch.app.serve import serve
        from vlsearch.app.serve.service import parse_specs
    except ImportError as exc:
        raise typer.BadParameter(f"{exc.name} is missing: install the server with pip install 'vlsearch[serve]'")

    config = server.config()
    specs = parse_specs(collections)
    serve(specs, config, on_ready=lambda app, c: typer.echo(
        f"serving {', '.join(specs)} on http://{c.host}:{c.port}/ (API docs at /docs)", err=True),
        on_watch=_echo_served_watch)


def _echo_served_watch(name: str, outcome: Any) -> None:
    """A sync round of ``serve --watch``, as ``vlsearch watch`` prints it, prefixed by the collection."""
    if isinstance(outcome, Exception):
        _echo_watch_error(outcome, prefix=f"{name}: ")
    else:
        _echo_watch_sync(outcome, prefix=f"{name}: ")


import_app = typer.Typer(help="Import folders of already computed vectors (clip-retrieval, npy + parquet) "
                         "as collections, without re-encoding; rerun on a grown folder to add its new rows.",
                         no_args_is_help=True)
app.add_typer(import_app, name="import")
IMPORT_DIR_ARG = typer.Argument(..., help="The folder to import.")
IMPORT_MODEL_OPT = typer.Option(..., "--model", help="The model that made the vectors: clip-retrieval's spelling "
                                "(open_clip:ViT-B-32/laion2b_s34b_b79k, ViT-B/32) or vlsearch's.")
IMPORT_REBUILD_OPT = typer.Option(False, "--rebuild-index", help="Build vlsearch's own index even where "
                                  "clip-retrieval's image.index matches the vectors.")
IMPORT_INDEX_DIR_OPT = typer.Option(None, "--index-dir", help="Folder holding image.index / image.json "
                                    "(default: the imported folder or its index/).")


@import_app.command("clip-retrieval")
@handle_errors
def import_clip_retrieval_cmd(folder: str = IMPORT_DIR_ARG, collection_dir: str = COLLECTION_OUT_ARG,
                              model: str = IMPORT_MODEL_OPT, rebuild_index: bool = IMPORT_REBUILD_OPT,
                              index_dir: Optional[str] = IMPORT_INDEX_DIR_OPT) -> None:
    """Import clip-retrieval's output: img_emb/, text_emb/, metadata/ and its autofaiss image.index."""
    from indexing.importing import ImportConfig, import_clip_retrieval

    config = ImportConfig(model=model, rebuild_index=rebuild_index, index_dir=index_dir)
    _import_and_report(import_clip_retrieval, folder, collection_dir, config)


@import_app.command("embeddings")
@handle_errors
def import_embeddings_cmd(folder: str = IMPORT_DIR_ARG, collection_dir: str = COLLECTION_OUT_ARG,
                          model: str = IMPORT_MODEL_OPT) -> None:
    """Import a folder of *.npy vectors with their *.parquet metadata (same stem, or the same sort order)."""
    from indexing.importing import ImportConfig, import_embeddings

    _import_and_report(import_embeddings, folder, collection_dir, ImportConfig(model=model))


def _import_and_report(run: Callable[..., Any], folder: str, collection_dir: str, config: Any) -> None:
    with TqdmProgress("import", unit="row") as bar:
        report = run(folder, collection_dir, config, progress=bar)
    typer.echo(f"{report.added:,} rows added ({report.captions:,} captions) to {report.collection} version "
               f"{report.version} in {report.seconds:.1f} s ({report.rows_per_second:,.0f} rows/s); "
               f"index: {report.index or 'unchanged'}")
    if report.skipped_ids:
        typer.echo(f"{len(report.skipped_ids)} rows skipped (vectors not finite), ids: "
                   f"{', '.join(map(str, report.skipped_ids[:20]))}{' ...' if len(report.skipped_ids) > 20 else ''}")


if __name__ == "__main__":  # pragma: no cover
    app()
