"""Keep a collection in step with a folder as it changes (``vlsearch watch SOURCE COLL``).

:class:`FolderWatcher` syncs the collection with its source (``indexing.sync``) once at start,
catching up with what changed while nobody watched, then whenever the folder changes. Changes come
from ``watchfiles`` (inotify, FSEvents, ReadDirectoryChangesW), or from polling where the platform
has no file-system events, where native events fail to start, or with ``force_polling`` (a network
mount). They are debounced: a sync starts once the folder has been quiet for ``quiet`` seconds,
and at least every ``max_delay`` seconds while changes keep coming.

**Files still being written are never embedded half-written.** A file is *settled* once its size
and mtime have not changed for ``settle`` seconds (judged from its mtime when first seen, then by
watching it). A sync leaves an unsettled image, or an image whose ``.txt`` captions are unsettled,
exactly as stored (``sync(defer=...)``), and the watcher looks again once it may have settled, with
or without a new event. A manifest or ``.tar`` being rewritten holds the whole round back. A
settled file that cannot be decoded is a failure, as in any sync. A round that raises (another
process holds the writer lock, the source vanished...) is reported through ``on_error`` and tried
again at the next change or after ``max_delay``; the watcher goes on.

A missing collection is created on the first round once every file has settled
(``indexing.embed`` then ``indexing.build``, with the embed config's model or the default one).

:meth:`FolderWatcher.run` blocks until its ``stop`` event is set; :meth:`FolderWatcher.start` runs
it in a thread (beside a server, or under the CLI). Rounds are reported through callbacks; the
library never prints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import watchfiles

from vlsearch.core.errors import CollectionMismatchError, SourceError
from vlsearch.core.fsutil import find_manifest
from vlsearch.core.lazy import Lazy
from vlsearch.data.locations import is_url
from vlsearch.data.sources import FolderSource, ImageSource, ManifestSource, open_source
from vlsearch.models.factory import Encoder, default_model, load_model
from vlsearch.store.collection import Collection
from vlsearch.store.layout import MANIFEST

from indexing.build import build_index
from indexing.embed import embed
from indexing.shards import EmbedConfig
from indexing.sync import SyncReport, sync

log = logging.getLogger(__name__)

OnSync = Callable[[SyncReport], None]
OnError = Callable[[Exception], None]


@dataclass(frozen=True)
class WatchConfig:
    """When a :class:`FolderWatcher` syncs (all times in seconds)."""

    #: sync once no change has come for this long
    quiet: float = 2.0
    #: ... but at least this often while changes keep coming (and the retry delay after an error)
    max_delay: float = 30.0
    #: a file is embedded once its size and mtime have not changed for this long
    settle: float = 1.0
    #: True: poll; False: file-system events only; None: events, polling where they are unavailable
    force_polling: bool | None = None
    #: time between two scans when polling
    poll_interval: float = 0.3

    def __post_init__(self) -> None:
        for name in ("quiet", "max_delay", "poll_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"WatchConfig.{name} must be > 0, not {getattr(self, name)}")
        if self.settle < 0:
            raise ValueError(f"WatchConfig.settle must be >= 0, not {self.settle}")
        if self.max_delay < self.quiet:
            raise ValueError(f"WatchConfig.max_delay ({self.max_delay}) must be >= quiet ({self.quiet})")


class _Settling:
    """Which files are still being written: since when each deferred file has kept its size and mtime.

    Only the files the latest round asked about are remembered (:meth:`begin` starts a round), so
    a deferred file that is deleted before it settles is forgotten."""

    def __init__(self, settle: float):
        self.settle = settle
        self._since: dict[str, tuple[tuple[int, int], float]] = {}
        self._last: dict[str, tuple[tuple[int, int], float]] = {}

    def begin(self) -> None:
        self._last, self._since = self._since, {}

    def unsettled(self, location: str | os.PathLike) -> bool:
        """Whether the file changed less than ``settle`` seconds ago (False when it is missing or
        cannot be read: the sync decides about those)."""
        location = os.fspath(location)
        try:
            st = os.stat(location)
        except OSError:
            return False
        key, now = (st.st_size, st.st_mtime_ns), time.monotonic()
        known = self._since.get(location) or self._last.get(location)
        # first seen, or changed since: it has been still since its mtime (never since the future:
        # a server clock ahead of ours counts from now)
        since = known[1] if known and known[0] == key else now - max(0.0, time.time() - st.st_mtime)
        if now - since >= self.settle:
            return False
        self._since[location] = (key, since)
        return True

    def due(self) -> float | None:
        """``time.monotonic()`` at which the first deferred file will have settled if left alone."""
        return min(since for _, since in self._since.values()) + self.settle if self._since else None


class FolderWatcher:
    """Keeps the collection at ``collection`` in step with the local folder (or manifest file)
    ``source`` as it changes; see the module docstring. ``encoder``: a loaded model to embed with
    (else the collection's own model is loaded on the first round). Raises :class:`SourceError`
    for a source that cannot be watched (missing, a URL or a glob), CollectionMismatchError when
    ``embed_config`` names another model than the collection's."""

    def __init__(self, source: str | os.PathLike, collection: str | os.PathLike, config: WatchConfig = WatchConfig(),
                 embed_config: EmbedConfig = EmbedConfig(), *, encoder: Encoder | None = None):
        text = os.fspath(source)
        if is_url(text) or not os.path.exists(text):
            raise SourceError(f"cannot watch {text}: only a local folder or manifest file that exists can be watched")
        self.source = Path(os.path.abspath(text))
        self.collection = Path(collection)
        self.config, self.embed_config = config, embed_config
        self._folder = self.source if self.source.is_dir() else self.source.parent
        self._settling = _Settling(config.settle)
        self._encoder: Lazy[Encoder] = Lazy(self._load_encoder, encoder)
        self._lock = threading.Lock()
        if embed_config.model is not None and (self.collection / MANIFEST).is_file():
            built = Collection.open(self.collection).model
            if built.name != embed_config.model:
                raise CollectionMismatchError(f"collection {self.collection} was built with {built.name}, "
                                              f"not {embed_config.model}; watch it with its own model")

    # ---- one round ---------------------------------------------------------------------------

    def sync_once(self) -> SyncReport:
        """Sync the collection with the settled state of the source now (create it if missing).
        Paths still being written are listed in the report's ``deferred``, not synced."""
        with self._lock:
            self._settling.begin()
            held = [p for p in self._source_files() if self._settling.unsettled(p)]
            if held:  # a manifest or tar being rewritten: reading it now could drop rows
                return SyncReport(deferred=[os.path.relpath(p, self._folder) for p in held])
            source = open_source(self.source)
            if not self._finished():
                return self._create(source)
            return sync(source, self.collection, self.embed_config, encoder=self._encoder.get(),
                        defer=self._defer(source))

    def _source_files(self) -> list[Path]:
        """The files a source reads besides its images: a manifest, or the tars of a folder of them."""
        if self.source.is_file():
            return [self.source]
        manifest = find_manifest(self.source)
        return [manifest] if manifest else sorted(p for p in self.source.iterdir() if p.suffix == ".tar")

    def _defer(self, source: ImageSource) -> Callable[[str], bool]:
        """``sync``'s ``defer``: an image path whose file (or, in a folder, its captions file) is unsettled."""
        base = Path(source.root).parent if isinstance(source, ManifestSource) else Path(source.root)
        sidecars = isinstance(source, FolderSource)

        def defer(path: str) -> bool:
            location = base / path
            return self._settling.unsettled(location) or (
                sidecars and self._settling.unsettled(location.with_suffix(".txt")))

        return defer

    def _finished(self) -> bool:
        return (self.collection / MANIFEST).is_file() and Collection.open(self.collection).manifest.complete

    def _create(self, source: ImageSource) -> SyncReport:
        """Embed the whole source into a new collection (or resume one) and build its index, once
        every file has settled."""
        records, defer = list(source), self._defer(source)
        held = [r.path for r in records if defer(r.path)]
        if held:
            return SyncReport(deferred=held)
        embed(source, self.collection, self.embed_config, encoder=self._encoder.get())
        build_index(self.collection)
        coll = Collection.open(self.collection)
        counts = coll.manifest.counts
        return SyncReport(new=[r.path for r in records], encoded=counts.get("images", 0),
                          failures=counts.get("failures", 0), version=coll.manifest.version)

    def _load_encoder(self) -> Encoder:
        c = self.embed_config
        if c.model is None and (self.collection / MANIFEST).is_file():  # the collection's own model
            info = Collection.open(self.collection).model
            c = replace(c, model=info.name, pretrained=c.pretrained or info.pretrained)
        return load_model(c.model or default_model(), c.pretrained, device=c.device, precision=c.precision)

    # ---- watching ----------------------------------------------------------------------------

    def run(self, stop: threading.Event, on_sync: OnSync | None = None, on_error: OnError | None = None) -> None:
        """Sync once watching has begun, then on every change, until ``stop`` is set (a sync in
        progress finishes first).
        ``on_sync(report)`` follows every round, ``on_error(exception)`` every round that raised."""
        due: float | None = 0.0  # the first round as soon as watching has begun: no change is missed
        with contextlib.closing(self._changes(stop)) as batches:
            for changes in batches:
                if stop.is_set():
                    break
                if changes or (due is not None and time.monotonic() >= due):
                    due = self._round(on_sync, on_error)

    def start(self, on_sync: OnSync | None = None, on_error: OnError | None = None) -> "WatchThread":
        """:meth:`run` in a daemon thread; stop it with the result's ``stop()``."""
        return WatchThread(self, on_sync, on_error)

    def _round(self, on_sync: OnSync | None, on_error: OnError | None) -> float | None:
        """One sync, reported; returns when the next is due without a change (None: at the next change)."""
        try:
            report = self.sync_once()
        except Exception as exc:  # whatever one round hit, the watcher goes on
            log.debug("watch round on %s failed", self.source, exc_info=True)
            if on_error is not None:
                on_error(exc)
            return time.monotonic() + self.config.max_delay
        if on_sync is not None:
            on_sync(report)
        return self._settling.due()

    def _changes(self, stop: threading.Event) -> Iterator[set]:
        """watchfiles' batches of changes, and an empty one every tick (to look at deferred files
        again); polling when native events cannot start and ``force_polling`` is None."""
        try:
            yield from self._watch(stop, self.config.force_polling)
        except (OSError, RuntimeError) as exc:
            if self.config.force_polling is not None or isinstance(exc, FileNotFoundError):
                raise
            log.warning("file-system events unavailable for %s (%s): polling every %g s", self._folder, exc,
                        self.config.poll_interval)
            yield from self._watch(stop, True)

    def _watch(self, stop: threading.Event, force_polling: bool | None) -> Iterator[set]:
        c = self.config
        ms = lambda seconds: max(1, round(seconds * 1000))  # noqa: E731
        tick = min(max(c.settle / 2, 0.05), 1.0)
        ignore = watchfiles.DefaultFilter(ignore_paths=[os.path.join(os.path.abspath(self.collection), "")])  # our own writes
        return watchfiles.watch(self._folder, watch_filter=ignore, debounce=ms(c.max_delay), step=ms(c.quiet),
                                stop_event=stop, rust_timeout=ms(tick), yield_on_timeout=True,
                                force_polling=force_polling, poll_delay_ms=ms(c.poll_interval),
                                raise_interrupt=False)


class WatchThread:
    """A :class:`FolderWatcher` running in a daemon thread (:meth:`FolderWatcher.start`)."""

    def __init__(self, watcher: FolderWatcher, on_sync: OnSync | None, on_error: OnError | None):
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(watcher, on_sync, on_error), daemon=True,
                                        name=f"vlsearch-watch {watcher.source}")
        self._thread.start()

    def _run(self, watcher: FolderWatcher, on_sync: OnSync | None, on_error: OnError | None) -> None:
        try:
            watcher.run(self._stop, on_sync, on_error)
        except BaseException as exc:  # handed to whoever waits on the thread
            self._error = exc

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the watcher ends (at most ``timeout`` seconds); re-raise what ended it.
        Returns whether it has ended. Interruptible by Ctrl-C in the main thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive() and (deadline is None or time.monotonic() < deadline):
            self._thread.join(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic())))
        if self._error is not None:
            raise self._error
        return not self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the watcher to stop and wait for it (see :meth:`wait`)."""
        self._stop.set()
        return self.wait(timeout)


__all__ = ["FolderWatcher", "WatchConfig", "WatchThread"]
