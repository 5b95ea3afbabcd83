"""The worker process of test_lock's race: two threads that sync one collection, round after round.

:func:`worker` runs in a spawned process (started by ``multiprocessing``, so this module is
imported there by name). It loads the tiny model once; then each of its two threads, every round,
waits at the shared barrier (the test's process adds a file, then joins it), calls
``indexing.sync.sync`` without waiting for the lock, and puts ``(round, worker, pid, outcome,
text)`` on the results queue: outcome ``synced`` (text: the report's summary), ``locked`` (the
error's message) or ``error`` (a traceback).

So that exactly one of the four workers syncs each round however the CPU is shared, the one that
gets the lock keeps it, at its first progress report, until the other three have released the
``refused`` semaphore (they do before reporting), or for ``HOLD_LIMIT`` seconds at most.
"""

from __future__ import annotations

import os
import threading
import traceback
from typing import Any

from indexing.shards import EmbedConfig
from indexing.sync import sync
from vlsearch.core.errors import CollectionLockedError
from vlsearch.core.threads import set_process_threads
from vlsearch.models.factory import TINY_MODEL, load_model

THREADS = 2
HOLD_LIMIT = 20.0  # seconds: only reached when a refusal never comes (a broken lock lets two sync)


def config(checkpoint: str) -> EmbedConfig:
    """The embedding settings of every sync in the race (and of the test's serial syncs)."""
    return EmbedConfig(model=TINY_MODEL, pretrained=checkpoint, workers=0, batch_size=4, shard_size=5,
                       device="cpu")


class HoldUntilRefused:
    """A progress callback that, on its first call, waits for ``others`` refusals."""

    def __init__(self, refused: Any, others: int):
        self.refused, self.others, self.called = refused, others, False

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if self.called:
            return
        self.called = True
        for _ in range(self.others):
            if not self.refused.acquire(timeout=HOLD_LIMIT):
                return


def _attempts(name: str, encoder: Any, args: tuple) -> None:
    checkpoint, source, collection, rounds, start, refused, results, others = args
    for round_no in range(rounds):
        try:
            start.wait(timeout=600)
        except threading.BrokenBarrierError:
            return  # the test gave up (or failed): stop
        try:
            report = sync(source, collection, config(checkpoint), encoder=encoder,
                          progress=HoldUntilRefused(refused, others))
            results.put((round_no, name, os.getpid(), "synced", report.summary()))
        except CollectionLockedError as exc:
            refused.release()
            results.put((round_no, name, os.getpid(), "locked", str(exc)))
        except BaseException:
            results.put((round_no, name, os.getpid(), "error", traceback.format_exc()))


def worker(number: int, checkpoint: str, source: str, collection: str, rounds: int, start: Any, refused: Any,
           results: Any, others: int) -> None:
    """Race ``rounds`` times with :data:`THREADS` threads (see the module docstring)."""
    set_process_threads(1)  # a tiny model on a shared CPU: more threads only spin
    encoder = load_model(TINY_MODEL, pretrained=checkpoint, device="cpu")
    results.put(("ready", number, os.getpid()))
    args = (checkpoint, source, collection, rounds, start, refused, results, others)
    threads = [threading.Thread(target=_attempts, args=(f"{number}.{t}", encoder, args)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
