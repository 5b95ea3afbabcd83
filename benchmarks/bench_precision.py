"""Inference precision on this machine: speed, agreement with fp32, retrieval quality, and what
``precision="auto"`` picks (``vlsearch.models.precision``).

Two sub-commands, each saving JSON under ``bench-data/precision/`` and then rewriting the
``precision`` section of RESULTS.md from every saved result (so they can run one at a time):

* ``speed``: model-only images/s and texts/s (batch ``--batch-size``), text-query latency p50/p99
  (batch 1, tokenisation included) and the minimum cosine of each precision's embeddings to
  fp32's on the same real flickr8k-test images and captions. Random-init weights are seeded, so
  every precision sees the same model. Slow modes are timed on fewer images (column ``n``).
* ``recall``: flickr8k-test (1,000 images, 5,000 captions) retrieval metrics per precision, and
  the cosine agreement of all 6,000 embeddings with fp32's. Embeddings are saved in blocks of
  ``--block-size`` images with their captions and each run stops before ``--max-seconds``, so a
  precision that is slow on this CPU (bf16 without bf16 units) completes over several runs.

    flock /work/wt/cpu.lock python benchmarks/bench_precision.py speed --models ViT-B-32,vlsearch-small
    flock /work/wt/cpu.lock python benchmarks/bench_precision.py recall --model vlsearch-small
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlsearch.core.allocator import enable_huge_pages  # noqa: E402
enable_huge_pages()  # before torch's first allocation: its allocator on huge pages, as in the CLI
import torch  # noqa: E402
from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402
from vlsearch.core.allocator import reusing_freed_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "flickr8k-test"
OUT = ROOT / "bench-data" / "precision"


def read_split(folder: Path = DATA) -> tuple[list[Path], list[str], np.ndarray]:
    """(unique image paths, captions, image index of each caption) of flickr8k-test."""
    from benchmarks.bench_small import read_split as read

    return read(folder)


def load(name: str, precision: str, seed: int = 0):
    from vlsearch.models.factory import load_model

    torch.manual_seed(seed)  # the same random-init weights for every precision
    return load_model(name, device="cpu", precision=precision)


def _timed(fn, n_items: int, seconds: float) -> float:
    """Items per second of ``fn`` (one call = ``n_items``), repeated for at least ``seconds``."""
    calls, start = 0, time.perf_counter()
    while calls < 1 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls * n_items / (time.perf_counter() - start)


def _n_for_budget(fn_one, batch: int, seconds: float) -> int:
    """Batch size to time: ``batch``, or fewer when one item already takes a large part of ``seconds``."""
    start = time.perf_counter()
    fn_one()  # warm-up
    per_item = time.perf_counter() - start
    return batch if per_item * batch <= seconds else max(2, int(seconds / per_item))


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine between matching rows (unit vectors); the rows both encoded."""
    n = min(len(a), len(b))
    return round(float((a[:n] * b[:n]).sum(1).min()), 5)


def speed_row(name: str, precision: str, pixels: torch.Tensor, captions: list[str], ref: dict | None,
              args: argparse.Namespace) -> tuple[dict, dict]:
    enc = load(name, precision)
    with reusing_freed_memory():  # as embedding jobs run (vlsearch/core/allocator.py); queries below run outside
        n_img = _n_for_budget(lambda: enc.encode_image_tensors(pixels[:1]), args.batch_size, args.seconds)
        images = enc.encode_image_tensors(pixels[:n_img])
        img_rate = _timed(lambda: enc.encode_image_tensors(pixels[:n_img]), n_img, args.seconds)
        n_txt = _n_for_budget(lambda: enc.encode_texts(captions[:1]), args.batch_size, args.seconds)
        texts = enc.encode_texts(captions[:n_txt])
        txt_rate = _timed(lambda: enc.encode_texts(captions[:n_txt]), n_txt, args.seconds)
    latencies = []
    start = time.perf_counter()
    while len(latencies) < 5 or (len(latencies) < args.queries and time.perf_counter() - start < args.seconds):
        q = captions[len(latencies) % len(captions)]
        t = time.perf_counter()
        enc.encode_texts([q])
        latencies.append(1000 * (time.perf_counter() - t))
    out = {"images": images, "texts": texts}
    row = {"model": name, "precision": enc.precision, "reason": enc.precision_choice.reason,
           "images/s": round(img_rate, 1), "n images": n_img, "texts/s": round(txt_rate, 1), "n texts": n_txt,
           "query p50 ms": round(float(np.percentile(latencies, 50)), 1),
           "query p99 ms": round(float(np.percentile(latencies, 99)), 1), "queries": len(latencies)}
    if ref is not None:
        row["min cos images"] = _min_cos(images, ref["images"][:n_img])
        row["min cos texts"] = _min_cos(texts, ref["texts"][:n_txt])
        row["speed-up images"] = round(img_rate / ref["row"]["images/s"], 3)
        row["speed-up texts"] = round(txt_rate / ref["row"]["texts/s"], 3)
    print(row, flush=True)
    return row, out


def run_speed(args: argparse.Namespace) -> None:
    from vlsearch.data.images import open_image
    from vlsearch.models.precision import benchmark_bf16, describe_auto

    paths, captions, _ = read_split()
    for name in args.models.split(","):
        enc = load(name, "fp32")
        pixels = torch.stack([enc.preprocess(open_image(p)) for p in paths[: args.batch_size]])
        del enc
        rows, ref = [], None
        for precision in ["fp32", *[p for p in args.precisions.split(",") if p != "fp32"]]:
            row, out = speed_row(name, precision, pixels, captions, ref, args)
            if precision == "fp32":
                ref = {**out, "row": row}
            rows.append(row)
        auto = load(name, "auto")
        save(f"speed-{name}", {"kind": "speed", "model": name, "rows": rows, "command": command_line(),
                               "machine": machine(), "load": os.getloadavg()[0], "batch_size": args.batch_size,
                               "auto": {"precision": auto.precision, "reason": auto.precision_choice.reason}})
    bench = benchmark_bf16()
    save("microbench", {"kind": "microbench", "speedup": bench.speedup, "seconds": bench.seconds, "key": bench.key,
                        **describe_auto("cpu")})
    write_report()


def _block_file(model: str, precision: str, block: int, block_size: int) -> Path:
    return OUT / "emb" / f"{model}-b{block_size}" / precision / f"block-{block:04d}.npz"


def encode_blocks(model: str, precisions: list[str], paths: list[Path], captions: list[str],
                  text_image: np.ndarray, block_size: int, deadline: float) -> int:
    """Encode images (and their captions) block by block, every precision per block, into
    ``bench-data/precision/emb/``, resuming from saved blocks; stop before a block that would pass
    ``deadline``. Returns how many leading blocks every precision has finished."""
    n_blocks = -(-len(paths) // block_size)
    encoders: dict[str, Any] = {}
    per_block: dict[str, float] = {}
    for b in range(n_blocks):
        for precision in precisions:
            final = _block_file(model, precision, b, block_size)
            if final.is_file():
                continue
            if time.perf_counter() + per_block.get(precision, 0.0) > deadline:
                return _leading_blocks(model, precisions, n_blocks, block_size)
            enc = encoders.get(precision) or encoders.setdefault(precision, load(model, precision))
            start = time.perf_counter()
            lo, hi = b * block_size, min(len(paths), (b + 1) * block_size)
            images = enc.encode_images(paths[lo:hi], batch_size=64)
            img_s = time.perf_counter() - start
            texts = enc.encode_texts([c for c, i in zip(captions, text_image) if lo <= i < hi])
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(final.stem + ".tmp.npz")
            np.savez(tmp, images=images, texts=texts, seconds=[img_s, time.perf_counter() - start - img_s],
                     precision=enc.precision)
            os.replace(tmp, final)
            per_block[precision] = max(per_block.get(precision, 0.0), time.perf_counter() - start)
            print(f"{model} {precision}: block {b + 1}/{n_blocks} in {time.perf_counter() - start:.0f} s", flush=True)
    return n_blocks


def _leading_blocks(model: str, precisions: list[str], n_blocks: int, block_size: int) -> int:
    for b in range(n_blocks):
        if not all(_block_file(model, p, b, block_size).is_file() for p in precisions):
            return b
    return n_blocks


def run_recall(args: argparse.Namespace) -> None:
    """Per-precision retrieval on flickr8k-test. Embeddings are saved in blocks of images (with their
    captions), so slow precisions finish over several time-limited runs; the metrics use the first
    blocks every precision has finished (the whole split once all are done)."""
    from vlsearch.core.metrics import retrieval_metrics

    paths, captions, text_image = read_split()
    precisions = ["fp32", *[p for p in args.precisions.split(",") if p != "fp32"]]
    deadline = time.perf_counter() + args.max_seconds
    done = encode_blocks(args.model, precisions, paths, captions, text_image, args.block_size, deadline)
    if done == 0:
        print("no block finished every precision within --max-seconds; run again to continue", flush=True)
        return
    ref, rows = None, []
    for precision in precisions:
        blocks = [np.load(_block_file(args.model, precision, b, args.block_size)) for b in range(done)]
        images = np.concatenate([z["images"] for z in blocks])
        texts = np.concatenate([z["texts"] for z in blocks])
        n_img = len(images)
        m = retrieval_metrics(texts @ images.T, text_image[text_image < n_img], ks=(1, 5, 10))
        row = {"model": args.model, "precision": str(blocks[0]["precision"]), "images": n_img,
               "images s": round(sum(float(z["seconds"][0]) for z in blocks), 1),
               "texts s": round(sum(float(z["seconds"][1]) for z in blocks), 1),
               **{f"t2i {k}": round(100 * m["t2i"][k], 2) for k in ("R@1", "R@5", "R@10")},
               **{f"i2t {k}": round(100 * m["i2t"][k], 2) for k in ("R@1", "R@5", "R@10")}}
        if ref is None:
            ref = (images, texts)
        else:
            row["min cos images"], row["min cos texts"] = _min_cos(images, ref[0]), _min_cos(texts, ref[1])
            row["mean cos"] = round(float(np.concatenate([(images * ref[0]).sum(1), (texts * ref[1]).sum(1)]).mean()), 6)
        print(row, flush=True)
        rows.append(row)
    save(f"recall-{args.model}", {"kind": "recall", "model": args.model, "rows": rows, "command": command_line(),
                                  "machine": machine(), "load": os.getloadavg()[0], "images": len(paths)})
    write_report()


def save(stem: str, data: dict) -> None:
    from vlsearch.core.fsutil import write_json

    write_json(OUT / f"{stem}.json", data)


def _cell(row: dict, column: str) -> object:
    value = row.get(column, "–")
    return f"{value:.5f}" if "cos" in column and isinstance(value, float) else value


def _table(rows: list[dict], columns: list[str]) -> str:
    return markdown_table(columns, [[_cell(r, c) for c in columns] for r in rows])


SPEED_COLUMNS = ["model", "precision", "images/s", "n images", "speed-up images", "min cos images", "texts/s",
                 "speed-up texts", "min cos texts", "query p50 ms", "query p99 ms"]
RECALL_COLUMNS = ["model", "precision", "images", "t2i R@1", "t2i R@5", "t2i R@10", "i2t R@1", "i2t R@5", "i2t R@10",
                  "min cos images", "min cos texts", "mean cos", "images s", "texts s"]


NOTES = """- `n images` / `n texts`: how many items one timed call encoded (fewer for modes so slow that a batch of 32
  would not fit the timing window). Speed-ups are against fp32 in the same run; agreement (`min cos`) is on
  the same real flickr8k-test images and captions, model weights seeded identically (ViT-B-32 is random-init:
  its pretrained weights cannot be downloaded here, so its retrieval quality under bf16 is judged by this
  cosine agreement, not by recall).
- Query latency: one caption per call (`Encoder.encode_texts([q])`, tokenisation included), batch 1.
- GPU: no GPU was available to this run; the CUDA path (bf16/fp16 autocast) is unchanged and unmeasured here."""


def write_report() -> None:
    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    parts = ["## Inference precision on CPU (`benchmarks/bench_precision.py`)", ""]
    micro = next((r for r in runs if r["kind"] == "microbench"), None)
    if micro:
        parts.append(f"What `precision=\"auto\"` picks here: **{micro['precision_auto']}** ({micro['precision_reason']}). "
                     f"The bf16 micro-benchmark (run here for the record; `auto` skips it on a CPU without bf16 "
                     f"instructions) measured bf16/fp32 speed-ups of {micro['speedup']} in {micro['seconds']} s "
                     f"(`{micro['key']}`).\n")
    for run in (r for r in runs if r["kind"] == "speed"):
        parts += [f"Model only, {run['machine']}; batch {run['batch_size']}; load average {run['load']:.1f}"
                  + (" (the CPU was shared)" if run["load"] > (os.cpu_count() or 1) else "") + "; "
                  f"`auto` for {run['model']}: {run['auto']['precision']}. `{run['command']}`", "",
                  _table(run["rows"], SPEED_COLUMNS), *([run["note"]] if run.get("note") else []), ""]
    for run in (r for r in runs if r["kind"] == "recall"):
        n = run["rows"][0].get("images", run.get("images"))
        subset = "" if n == run.get("images") else f" (the first {n} of {run['images']} images and their captions)"
        parts += [f"Flickr8k-test retrieval (%) per precision{subset}, {run['machine']}; load average {run['load']:.1f}. "
                  f"`{run['command']}` (embeddings saved in blocks, over as many runs as it took; `images s` / "
                  "`texts s`: encoding time summed over the blocks)", "", _table(run["rows"], RECALL_COLUMNS), ""]
    parts.append(NOTES)
    write_section("precision", "\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--models", default="ViT-B-32,vlsearch-small")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--seconds", type=float, default=4.0, help="timing window per measurement")
    s.add_argument("--queries", type=int, default=200, help="most single text queries timed")
    r = sub.add_parser("recall")
    r.add_argument("--model", default="vlsearch-small")
    r.add_argument("--block-size", type=int, default=100, help="images per saved block (with their captions)")
    r.add_argument("--max-seconds", type=float, default=540, help="start no block that would end after this; "
                   "rerun to continue from the saved blocks")
    for p in (s, r):
        p.add_argument("--precisions", default="fp32,bf16,int8")
        p.add_argument("--threads", type=int, default=2)
    sub.add_parser("report")
    args = ap.parse_args()
    if args.cmd != "report":
        torch.set_num_threads(args.threads)
    {"speed": run_speed, "recall": run_recall, "report": lambda a: write_report()}[args.cmd](args)


if __name__ == "__main__":
    main()
