"""vlsearch.core.cache.ByteLRU: the one byte-bounded LRU cache."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from vlsearch.core.cache import ByteLRU, nbytes


def test_evicts_least_recently_used_by_bytes():
    cache = ByteLRU(3000)
    for key in "abc":
        cache.put(key, np.zeros(1000, np.uint8))
    assert cache.get("a") is not None  # a is now the most recent; b the least
    cache.put("d", np.zeros(1000, np.uint8))
    assert "b" not in cache and all(k in cache for k in "acd")
    assert cache.nbytes == 3000


def test_value_larger_than_the_budget_is_not_stored_and_replaces_nothing():
    cache = ByteLRU(100)
    cache.put("small", b"x" * 50)
    assert cache.put("big", b"x" * 101) == b"x" * 101
    assert "big" not in cache and cache.get("small") == b"x" * 50


def test_zero_budget_holds_nothing_and_counts_misses():
    cache = ByteLRU(0)
    cache.put("a", b"1")
    assert cache.get("a") is None and cache.misses == 1 and cache.hits == 0 and len(cache) == 0


def test_sizes_of_arrays_tables_and_bytes():
    table = pa.table({"x": np.arange(1000, dtype=np.int64)})
    assert nbytes(table) == table.nbytes and nbytes(np.zeros((4, 8), np.float32)) == 128
    assert nbytes(b"abc") == 3 and nbytes((np.zeros(10, np.uint8), b"ab")) >= 12


def test_concurrent_puts_keep_the_budget():
    cache = ByteLRU(10_000)

    def work(offset):
        for i in range(500):
            cache.put((offset, i), np.zeros(100, np.uint8))
            cache.get((offset, i - 1))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.nbytes <= 10_000 and len(cache) == 100
