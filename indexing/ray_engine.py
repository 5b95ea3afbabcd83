"""The Ray engine: embed a source and build its index on a Ray cluster, writing the same collection.

Install with ``pip install 'vlsearch[ray]'``. Nothing here schedules work itself: Ray does.

**Embed** (:func:`embed_ray`). The driver lists the source's records (the same deterministic order
as the local engine) and cuts them into shards of ``shard_size``; a Ray Data ``map_batches`` over
those shards runs a callable class, :class:`ShardEmbedder`, on ``actors`` actors, so each actor
loads the model once (``num_gpus=gpus_per_actor`` places it on a GPU). Task ``k`` writes shard
``k`` — records ``[k*S, (k+1)*S)`` — through the local engine's own shard writer
(:func:`indexing.shards.embed_shard`: same schema, failures table, images file written last =
commit). So resume is the local engine's: a rerun keeps every committed shard and redoes the
missing ones, whichever engine ran before. A worker that dies mid-shard is restarted by Ray Data
and the shard redone (a shard already committed by a task that died before returning is not
rewritten). Progress: actors report per-shard counts to one small actor that the driver polls into
the caller's ``progress`` callback.

Workers read images from the record locations the driver listed, so the source must be on a
path every node sees (a shared filesystem such as NFS/Lustre/EFS mounted at the same path).

**Index** (:func:`build_index_ray`): the autofaiss recipe, on :func:`indexing.build.build_index`
(same plan, same seeded training sample, same nprobe tuning and manifest entry):

1. train the IVF quantizer and codebooks once, on the driver;
2. hand the trained empty index to ``parts`` Ray tasks, each adding the vectors of a contiguous
   group of shards with their ids exactly as the local build does;
3. merge the parts in shard order (:mod:`vlsearch.ann.merge`), after checking that no id occurs in
   two parts (``merge_from`` with overlapping ids corrupts silently, faiss #3651) and that every
   part carries the trained quantizer and codebooks (faiss #2970). The merged index is the one the
   local build makes.

Each part also writes its vectors into their rows of the build's fp16 rows file (created and
sized by the driver, :class:`vlsearch.ann.refine.RowsPart`), so a Ray build has the same rows file
as a local one: ``Refine(disk)`` plans (the auto plan at 10M on a 4 GB budget, or any plan under
``--max-bytes-per-vector 80``) re-score from it, and filtered exact search reads single rows from it.

``on_disk=True`` merges the inverted lists through ``index-<build>.ivfdata`` beside ``index.faiss``
(:func:`vlsearch.ann.merge.merge_on_disk`, ``OnDiskInvertedLists``): the driver never holds all the
parts' codes at once. Plain IVF codes stay there and ``Searcher`` memory-maps them (manifest
``index.layout = "ondisk"``). Fast-scan lists (``PQ..x4fs``, the auto plans) cannot be searched from
a mapping: they are read from that file into the in-RAM fast-scan layout and the file is removed
(``merge = "ondisk"``, ``layout = "memory"``). A plan with an in-RAM ``Refine(SQ8)`` stage cannot be
merged on disk.

Fast-scan IVF lists are not merged by FAISS: parts hold the same codes as plain
4-bit ``IVFPQ`` and the merged index is converted back (:mod:`vlsearch.ann.merge`), giving the
same index as adding directly.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import pickle
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlsearch.store.layout import IMAGES_DIR, shard_name
from vlsearch.store.collection import Collection
from vlsearch.store.manifest import Manifest
from vlsearch.core.errors import CollectionMismatchError, DistributedError, IndexConfigError, RayNotInstalledError
from vlsearch.ann.faiss_index import find_ivf, find_refine, make_index
from vlsearch.ann.merge import as_fastscan, as_plain_ivfpq, fastscan_ivf, merge_files, merge_on_disk, trained_digest
from vlsearch.core.allocator import reusing_freed_memory
from vlsearch.core.progress import Progress
from vlsearch.query.exact import ExactTopK

from indexing.build import TUNE_K, add_vectors, build_index, peak_rss_mb
from vlsearch.ann.plan import AutoPolicy, split_disk_refine
from vlsearch.ann.refine import RowsPart, RowsWriter
from vlsearch.data.sources import ImageSource, open_source

if TYPE_CHECKING:  # indexing.embed, .shards, .photos (torch) are imported inside the embedding functions: index
    # workers never load torch (~0.8 GB per worker; tests/test_ray.py checks)
    from indexing.shards import EmbedConfig

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'vlsearch[ray]'"


def require_ray() -> Any:
    """The ``ray`` module, or :class:`RayNotInstalledError` saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RayNotInstalledError(
            f"the Ray engine needs the 'ray' package, which is not installed ({exc}); install it with "
            f"{INSTALL_HINT}, or use the local engine (--engine local)") from None
    return ray


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide a Ray job runs.

    ``address``: None (``$RAY_ADDRESS`` if set, else a new local Ray instance), ``"auto"`` (the
    cluster this node belongs to) or ``"ray://head:10001"`` (Ray Client). A driver that is already
    connected (``ray.is_initialized()``) is used as is and not shut down.
    """

    address: str | None = None
    actors: int = 2
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    #: passed to Ray for the job's workers (pip packages, env_vars, worker_process_setup_hook...).
    runtime_env: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError(f"RayConfig.actors must be >= 1, not {self.actors}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise ValueError("RayConfig.gpus_per_actor must be >= 0 and cpus_per_actor > 0")

    def remote_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"num_cpus": self.cpus_per_actor}
        if self.gpus_per_actor:
            args["num_gpus"] = self.gpus_per_actor
        if self.runtime_env:
            args["runtime_env"] = self.runtime_env
        return args


@contextmanager
def ray_session(config: RayConfig) -> Iterator[Any]:
    """Connect to (or start) Ray for one job; disconnect afterwards if this call connected."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=config.address, include_dashboard=False, runtime_env=config.runtime_env,
                 log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise DistributedError(f"cannot start or reach Ray at address={config.address!r}: {exc}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


# ---- distributed embed -----------------------------------------------------------------------------
def embed_ray(source: ImageSource | str, collection_dir: str | Path, config: EmbedConfig | None = None,
              ray_config: RayConfig = RayConfig(), progress: Progress | None = None) -> Collection:
    """:func:`indexing.embed.embed` on a Ray cluster: same collection, same resume, same errors.
    A finished collection is synced with its source on the driver, as :func:`indexing.embed.embed` does.

    ``config``: as for the local engine (default ``EmbedConfig()``); ``workers`` decoding processes
    run inside each actor."""
    require_ray()
    from vlsearch.models.factory import default_model

    from indexing.embed import open_existing
    from indexing.photos import honour_no_gps, source_record
    from indexing.shards import EmbedConfig

    config = config or EmbedConfig()
    if config.model is None:
        config = replace(config, model=default_model())
    if not isinstance(source, ImageSource):
        source = open_source(source)
    path = Path(collection_dir)
    coll = open_existing(path, source, config)
    config = honour_no_gps(coll, config) if coll is not None else config
    if coll is not None and coll.manifest.complete:  # a finished collection follows its source, as locally:
        from indexing.embed import embed  # synced on the driver (only new and changed images are encoded)

        return embed(source, path, config, progress)
    info = _model_info(config)  # here, before any worker starts: a bad model name fails fast
    if coll is not None:
        coll.check_model(info)
    with ray_session(ray_config) as ray:
        records = iter(source)
        first = next(records)  # SourceError for an empty source, before anything is created
        if coll is None:
            coll = Collection.create(path, Manifest(model=info, shard_size=config.shard_size,
                                                    source=source_record(source, config)))
        with coll.lock():  # one writer at a time, as for the local engine
            return _run_ray(ray, coll, source, itertools.chain([first], records), config, ray_config, progress)


def _model_info(config: EmbedConfig) -> Any:
    """The model's :class:`ModelInfo` (name, resolved weights, dim) for the manifest: the driver loads
    the model once on CPU (the actors check theirs against the manifest)."""
    from vlsearch.models.factory import load_model

    return load_model(config.model, config.pretrained, device="cpu", precision="fp32").info


def _run_ray(ray: Any, coll: Collection, source: ImageSource, records: Iterator[Any], config: EmbedConfig,
             ray_config: RayConfig, progress: Progress | None) -> Collection:
    from indexing.photos import source_record
    from indexing.shards import chunks, committed_shards, counts_on_disk

    done = set(committed_shards(coll))
    size = coll.manifest.shard_size
    items = [{"shard": k, "records": pickle.dumps(chunk)} for k, chunk in enumerate(chunks(records, size))
             if k not in done]
    counts = counts_on_disk(coll)
    start = time.perf_counter()
    if items:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        hub = ray.remote(num_cpus=0)(_ProgressHub).remote()
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardEmbedder, batch_size=1, concurrency=ray_config.actors,
            fn_constructor_kwargs={"collection_dir": str(coll.path), "config": config, "hub": hub,
                                   "metadata_schema": source.metadata_schema}, **ray_config.remote_args())
        poller = _Poller(ray, hub, progress, skipped=len(done) * size, total=source.size_hint(),
                         failures=counts["failures"])
        try:
            for row in ds.iter_rows():
                for key in ("images", "captions", "failures"):
                    counts[key] += int(row[key])
                counts["shards"] += 1
                coll.update_manifest(counts=dict(counts))
        except ray.exceptions.RayError as exc:
            raise DistributedError(f"distributed embed into {coll.path} failed: {exc}; rerun the same "
                                   "command to resume from the committed shards") from exc
        finally:
            poller.stop()
            ray.kill(hub)
    coll.commit_version(counts=counts_on_disk(coll), complete=True, source=source_record(source, config))
    log.info("embedded %s into %s with Ray in %.1f s", coll.manifest.counts, coll.path, time.perf_counter() - start)
    return coll


class ShardEmbedder:
    """Ray Data callable class: one model per actor; each call embeds and commits whole shards."""

    def __init__(self, collection_dir: str, config: EmbedConfig, hub: Any, metadata_schema: pa.Schema):
        import torch

        from vlsearch.models.factory import load_model

        from indexing.shards import image_schema

        if config.threads:  # for the actor's lifetime (set_process_threads would pin FAISS too)
            torch.set_num_threads(config.threads)
        self.config, self.hub = config, hub
        self.coll = Collection.open(collection_dir)
        self.encoder = load_model(config.model, config.pretrained, device=config.device, precision=config.precision)
        self.coll.check_model(self.encoder.info)
        self.schema = image_schema(self.encoder.dim, metadata_schema)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with reusing_freed_memory():
            return self._embed(batch)

    def _embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from indexing.shards import ShardStats, embed_shard

        out: dict[str, list[int]] = {"shard": [], "images": [], "captions": [], "failures": []}
        for number, blob in zip(batch["shard"], batch["records"]):
            number = int(number)
            if (self.coll.path / IMAGES_DIR / shard_name(number)).exists():
                counts = _shard_counts(self.coll, number)  # committed by an attempt that died before returning
            else:
                chunk = pickle.loads(blob)
                stats = ShardStats(start=time.perf_counter(), skipped=0, total=None, failures=0)
                report = partial(_report, self.hub, number, stats)
                counts = embed_shard(self.coll, number, chunk, self.encoder, self.config, self.schema, stats, report)
            self.hub.set.remote(number, counts["images"] + counts["failures"], counts["failures"])
            out["shard"].append(number)
            for key in ("images", "captions", "failures"):
                out[key].append(counts[key])
        return {key: np.asarray(values, np.int64) for key, values in out.items()}


def _report(hub: Any, number: int, stats: Any, done: int, total: int | None = None, **postfix: Any) -> None:
    hub.set.remote(number, stats.done, stats.failures)


def _shard_counts(coll: Collection, number: int) -> dict[str, int]:
    counts = {}
    for kind in ("images", "captions", "failures"):
        path = coll.path / kind / shard_name(number)
        counts[kind] = pq.ParquetFile(path).metadata.num_rows if path.exists() else 0
    return counts


class _ProgressHub:
    """Ray actor: images done and refused per shard (a retried shard overwrites its own entry)."""

    def __init__(self) -> None:
        self.shards: dict[int, tuple[int, int]] = {}

    def set(self, shard: int, done: int, failures: int) -> None:
        self.shards[shard] = (done, failures)

    def totals(self) -> tuple[int, int]:
        return sum(d for d, _ in self.shards.values()), sum(f for _, f in self.shards.values())


class _Poller:
    """Driver thread feeding the hub's totals to the progress callback every half second."""

    def __init__(self, ray: Any, hub: Any, progress: Progress | None, *, skipped: int, total: int | None,
                 failures: int, every: float = 0.5):
        self.ray, self.hub, self.progress = ray, hub, progress
        self.skipped, self.total, self.failures, self.every = skipped, total, failures, every
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vlsearch-ray-progress", daemon=True)
        if progress is not None:
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def poll(self) -> None:
        try:
            done, failures = self.ray.get(self.hub.totals.remote(), timeout=10)
        except self.ray.exceptions.RayError as exc:  # best effort: the job's own errors surface elsewhere
            log.debug("progress poll failed: %s", exc)
            return
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        self.progress(self.skipped + done, self.total, **{"img/s": f"{rate:.1f}", "failures": self.failures + failures})

    def stop(self) -> None:
        if self.progress is None:
            return
        self._stop.set()
        self._thread.join()
        self.poll()


# ---- distributed index build -----------------------------------------------------------------------
def build_index_ray(collection_dir: str | Path | Collection, index_type: str = "auto", max_memory: str | int = "4GB",
                    metric: str = "ip", nprobe_default: int | None = None, train_size: int | None = None,
                    seed: int = 0, progress: Progress | None = None, *, ray_config: RayConfig = RayConfig(),
                    parts: int | None = None, on_disk: bool = False, k_factor_default: float | None = None,
                    max_bytes_per_vector: int | None = None, policy: AutoPolicy = AutoPolicy()) -> dict[str, Any]:
    """:func:`indexing.build.build_index` with the add stage split over ``parts`` Ray tasks (default:
    2 per actor, at most one per shard), then merged: the same plan (``"auto"`` included), tuned
    defaults and rows file as the local build. ``on_disk`` merges through on-disk inverted lists
    (module doc)."""
    require_ray()
    coll = collection_dir if isinstance(collection_dir, Collection) else Collection.open(collection_dir)
    if parts is not None and parts < 1:
        raise IndexConfigError(f"parts must be >= 1, not {parts}")
    if on_disk:
        _check_on_disk_factory(index_type, coll.dim, metric)
    with ray_session(ray_config) as ray:
        adder = partial(_add_distributed, ray=ray, ray_config=ray_config,
                        parts=parts or 2 * ray_config.actors, on_disk=on_disk)
        entry = build_index(coll, index_type, max_memory, metric, nprobe_default, train_size, seed, progress,
                            k_factor_default=k_factor_default, max_bytes_per_vector=max_bytes_per_vector,
                            policy=policy, use_gpu=False, adder=adder)
    for stale in coll.path.glob("index-*.ivfdata"):  # from earlier builds, or one that crashed
        if stale.name != entry.get("ivfdata"):
            stale.unlink()
    return entry


def _check_on_disk_factory(index_type: str, dim: int, metric: str) -> None:
    """Refuse before training what cannot merge on disk: no inverted lists, or an in-RAM refine."""
    import faiss

    if index_type == "auto":
        return  # checked once planned (_check_on_disk_index)
    index = make_index(split_disk_refine(index_type)[0], dim, metric)
    _check_on_disk_index(index, index_type)
    if not isinstance(_below_transforms(index), faiss.IndexIVF):
        raise IndexConfigError(f"{index_type!r} cannot use on-disk inverted lists: its IVF is wrapped "
                               "(e.g. IDMap); use a plain IVF code such as 'IVF4096,PQ64'")


def _check_on_disk_index(index: Any, plan: str) -> None:
    if find_ivf(index) is None or find_refine(index) is not None:
        raise IndexConfigError(
            f"{plan!r} cannot be merged on disk: that needs inverted lists and no in-RAM refine stage (e.g. "
            "'IVF4096,PQ64', 'IVF16384,PQ128x4fs,Refine(disk)'); drop --on-disk, or lower "
            "--max-bytes-per-vector so that the auto plan refines from disk")


def _below_transforms(index: Any) -> Any:
    import faiss

    top = faiss.downcast_index(index)
    while isinstance(top, faiss.IndexPreTransform):
        top = faiss.downcast_index(top.index)
    return top


@dataclass(frozen=True)
class _Part:
    """What a part task returns: its file, ids, trained-state digest and the eval queries' exact top-(TUNE_K + 1)."""

    path: str
    ids: np.ndarray
    digest: str
    distances: np.ndarray
    labels: np.ndarray
    peak_rss_mb: float
    seconds: float


def _add_distributed(index: Any, coll: Collection, xq: np.ndarray, metric: str, batch: int, progress: Progress, *,
                     ray: Any, ray_config: RayConfig, parts: int, on_disk: bool,
                     rows: RowsWriter | None = None) -> tuple[Any, np.ndarray, dict]:
    import faiss

    if on_disk:
        _check_on_disk_index(index, f"the planned {type(faiss.downcast_index(index)).__name__}")
    shards = coll.shard_paths(IMAGES_DIR)
    groups = [g for g in np.array_split(np.arange(len(shards)), min(parts, len(shards))) if len(g)]
    workdir = coll.path / f".build-{uuid.uuid4().hex[:12]}"
    workdir.mkdir()
    try:
        fast = fastscan_ivf(index) is not None
        template = as_plain_ivfpq(index) if fast else index
        digest = trained_digest(template)
        blob, rows_ref = ray.put(faiss.serialize_index(template)), ray.put(None if rows is None else rows.part)
        task = ray.remote(max_retries=3)(_add_part).options(**ray_config.remote_args())
        futures = [task.remote(blob, str(coll.path), [str(shards[i]) for i in g], str(workdir / f"part-{p:05d}.faiss"),
                               xq, metric, batch, rows_ref) for p, g in enumerate(groups)]
        results = _gather(ray, futures, progress, coll.manifest.counts.get("images"))
        _check_parts(results, digest)
        truth = _merge_truth(results, len(xq), metric)
        merged, extra = _merge_parts(template, [r.path for r in results], coll.path, workdir, on_disk, fast)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    extra.update({"engine": "ray", "parts": len(groups), "part_peak_rss_mb": max(r.peak_rss_mb for r in results),
                  "part_seconds": round(max(r.seconds for r in results), 2)})
    return merged, truth, extra


def _merge_parts(template: Any, paths: list[str], folder: Path, workdir: Path, on_disk: bool,
                 fast: bool) -> tuple[Any, dict[str, Any]]:
    """The parts merged in order (in memory, or through an ``.ivfdata`` file); fast-scan plans are
    converted back to fast-scan, in RAM (their lists cannot be searched from a mapping)."""
    if not on_disk:
        merged = merge_files(paths)
        return (as_fastscan(merged) if fast else merged), {"layout": "memory", "merge": "memory"}
    if fast:  # merged on disk, read into the fast-scan blocks, the plain lists' file removed with the workdir
        return as_fastscan(merge_on_disk(template, paths, workdir / "merged.ivfdata")), \
            {"layout": "memory", "merge": "ondisk"}
    ivfdata = f"index-{workdir.name[len('.build-'):]}.ivfdata"
    merged = merge_on_disk(template, paths, folder / ivfdata)
    return merged, {"layout": "ondisk", "merge": "ondisk", "ivfdata": ivfdata,
                    "ivfdata_bytes": (folder / ivfdata).stat().st_size}


def _add_part(blob: np.ndarray, coll_path: str, shard_paths: list[str], out: str, xq: np.ndarray, metric: str,
              batch: int, rows: RowsPart | None = None) -> _Part:
    """Ray task: the trained empty index + the vectors of these shards (ids as the local build adds
    them), written to ``out``; their rows go to the rows file too (``rows``)."""
    import faiss

    start = time.perf_counter()
    index = faiss.deserialize_index(blob)
    coll = Collection.open(coll_path)
    exact = ExactTopK(xq, TUNE_K + 1, metric)  # + 1: the tuner drops each query's own id
    ids = []
    with open(rows.path, "r+b", buffering=0) if rows is not None else contextlib.nullcontext() as rows_file:
        for part_ids, vecs in coll.iter_embeddings(batch_size=batch, paths=[Path(p) for p in shard_paths]):
            add_vectors(index, part_ids, vecs)
            exact.add(part_ids, vecs)
            if rows is not None:
                rows.write(rows_file.fileno(), part_ids, vecs)
            ids.append(part_ids)
    tmp = out + ".tmp"
    faiss.write_index(index, tmp)
    Path(tmp).replace(out)
    distances, labels = exact.result()
    return _Part(out, np.concatenate(ids), trained_digest(index), distances.copy(), labels.copy(),
                 peak_rss_mb(), time.perf_counter() - start)


def _gather(ray: Any, futures: list[Any], progress: Progress, total: int | None) -> list[_Part]:
    order = {f: i for i, f in enumerate(futures)}
    results: list[_Part | None] = [None] * len(futures)
    pending, done = list(futures), 0
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            part = ray.get(ready[0])
            results[order[ready[0]]] = part
            done += len(part.ids)
            progress(done, total, stage="add")
    except ray.exceptions.RayError as exc:
        for f in pending:
            ray.cancel(f)
        raise DistributedError(f"a part of the distributed index build failed after its retries: {exc}") from exc
    return results  # type: ignore[return-value]


def _check_parts(results: list[_Part], digest: str) -> None:
    """Refuse parts that would merge into a corrupt index (faiss #3651, #2970)."""
    ids = np.concatenate([r.ids for r in results])
    if len(np.unique(ids)) != len(ids):
        raise CollectionMismatchError("the same id occurs in two index parts; merging them would corrupt the index "
                                      "(faiss #3651): the collection's shards overlap")
    for r in results:
        if r.digest != digest:
            raise DistributedError(f"index part {r.path} does not carry the trained quantizer/codebooks of this "
                                   "build (faiss #2970); refusing to merge it")


def _merge_truth(results: list[_Part], nq: int, metric: str) -> np.ndarray:
    import faiss

    heap = faiss.ResultHeap(nq, TUNE_K + 1, keep_max=(metric == "ip"))
    for r in results:
        heap.add_result(np.ascontiguousarray(r.distances), np.ascontiguousarray(r.labels))
    heap.finalize()
    return heap.I
