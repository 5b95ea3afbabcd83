"""`vlsearch import clip-retrieval`: rows/s and peak RSS of importing a generated clip-retrieval folder.

1. **Generate** (once per size, kept under ``--dir``) a folder in clip-retrieval 2.45's layout:
   ``img_emb/img_emb_{k}.npy`` (float16 unit vectors, written chunk by chunk into a memory-mapped
   npy), ``text_emb/text_emb_{k}.npy`` and ``metadata/metadata_{k}.parquet`` (``image_path``,
   ``caption``, ``url``, ``key``, ``width``, ``height``), ``--partition-rows`` rows per partition
   (clip-retrieval writes 1,000,000 by default), ``k`` zero-padded as its writer does.
2. **Import** it in a child process run under ``/usr/bin/time -v`` (peak RSS of the import alone,
   not of the generator): ``indexing.importing.import_clip_retrieval`` into a new collection,
   without an index (the index build is ``build_index``'s own cost, measured by bench_index.py;
   adopting an autofaiss index is a file copy plus a 66-row check).

Each size is measured in turn (e.g. ``--rows 1000000 10000000``) so the table shows whether
memory stays flat as the folder grows. Collections are removed after each run (disk).

    python benchmarks/bench_import.py --rows 1000000 10000000 --dir /tmp/bench-import
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402

DIM = 512
MODEL = "open_clip:ViT-B-32/laion2b_s34b_b79k"


def generate(folder: Path, rows: int, partition_rows: int, seed: int = 0) -> float:
    """Write the clip-retrieval folder (kept when a complete one is there); seconds it took."""
    done = folder / "COMPLETE"
    if done.is_file():
        return float(done.read_text())
    t0 = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    count = math.ceil(rows / partition_rows)
    digits = int(math.log10(count)) + 1  # clip-retrieval's zero padding
    for k in range(count):
        n = min(partition_rows, rows - k * partition_rows)
        name = str(k).zfill(digits)
        rng = np.random.default_rng([seed, k])
        for kind in ("img_emb", "text_emb"):
            write_npy(folder / kind / f"{kind}_{name}.npy", n, rng)
        write_metadata(folder / "metadata" / f"metadata_{name}.parquet", k, n)
    seconds = time.perf_counter() - t0
    done.write_text(f"{seconds:.1f}")
    return seconds


def write_npy(path: Path, n: int, rng: np.random.Generator, chunk: int = 100_000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, DIM))
    for lo in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - lo), DIM), dtype=np.float32)
        out[lo:lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out


def write_metadata(path: Path, k: int, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    i = np.arange(n)
    table = pa.table({
        "image_path": pa.array(np.char.add(f"{k:05d}/", i.astype(str))),
        "caption": pa.array(np.char.add(f"a photo number {k} ", i.astype(str))),
        "url": pa.array(np.char.add(f"https://example.com/{k}/", i.astype(str))),
        "key": pa.array(np.char.add(f"{k:05d}", np.char.zfill(i.astype(str), 4))),
        "width": pa.array(256 + i % 512), "height": pa.array(256 + i % 384),
    })
    pq.write_table(table, path)  # one row group per partition, as pandas' to_parquet writes it


def import_child(folder: str, collection: str) -> None:
    """The measured import (run in a child under /usr/bin/time -v); prints its report as JSON."""
    from indexing.importing import ImportConfig, import_clip_retrieval

    report = import_clip_retrieval(folder, collection, ImportConfig(model=MODEL, index=False))
    print(json.dumps({"added": report.added, "captions": report.captions, "seconds": report.seconds}))


def measure(folder: Path, collection: Path) -> dict[str, float]:
    shutil.rmtree(collection, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", str(folder), str(collection)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    disk = sum(p.stat().st_size for p in collection.rglob("*") if p.is_file())
    shutil.rmtree(collection, ignore_errors=True)
    return {**result, "peak_rss_mb": rss_kb / 1024, "disk_gb": disk / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--partition-rows", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-import"))
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "COLLECTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import_child(*args.child)
        return
    rows = []
    for n in args.rows:
        folder = args.dir / f"cr-{n}"
        gen = generate(folder, n, args.partition_rows)
        r = measure(folder, args.dir / f"coll-{n}")
        rows.append([f"{n:,}", f"{r['added']:,}", round(r["seconds"], 1), f"{r['added'] / r['seconds']:,.0f}",
                     round(r["peak_rss_mb"]), round(r["disk_gb"], 2), round(gen, 1)])
        print(rows[-1], flush=True)
        write_results(rows, args.partition_rows)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def write_results(rows: list[list[object]], partition_rows: int) -> None:
    body = "\n".join([
        "## Import from clip-retrieval (`benchmarks/bench_import.py`)", "",
        f"Machine: {machine()}. Shared with other jobs (2 cores, several helpers).",
        f"Command: `{command_line()}`", "",
        f"A generated clip-retrieval 2.45 folder ({DIM}-d float16 `img_emb` + `text_emb`, metadata parquet with "
        f"image_path, caption, url, key, width, height; {partition_rows:,} rows per partition) imported by "
        "`import_clip_retrieval` into a new collection (fp16 shards of 10,000 rows with their captions shards "
        "and keyword index; no ANN index: that is `build_index`'s cost). Peak RSS: `/usr/bin/time -v` of the "
        "import process alone.", "",
        markdown_table(["folder rows", "rows imported", "import s", "rows/s", "peak RSS MB", "collection GB",
                        "generate s"], rows),
    ])
    write_section("bench_import", body)


if __name__ == "__main__":
    main()
