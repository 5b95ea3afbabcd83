"""``vlsearch serve COLL --watch SOURCE``: a folder watcher (:class:`indexing.watch.FolderWatcher`)
beside the server for each watched collection, so that one command runs an always-fresh service:
the watcher syncs the collection as the folder changes, and the server follows each new version."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from indexing.watch import FolderWatcher, WatchThread

from vlsearch.core.errors import ServeConfigError
from vlsearch.app.serve.service import ServedCollection

#: ``on_watch(name, report_or_exception)``: after each sync round of a watched collection
OnWatch = Callable[[str, Any], None]


def parse_watches(args: tuple[str, ...], names: list[str]) -> dict[str, str]:
    """``["photos=~/Pictures"]`` or, serving one collection, ``["~/Pictures"]`` -> ``{name: source}``."""
    watches: dict[str, str] = {}
    for arg in args:
        name, sep, source = arg.partition("=")
        if not sep or name not in names or os.path.exists(arg):
            if len(names) != 1:
                raise ServeConfigError(f"--watch {arg}: say which collection it feeds, as NAME=SOURCE "
                                       f"(serving {', '.join(names)})")
            name, source = names[0], arg
        if name in watches:
            raise ServeConfigError(f"collection {name!r} is watched twice: give one --watch per collection")
        watches[name] = source
    return watches


class ServedWatchers:
    """The watchers of ``serve --watch``: made (and their sources checked) with the app, running
    while it runs. Each embeds with the model its collection is served with (loaded once)."""

    def __init__(self, args: tuple[str, ...], served: Mapping[str, ServedCollection], on_watch: OnWatch | None = None):
        self.watchers = {name: FolderWatcher(source, served[name].searcher.collection.path,
                                             encoder=served[name].searcher.encoder)
                         for name, source in parse_watches(args, list(served)).items()}
        self.on_watch = on_watch
        self._running: list[WatchThread] = []

    def start(self) -> None:
        for name, watcher in self.watchers.items():
            report = None if self.on_watch is None else (lambda r, n=name: self.on_watch(n, r))
            self._running.append(watcher.start(on_sync=report, on_error=report))

    def stop(self) -> None:
        """Stop every watcher (a sync in progress finishes first)."""
        running, self._running = self._running, []
        for thread in running:
            thread.stop(timeout=120)
