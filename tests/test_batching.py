"""MicroBatcher: concurrent calls merged into fewer calls, each caller getting its own results."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vlsearch.core.batching import MicroBatcher


def test_a_lone_call_runs_at_once_with_its_own_items():
    seen = []
    batcher = MicroBatcher(lambda items: (seen.append(list(items)), [x * 2 for x in items])[1])
    assert batcher([1, 2, 3]) == [2, 4, 6]
    assert seen == [[1, 2, 3]] and batcher.calls == 1


def test_concurrent_callers_share_calls_and_each_gets_its_own_rows():
    started = threading.Event()
    sizes = []

    def encode(items):
        started.set()
        sizes.append(len(items))
        time.sleep(0.05)  # a slow forward pass: callers arriving meanwhile queue
        return np.array([[float(x), -float(x)] for x in items])

    batcher = MicroBatcher(encode, max_items=64)
    results: dict[int, np.ndarray] = {}

    def caller(i: int) -> None:
        results[i] = batcher([i, i + 100])

    first = threading.Thread(target=caller, args=(0,))
    first.start()
    started.wait(5)
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(1, 21)]
    for t in threads:
        t.start()
    for t in [first, *threads]:
        t.join(10)
    assert sorted(results) == list(range(21))
    for i, rows in results.items():
        assert rows.tolist() == [[i, -i], [i + 100, -(i + 100)]]
    assert sum(sizes) == 42 and batcher.calls < 21  # merged: 20 queued callers in few calls
    assert max(sizes) <= 64


def test_max_items_caps_a_merged_call():
    gate = threading.Event()
    sizes = []

    def fn(items):
        sizes.append(len(items))
        gate.wait(5)
        return list(items)

    batcher = MicroBatcher(fn, max_items=4)
    threads = [threading.Thread(target=batcher, args=([i, i],)) for i in range(6)]
    _start_then_open(threads, gate)
    assert sum(sizes) == 12 and max(sizes) <= 4


def test_an_error_reaches_only_the_caller_whose_items_cause_it():
    gate = threading.Event()

    def fn(items):
        gate.wait(5)
        if "bad" in items:
            raise ValueError("cannot encode 'bad'")
        return [s.upper() for s in items]

    batcher = MicroBatcher(fn)
    out: dict[str, object] = {}

    def caller(items):
        try:
            out[items[0]] = batcher(items)
        except ValueError as exc:
            out[items[0]] = exc

    threads = [threading.Thread(target=caller, args=(items,)) for items in (["a"], ["bad"], ["c", "d"])]
    _start_then_open(threads, gate)
    assert out["a"] == ["A"] and out["c"] == ["C", "D"]
    assert isinstance(out["bad"], ValueError) and "bad" in str(out["bad"])


def test_a_function_returning_the_wrong_count_is_an_error():
    with pytest.raises(ValueError, match="2 results for 3 items"):
        MicroBatcher(lambda items: items[:2])([1, 2, 3])


def _start_then_open(threads: list[threading.Thread], gate: threading.Event) -> None:
    """Start the callers, let them all queue behind the closed gate, open it, wait for them."""
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(10)
