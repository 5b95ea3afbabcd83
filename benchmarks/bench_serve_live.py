"""`vlsearch serve` under load while the collection changes: does the server follow every sync?

Setup: a copy of ``bench_serve``'s 100k-item collection (synthetic 256-d vectors labelled as
vlsearch-small, IVF index), served by ``vlsearch serve`` on 127.0.0.1 in a subprocess. Two phases
of ``--seconds`` each, with 8 client threads posting vector queries in a closed loop:

1. **quiet**: nobody writes;
2. **writer**: every ``--every`` seconds a sync commits a new version that adds 100 rows and deletes
   100 (``Collection.update``, the mechanism ``vlsearch index`` uses on a finished collection),
   and one ``compact`` runs in the middle.

Half of the queries are *probes*: the vector of a row just added (found at rank 1 once served) or
of a row just deleted (must never come back once its version is served). A monitor thread polls
``/health`` to learn when each version starts being served.

Reported: errors (non-200 or failed requests; goal 0), deleted ids returned by requests that
started after the version deleting them was served (goal 0), the delay from each sync's commit to
the server reporting that version and to the first response holding its new rows, and p50/p99
latency with and without the writer. Loopback only, bounded in time; the server is stopped at the
end (and if the benchmark fails).

    python benchmarks/bench_serve_live.py                       # 2 x 60 s, 8 clients
    python benchmarks/bench_serve_live.py --seconds 15 --every 4 --no-write   # a quick dry run
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402
from benchmarks.bench_serve import free_port, make_collection, start_server  # noqa: E402
from benchmarks.synthetic import DEFAULT_DIR  # noqa: E402

CLIENTS = 8
BATCH = 100


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="collection size (synthetic vectors)")
    ap.add_argument("--seconds", type=float, default=60.0, help="duration of each phase")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between syncs in the writer phase")
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--index-type", default="auto")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    return ap.parse_args()


@dataclass
class Write:
    """One committed version: when, what it added (ids, vectors) and deleted."""

    version: int
    committed: float
    added: np.ndarray
    added_vectors: np.ndarray
    deleted: np.ndarray
    deleted_vectors: np.ndarray


@dataclass
class Log:
    """What the clients, the writer and the monitor saw (times from time.perf_counter)."""

    responses: list[tuple[float, float, int, frozenset]] = field(default_factory=list)  # start, end, status, ids
    writes: list[Write] = field(default_factory=list)
    served: dict[int, float] = field(default_factory=dict)  # version -> first time /health reported it
    lock: threading.Lock = field(default_factory=threading.Lock)


def live_copy(view: Path) -> Path:
    """A private, writable copy of the served collection (the view's shards are a symlink)."""
    live = DEFAULT_DIR / (view.name.replace("serve-view", "serve-live"))
    shutil.rmtree(live, ignore_errors=True)
    shutil.copytree(view, live, symlinks=False)
    return live


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)


class Writer:
    """Commits a version every ``every`` seconds (BATCH rows added, BATCH of the original rows
    deleted) and one ``compact`` halfway through, until ``stop``."""

    def __init__(self, path: Path, log: Log, every: float, seconds: float, seed: int = 0):
        from vlsearch.store.collection import Collection

        self.path, self.log, self.every, self.seconds = path, log, every, seconds
        self.rng = np.random.default_rng(seed)
        self.ids, self.vectors = Collection.open(path).read_embeddings()
        self.alive = np.ones(len(self.ids), bool)
        self.next_id = int(self.ids.max()) + 1
        self.compacted: float | None = None

    def run(self, stop: threading.Event) -> None:
        begin = time.perf_counter()
        for n in range(1, int(self.seconds // self.every) + 1):
            if stop.wait(max(0.0, begin + n * self.every - time.perf_counter())):
                return
            self.log.writes.append(self.sync())
            if self.compacted is None and time.perf_counter() - begin >= self.seconds / 2:
                self.compact()

    def sync(self) -> Write:
        import pyarrow as pa

        from vlsearch.store.arrays import embedding_array
        from vlsearch.store.collection import Collection

        coll = Collection.open(self.path)
        ids = np.arange(self.next_id, self.next_id + BATCH, dtype=np.int64)
        self.next_id += BATCH
        vectors = unit(self.rng, BATCH, coll.dim)
        gone = self.rng.choice(np.flatnonzero(self.alive), BATCH, replace=False)
        self.alive[gone] = False
        rows = pa.table({"id": pa.array(ids), "path": [f"live/{i}.jpg" for i in ids],
                         "embedding": embedding_array(vectors)})
        with coll.update() as u:
            u.add(rows)
            u.remove(self.ids[gone])
        return Write(coll.manifest.version, time.perf_counter(), ids, vectors, self.ids[gone], self.vectors[gone])

    def compact(self) -> None:
        from vlsearch.store.collection import Collection

        start = time.perf_counter()
        Collection.open(self.path).compact()
        self.compacted = time.perf_counter() - start


def client(url: str, queries: np.ndarray, log: Log, k: int, stop: threading.Event, seed: int) -> None:
    """Closed-loop vector queries; half are probes of the newest write's added or deleted rows."""
    import httpx

    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            write = log.writes[-1] if log.writes else None
            if write is not None and rng.random() < 0.5:
                pool = write.added_vectors if rng.random() < 0.5 else write.deleted_vectors
                vector = pool[rng.randrange(len(pool))]
            else:
                vector = queries[rng.randrange(len(queries))]
            start = time.perf_counter()
            try:
                r = http.post("/api/collections/bench/search", json={"vector": vector.tolist(), "k": k})
                status = r.status_code  # ids come as decimal strings (63-bit)
                ids = frozenset(int(h["id"]) for h in r.json()["hits"]) if r.is_success else frozenset()
            except (httpx.HTTPError, ValueError, KeyError):
                status, ids = 0, frozenset()
            with log.lock:
                log.responses.append((start, time.perf_counter(), status, ids))


def monitor(url: str, log: Log, stop: threading.Event) -> None:
    """Record when /health first reports each version."""
    import httpx

    with httpx.Client(base_url=url, timeout=10) as http:
        while not stop.wait(0.05):
            try:
                for c in http.get("/health").json()["versions"].values():
                    log.served.setdefault(int(c["version"]), time.perf_counter())
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                pass


def phase(url: str, queries: np.ndarray, a: argparse.Namespace, writer: Writer | None) -> Log:
    log = writer.log if writer else Log()
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(url, queries, log, a.k, stop, i), daemon=True)
               for i in range(a.clients)]
    threads.append(threading.Thread(target=monitor, args=(url, log, stop), daemon=True))
    for t in threads:
        t.start()
    if writer is not None:
        w = threading.Thread(target=writer.run, args=(stop,), daemon=True)
        w.start()
    time.sleep(a.seconds)
    stop.set()
    for t in threads:
        t.join(120)
    return log


def analyse(log: Log) -> dict:
    """Errors, stale deleted ids, follow delays and latency percentiles of one phase."""
    lat = np.array([end - start for start, end, _, _ in log.responses]) * 1e3
    out = {"requests": len(lat), "errors": sum(status != 200 for _, _, status, _ in log.responses),
           "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}
    stale, early, served_delay, found_delay = 0, 0, [], []
    for w in log.writes:
        served = min((t for v, t in log.served.items() if v >= w.version), default=None)
        if served is None:
            continue
        served_delay.append(served - w.committed)
        gone, new = set(w.deleted.tolist()), set(w.added.tolist())
        stale += sum(1 for start, _, _, ids in log.responses if start > served and ids & gone)
        early += sum(1 for start, _, _, ids in log.responses if start <= served and ids & gone)  # the old version's
        first = min((end for start, end, _, ids in log.responses if end > w.committed and ids & new), default=None)
        if first is not None:
            found_delay.append(first - w.committed)
    out.update(stale_deleted=stale, before_served=early, syncs=len(log.writes), served_syncs=len(served_delay),
               served_delay=served_delay, found_delay=found_delay)
    return out


def main() -> None:
    a = parse_args()
    view, queries = make_collection(a.n, a.index_type)
    live = live_copy(view)
    from vlsearch.store.collection import Collection

    factory = Collection.open(live).manifest.index["factory"]
    port = free_port()
    server = start_server(live, port)
    url = f"http://127.0.0.1:{port}"
    load_avg = [os.getloadavg()[0]]
    try:
        quiet = analyse(phase(url, queries, a, None))
        print("quiet", {k: v for k, v in quiet.items() if "delay" not in k}, flush=True)
        writer = Writer(live, Log(), a.every, a.seconds)
        busy = analyse(phase(url, queries, a, writer))
        print("writer", {k: v for k, v in busy.items() if "delay" not in k}, flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    load_avg.append(os.getloadavg()[0])
    report(a, quiet, busy, writer, factory, load_avg)


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{np.median(xs) * 1e3:.0f} / {max(xs) * 1e3:.0f}"


def report(a: argparse.Namespace, quiet: dict, busy: dict, writer: Writer, factory: str, load_avg: list[float]) -> None:
    rows = [[name, r["requests"], r["errors"], r["stale_deleted"], r["before_served"], round(r["p50"], 2), round(r["p99"], 2),
             f"{r['served_syncs']}/{r['syncs']}", _ms(r["served_delay"]), _ms(r["found_delay"])]
            for name, r in (("no writer", quiet), ("writer", busy))]
    body = "\n".join([
        "## A living service (`vlsearch serve` while syncs commit)", "",
        f"{machine()}. Collection: a private copy of bench_serve's {a.n:,} synthetic 256-d vectors labelled as "
        f"vlsearch-small, index `{factory}`, served with the default follow interval. Each phase: {a.seconds:.0f} s "
        f"of closed-loop vector queries (k={a.k}) from {a.clients} client threads; half of them probe the newest "
        f"sync's added or deleted rows. Writer phase: a sync every {a.every:.0f} s (+{BATCH} rows, -{BATCH} rows, "
        f"one version each) and one compact halfway ({writer.compacted or 0:.1f} s). Load average (1 min) "
        f"{load_avg[0]:.1f} at start, {load_avg[-1]:.1f} at end (clients, server and writer share the 2 cores).", "",
        f"`{command_line()}`", "",
        markdown_table(["phase", "requests", "errors", "deleted ids returned after served",
                        "... before served (old version, expected)", "p50 ms", "p99 ms",
                        "syncs served", "commit -> served, median / max ms",
                        "commit -> first hit of new rows, median / max ms"], rows), "",
        "Goals: 0 errors, 0 deleted ids returned once their version is served, commit -> served within 2 s.",
    ])
    print(body)
    if not a.no_write:
        write_section("bench_serve_live", body)


if __name__ == "__main__":
    main()
