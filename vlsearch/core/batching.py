"""``MicroBatcher``: concurrent calls of a batch function merged into fewer, larger calls.

A server encodes each request's query text with the model. Run one forward pass per request, and
concurrent requests fight for the same cores: on 2 cores, 8 clients each waiting for a one-text
forward of ViT-B-32's text tower get little more throughput than one. A forward over 8 texts costs
far less than 8 forwards over one, so the batcher lets one caller at a time run the function (the
*leader*) while the callers that arrive meanwhile queue; the next leader takes everything queued
(up to ``max_items``) in one call. There is no timer: a lone caller runs at once and waits for
nobody, so batching costs no latency when the server is idle, and batches grow with the load.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Generic, Sequence, TypeVar

T = TypeVar("T")


class _Pending:
    """One caller's items and, once done, its results or its error."""

    __slots__ = ("items", "done", "result", "error")

    def __init__(self, items: list[Any]):
        self.items, self.done = items, False
        self.result: Any = None
        self.error: BaseException | None = None


class MicroBatcher(Generic[T]):
    """``batcher(items) == fn(items)``, with concurrent calls merged (see module docstring).

    ``fn(items)`` must return one result per item, sliceable (``result[a:b]``: a list or an array).
    If a merged call raises, each caller's items are run again on their own, so an error reaches
    only the caller whose items cause it. Thread-safe."""

    def __init__(self, fn: Callable[[list[Any]], T], max_items: int = 64):
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, not {max_items}")
        self.fn, self.max_items = fn, max_items
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._busy = False
        self.calls = 0  #: how many times ``fn`` ran (tests and metrics)

    def __call__(self, items: Sequence[Any]) -> T:
        pending = _Pending(list(items))
        with self._cond:
            self._queue.append(pending)
        while True:
            with self._cond:
                while not pending.done and self._busy:
                    self._cond.wait()
                if pending.done:
                    break
                self._busy = True
                batch = self._take()
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _take(self) -> list[_Pending]:
        """The queued callers, oldest first, up to ``max_items`` items (always at least one caller)."""
        batch, total = [], 0
        while self._queue and (not batch or total + len(self._queue[0].items) <= self.max_items):
            batch.append(self._queue.pop(0))
            total += len(batch[-1].items)
        return batch

    def _run(self, batch: list[_Pending]) -> None:
        """Run ``fn`` over the batch; every caller taken is done afterwards, with a result or an error."""
        error = self._call(batch)
        if error is None:
            return
        if len(batch) == 1 or not isinstance(error, Exception):
            for pending in batch:
                pending.error, pending.done = error, True
            return
        for pending in batch:  # find whose items fail: each caller on its own
            error = self._call([pending])
            if error is not None:
                pending.error, pending.done = error, True

    def _call(self, batch: list[_Pending]) -> BaseException | None:
        """``fn`` over the batch's items, results handed to each caller; the error if it raised."""
        items = [item for pending in batch for item in pending.items]
        self.calls += 1
        try:
            results = self.fn(items)
            if len(results) != len(items):
                raise ValueError(f"batch function returned {len(results)} results for {len(items)} items")
        except BaseException as exc:  # handed to the callers, who raise it in their own threads
            return exc
        start = 0
        for pending in batch:
            pending.result = results[start:start + len(pending.items)]
            pending.done = True
            start += len(pending.items)
        return None


__all__ = ["MicroBatcher"]
