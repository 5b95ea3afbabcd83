"""clip-retrieval's back end vs ``vlsearch serve`` on the same vectors, side by side (issue 33).

1. **Folder.** A clip-retrieval output folder of ``--rows`` 512-d vectors (``img_emb/img_emb_{k}.npy``
   float16 and ``metadata/metadata_{k}.parquet`` with image_path, caption, url; partitions of 100,000
   rows, ``k`` zero-padded), drawn from ``benchmarks/synthetic.py``'s ``"real"`` generator (fitted to
   real embeddings; same seeds, so the rows equal ``make_dataset``'s). Held-out query vectors from the
   generator's query stream (not in the folder) and their exact inner-product top-10 over the
   float16 vectors. Cached under ``bench-data/crbench-n{rows}/``.
2. **clip-retrieval's index**, built the way its users do: ``clip-retrieval index`` (autofaiss with
   its defaults: 4G index memory budget; 16G available memory), writing ``index/image.index`` and
   ``image.json`` (the factory autofaiss picked is reported).
3. **vlsearch's collection**: ``vlsearch import clip-retrieval`` of the same folder, adopting that
   ``image.index`` (the import's default). ``--rebuild-index`` also measures a second collection
   imported with ``--rebuild-index`` (vlsearch's own auto index plan).
4. **The text encoder.** Weights cannot be downloaded here, so both servers use ViT-B-32 with the
   same random weights: a state dict saved once (``torch.manual_seed(0)``) to
   ``bench-data/crbench-vit-b-32-random.pt``. vlsearch records it as the collection's model
   (``--model open_clip:ViT-B-32/<checkpoint path>``: an open_clip model with no downloadable weights
   and no checkpoint would encode with fresh random weights, different in each process); clip back
   gets it through ``benchmarks/clip_back_launcher.py``, which replaces ``all_clip.load_clip``.
5. **Servers**, one at a time on 127.0.0.1: clip back by ``clip_back_launcher.py`` in clip-retrieval's
   own virtualenv (``--venv``, or ``--setup-venv DIR`` to create one: clip-retrieval pins numpy < 2),
   serving clip_back's Flask app with werkzeug's threaded server (the launcher asserts its socket is
   bound to 127.0.0.1; its mclip and aesthetic options are off: they download); ``vlsearch serve``
   with its defaults. This script also checks ``/proc/net/tcp`` that each port listens on 127.0.0.1
   only.
6. **Load.** ClipClient 2.45's ``/knn-service`` text request (``tests/fixtures/clip_retrieval/
   clipclient_text.json``: num_images 40, deduplicate on, safety/violence/aesthetic fields as
   ClipClient sends them), one new connection per request and no content type, as ClipClient's
   ``requests.post(url, data=json.dumps(...))``; distinct captions (never repeated in a run) from 1, 8
   and 32 client threads for ``--seconds`` per server and level. All servers run at once (idle but
   the one measured) and take turns in ``--rounds`` rounds per level, so that the shared machine's
   changing background load falls on each alike. Throughput and p50/p99 latency per server and
   level (p50: the rounds' p50s weighted by requests; p99: the worst round's), and vlsearch /
   clip-retrieval ratios from the same run.
7. **Recall@10** against exact search: the same request with ``embedding_input`` = each held-out
   query vector (identical vectors on both servers) and ``deduplicate: false``, one client; the ids
   come from the returned ``image_path`` (both servers return it).

Results go to benchmarks/RESULTS.md, section "clip-retrieval side by side".

    python benchmarks/bench_clip_retrieval.py --venv /tmp/crvenv                  # 1M rows
    python benchmarks/bench_clip_retrieval.py --venv /tmp/crvenv --rows 100000 --seconds 10 --no-write
    python benchmarks/bench_clip_retrieval.py --setup-venv /tmp/crvenv2 --rows 100000
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402
from benchmarks.bench_serve import free_port, run_load  # noqa: E402
from benchmarks.synthetic import CHUNK, DEFAULT_DIR, KINDS, _Model  # noqa: E402

DIM = 512
ARCH = "ViT-B-32"
INDEX_NAME = "bench"
RECALL_K = 10
REQUEST_TIMEOUT = 60  # seconds: a request a server never answers counts as an error
CHECKPOINT = DEFAULT_DIR / "crbench-vit-b-32-random.pt"
CLIPCLIENT_BODY = ROOT / "tests" / "fixtures" / "clip_retrieval" / "clipclient_text.json"
LOGS = DEFAULT_DIR / "crbench-logs"  # the servers' output, one file per port
LAUNCHER = Path(__file__).resolve().parent / "clip_back_launcher.py"
VENV_PACKAGES = ["clip-retrieval==2.45.0", "torch==2.14.1", "torchvision==0.29.1", "setuptools<70"]
WORDS = {
    "adj": "red blue green small large old young wooden shiny dark bright striped fluffy quiet busy".split(),
    "noun": ("dog cat horse bicycle car boat house tree child woman man bird train guitar kite "
             "bridge tower table flower mountain").split(),
    "verb": "standing sitting running resting waiting lying playing parked floating shown".split(),
    "place": ("beach street park field kitchen forest river garden market station city lake road "
              "snow desert harbour").split(),
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=500, help="held-out query vectors for recall@10")
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of each concurrency level")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels")
    ap.add_argument("--rounds", type=int, default=4, help="turns per level: the servers alternate (see text_load)")
    venv = ap.add_mutually_exclusive_group(required=True)
    venv.add_argument("--venv", type=Path, help="an existing virtualenv with clip-retrieval 2.45")
    venv.add_argument("--setup-venv", type=Path, help="create (or reuse) this virtualenv with clip-retrieval 2.45")
    ap.add_argument("--rebuild-index", action="store_true",
                    help="also measure a collection imported with --rebuild-index (vlsearch's own index)")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the generated data is cached")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    return ap.parse_args()


# ---- setup ---------------------------------------------------------------------------------------

def setup_venv(path: Path, log=print) -> Path:
    """A virtualenv with clip-retrieval 2.45 at ``path``: created with its pinned packages unless it has them."""
    python = path / "bin" / "python"
    probe = "import importlib; importlib.import_module('clip_retrieval.clip_back'); import autofaiss"
    if python.is_file() and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
        return path
    log(f"creating {path} with {' '.join(VENV_PACKAGES)}")
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", *VENV_PACKAGES], check=True)
    return path


def captions(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` short captions from WORDS (about 45,000 distinct ones)."""
    pick = {k: rng.integers(0, len(v), n) for k, v in WORDS.items()}
    return [f"a {WORDS['adj'][a]} {WORDS['noun'][b]} {WORDS['verb'][c]} near the {WORDS['place'][d]}"
            for a, b, c, d in zip(pick["adj"], pick["noun"], pick["verb"], pick["place"])]


def query_texts(seed: int = 1) -> list[str]:
    """Every distinct caption WORDS can make, in a random order (a run never repeats one)."""
    texts = [f"a {a} {b} {c} near the {d}" for a, b, c, d in
             itertools.product(WORDS["adj"], WORDS["noun"], WORDS["verb"], WORDS["place"])]
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order]


def write_partition(folder: Path, k: str, start: int, x16: np.ndarray, rng: np.random.Generator) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = np.arange(start, start + len(x16))
    np.save(folder / "img_emb" / f"img_emb_{k}.npy", x16)
    pq.write_table(pa.table({
        "image_path": [f"images/{i:08d}.jpg" for i in rows],
        "caption": captions(rng, len(rows)),
        "url": [f"https://example.com/images/{i:08d}.jpg" for i in rows],
    }), folder / "metadata" / f"metadata_{k}.parquet")


def generate_folder(root: Path, rows: int, n_queries: int, seed: int = 0, log=print) -> Path:
    """The clip-retrieval folder ``root/folder`` (module doc, step 1), generated once."""
    import faiss

    folder = root / "folder"
    if (root / "gt_ids.npy").is_file():
        return folder
    for sub in ("img_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    model = _Model(KINDS["real"], seed)  # KINDS["real"] is 512-d
    queries = model.sample(np.random.default_rng([seed, 0x9E7]), n_queries)
    heap = faiss.ResultHeap(n_queries, RECALL_K, keep_max=True)
    width = len(str((rows + CHUNK - 1) // CHUNK))
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        x16 = model.sample(np.random.default_rng([seed, start // CHUNK]), n).astype(np.float16)
        scores, idx = faiss.knn(queries, x16.astype(np.float32), min(RECALL_K, n), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, idx + start)
        write_partition(folder, str(start // CHUNK).zfill(width), start, x16,
                        np.random.default_rng([seed, 0xCA9, start // CHUNK]))
        log(f"folder: {start + n:,}/{rows:,} rows")
    heap.finalize()
    np.save(root / "queries.npy", queries)
    np.save(root / "gt_ids.npy", heap.I.astype(np.int64))
    return folder


def build_cr_index(venv: Path, folder: Path, index_dir: Path, log=print) -> dict:
    """``clip-retrieval index`` as its users run it; returns autofaiss's ``image.json`` (+ build time)."""
    info_path = index_dir / "build.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    log("clip-retrieval index (autofaiss) ...")
    start = time.perf_counter()
    subprocess.run([venv / "bin" / "clip-retrieval", "index", "--embeddings_folder", folder,
                    "--index_folder", index_dir], check=True, stdout=subprocess.DEVNULL)
    info = {**json.loads((index_dir / "image.json").read_text()), "build_seconds": time.perf_counter() - start}
    info_path.write_text(json.dumps(info, indent=2))
    return info


def save_checkpoint(path: Path = CHECKPOINT) -> Path:
    """ViT-B-32 with random weights (seed 0), saved once as an open_clip state dict."""
    if not path.is_file():
        import open_clip
        import torch

        torch.manual_seed(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(open_clip.create_model(ARCH, pretrained=None).state_dict(), path)
    return path


def vlsearch_cli(*args: object, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vlsearch.app.cli", *map(str, args)]
    if kwargs.pop("background", False):
        return subprocess.Popen(cmd, env=env, **kwargs)
    return subprocess.run(cmd, env=env, check=True, **kwargs)


def import_collection(folder: Path, index_dir: Path, dest: Path, rebuild: bool, log=print) -> dict:
    """``vlsearch import clip-retrieval`` (once); returns its wall time and the index it ended with."""
    from vlsearch.store.collection import Collection

    done = dest / "bench-import.json"
    if done.is_file():
        return json.loads(done.read_text())
    log(f"vlsearch import clip-retrieval -> {dest.name} ...")
    start = time.perf_counter()
    vlsearch_cli("import", "clip-retrieval", folder, dest, "--model", f"open_clip:{ARCH}/{save_checkpoint()}",
                 "--index-dir", index_dir, *(["--rebuild-index"] if rebuild else []), stdout=subprocess.DEVNULL)
    index = Collection.open(dest).manifest.index or {}
    info = {"seconds": time.perf_counter() - start, "factory": index.get("factory"), "adopted": not rebuild}
    done.write_text(json.dumps(info, indent=2))
    return info


# ---- servers -------------------------------------------------------------------------------------

def listen_addresses(port: int) -> set[str]:
    """The IPv4/IPv6 addresses a LISTEN socket on ``port`` is bound to (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 900) -> None:
    """Wait for ``GET /indices-list``; then check the port listens on 127.0.0.1 only."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode} (its log: {LOGS})")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/indices-list")
            if conn.getresponse().status == 200:
                break
        except OSError:
            time.sleep(1)
    else:
        raise RuntimeError(f"server on port {port} not ready within {timeout:.0f} s")
    addresses = listen_addresses(port)
    if addresses != {"0100007F"}:  # 127.0.0.1, little-endian hex
        raise RuntimeError(f"port {port} listens on {addresses}, not on 127.0.0.1 only")


@dataclass
class Server:
    """A server to measure: how to start it, and its process while it runs."""

    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        # a file, not a pipe: clip back logs every request to stderr, and a pipe nobody reads fills
        # up (64 KiB) and blocks the server's threads for good
        LOGS.mkdir(parents=True, exist_ok=True)
        with open(LOGS / f"{self.port}.log", "wb") as log:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.proc, self.port)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def clip_back_server(venv: Path, index_dir: Path) -> Server:
    indices = index_dir.parent / "indices_paths.json"
    indices.write_text(json.dumps({INDEX_NAME: str(index_dir)}))
    port = free_port()
    return Server("clip-retrieval back", [str(venv / "bin" / "python"), str(LAUNCHER), "--indices", str(indices),
                                          "--port", str(port), "--checkpoint", str(save_checkpoint())],
                  dict(os.environ), port)


def vlsearch_server(name: str, collection: Path) -> Server:
    port = free_port()
    return Server(name, [sys.executable, "-m", "vlsearch.app.cli", "serve", f"{INDEX_NAME}={collection}",
                         "--host", "127.0.0.1", "--port", str(port)],
                  {**os.environ, "PYTHONPATH": str(ROOT)}, port)


# ---- load ----------------------------------------------------------------------------------------

def clipclient_body(**fields: object) -> dict:
    """ClipClient 2.45's request body (the recorded fixture) with ``fields`` replaced."""
    return {**json.loads(CLIPCLIENT_BODY.read_text()), "indice_name": INDEX_NAME, **fields}


def post_knn(port: int, body: dict) -> list[dict]:
    """One ``/knn-service`` call as ClipClient makes it: a new connection, ``data=json.dumps(body)``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("POST", "/knn-service", body=json.dumps(body))
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"/knn-service answered {response.status}: {data[:300]!r}")
        return json.loads(data)
    finally:
        conn.close()


def text_caller(port: int, texts: list[str], counter: itertools.count, lock: threading.Lock):
    """``run_load``'s call factory: ClipClient text queries, each with the next distinct caption."""
    def factory():
        def call() -> bool:
            with lock:
                text = texts[next(counter) % len(texts)]
            return len(post_knn(port, clipclient_body(text=text))) > 0
        return call
    return factory


def merge(parts: list[dict], seconds: float) -> dict:
    """One level's figures from its rounds (latencies pooled by weighting each round's percentiles)."""
    requests = sum(p["requests"] for p in parts)
    weights = [p["requests"] / max(requests, 1) for p in parts]
    return {"requests": requests, "rps": requests / (seconds * len(parts)), "errors": sum(p["errors"] for p in parts),
            "p50": float(np.average([p["p50"] for p in parts], weights=weights)),
            "p99": float(max(p["p99"] for p in parts))}


def text_load(servers: list[Server], texts: list[str], levels: list[int], seconds: float, rounds: int,
              log=print) -> dict[str, dict[int, dict]]:
    """ClipClient text load per server and concurrency level. Each level runs ``rounds`` rounds of
    ``seconds / rounds`` per server, the servers taking turns, so that a shared machine's changing
    background load falls on all of them alike; every server gets the same captions in the same order."""
    counters = {s.name: (itertools.count(), threading.Lock()) for s in servers}
    for s in servers:
        post_knn(s.port, clipclient_body(text="a warm-up query"))
    out: dict[str, dict[int, dict]] = {s.name: {} for s in servers}
    for n in levels:
        parts: dict[str, list[dict]] = {s.name: [] for s in servers}
        for r in range(rounds):
            for s in servers if r % 2 == 0 else servers[::-1]:
                parts[s.name].append(run_load(text_caller(s.port, texts, *counters[s.name]), n, seconds / rounds))
        for s in servers:
            out[s.name][n] = res = merge(parts[s.name], seconds / rounds)
            log(f"{s.name}: {n:>2} clients {res['rps']:.2f} q/s p50 {res['p50']:.0f} ms p99 {res['p99']:.0f} ms "
                f"errors {res['errors']} (load average {os.getloadavg()[0]:.1f})")
    return out


def recall_at_k(port: int, queries: np.ndarray, gt_ids: np.ndarray, k: int = RECALL_K) -> float:
    """Mean recall@k of ``embedding_input`` queries (deduplicate off) against the exact top-k."""
    hits = 0
    for q, truth in zip(queries, gt_ids[:, :k]):
        results = post_knn(port, clipclient_body(text=None, embedding_input=q.tolist(), deduplicate=False))
        rows = {int(Path(r["image_path"]).stem) for r in results[:k]}
        hits += len(rows & set(truth.tolist()))
    return hits / (len(queries) * k)


def measure(servers: list[Server], texts: list[str], levels: list[int], seconds: float, rounds: int,
            queries: np.ndarray, gt_ids: np.ndarray, log=print) -> dict[str, dict]:
    """Recall and text load of every server, all of them running (idle but for the one measured)."""
    with contextlib.ExitStack() as stack:
        for s in servers:
            stack.enter_context(s)
            log(f"{s.name}: serving on 127.0.0.1:{s.port}")
        recall = {s.name: recall_at_k(s.port, queries, gt_ids) for s in servers}
        log(f"recall@{RECALL_K}: {recall}")
        load = text_load(servers, texts, levels, seconds, rounds)
    return {s.name: {"recall": recall[s.name], "load": load[s.name]} for s in servers}


# ---- report --------------------------------------------------------------------------------------

def report(args: argparse.Namespace, results: dict[str, dict], cr_index: dict, imports: dict[str, dict]) -> str:
    base = results["clip-retrieval back"]
    headers = ["server", "index", "clients", "queries/s", "p50 ms", "p99 ms", "errors", "recall@10",
               "throughput vs clip-retrieval", "p50 vs clip-retrieval", "p99 vs clip-retrieval"]
    rows = []
    for name, res in results.items():
        index = cr_index.get("index_key") if name not in imports else imports[name]["factory"]
        for n, r in res["load"].items():
            b = base["load"][n]
            rows.append([name, index, n, r["rps"], r["p50"], r["p99"], r["errors"], res["recall"],
                         f"{r['rps'] / b['rps']:.2f}x", f"{r['p50'] / b['p50']:.2f}x", f"{r['p99'] / b['p99']:.2f}x"])
    how = {True: "adopting image.index", False: "--rebuild-index"}
    imported = "; ".join(f"{name}: {info['seconds']:.0f} s ({how[info['adopted']]})" for name, info in imports.items())
    return "\n".join([
        "## clip-retrieval side by side (`benchmarks/bench_clip_retrieval.py`)", "",
        f"Command: `{command_line()}`", "", f"Machine: {machine()}", "",
        f"{args.rows:,} synthetic 512-d vectors (the \"real\" generator) in a clip-retrieval 2.45 folder; "
        f"clip-retrieval's index by `clip-retrieval index` (autofaiss, its defaults): `{cr_index.get('index_key')}` "
        f"in {cr_index.get('build_seconds', float('nan')):.0f} s; `vlsearch import clip-retrieval`: {imported}. "
        f"Both servers encode text with the same random-weight ViT-B-32 checkpoint (module docstring). "
        f"Load: ClipClient's `/knn-service` text body (num_images 40, deduplicate on), a new connection per "
        f"request, distinct captions, {args.seconds:.0f} s per server and level in {args.rounds} alternating rounds "
        f"(p50: the rounds' p50s weighted by requests; p99: the worst round's); recall@10 of {len(np.load(args.dir / f'crbench-n{args.rows}' / 'queries.npy')):,} "
        "held-out `embedding_input` queries (deduplicate off) against exact inner product. Ratios are "
        "vlsearch / clip-retrieval from the same run (throughput: higher is better; latency: lower).", "",
        markdown_table(headers, rows),
    ])


def main() -> None:
    args = parse_args()
    venv = setup_venv(args.setup_venv) if args.setup_venv else args.venv
    root = args.dir / f"crbench-n{args.rows}"
    folder = generate_folder(root, args.rows, args.queries)
    cr_index = build_cr_index(venv, folder, root / "index")
    print(f"clip-retrieval index: {cr_index.get('index_key')}")
    imports = {"vlsearch": import_collection(folder, root / "index", root / "collection", rebuild=False)}
    if args.rebuild_index:
        imports["vlsearch (--rebuild-index)"] = import_collection(folder, root / "index", root / "collection-rebuilt",
                                                                  rebuild=True)
    servers = [clip_back_server(venv, root / "index"), vlsearch_server("vlsearch", root / "collection")]
    if args.rebuild_index:
        servers.append(vlsearch_server("vlsearch (--rebuild-index)", root / "collection-rebuilt"))
    texts, levels = query_texts(), [int(n) for n in args.clients.split(",")]
    queries, gt_ids = np.load(root / "queries.npy"), np.load(root / "gt_ids.npy")
    results = measure(servers, texts, levels, args.seconds, args.rounds, queries, gt_ids)
    body = report(args, results, cr_index, imports)
    print(body)
    if not args.no_write:
        write_section("bench_clip_retrieval", body)


if __name__ == "__main__":
    main()
