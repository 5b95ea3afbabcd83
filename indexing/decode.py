"""Decode records into model-ready pixels in parallel worker processes, never crashing or hanging.

Each record is opened with :func:`vlsearch.data.images.open_image` (JPEG ``draft``, EXIF orientation,
every mode to RGB, decompression-bomb refusal) and run through the model's own preprocess, in
``torch.utils.data.DataLoader`` worker processes, so decoding batch ``n+1`` overlaps encoding
batch ``n`` in the main process. A file that cannot be decoded becomes a failure row
``(path, kind, message)`` instead of an exception; a decode that takes longer than ``timeout``
seconds (a FIFO, a stalled network mount, a pathological file) is interrupted by ``SIGALRM`` and
becomes a ``timeout`` failure. Non-regular files (FIFOs, devices, directories) are refused up front.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from vlsearch.core.errors import DecodeError, DecodeHangError, FilesystemNotInstalledError
from vlsearch.data.formats import refusal
from vlsearch.data.images import MAX_PIXELS, file_exif, missing_file, open_image, original_size
from vlsearch.data.photo import exif_values

from vlsearch.data.sources import ImageRecord, bytes_hash, content_hash, file_stat, is_url, read_record

#: ``(file_stat, content_hash)`` of a record's file, as ``embed`` stores them.
FileFacts = tuple[tuple[int, int] | None, str | None]
#: Local files up to this size are read once, through one descriptor: decoded from memory, with
#: their stat and content hash taken from the same bytes (larger ones are decoded from their path).
READ_ONCE_BYTES = 256 << 20

#: Seconds one image may take to read + decode + preprocess before it is given up.
DEFAULT_TIMEOUT = 30.0
#: Decode workers run this much nicer than the encoding process (``$VLSEARCH_DECODE_NICE``
#: overrides it, e.g. 0 on a machine shared with other CPU-bound jobs): on a CPU the model is the
#: bottleneck, and a worker that preempts one of its threads stalls the other at the next barrier;
#: at the lowest priority decoding fills the time the model leaves idle. vlsearch-small on 2 cores,
#: end-to-end / model-only, one run: nice 0: 0.73, 10: 0.80, 19: 0.89 (benchmarks/RESULTS.md, issue 21).
DECODE_NICE = 19


class _Timeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so no ``except Exception`` swallows it."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupt the body with :class:`DecodeError` (kind ``timeout``) after ``seconds``.

    Uses ``SIGALRM``, so it bounds blocking reads and PIL's decode loop; it only works in a
    process's main thread (always the case in DataLoader workers), elsewhere it does nothing.
    """
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Timeout:
        raise DecodeError("timeout", f"not decoded within {seconds:g} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def open_record(record: ImageRecord, *, draft_size: int | None = None,
                max_pixels: int = MAX_PIXELS) -> tuple[Any, FileFacts | None]:
    """One record as an upright RGB PIL image (tar members read from their offset, URLs through
    fsspec), and the :data:`FileFacts` of the bytes it decoded when it read them itself (a local
    file up to :data:`READ_ONCE_BYTES`); None otherwise. A RAW file, or a file taken for its bytes
    under another extension, is refused before it is read (:func:`vlsearch.data.formats.refusal`)."""
    problem = refusal(record.path, record.sniffed)
    if problem is not None:
        raise problem
    data, facts = read_bytes(record)
    if data is not None:
        return open_image(data, draft_size=draft_size, max_pixels=max_pixels), facts
    try:
        return open_image(record.location, draft_size=draft_size, max_pixels=max_pixels), None
    except PermissionError as exc:
        raise DecodeError("unreadable", str(exc)) from exc


def read_bytes(record: ImageRecord) -> tuple[bytes | None, FileFacts | None]:
    """A record's bytes (tar members from their offset, URLs through fsspec), with their
    :data:`FileFacts` when it is a local file read through one descriptor; None for a local file
    over :data:`READ_ONCE_BYTES` (decode it from its path). Raises :class:`DecodeError`."""
    if record.tar_range is not None or is_url(record.location):
        try:
            return read_record(record), None
        except FileNotFoundError as exc:
            raise DecodeError("missing", f"no such file: {record.location}") from exc
        except OSError as exc:
            raise DecodeError("unreadable", f"{type(exc).__name__}: {exc}") from exc
    return _read_local(record) or (None, None)


def _read_local(record: ImageRecord) -> tuple[bytes, FileFacts] | None:
    """A local file's bytes and facts through one descriptor (None: too big to hold). Opened
    non-blocking so a FIFO is refused instead of waiting for a writer."""
    path = record.location
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise missing_file(path) from None
    except PermissionError as exc:
        raise DecodeError("unreadable", str(exc)) from exc
    except OSError as exc:
        raise DecodeError("unreadable", f"{type(exc).__name__}: {exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DecodeError("not-a-file", f"{record.path} is not a regular file (FIFO, device or directory)")
        if st.st_size == 0:
            raise DecodeError("empty", f"zero-byte file: {path}")
        if st.st_size > READ_ONCE_BYTES:
            return None
        data = fh.read()
    return data, ((int(st.st_size), int(st.st_mtime_ns)), bytes_hash(data))


class Decoded(NamedTuple):
    """One decoded record: ``pixels`` (3, H, W), its upright original ``size`` (width, height),
    the :data:`FileFacts` of the bytes decoded when they were read in one go (else None), and the
    EXIF columns of the file (:func:`vlsearch.data.photo.exif_values`)."""

    pixels: torch.Tensor
    size: tuple[int, int]
    file: FileFacts | None
    exif: dict[str, Any]


def decode_record(
    record: ImageRecord,
    transform: Callable[[Any], torch.Tensor],
    *,
    draft_size: int | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    max_pixels: int = MAX_PIXELS,
) -> Decoded:
    """Read, decode and preprocess one record; raises :class:`DecodeError`."""
    try:
        with time_limit(timeout):
            img, facts = open_record(record, draft_size=draft_size, max_pixels=max_pixels)
            return Decoded(transform(img), original_size(img), facts, exif_values(file_exif(img)))
    except _Timeout:  # the alarm fired just after the body finished
        raise DecodeError("timeout", f"not decoded within {timeout:g} s") from None
    except (DecodeError, FilesystemNotInstalledError):  # a missing fsspec package is the job's error, not the image's
        raise
    except Exception as exc:  # an unexpected library error must cost one image, not the run
        raise DecodeError("error", f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class DecodedBatch:
    """A batch of records: pixels of those that decoded, failures of those that did not.

    ``ok[i]`` is the position (in the record list given to :func:`decode_batches`) of
    ``pixels[i]``, whose upright original size is ``sizes[i]``; ``failures`` holds
    ``(position, kind, message)``. ``files[i]``: ``(file_stat, content_hash)`` of ``ok[i]``'s
    file, computed in the worker that decoded it (the page cache still holds the bytes), so the
    encoding process does not read and hash every file again (``indexing.shards.file_columns``).
    ``exif[i]``: ``ok[i]``'s EXIF columns, read from the image the worker opened.
    """

    pixels: torch.Tensor
    ok: list[int]
    sizes: list[tuple[int, int]]
    failures: list[tuple[int, str, str]]
    files: list[tuple[tuple[int, int] | None, str | None]] = field(default_factory=list)
    exif: list[dict[str, Any]] = field(default_factory=list)

    def pin_memory(self) -> "DecodedBatch":  # called by DataLoader(pin_memory=True)
        return replace(self, pixels=self.pixels.pin_memory())


class RecordDataset(Dataset):
    """Map-style dataset over records: item ``i`` is ``(i, pixels or None, size or None, failure or None,
    (file_stat, content_hash) or None, EXIF columns or None)``."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable[[Any], torch.Tensor], *,
                 draft_size: int | None, timeout: float | None, max_pixels: int):
        self.records = records
        self.transform = transform
        self.draft_size, self.timeout, self.max_pixels = draft_size, timeout, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        try:
            pixels, size, facts, exif = decode_record(record, self.transform, draft_size=self.draft_size,
                                                      timeout=self.timeout, max_pixels=self.max_pixels)
        except DecodeError as exc:
            return i, None, None, (exc.kind, exc.message), None, None
        return i, pixels, size, None, facts or (file_stat(record), content_hash(record)), exif


def collate(items: list[tuple]) -> DecodedBatch:
    """Stack the decoded items and keep the failures (the default collate would choke on None)."""
    good = [it for it in items if it[3] is None]
    pixels = stack_pixels([it[1] for it in good]) if good else torch.empty(0)
    return DecodedBatch(pixels, [it[0] for it in good], [it[2] for it in good],
                        [(it[0], *it[3]) for it in items if it[3] is not None], [it[4] for it in good],
                        [it[5] for it in good])


def stack_pixels(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Stack ``(3, H, W)`` images into a batch. Channels-last views of HWC pixels (what the split
    preprocess's workers make) stay channels-last: a plain copy, where a contiguous NCHW stack
    would transpose every image (3.0 vs 0.4 ms per 64 images at 224 px), and channels-last is what
    convolutional towers take anyway."""
    if all(p.dim() == 3 and p.permute(1, 2, 0).is_contiguous() for p in pixels):
        return torch.stack([p.permute(1, 2, 0) for p in pixels]).permute(0, 3, 1, 2)
    return torch.stack(pixels)


def init_worker(worker_id: int) -> None:
    """Lower the worker's priority, and give it glibc's own malloc settings (see vlsearch/core/allocator.py)."""
    from vlsearch.core.allocator import restore_defaults

    restore_defaults()
    with suppress(AttributeError, OSError, ValueError):  # no os.nice (Windows), not permitted, bad value
        os.nice(int(os.environ.get("VLSEARCH_DECODE_NICE", DECODE_NICE)))


def mp_context():
    # fork starts workers in milliseconds and shares the parent's records and transform; spawn
    # elsewhere (macOS/Windows), where both are pickled.
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


#: Most decode processes :func:`default_workers` starts.
MAX_AUTO_WORKERS = 32


def default_workers(device_type: str, cores: int | None = None, threads: int | None = None) -> int:
    """Decode processes for an encoder on ``device_type``. On a GPU the model needs no CPU: every
    core but one (the encoding process's), up to :data:`MAX_AUTO_WORKERS`. On a CPU the cores
    torch's ``threads`` leave free, at least 2 (at nice +19 they fill the model's idle time)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device_type == "cuda":
        return max(1, min(cores - 1, MAX_AUTO_WORKERS))
    free = cores - (threads if threads is not None else torch.get_num_threads())
    return max(2, min(free, MAX_AUTO_WORKERS))


#: Smallest decode task (images one worker decodes at a time) worth splitting a batch into.
MIN_TASK = 4


def decode_task_size(batch_size: int, workers: int, n_records: int) -> int:
    """Images per worker task. A DataLoader hands each worker whole tasks, so a chunk of fewer
    batches than ``workers`` would leave workers idle (a GPU embedding a few hundred camera
    photos): then tasks are the largest divisor of ``batch_size`` that gives every worker one.
    Otherwise whole batches, since joining tasks costs the encoding process a copy of every batch
    (30-50 ms per 256 images, issue 21's GPU run). Never under :data:`MIN_TASK` images."""
    n_batches = -(-n_records // batch_size)
    if workers <= 1 or n_batches >= workers:
        return batch_size
    bound = batch_size * n_batches // workers
    size = max([d for d in range(1, bound + 1) if batch_size % d == 0] or [1])
    return size if size >= MIN_TASK else batch_size


def decode_batches(
    records: Sequence[ImageRecord],
    transform: Callable[[Any], torch.Tensor],
    *,
    batch_size: int = 64,
    workers: int = 2,
    timeout: float | None = DEFAULT_TIMEOUT,
    draft_size: int | None = None,
    pin_memory: bool = False,
    max_pixels: int = MAX_PIXELS,
    hang_timeout: float | None = None,
) -> Iterator[DecodedBatch]:
    """Decode ``records`` in order, in ``workers`` processes (0: in this process), batch by batch.

    Workers decode tasks of :func:`decode_task_size` images (whole batches unless there are fewer
    batches than workers), joined here into batches of ``batch_size``. With workers and a
    per-image ``timeout``, a task that takes longer than ``hang_timeout`` (default: task size *
    ``timeout`` + 60 s, what a task of images that all time out can take) raises
    :class:`DecodeHangError` naming its images, instead of waiting forever on a decoder stuck
    inside C code where the alarm cannot reach it."""
    dataset = RecordDataset(records, transform, draft_size=draft_size, timeout=timeout, max_pixels=max_pixels)
    task = decode_task_size(batch_size, workers, len(records))
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = {"prefetch_factor": 2, "multiprocessing_context": mp_context(), "worker_init_fn": init_worker}
        if timeout:
            kwargs["timeout"] = hang_timeout or task * timeout + 60
    loader = DataLoader(dataset, batch_size=task, shuffle=False, num_workers=workers,
                        collate_fn=collate, pin_memory=pin_memory and task == batch_size, **kwargs)
    tasks = name_hangs(iter(loader), records, task, kwargs.get("timeout"))
    return tasks if task == batch_size else _join(tasks, batch_size // task, pin_memory)


def _join(tasks: Iterator[DecodedBatch], per_batch: int, pin_memory: bool) -> Iterator[DecodedBatch]:
    """Consecutive tasks, ``per_batch`` at a time, as one batch (copied once, into pinned memory
    when asked: torch's host allocator caches those blocks)."""
    while group := list(itertools.islice(tasks, per_batch)):
        parts = [t.pixels for t in group if t.ok]
        pixels = torch.empty(0)
        if parts:
            shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
            layout = torch.contiguous_format if parts[0].is_contiguous() else torch.channels_last  # as stack_pixels made them
            pixels = torch.cat(parts, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=pin_memory,
                                                      memory_format=layout))
        yield DecodedBatch(pixels,
                           [i for t in group for i in t.ok], [s for t in group for s in t.sizes],
                           [f for t in group for f in t.failures], [f for t in group for f in t.files],
                           [e for t in group for e in t.exif])


def name_hangs(batches: Iterator[DecodedBatch], records: Sequence[ImageRecord], batch_size: int,
                hang_timeout: float | None) -> Iterator[DecodedBatch]:
    done = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as exc:
            if hang_timeout is None or "timed out" not in str(exc):
                raise
            stuck = [r.path for r in records[done * batch_size : (done + 1) * batch_size]]
            raise DecodeHangError(
                f"decode batch {done} (images {done * batch_size}-{done * batch_size + len(stuck) - 1}) was not "
                f"decoded within {hang_timeout:g} s (a decoder hung where the per-image "
                f"timeout cannot interrupt it); move these {len(stuck)} images aside and rerun to resume: "
                + ", ".join(stuck[:8]) + (" ..." if len(stuck) > 8 else "")) from None
        done += 1
        yield batch
