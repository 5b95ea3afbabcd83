"""CPU encoding, end to end: ``vlsearch`` ``embed`` vs ``clip-retrieval inference`` on the same JPEGs.

Both run ViT-B-32 with random weights (none can be downloaded here; speed does not depend on the
weights), batch 64, 2 decode workers, on the same 2,000 distinct flickr8k-train JPEGs (160 px),
each in a fresh process, alternating (A/B/A/B...) so the shared machine's drift hits both; the
ratio is of the medians, and each side's range is reported. Timing covers model creation and the
whole run (listing, decoding, encoding, writing), inside the process (interpreter start-up and
imports excluded on both sides).

clip-retrieval 2.45 lives in its own virtualenv (``--cr-python``, default ``/tmp/crvenv``): a
launcher patches ``open_clip.create_model_and_transforms`` to random weights and calls
``clip_retrieval.clip_inference.main.main`` in-process (``distribution_strategy="sequential"``).

Runs are kept in ``bench-data/vs_clip_retrieval.json`` under ``--label`` (e.g. ``before`` /
``after`` a decoder change), and the RESULTS.md section shows every label; ``--tree NAME=PATH``
times several vlsearch checkouts (before/after a change) in the same alternation.

    python benchmarks/bench_vs_clip_retrieval_encode.py --rounds 2 --tree before=/tmp/base --tree after=.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "flickr8k-train" / "images"
STORE = ROOT / "bench-data" / "vs_clip_retrieval.json"

CR_LAUNCHER = """
import sys, time, torch, open_clip
torch.manual_seed(0)
real = open_clip.create_model_and_transforms
def random_weights(name, *args, **kwargs):
    kwargs["pretrained"] = None
    return real(name, *args[1:], **kwargs) if args else real(name, **kwargs)
open_clip.create_model_and_transforms = random_weights
from clip_retrieval.clip_inference.main import main
folder, out, batch, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
main(folder, out, input_format="files", batch_size=batch, num_prepro_workers=workers, enable_text=False,
     enable_metadata=False, clip_model="open_clip:ViT-B-32/random", use_jit=False)
print("SECONDS", time.perf_counter() - start)
"""

VLSEARCH_LAUNCHER = """
import sys, time
from vlsearch.core.allocator import enable_huge_pages
enable_huge_pages()
import torch
torch.manual_seed(0)
from indexing.embed import EmbedConfig, embed
folder, out, batch, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
coll = embed(folder, out, EmbedConfig(model="ViT-B-32", batch_size=batch, workers=workers, device="cpu"))
assert coll.count("images") > 0
print("SECONDS", time.perf_counter() - start)
"""


def gallery(n: int, dest: Path) -> Path:
    """A folder of symlinks to the first ``n`` flickr8k-train JPEGs (sorted)."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(DATA.glob("*.jpg"))[:n]:
        link = dest / path.name
        if not link.exists():
            link.symlink_to(path)
    return dest


def timed(python: str, launcher: str, folder: Path, out: Path, batch: int, workers: int, tree: Path = ROOT) -> float:
    """Seconds one run reports for itself (it fails loudly when the tool does); ``tree``: the
    vlsearch checkout on ``PYTHONPATH``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([python, "-c", launcher, str(folder), str(out), str(batch), str(workers)],
                          capture_output=True, text=True, env=env, cwd=tree)
    found = re.findall(r"SECONDS ([0-9.]+)", done.stdout)  # clip-retrieval ends its progress line without a newline
    if done.returncode != 0 or not found:
        raise RuntimeError(f"{python} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return float(found[-1])


def run(args: argparse.Namespace) -> dict:
    """``--rounds`` rounds of clip-retrieval then each vlsearch tree, in fresh processes."""
    folder = gallery(args.images, ROOT / "bench-data" / f"cr-gallery-{args.images}")
    trees = dict(t.split("=", 1) for t in args.tree) or {"vlsearch": str(ROOT)}
    rates: dict[str, list[float]] = {"clip-retrieval": [], **{name: [] for name in trees}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for r in range(args.rounds):
            seconds = timed(args.cr_python, CR_LAUNCHER, folder, tmp / f"cr{r}", args.batch_size, args.workers)
            rates["clip-retrieval"].append(args.images / seconds)
            for name, tree in trees.items():
                seconds = timed(sys.executable, VLSEARCH_LAUNCHER, folder, tmp / f"{name}{r}", args.batch_size,
                                args.workers, Path(tree))
                rates[name].append(args.images / seconds)
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()), flush=True)
    return {"rates": rates, "load": os.getloadavg()[0], "command": command_line(), "machine": machine(),
            "images": args.images, "comment": args.comment}


def body(store: dict) -> str:
    rows = []
    for label, res in store.items():
        cr = res["rates"]["clip-retrieval"]
        for name, vl in res["rates"].items():
            if name != "clip-retrieval":
                rows.append([label, name, res["images"], len(cr), f"{min(cr):.1f}-{max(cr):.1f}",
                             round(statistics.median(cr), 1), f"{min(vl):.1f}-{max(vl):.1f}",
                             round(statistics.median(vl), 1), round(statistics.median(vl) / statistics.median(cr), 2),
                             res["comment"]])
    headers = ["run", "vlsearch tree", "images", "rounds", "clip-retrieval img/s (range)", "clip-retrieval (median)",
               "vlsearch img/s (range)", "vlsearch (median)", "ratio of medians", "comment"]
    commands = "\n".join(f"- {label}: `{res['command']}` (load average {res['load']:.1f} at end)"
                         for label, res in store.items())
    return "\n\n".join([
        "## CPU encoding vs clip-retrieval (`benchmarks/bench_vs_clip_retrieval_encode.py`)",
        f"{next(iter(store.values()))['machine']}. ViT-B-32 with random weights on both sides, batch 64, 2 decode "
        "workers, the same distinct flickr8k-train JPEGs (160x160), `vlsearch` `embed` (bf16, its defaults) vs "
        "`clip-retrieval inference` 2.45 (its own venv: torch 2.14.1, open_clip 2.32), alternating runs in fresh "
        "processes (clip-retrieval, then each vlsearch tree, per round), each timed from model creation to the "
        "end of the run.",
        markdown_table(headers, rows), commands])


def decode_check(n: int = 200, camera: int = 8) -> str:
    """The JPEG decoder before/after (Pillow ``draft`` vs simplejpeg at the same scale): ms per image
    through ``open_image`` + the model's PIL preprocess, the largest pixel difference, and the mean
    cosine of random-weight ViT-B-32 embeddings of the same images."""
    import io
    import time

    import numpy as np
    import torch
    from PIL import Image

    from vlsearch.data import images
    from vlsearch.models.factory import load_model

    torch.manual_seed(0)
    enc = load_model("ViT-B-32", device="cpu")
    small = [p.read_bytes() for p in sorted((ROOT.parent / "shared" / "data" / "flickr8k-test" / "images").glob("*.jpg"))[:n]]
    big = []
    for data in small[:camera]:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize((3000, 2000), Image.BILINEAR).save(buf, "JPEG", quality=90)
        big.append(buf.getvalue())
    fast_module, out, rows = images.simplejpeg, {}, []
    for name, module in (("Pillow draft (before)", None), ("simplejpeg (after)", fast_module)):
        images.simplejpeg = module
        for gallery_name, datas in (("flickr8k-test 224 px", small), ("3000x2000 camera", big)):
            start = time.perf_counter()
            pixels = [enc.decode_transform(images.open_image(d, draft_size=2 * enc.image_size)) for d in datas]
            rows.append([name, gallery_name, round(1000 * (time.perf_counter() - start) / len(datas), 2)])
            out[name, gallery_name] = torch.stack(pixels)
    images.simplejpeg = fast_module
    checks = []
    for gallery_name in ("flickr8k-test 224 px", "3000x2000 camera"):
        a, b = out["Pillow draft (before)", gallery_name], out["simplejpeg (after)", gallery_name]
        ea, eb = enc.encode_image_tensors(a), enc.encode_image_tensors(b)
        cos = (ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
        checks.append(f"- {gallery_name} ({len(a)} images): largest pixel difference "
                      f"{int((a.int() - b.int()).abs().max())}, mean cosine of ViT-B-32 (random weights) embeddings "
                      f"{cos.mean():.6f} (min {cos.min():.6f}).")
    return "\n\n".join([
        "### The JPEG decoder: before/after (`--decode-check`)",
        "One process, open + decode + EXIF + the model's PIL preprocess (resize, crop, uint8), ms per image:",
        markdown_table(["decoder", "images", "ms/img"], rows), "\n".join(checks)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2, help="alternating clip-retrieval / vlsearch pairs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cr-python", default="/tmp/crvenv/bin/python")
    ap.add_argument("--tree", action="append", default=[],
                    help="NAME=PATH of a vlsearch checkout to time (repeatable; default: this one)")
    ap.add_argument("--label", default="today")
    ap.add_argument("--comment", default="")
    ap.add_argument("--decode-check", action="store_true", help="only the decoder before/after and its quality")
    args = ap.parse_args()
    if args.decode_check:
        text = decode_check()
        print(text)
        write_section("bench_vs_clip_retrieval_decode", f"`{command_line()}`\n\n{text}")
        return
    store = json.loads(STORE.read_text()) if STORE.exists() else {}
    store[args.label] = run(args)
    STORE.parent.mkdir(parents=True, exist_ok=True)
    STORE.write_text(json.dumps(store, indent=1))
    text = body(store)
    print(text)
    write_section("bench_vs_clip_retrieval_encode", text)


if __name__ == "__main__":
    main()
