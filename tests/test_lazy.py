"""vlsearch.core.lazy.Lazy: made once, on first use, even under concurrent first calls."""

from __future__ import annotations

import threading
import time

from vlsearch.core.lazy import Lazy


def test_made_once_on_first_get_even_when_threads_race():
    calls = []

    def make():
        calls.append(1)
        time.sleep(0.05)  # widen the window in which a second thread could also make it
        return object()

    lazy = Lazy(make)
    assert not lazy.made and calls == []
    got = []
    threads = [threading.Thread(target=lambda: got.append(lazy.get())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(g) for g in got}) == 1 and lazy.made


def test_a_given_value_is_never_remade_and_set_replaces_it():
    lazy = Lazy(lambda: (_ for _ in ()).throw(AssertionError("made")), value="given")
    assert lazy.get() == "given"
    lazy.set("other")
    assert lazy.get() == "other"
