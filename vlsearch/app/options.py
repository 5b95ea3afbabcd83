"""Command-line option groups: each option is declared once and shared by the commands that take it.

A group is a frozen dataclass whose fields are typer options (``EmbedOptions``, ``BuildOptions``,
``ModelOptions``...) or a table of overrides (``TRAIN``); its methods turn the options into the
library's config or call. :func:`with_groups` puts a group's options in a command's signature
where the command names the group and hands the command one object per group, so ``embed``,
``index`` and ``build-index`` spell their 16 options in one place and each command stays a few
lines long.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer

# ---- single options shared by several commands -----------------------------------------------
MODEL_OPT = typer.Option(None, "--model", "-m", help="Model name (default: the built-in default model).")
PRETRAINED_OPT = typer.Option(None, "--pretrained", "-p", help="Tag, hf-hub:org/repo, or checkpoint file.")
DEVICE_OPT = typer.Option("auto", help="auto, cpu or cuda.")
PRECISION_OPT = typer.Option("auto", "--precision", help="Inference precision: auto (bf16 where this CPU/GPU runs "
                             "it fast, else fp32; `vlsearch info` says which), fp32, bf16, fp16 or int8 (CPU).")
SOURCE_ARG = typer.Argument(..., help="Image folder, .csv/.tsv/.parquet manifest, .tar shard(s) (folder or glob).")
COLLECTION_OUT_ARG = typer.Argument(..., help="Output collection directory (created, resumed, or synced).")
COLLECTION_ARG = typer.Argument(..., help="Collection directory (from `vlsearch embed`).")
NO_GPS_HELP = ("Keep location out of the collection: gps_lat/gps_lon stay null. Recorded in the collection, so "
               "later syncs keep it; on a collection that holds locations it clears them.")
WAIT_OPT = typer.Option(0.0, "--wait", min=0.0, metavar="SECONDS",
                        help="Wait up to SECONDS for another writer of the collection (a sync, compact or "
                             "build-index) to finish (0: fail at once if another writer holds the collection).")


def _option(default: Any, *flags: str, **kwargs: Any) -> Any:
    return dataclasses.field(default=default, metadata={"option": typer.Option(default, *flags, **kwargs)})


@dataclass(frozen=True)
class EmbedOptions:
    """The options of ``embed`` and ``index``: how a source is read and encoded."""

    model: Optional[str] = dataclasses.field(default=None, metadata={"option": MODEL_OPT})
    pretrained: Optional[str] = dataclasses.field(default=None, metadata={"option": PRETRAINED_OPT})
    batch_size: int = _option(64, "--batch-size", "-b", min=1, help="Images per forward pass.")
    workers: Optional[int] = _option(None, "--workers", "-w", min=0,
                                     help="Decoding processes (0: decode in the main process; default: every core "
                                          "but one with a GPU, else the cores torch leaves free, at least 2).")
    device: str = dataclasses.field(default="auto", metadata={"option": DEVICE_OPT})
    precision: str = dataclasses.field(default="auto", metadata={"option": PRECISION_OPT})
    shard_size: int = _option(10_000, "--shard-size", min=1, help="Source records per Parquet shard.")
    threads: Optional[int] = _option(None, "--threads", min=1, help="torch threads of the encoding process.")
    decode_timeout: float = _option(30.0, "--decode-timeout", min=0.0,
                                    help="Seconds per image before it is refused (0: none).")
    source_type: str = _option("auto", "--source-type", help="auto, folder, manifest or webdataset.")
    image_column: Optional[str] = _option(None, "--image-column", help="Manifest column of image paths.")
    caption_column: Optional[str] = _option(None, "--caption-column", help="Manifest column of captions.")
    dry_run: bool = _option(False, "--dry-run", help="On a finished collection: list what a sync would change, "
                            "write nothing.")
    no_gps: bool = _option(False, "--no-gps", help=NO_GPS_HELP)
    no_gpu_decode: bool = _option(False, "--no-gpu-decode", help="Decode JPEGs in the CPU workers even when the "
                                  "model runs on CUDA (by default nvjpeg decodes them on the GPU).")

    def config(self) -> Any:
        """The :class:`indexing.embed.EmbedConfig` these options describe."""
        from indexing.embed import EmbedConfig

        return EmbedConfig(model=self.model, pretrained=self.pretrained, batch_size=self.batch_size,
                           workers=self.workers, device=self.device, precision=self.precision,
                           shard_size=self.shard_size,
                           threads=self.threads, decode_timeout=self.decode_timeout or None, no_gps=self.no_gps,
                           gpu_decode=False if self.no_gpu_decode else None)

    def open_source(self, source: str) -> Any:
        from vlsearch.data.sources import open_source

        return open_source(source, kind=self.source_type, image_column=self.image_column,
                           caption_column=self.caption_column)


@dataclass(frozen=True)
class BuildOptions:
    """The options of ``build-index`` and ``index``: which index and how it is tuned."""

    index_type: str = _option("auto", "--index-type", "-t",
                              help="'auto' or a FAISS factory string, e.g. 'IVF4096,PQ32x4fs,Refine(SQ8)' or 'Flat'; "
                                   "',Refine(disk)' after an IVF index re-scores exactly from an fp16 file on disk.")
    max_memory: str = _option("4GB", "--max-memory", help="Memory budget of the index and the build (e.g. 4GB).")
    max_bytes_per_vector: Optional[int] = _option(
        None, "--max-bytes-per-vector", min=12,
        help="auto: resident index bytes per vector (e.g. 80); below a full-dimension SQ8 code the shortlist "
             "is re-scored exactly from an fp16 file on disk.")
    nprobe_default: Optional[int] = _option(None, "--nprobe-default", min=1, help="Fix nprobe instead of tuning it.")
    k_factor_default: Optional[float] = _option(None, "--k-factor-default", min=1.0,
                                                help="Fix the refine k_factor instead of tuning it.")
    train_size: Optional[int] = _option(None, "--train-size", min=1, help="Training sample size (default: auto).")
    seed: int = _option(0, "--seed", help="Seed of the training sample and k-means (reproducible builds).")

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`indexing.build.build_index`."""
        return {**dataclasses.asdict(self), "metric": "ip"}


@dataclass(frozen=True)
class EngineOptions:
    """Where ``embed``, ``build-index`` and ``index`` run: here, or on a Ray cluster."""

    engine: str = _option("local", "--engine",
                          help="local (this process) or ray (a Ray cluster; pip install 'vlsearch\\[ray]').")
    address: Optional[str] = _option(None, "--address",
                                     help="Ray cluster: auto, ray://head:10001 (default: $RAY_ADDRESS or a new local Ray).")
    actors: int = _option(2, "--actors", min=1, help="Ray: parallel actors/tasks (one model per embedding actor).")
    gpus_per_actor: float = _option(0.0, "--gpus-per-actor", min=0.0, help="Ray: GPUs per actor (e.g. 1, or 0.5).")

    def ray_config(self) -> Any:
        """The :class:`indexing.ray_engine.RayConfig` of ``--engine ray``; None for the local engine."""
        if self.engine not in ("local", "ray"):
            raise typer.BadParameter(f"--engine must be local or ray, not {self.engine!r}")
        if self.engine == "local":
            return None
        from indexing.ray_engine import RayConfig

        return RayConfig(address=self.address, actors=self.actors, gpus_per_actor=self.gpus_per_actor)


@dataclass(frozen=True)
class PartsOptions:
    """How ``--engine ray`` splits and merges an index build."""

    parts: Optional[int] = _option(None, "--parts", min=1,
                                   help="Ray: index parts built in parallel, then merged (default 2 x actors).")
    on_disk: bool = _option(False, "--on-disk", help="Ray: merge the parts' inverted lists through a file, not in "
                                                     "RAM. Plain IVF codes stay there (memory-mapped by searches); "
                                                     "fast-scan plans (auto) are read back into RAM. Not for an "
                                                     "in-RAM Refine(SQ8) plan.")


def _int_list(value: str, option: str) -> tuple[int, ...]:
    """Comma-separated positive integers (``--k 1,5,10``)."""
    try:
        items = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        items = ()
    if not items or any(v < 1 for v in items):
        raise typer.BadParameter(f"expected comma-separated positive integers, got {value!r}", param_hint=option)
    return items


@dataclass(frozen=True)
class ModelOptions:
    """Which encoder ``encode`` and ``classify`` load, where and at what precision."""

    model: Optional[str] = dataclasses.field(default=None, metadata={"option": MODEL_OPT})
    pretrained: Optional[str] = dataclasses.field(default=None, metadata={"option": PRETRAINED_OPT})
    device: str = dataclasses.field(default="auto", metadata={"option": DEVICE_OPT})
    precision: str = dataclasses.field(default="auto", metadata={"option": PRECISION_OPT})

    def load(self) -> Any:
        """The encoder (:func:`vlsearch.models.factory.load_model`)."""
        from vlsearch.models.factory import load_model

        return load_model(self.model, self.pretrained, device=self.device, precision=self.precision)


@dataclass(frozen=True)
class PromptOptions:
    """The class prompts of ``classify``: class names and templates."""

    classes: Optional[str] = _option(None, "--classes", "-c",
                                     help="Comma-separated class names (default: the sub-folder names).")
    templates: list[str] = dataclasses.field(default=(), metadata={"option": typer.Option(
        [], "--templates", "-t", help="Prompt with one {} (repeatable), or a file with one per line "
        "(default: 'a photo of a {}.' and 5 more).")})

    def names(self) -> Optional[list[str]]:
        """The class names given (None: the sub-folder names)."""
        return [c.strip() for c in self.classes.split(",") if c.strip()] if self.classes else None

    def prompts(self) -> list[str]:
        """The templates given, the lines of the one file given, or the default templates."""
        from vlsearch.eval.zeroshot import DEFAULT_TEMPLATES

        given = list(self.templates)
        if len(given) == 1 and Path(given[0]).is_file():
            given = [t for t in Path(given[0]).read_text(encoding="utf-8").splitlines() if t.strip()]
        return given or list(DEFAULT_TEMPLATES)


@dataclass(frozen=True)
class QueryOptions:
    """The options of ``search``: the query, how the collection is opened and searched, the output."""

    k: int = _option(10, "-k", "--k", min=1, help="Number of results.")
    image: Optional[str] = _option(None, "--image", "-i", help="Search by this image file instead of text.")
    nprobe: Optional[int] = _option(None, "--nprobe", min=1, help="IVF lists to probe (default: the index's).")
    k_factor: Optional[float] = _option(None, "--k-factor", min=1.0, help="Refine stage: re-rank k*F candidates.")
    exact: bool = _option(False, "--exact", help="Exact brute-force search over the shards (no index needed).")
    mmap: bool = _option(False, "--mmap", help="Memory-map the index instead of reading it into RAM.")
    as_json: bool = _option(False, "--json", help="Print one JSON object per hit.")
    where: Optional[str] = _option(
        None, "--where", "-w", help="Metadata filter, an SQL condition, e.g. \"width >= 1000 AND label = 'dog'\".")
    device: str = dataclasses.field(default="auto", metadata={"option": DEVICE_OPT})
    precision: str = dataclasses.field(default="auto", metadata={"option": PRECISION_OPT})
    rerank: int = _option(0, "--rerank", min=0, help="Re-score the top K (>= k) with the cross-attention "
                          "re-ranker (text queries; 0 = off).")
    reranker: Optional[str] = _option(None, "--reranker", help="Re-ranker file (default: the model's shipped one).")
    rerank_features: str = _option("auto", "--rerank-features", help="Candidate features: auto (stored where "
                                   "present, else recomputed from the image files), stored or recompute.")
    like: list[int] = dataclasses.field(default=(), metadata={"option": typer.Option(
        [], "--like", min=0, metavar="ID", help="Recommend items like this stored item (repeatable; no query).")})
    unlike: list[int] = dataclasses.field(default=(), metadata={"option": typer.Option(
        [], "--unlike", min=0, metavar="ID", help="With --like: and unlike this stored item (repeatable).")})
    min_score: Optional[float] = _option(None, "--min-score", help="Keep only hits scoring at least this (cosine; "
                                         "its scale depends on the model and on text vs image queries).")
    autocut: Optional[int] = _option(None, "--autocut", min=1, help="Cut the list before its N-th score jump.")
    group_by: Optional[str] = _option(None, "--group-by", help="At most --per-group hits per value of this metadata "
                                      "column (or folder).")
    per_group: Optional[int] = _option(None, "--per-group", min=1, help="Hits kept per group (default 1).")
    order_by: Optional[str] = _option(None, "--order-by", help="\"column [ASC|DESC]\": sort the relevant set (hits "
                                      "passing --min-score/--autocut, else the top --depth).")
    depth: Optional[int] = _option(None, "--depth", min=1, help="Candidates the list is shaped from (default: k, or "
                                   "max(k, 100) with --group-by/--order-by/--facet).")
    facets: Optional[list[str]] = _option(None, "--facet", help="Count this column's values among the relevant set "
                                          "(repeat for several).")
    dedup: bool = _option(False, "--dedup", help="Collapse near-duplicate hits into their best-ranked one "
                          "(cosine of the stored vectors >= --dedup-threshold); still k hits when enough exist.")
    dedup_threshold: Optional[float] = _option(None, "--dedup-threshold", min=0.0, max=1.0,
                                               help="With --dedup: the cosine threshold (default: "
                                               "vlsearch.ann.duplicates.DEFAULT_DUPLICATE_THRESHOLD).")
    mode: str = _option("vector", "--mode", help="Text queries: vector (embedding k-NN), keyword (BM25 over "
                        "captions, path words and text metadata; phrases, field prefixes like path:beach) or "
                        "hybrid (both, fused by Reciprocal Rank Fusion, k=60).")
    alpha: Optional[float] = _option(None, "--alpha", min=0.0, max=1.0, help="--mode hybrid: weighted fusion "
                                     "alpha*vector + (1-alpha)*keyword of normalised scores instead of RRF.")

    def shaping(self) -> dict[str, Any]:
        """The shaping options given (see vlsearch.query.shaping)."""
        given = dict(min_score=self.min_score, autocut=self.autocut, group_by=self.group_by, per_group=self.per_group,
                     order_by=self.order_by, depth=self.depth, facets=list(self.facets) if self.facets else None,
                     dedup=self._dedup())
        return {key: value for key, value in given.items() if value is not None}

    def _dedup(self) -> bool | float | None:
        if self.dedup_threshold is not None and not self.dedup:
            raise typer.BadParameter("--dedup-threshold goes with --dedup", param_hint="--dedup-threshold")
        return (self.dedup_threshold if self.dedup_threshold is not None else True) if self.dedup else None

    def run(self, collection_dir: str, query: Optional[str | list[str]]) -> list[Any]:
        """The hits of the query (a text, or weighted terms: see :func:`parse_cli_terms`), of
        ``--image``, or of ``--like``/``--unlike`` examples (exactly one of the three)."""
        from vlsearch.query.searcher import Searcher
        from vlsearch.query.terms import parse_cli_terms, plain_text

        words = [query] if isinstance(query, str) else list(query or [])
        if sum(map(bool, (words, self.image, self.like))) != 1:
            raise typer.BadParameter("give either a query (text or terms), --image PATH or --like ID (exactly one)")
        if self.unlike and not self.like:
            raise typer.BadParameter("--unlike goes with --like", param_hint="--unlike")
        text = plain_text(words)  # a lone plain text is searched as before (and may be re-ranked)
        if (self.image or self.like or (words and text is None)) and self.rerank:
            raise typer.BadParameter("--rerank re-scores single text queries only", param_hint="--rerank")
        if (self.image or self.like or text is None) and self.mode != "vector":
            raise typer.BadParameter("--mode keyword/hybrid searches single text queries only", param_hint="--mode")
        searcher = Searcher.open(collection_dir, mmap=self.mmap, device=self.device, precision=self.precision,
                                 reranker=self.reranker, rerank_features=self.rerank_features)
        options = dict(k=self.k, nprobe=self.nprobe, exact=self.exact, k_factor=self.k_factor, where=self.where,
                       **self.shaping())
        if self.image:
            return searcher.search_image(self.image, **options)
        if self.like:
            return searcher.more_like(list(self.like), list(self.unlike), **options)
        if text is None:
            return searcher.search(parse_cli_terms(words), **options)
        if self.mode != "vector" or self.alpha is not None:
            return searcher.search_text(text, rerank=self.rerank, mode=self.mode, alpha=self.alpha, **options)
        return searcher.search_text(text, rerank=self.rerank, **options)


@dataclass(frozen=True)
class BenchOptions:
    """The options of ``bench``: what is measured and where the results go."""

    k: str = _option("1,5,10", "--k", help="Recall@K cut-offs, comma-separated; the largest is the ANN depth.")
    nprobe: str = _option("1,4,16,64,256", "--nprobe", help="IVF lists probed, comma-separated.")
    out: Optional[str] = _option(None, "--out", "-o", help="Write all results to this JSON file.")
    plot: Optional[str] = _option(None, "--plot", help="Write a recall-vs-QPS plot (needs matplotlib).")
    latency_queries: int = _option(1000, "--latency-queries", min=0, help="Single queries timed for p50/p99.")
    max_queries: Optional[int] = _option(None, "--max-queries", min=1,
                                         help="Evaluate a seeded sample of queries.")
    rerank: int = _option(0, "--rerank", min=0, help="Also report t2i with the exact top K re-ranked (0 = off).")
    reranker: Optional[str] = _option(None, "--reranker", help="Re-ranker file (default: the model's shipped one).")

    def config(self) -> Any:
        """The :class:`vlsearch.eval.bench.BenchConfig` these options describe."""
        from vlsearch.eval.bench import BenchConfig

        try:
            return BenchConfig(ks=_int_list(self.k, "--k"), nprobes=_int_list(self.nprobe, "--nprobe"),
                               latency_queries=self.latency_queries, max_queries=self.max_queries,
                               rerank=self.rerank, reranker=self.reranker)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc


@dataclass(frozen=True)
class RerankTrainOptions:
    """The options of ``train-rerank``: the frozen towers and the re-ranker's training schedule."""

    model: str = _option("vlsearch-small", "--model", "-m", help="Model whose frozen towers feed the re-ranker.")
    pretrained: Optional[str] = _option(None, "--pretrained", help="Its weights (default: built-in).")
    epochs: int = _option(20, "--epochs", min=1, help="Passes over the training images.")
    random_epochs: int = _option(2, "--random-epochs", min=0, help="First epochs with random negatives.")
    batch_size: int = _option(128, "--batch-size", min=2)
    lr: float = _option(5e-4, "--lr")
    group_size: int = _option(0, "--group-size", min=0, help="Hard epochs batch neighbourhoods of this many "
                              "similar images (0: random batches).")
    seed: int = _option(0, "--seed")
    cache_dir: Optional[str] = _option(None, "--cache-dir", help="Cache the towers' features here (.npz).")
    threads: Optional[int] = _option(None, "--threads", min=1, help="torch threads.")
    precision: str = _option("fp32", "--precision", help="fp32, or bf16 (CPU autocast; ~2x faster where the "
                             "CPU has bf16 units).")
    grid: int = _option(7, "--grid", min=1, help="Image tokens: the trunk's map pooled to GRID x GRID.")
    bank_size: int = _option(4096, "--bank-size", min=0, help="Training captions in the hubness bank "
                             "(0: no hubness correction).")

    def config(self) -> Any:
        """The :class:`vlsearch.rerank.training.RerankTrainConfig` these options describe."""
        from vlsearch.rerank.model import FusionConfig
        from vlsearch.rerank.training import RerankTrainConfig

        return RerankTrainConfig(FusionConfig(image_tokens=self.grid * self.grid), epochs=self.epochs,
                                 random_epochs=min(self.random_epochs, self.epochs), batch_size=self.batch_size,
                                 lr=self.lr, group_size=self.group_size, seed=self.seed, precision=self.precision,
                                 bank_size=self.bank_size)

    def encoder(self) -> Any:
        """The frozen dual encoder (fp32, on the CPU) whose towers feed the re-ranker."""
        from vlsearch.models.factory import load_model

        return load_model(self.model, self.pretrained, device="cpu", precision="fp32")


@dataclass(frozen=True)
class ServeOptions:
    """The options of ``serve``: where it listens, who may call it, what it holds in memory."""

    host: str = _option("127.0.0.1", "--host",
                        help="Address to bind; other than loopback needs --token or --no-auth.")
    port: int = _option(8000, "--port", min=0, max=65535, help="TCP port.")
    token: Optional[str] = _option(None, "--token", envvar="VLSEARCH_TOKEN",
                                   help="Bearer token required on API calls.")
    no_auth: bool = _option(False, "--no-auth", help="Serve a non-loopback address without a token, on purpose.")
    cors_origin: list[str] = dataclasses.field(default=(), metadata={"option": typer.Option(
        [], "--cors-origin", help="Allow browser calls from this origin (repeatable).")})
    max_upload_mb: float = _option(20.0, "--max-upload-mb", min=0.01, help="Largest uploaded image (MB).")
    mmap: bool = _option(False, "--mmap", help="Memory-map the indexes instead of reading them into RAM.")
    device: str = _option("cpu", help="Device of the query models: cpu, cuda or auto.")
    pin_version: bool = _option(False, "--pin-version",
                                help="Serve the version each collection has now, whatever syncs commit later "
                                     "(by default the server moves to each new version within about 2 s).")
    watch: list[str] = dataclasses.field(default=(), metadata={"option": typer.Option(
        [], "--watch", metavar="[NAME=]SOURCE", help="Sync this folder (or manifest) into the served collection as "
        "it changes, like `vlsearch watch` (NAME=SOURCE when serving several; repeatable).")})
    clip_retrieval_api: bool = _option(True, "--clip-retrieval-api/--no-clip-retrieval-api",
                                       help="Also serve clip-retrieval's back-end API (/indices-list, /knn-service, "
                                            "/metadata) for ClipClient scripts and clip-front (serve the front from "
                                            "another origin with --cors-origin).")
    allow_url_fetch: bool = _option(False, "--allow-url-fetch", help="Let /knn-service fetch a query's image_url "
                                    "(public http(s) addresses only, --max-upload-mb at most, 10 s).")

    def config(self) -> Any:
        """The :class:`vlsearch.app.serve.ServeConfig` these options describe (checked there)."""
        from vlsearch.app.serve.config import ServeConfig

        return ServeConfig(host=self.host, port=self.port, token=self.token, no_auth=self.no_auth,
                           cors_origins=tuple(self.cors_origin), max_upload_bytes=int(self.max_upload_mb * 1024 * 1024),
                           mmap=self.mmap, device=self.device, pin_version=self.pin_version,
                           watch=tuple(self.watch), clip_retrieval_api=self.clip_retrieval_api,
                           allow_url_fetch=self.allow_url_fetch)


@dataclass(frozen=True)
class WatchOptions:
    """The options of ``watch``: when it syncs, and the model it embeds with."""

    quiet: float = _option(2.0, "--quiet", min=0.01, help="Sync once the folder has had no change for this many "
                           "seconds...")
    max_delay: float = _option(30.0, "--max-delay", min=0.01, help="...but at least this often while changes keep "
                               "coming (and retry a failed sync after this long).")
    settle: float = _option(1.0, "--settle", min=0.0, help="Embed a file once its size and mtime have not changed "
                            "for this many seconds (a file still being copied waits).")
    poll: bool = _option(False, "--poll", help="Poll the folder instead of file-system events (e.g. a network "
                         "mount; without it, polling is used only where events are unavailable).")
    poll_interval: float = _option(0.3, "--poll-interval", min=0.01, help="Seconds between two polls.")
    model: Optional[str] = _option(None, "--model", "-m", help="Model of a new collection (default: the "
                                   "collection's own, else the built-in default model).")
    pretrained: Optional[str] = dataclasses.field(default=None, metadata={"option": PRETRAINED_OPT})
    device: str = dataclasses.field(default="auto", metadata={"option": DEVICE_OPT})
    precision: str = dataclasses.field(default="auto", metadata={"option": PRECISION_OPT})
    workers: Optional[int] = _option(None, "--workers", "-w", min=0, help="Decoding processes per sync (0: in "
                                     "the watching process).")
    no_gps: bool = _option(False, "--no-gps", help=NO_GPS_HELP)

    def config(self) -> Any:
        """The :class:`indexing.watch.WatchConfig` these options describe."""
        from indexing.watch import WatchConfig

        try:
            return WatchConfig(quiet=self.quiet, max_delay=self.max_delay, settle=self.settle,
                               force_polling=True if self.poll else None, poll_interval=self.poll_interval)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc

    def embed_config(self) -> Any:
        """The :class:`indexing.shards.EmbedConfig` of the syncs."""
        from indexing.shards import EmbedConfig

        return EmbedConfig(model=self.model, pretrained=self.pretrained, device=self.device,
                           precision=self.precision, workers=self.workers, no_gps=self.no_gps)


# ---- train: every flag is an override of the config file (or of TrainConfig's defaults) -----------
@dataclass(frozen=True)
class TrainFlag:
    """One ``vlsearch train`` flag: what it sets in the config (``to`` maps its value to overrides)."""

    name: str
    type: type
    flags: tuple[str, ...]
    key: str
    default: str  #: TrainConfig's default as shown in --help (tests check it against TrainConfig)
    help: str = ""
    limits: dict[str, float] = dataclasses.field(default_factory=dict)
    to: Optional[Callable[[Any], dict[str, Any]]] = None

    def overrides(self, value: Any) -> dict[str, Any]:
        return self.to(value) if self.to is not None else {self.key: value}


TRAIN_FLAGS: tuple[TrainFlag, ...] = (
    TrainFlag("model", str, ("--model", "-m"), "model", "vlsearch-tiny", "open_clip architecture to train."),
    TrainFlag("pretrained", str, ("--pretrained", "-p"), "pretrained", "none", "Start from these weights (tag or file)."),
    TrainFlag("epochs", int, ("--epochs",), "epochs", "10", limits={"min": 1}),
    TrainFlag("batch_size", int, ("--batch-size", "-b"), "batch_size", "128", limits={"min": 2}),
    TrainFlag("lr", float, ("--lr",), "lr", "0.0005"),
    TrainFlag("weight_decay", float, ("--weight-decay",), "weight_decay", "0.2", limits={"min": 0.0}),
    TrainFlag("warmup_steps", int, ("--warmup-steps",), "warmup_steps", "100", limits={"min": 0}),
    TrainFlag("grad_clip", float, ("--grad-clip",), "grad_clip", "1.0", "Max gradient norm (0: no clipping).",
              {"min": 0.0}, lambda v: {"grad_clip": v or None}),
    TrainFlag("lock_text", bool, ("--lock-text/--no-lock-text",), "lock_text", "no", "Freeze the text tower (LiT)."),
    TrainFlag("unlocked_layers", int, ("--unlocked-text-layers",), "lock_text_unlocked_layers", "0",
              "With --lock-text: train its last N blocks.", {"min": 0}),
    TrainFlag("lock_image", bool, ("--lock-image/--no-lock-image",), "lock_image", "no",
              "Freeze the image tower (a timm trunk: its head trains)."),
    TrainFlag("unlocked_groups", int, ("--unlocked-image-groups",), "lock_image_unlocked_groups", "0",
              "With --lock-image: train the last N stages of the timm trunk.", {"min": 0}),
    TrainFlag("pretrained_image", str, ("--pretrained-image",), "pretrained_image", "none",
              "Load the timm image trunk from this weights file first."),
    TrainFlag("precompute_image", bool, ("--precompute-image/--no-precompute-image",), "precompute_image", "auto",
              "Run the locked image layers once and cache their output (default: with --lock-image)."),
    TrainFlag("image_views", int, ("--image-views",), "image_views", "1",
              "Precomputed views per image: the plain one + N-1 augmented.", {"min": 1}),
    TrainFlag("image_size", int, ("--train-image-size",), "image_size", "none",
              "Training input size in px (none: the model's own).", {"min": 16}),
    TrainFlag("cache_dir", str, ("--cache-dir",), "cache_dir", "none", "Shared folder for precomputed feature caches."),
    TrainFlag("precompute_text", bool, ("--precompute-text/--no-precompute-text",), "precompute_text", "auto",
              "Cache the locked text layers' output once (default: with --lock-text)."),
    TrainFlag("augment", bool, ("--augment/--no-augment",), "augment", "on", "Random resized crop + colour jitter."),
    TrainFlag("crop_scale", float, ("--crop-scale",), "augment.scale", "0.8", "Smallest crop area fraction.",
              {"min": 0.05, "max": 1.0}, lambda v: {"augment.scale": [v, 1.0]}),
    TrainFlag("hflip", float, ("--hflip",), "augment.hflip", "0.0",
              "Horizontal flip probability (never for a caption that says left/right).", {"min": 0.0, "max": 1.0}),
    TrainFlag("color_jitter", float, ("--color-jitter",), "augment.brightness", "0.3",
              "Brightness/contrast jitter strength.", {"min": 0.0},
              lambda v: {"augment.brightness": v, "augment.contrast": v}),
    TrainFlag("val_fraction", float, ("--val-fraction",), "val_fraction", "0.05", "Images held out for validation.",
              {"min": 0.0, "max": 0.99}),
    TrainFlag("checkpoint_every", int, ("--checkpoint-every",), "checkpoint_every", "500",
              "Steps between last.pt saves.", {"min": 0}),
    TrainFlag("max_steps", int, ("--max-steps",), "max_steps", "none", limits={"min": 1}),
    TrainFlag("seed", int, ("--seed",), "seed", "0"),
    TrainFlag("device", str, ("--device",), "device", "auto", "auto, cpu or cuda."),
    TrainFlag("precision", str, ("--precision",), "precision", "auto", "auto, fp32, fp16 or bf16."),
    TrainFlag("workers", int, ("--workers", "-w"), "workers", "2", "Image decoding processes.", {"min": 0}),
    TrainFlag("threads", int, ("--threads",), "threads", "none", "torch CPU threads.", {"min": 1}),
    TrainFlag("captions_per_image", int, ("--captions-per-image",), "captions_per_image", "1",
              "Captions of each image per step (loss averaged over them).", {"min": 1}),
    TrainFlag("cache_images", bool, ("--cache-images/--no-cache-images",), "cache_images", "no",
              "Decode all images into memory once and augment batches as tensors (fast on CPU)."),
    TrainFlag("half", bool, ("--half/--no-half",), "half_final", "no", "Save model.pt in fp16."),
)


def train_overrides(values: dict[str, Any]) -> dict[str, Any]:
    """The config overrides of the train flags that were given (None: not given)."""
    out: dict[str, Any] = {}
    for flag in TRAIN_FLAGS:
        if values.get(flag.name) is not None:
            out.update(flag.overrides(values[flag.name]))
    return out


def _train_option(flag: TrainFlag) -> Any:
    text = f"{flag.help} [default: {flag.default}]".strip()
    return typer.Option(None, *flag.flags, help=text, show_default=False, **flag.limits)


@dataclass(frozen=True)
class DuplicatesOptions:
    """The options of ``duplicates``: the threshold, what to compare, the output format."""

    threshold: Optional[float] = _option(None, "--threshold", "-t", min=0.0, max=1.0, help="Cosine >= T links two "
                                         "images as near copies (default: DEFAULT_DUPLICATE_THRESHOLD, calibrated "
                                         "in benchmarks/RESULTS.md).")
    exact_only: bool = _option(False, "--exact-only", help="Exact copies (same content hash) only.")
    as_json: bool = _option(False, "--json", help="One JSON line per group.")
    as_csv: bool = _option(False, "--csv", help="CSV, one row per item.")

    @property
    def machine_readable(self) -> bool:
        """Whether stdout carries JSON or CSV (messages then go to stderr)."""
        return self.as_json or self.as_csv

    def find(self, collection_dir: str, progress: Any) -> Any:
        """:func:`indexing.duplicates.find_duplicates` with these options."""
        from indexing.duplicates import DEFAULT_DUPLICATE_THRESHOLD, find_duplicates

        if self.as_json and self.as_csv:
            raise typer.BadParameter("choose one of --json and --csv")
        threshold = DEFAULT_DUPLICATE_THRESHOLD if self.threshold is None else self.threshold
        return find_duplicates(collection_dir, threshold, exact_only=self.exact_only, progress=progress)

    def format(self, groups: Any) -> str:
        """The groups as a table, JSON lines or CSV."""
        from indexing import duplicates as dup

        return (dup.groups_to_json_lines if self.as_json else dup.groups_to_csv if self.as_csv
                else dup.format_groups)(groups)


# ---- groups -> command parameters --------------------------------------------------------------
@dataclass(frozen=True)
class OptionGroup:
    """Options added to a command's signature, gathered into one argument ``name`` by ``make``."""

    name: str
    parameters: tuple[inspect.Parameter, ...]
    make: Callable[[dict[str, Any]], Any]


def group_of(name: str, cls: type) -> OptionGroup:
    """The options of dataclass ``cls`` (from its fields' ``option`` metadata), made into a ``cls``."""
    hints = typing.get_type_hints(cls)
    params = tuple(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.metadata["option"],
                                     annotation=hints[f.name]) for f in dataclasses.fields(cls))
    return OptionGroup(name, params, lambda values: cls(**values))


EMBED = group_of("embed", EmbedOptions)
BUILD = group_of("build", BuildOptions)
ENGINE = group_of("engine", EngineOptions)
PARTS = group_of("parts", PartsOptions)
MODEL = group_of("model_options", ModelOptions)
PROMPTS = group_of("prompts", PromptOptions)
QUERY = group_of("query_options", QueryOptions)
BENCH = group_of("bench", BenchOptions)
RERANK_TRAIN = group_of("train", RerankTrainOptions)
SERVE = group_of("server", ServeOptions)
WATCH = group_of("watch", WatchOptions)
DUPLICATES = group_of("dups", DuplicatesOptions)
TRAIN = OptionGroup("overrides", tuple(
    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_train_option(f), annotation=Optional[f.type])
    for f in TRAIN_FLAGS), train_overrides)


def with_groups(*groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Put the groups' options in the decorated command's signature, each group's where the command
    names it (so ``--help`` lists them in that order); the command receives one object per group."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        by_name, own = {g.name: g for g in groups}, inspect.signature(fn).parameters
        if set(by_name) - set(own):
            raise TypeError(f"{fn.__name__} must name its option groups {sorted(set(by_name) - set(own))}")
        hints = typing.get_type_hints(fn)
        params: list[inspect.Parameter] = []
        for p in own.values():
            if p.name in by_name:
                params += by_name[p.name].parameters
            else:  # keyword-only like the groups' options: typer passes every value by name
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation)))

        @functools.wraps(fn)
        def command(**values: Any) -> Any:
            for g in groups:
                values[g.name] = g.make({p.name: values.pop(p.name) for p in g.parameters})
            return fn(**values)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        del command.__wrapped__  # typer must see the new signature, not fn's
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
