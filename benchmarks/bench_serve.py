"""Load benchmark of `vlsearch serve`: HTTP requests/s and latency against in-process `Searcher`.

Setup: a 100k-item synthetic collection (``benchmarks/synthetic.py``, 256-d, the dimension of
vlsearch-small) whose manifest names vlsearch-small, so text queries run through the real text
tower; its index is built once by ``indexing.build.build_index`` (``--index-type``, default auto).
Then ``vlsearch serve`` runs on 127.0.0.1 in a subprocess, and 1, 8 and 32 concurrent clients
(threads, one keep-alive HTTP connection each) post queries for ``--seconds`` each:

* vector queries (the held-out synthetic queries, in rotation);
* text queries, every one a new sentence, so each one runs the text encoder (no cache hits).

Reported: requests/s, p50/p99 latency, errors (non-200 or failed requests; goal 0), server RSS
before and after, and the same load on a ``Searcher`` in this process (same threads, same calls),
so the HTTP overhead is a measured ratio. Loopback only, bounded in time; the server is stopped
at the end (and if the benchmark fails). Clients and server share the machine's cores.

    flock /work/wt/cpu.lock python benchmarks/bench_serve.py            # 3 x 2 x (30 s HTTP + 10 s local)
    python benchmarks/bench_serve.py --seconds 3 --clients 1,4          # a quick dry run
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402
from benchmarks.synthetic import DEFAULT_DIR, load_dataset  # noqa: E402

MODEL = "vlsearch-small"
SUBJECTS = ["a dog", "two children", "a man", "an old woman", "a black cat", "a group of people", "a cyclist",
            "a brown horse", "a girl in a red dress", "three boys"]
ACTIONS = ["running", "jumping", "sitting", "walking", "playing", "standing", "climbing", "swimming"]
PLACES = ["on the beach", "in the snow", "on a busy street", "in a park", "by a lake", "on the grass",
          "in front of a building", "near the water", "on a mountain", "at night"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="collection size (synthetic vectors)")
    ap.add_argument("--seconds", type=float, default=30.0, help="duration of each load level")
    ap.add_argument("--local-seconds", type=float, default=10.0,
                    help="duration of each in-process (Searcher) level, for the HTTP / in-process ratio")
    ap.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--modes", default="vector,text")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--index-type", default="auto")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    return ap.parse_args()


def unique_texts() -> "itertools.count":
    """An endless stream of distinct captions (so the text cache never answers)."""
    for i in itertools.count():
        s, a, p = SUBJECTS[i % 10], ACTIONS[(i // 10) % 8], PLACES[(i // 80) % 10]
        yield f"{s} {a} {p}" + (f" (photo {i // 800})" if i >= 800 else "")


def make_collection(n: int, index_type: str, log=print) -> tuple[Path, np.ndarray]:
    """The synthetic collection re-labelled as vlsearch-small (a view sharing its shards) + queries."""
    from indexing.build import build_index
    from vlsearch.store.collection import Collection
    from vlsearch.models.factory import load_model

    dim = load_model(MODEL, device="cpu").info.dim
    data = load_dataset(n=n, dim=dim, n_queries=1000, log=log)
    view = DEFAULT_DIR / f"serve-view-n{n}-d{dim}-{index_type.replace(',', '_')}"
    if not (view / "manifest.json").is_file():
        view.mkdir(parents=True, exist_ok=True)
        if not (view / "images").exists():
            os.symlink(data.collection.resolve() / "images", view / "images")
        from dataclasses import replace

        src = Collection.open(data.collection)
        Collection.create(view, replace(src.manifest, model=load_model(MODEL, device="cpu").info, index=None))
    if not Collection.open(view).has_index():
        entry = build_index(view, index_type=index_type)
        log(f"built {entry['factory']} in {entry['build_seconds']:.1f} s")
    return view, data.queries


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(view: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "vlsearch.app.cli", "serve", f"bench={view}", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start within 300 s")


def run_load(call_factory, clients: int, seconds: float) -> dict:
    """``clients`` threads, each calling its own ``call_factory()()`` until time is up."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start_barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        call = call_factory()
        start_barrier.wait()
        while time.perf_counter() < stop_at[0]:
            t = time.perf_counter()
            try:
                ok = call()
            except Exception:
                ok = False
            lat[i].append(time.perf_counter() - t)
            errors[i] += not ok

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    begin = time.perf_counter()
    start_barrier.wait()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.perf_counter() - begin
    all_ms = np.array([x for per in lat for x in per]) * 1e3
    return {"requests": len(all_ms), "rps": len(all_ms) / elapsed, "p50": float(np.percentile(all_ms, 50)),
            "p99": float(np.percentile(all_ms, 99)), "errors": sum(errors)}


def http_caller(url: str, mode: str, queries: np.ndarray, texts, k: int):
    import httpx

    counter = itertools.count()
    lock = threading.Lock()

    def factory():
        client = httpx.Client(base_url=url, timeout=60)

        def call() -> bool:
            with lock:
                i = next(counter)
                body = {"k": k, **({"vector": queries[i % len(queries)].tolist()} if mode == "vector"
                                   else {"text": next(texts)})}
            r = client.post("/api/collections/bench/search", json=body)
            return r.status_code == 200 and len(r.json()["hits"]) == k
        return call
    return factory


def local_caller(searcher, mode: str, queries: np.ndarray, texts, k: int):
    counter = itertools.count()
    lock = threading.Lock()

    def factory():
        def call() -> bool:
            with lock:
                i = next(counter)
                text = next(texts) if mode == "text" else None
            hits = searcher.search_text(text, k=k) if text else searcher.search_vector(queries[i % len(queries)], k=k)
            return len(hits) == k
        return call
    return factory


def main() -> None:
    a = parse_args()
    clients = [int(c) for c in a.clients.split(",")]
    modes = a.modes.split(",")
    view, queries = make_collection(a.n, a.index_type)
    from vlsearch.store.collection import Collection

    factory = Collection.open(view).manifest.index["factory"]
    port = free_port()
    server = start_server(view, port)
    url = f"http://127.0.0.1:{port}"
    rows, rss = [], {"start": rss_mb(server.pid)}
    load_avg = [os.getloadavg()[0]]
    try:
        http_caller(url, "vector", queries, unique_texts(), a.k)()()  # warm up
        http_caller(url, "text", queries, unique_texts(), a.k)()()
        rss["warm"] = rss_mb(server.pid)
        for mode in modes:
            texts = unique_texts()
            for c in clients:
                r = run_load(http_caller(url, mode, queries, texts, a.k), c, a.seconds)
                rows.append({"mode": mode, "clients": c, "where": "HTTP", **r})
                print(rows[-1], flush=True)
        rss["end"] = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    from vlsearch.models.factory import load_model
    from vlsearch.query.searcher import Searcher

    searcher = Searcher.open(view, encoder=load_model(MODEL, device="cpu"))
    for mode in modes:
        texts = itertools.islice(unique_texts(), 10**6, None)  # sentences the HTTP run never sent
        local_caller(searcher, mode, queries, texts, a.k)()()
        for c in clients:
            r = run_load(local_caller(searcher, mode, queries, texts, a.k), c, a.local_seconds)
            rows.append({"mode": mode, "clients": c, "where": "in-process", **r})
            print(rows[-1], flush=True)
    load_avg.append(os.getloadavg()[0])
    report(a, rows, rss, factory, load_avg)


def report(a: argparse.Namespace, rows: list[dict], rss: dict, factory: str, load_avg: list[float]) -> None:
    local = {(r["mode"], r["clients"]): r for r in rows if r["where"] == "in-process"}
    table = []
    for r in rows:
        if r["where"] != "HTTP":
            continue
        inproc = local.get((r["mode"], r["clients"]))
        table.append([r["mode"], r["clients"], r["requests"], round(r["rps"], 1), round(r["p50"], 2),
                      round(r["p99"], 2), r["errors"], round(inproc["rps"], 1) if inproc else "-",
                      round(inproc["p50"], 2) if inproc else "-",
                      f"{r['rps'] / inproc['rps']:.2f}" if inproc else "-"])
    shared = " (the machine was shared with other jobs)." if max(load_avg) > 2.5 else "."
    body = "\n".join([
        "## HTTP serving (`vlsearch serve`, loopback)", "",
        f"{machine()}. Collection: {a.n:,} synthetic 256-d vectors labelled as {MODEL} (text queries run its "
        f"text tower; every text is new, so none is answered from the text cache), index `{factory}` at its "
        f"default nprobe, k={a.k}. Each HTTP level: {a.seconds:.0f} s of closed-loop load from N client threads (one "
        "keep-alive connection each) in the benchmark process, on the same 2 cores as the server; each "
        f"in-process level: {a.local_seconds:.0f} s of the same calls on a `Searcher` in the benchmark process. "
        f"Load average (1 min) {load_avg[0]:.1f} at start, {load_avg[-1]:.1f} at end{shared}", "",
        f"`{command_line()}`", "",
        markdown_table(["query", "clients", "requests", "HTTP req/s", "HTTP p50 ms", "HTTP p99 ms", "errors",
                        "in-process req/s", "in-process p50 ms", "HTTP / in-process"], table), "",
        f"- Server RSS: {rss['start']:.0f} MB after start, {rss['warm']:.0f} MB after the first queries, "
        f"{rss['end']:.0f} MB at the end of the load (a growth of {rss['end'] - rss['warm']:+.0f} MB).",
    ])
    print(body)
    if not a.no_write:
        write_section("bench_serve", body)


if __name__ == "__main__":
    main()
