"""The collection's writer lock (vlsearch.store.lock): exclusive across processes and threads,
re-entrant in its thread, free as soon as its holder dies, naming the holder when it refuses,
``--wait``; and the race of 2 processes x 2 threads syncing one collection."""

from __future__ import annotations

import multiprocessing
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from process_support import wait_for_line
from typer.testing import CliRunner

import _lock_race
import vlsearch.store.lock as lock_module
from indexing.embed import embed
from indexing.sync import sync
from test_embed import _folder, _jpeg
from test_live import _collection
from vlsearch.app.cli import app
from vlsearch.core.errors import CollectionLockedError
from vlsearch.store.collection import Collection
from vlsearch.store.lock import CollectionLock, lock_wait

#: A process that takes the lock at argv[1], says ``locked``, and releases it at a line on stdin.
#: With argv[2] == "fork" it first forks a child that outlives it (as decode workers are forked).
HOLDER = """
import os, sys, time
from vlsearch.store.lock import CollectionLock
with CollectionLock(sys.argv[1]):
    child = os.fork() if sys.argv[2:] == ["fork"] else -1
    if child == 0:
        time.sleep(600)
        os._exit(0)
    print("locked", child, flush=True)
    sys.stdin.readline()
print("released", flush=True)
sys.stdin.readline()
"""


class Holder:
    """The HOLDER script in a child process, holding the lock at ``path`` once started."""

    def __init__(self, path: Path, *extra: str):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), *extra], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self.child = int(wait_for_line(self.proc, r"^locked (-?\d+)$", timeout=300).group(1))

    def release(self) -> None:
        self.proc.stdin.write(b"\n")
        wait_for_line(self.proc, "^released$", timeout=60)

    def close(self) -> None:
        for pid in (self.proc.pid, self.child):
            if pid > 0:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            pipe.close()


def _try(path: Path, wait: float | None = None) -> str:
    """Take the lock in this thread: "held" (then released), or the refusal's message."""
    try:
        with CollectionLock(path, wait):
            return "held"
    except CollectionLockedError as exc:
        return str(exc)


def _attempt(path: Path, wait: float | None = None) -> str:
    """:func:`_try` in a new thread (this one may hold the lock)."""
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(_try(path, wait)))
    thread.start()
    thread.join()
    return outcome[0]


def test_two_threads_race_one_holds_the_other_is_refused_naming_the_pid(tmp_path):
    path, both, refused, outcomes = tmp_path / ".lock", threading.Barrier(2), threading.Event(), {}

    def race(name: str) -> None:
        both.wait()
        try:
            with CollectionLock(path):
                outcomes[name] = "held"
                refused.wait(timeout=60)  # keep it until the other thread has been refused
        except CollectionLockedError as exc:
            outcomes[name] = str(exc)
            refused.set()

    threads = [threading.Thread(target=race, args=(name,)) for name in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v == "held" for v in outcomes.values()) == [False, True], outcomes
    message = next(v for v in outcomes.values() if v != "held")
    assert f"collection {tmp_path} is locked by pid {os.getpid()} (started " in message
    assert message.endswith("wait for it to finish, or rerun with --wait SECONDS")
    assert _attempt(path) == "held"  # released: free again


def test_reentrant_in_its_thread_only_and_free_once_fully_released(tmp_path):
    path = tmp_path / ".lock"
    with CollectionLock(path):
        with CollectionLock(path):  # the same thread again (a sync that rebuilds the index)
            assert f"locked by pid {os.getpid()}" in _attempt(path)
        assert f"locked by pid {os.getpid()}" in _attempt(path)  # still held: one level left
    assert _attempt(path) == "held"
    assert path.read_text() == ""  # never unlinked; the holder's name went with the lock
    with pytest.raises(RuntimeError, match="not locked by this thread"):
        CollectionLock(path).__exit__(None, None, None)


def test_lock_wait_waits_for_the_holder_in_this_process(tmp_path, monkeypatch):
    path, polling = tmp_path / ".lock", threading.Event()

    def sleep(seconds: float) -> None:  # the waiter has found the lock taken and waits
        polling.set()
        time.sleep(seconds)

    monkeypatch.setattr(lock_module, "time", SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
    outcome: list[str] = []

    def wait_for_it() -> None:
        with lock_wait(60):
            outcome.append(_try(path, wait=0))  # its own wait goes before the ambient one
            outcome.append(_try(path))

    with CollectionLock(path):
        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        assert polling.wait(timeout=60)
        assert "after waiting 0.01 s: another sync" in _attempt(path, wait=0.01)
    waiter.join()
    assert "locked by pid" in outcome[0] and "after waiting" not in outcome[0]
    assert outcome[1] == "held"
    with pytest.raises(ValueError):
        with lock_wait(-1):
            pass


def test_a_dead_holder_leaves_the_lock_free_and_a_live_one_is_named(tmp_path):
    path = tmp_path / ".lock"
    holder = Holder(path)
    try:
        pid, started = re.fullmatch(r"pid (\d+) started (\S+) host \S+\n", path.read_text()).groups()
        assert int(pid) == holder.proc.pid
        message = _attempt(path)
        assert f"is locked by pid {holder.proc.pid} (started {started}): another sync" in message
        os.kill(holder.proc.pid, signal.SIGKILL)
        holder.proc.wait()
    finally:
        holder.close()
    assert path.exists()  # left as it was: nothing to take over
    assert _attempt(path) == "held"


def test_a_forked_child_does_not_keep_its_dead_parents_lock(tmp_path):
    """Decode workers are forked while a sync holds the lock: they must not hold it when it dies."""
    path = tmp_path / ".lock"
    holder = Holder(path, "fork")
    try:
        os.kill(holder.proc.pid, signal.SIGKILL)
        holder.proc.wait()
        os.kill(holder.child, 0)  # the forked child lives on
        assert _attempt(path) == "held"
    finally:
        holder.close()


def test_every_writing_command_takes_wait():
    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    for name in ("embed", "index", "build-index", "compact", "rerank-features"):
        assert any("--wait" in p.opts for p in commands[name].params), name


def test_compact_fails_at_once_or_waits_with_wait(tmp_path, monkeypatch):
    coll = _collection(tmp_path / "c", n=40, shard_size=10, factory=None)
    version = coll.manifest.version
    holder = Holder(coll.path / ".lock")
    try:
        refused = CliRunner().invoke(app, ["compact", str(coll.path)])
        assert refused.exit_code == 1
        assert f"is locked by pid {holder.proc.pid} (started " in refused.output
        assert Collection.open(coll.path).manifest.version == version

        polling, real_sleep = threading.Event(), time.sleep
        monkeypatch.setattr(lock_module, "time", SimpleNamespace(
            monotonic=time.monotonic, sleep=lambda s: polling.set() or real_sleep(s)))
        results = []
        waiter = threading.Thread(target=lambda: results.append(
            CliRunner().invoke(app, ["compact", str(coll.path), "--wait", "60"])))
        waiter.start()
        assert polling.wait(timeout=120)  # compact found the lock taken and waits
        holder.release()
        waiter.join()
    finally:
        holder.close()
    assert results[0].exit_code == 0, results[0].output
    assert Collection.open(coll.path).manifest.version == version + 1


# ---- the race: 2 processes x 2 threads sync one collection, 50 rounds -----------------------------

ROUNDS, PROCESSES = 50, 2


def _ids_and_paths(path: Path) -> list[tuple[int, str]]:
    table = Collection.open(path).read_table("images", ["id", "path"])
    return sorted(zip(table.column("id").to_pylist(), table.column("path").to_pylist()))


def _get(results, procs, timeout: float = 600) -> tuple:
    """The next message of the workers; fails at once when one of them has died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=1)
        except queue.Empty:
            dead = [p.exitcode for p in procs if not p.is_alive()]
            assert not dead, f"a race worker exited with code {dead}"
    pytest.fail("the race workers sent nothing in time")


def _check_round(round_no: int, outcomes: list[tuple]) -> None:
    """Exactly one worker synced (the one new file), three were refused naming the winner's pid."""
    assert [o[0] for o in outcomes] == [round_no] * 4, outcomes
    won = [o for o in outcomes if o[3] == "synced"]
    lost = [o for o in outcomes if o[3] == "locked"]
    assert len(won) == 1 and len(lost) == 3, outcomes
    assert won[0][4].startswith("+1 new, ~0 changed, -0 deleted"), won
    for _, _, _, _, message in lost:
        assert re.search(rf"locked by pid {won[0][2]} \(started |locked by another process", message), message


@pytest.mark.usefixtures("one_torch_thread")
def test_two_processes_of_two_threads_race_to_sync_exactly_one_wins_each_round(tmp_path, tiny_encoder,
                                                                               tiny_checkpoint):
    src = _folder(tmp_path / "src", 3)
    config = _lock_race.config(str(tiny_checkpoint))
    raced = embed(src, tmp_path / "raced", config, encoder=tiny_encoder).path
    serial = embed(src, tmp_path / "serial", config, encoder=tiny_encoder).path
    workers = PROCESSES * _lock_race.THREADS
    ctx = multiprocessing.get_context("spawn")  # never fork a process that has torch's threads running
    start, refused, results = ctx.Barrier(workers + 1), ctx.Semaphore(0), ctx.Queue()
    procs = [ctx.Process(target=_lock_race.worker, daemon=True,
                         args=(n, str(tiny_checkpoint), str(src), str(raced), ROUNDS, start, refused, results,
                               workers - 1)) for n in range(PROCESSES)]
    for p in procs:
        p.start()
    try:
        assert sorted(_get(results, procs)[0] for _ in procs) == ["ready"] * PROCESSES  # each loaded its model
        for round_no in range(ROUNDS):
            (src / f"new{round_no:03d}.jpg").write_bytes(_jpeg(200 + round_no))
            start.wait(timeout=120)  # all four go at once
            _check_round(round_no, sorted(_get(results, procs) for _ in range(workers)))
            sync(src, serial, config, encoder=tiny_encoder)
            assert _ids_and_paths(raced) == _ids_and_paths(serial)
    finally:
        start.abort()
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    assert len(_ids_and_paths(raced)) == 3 + ROUNDS
