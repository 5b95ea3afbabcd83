"""GPU checks (issue 21): encoding on CUDA, model-only vs end-to-end ``embed``, and bf16 quality.

Run on a machine with a CUDA GPU. For each model (vlsearch-small, ViT-B-32) it measures, with
``precision="auto"`` (bf16 autocast on a bf16 GPU):

* model-only and end-to-end images/s (``bench_encode.bench_model``: pre-decoded tensors vs a
  whole ``embed`` run with decode workers) on a gallery of small JPEGs (``--images`` files
  repeated to ``--n`` entries) and on camera-sized JPEGs (``--camera`` 3000x2000 files upscaled
  from them);
* text-query latency, batch 1, p50/p99, fp32 vs the auto precision;
* quality, when ``--reference`` is given (made on any machine by ``--make-reference``: the
  vlsearch-small image embeddings computed on CPU in fp32, and the caption embeddings): the
  smallest cosine between the GPU's and the CPU's image embeddings, and text->image R@1/5/10
  with the CPU caption embeddings against the CPU images and against the GPU images;
* which FAISS it finds and whether that build has GPUs (``faiss.get_num_gpus``).

The figures go to ``--json``; ``--render JSON`` writes the RESULTS.md section from such a file on
any machine (the GPU machine's copy of the project is thrown away).

    python benchmarks/bench_gpu.py --make-reference bench-data/gpu/ref.npz --images 500
    python benchmarks/bench_gpu.py --data DIR --reference ref.npz --json gpu.json   # on the GPU machine
    python benchmarks/bench_gpu.py --render gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlsearch.core.allocator import enable_huge_pages  # noqa: E402
enable_huge_pages()  # before torch's first allocation: its allocator on huge pages, as in the CLI
import torch  # noqa: E402
from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402
from benchmarks.bench_encode import HEADERS, STAGE_HEADERS, bench_model, camera_gallery  # noqa: E402
from benchmarks.bench_small import read_split  # noqa: E402
from vlsearch.core.metrics import retrieval_metrics  # noqa: E402
from vlsearch.models.factory import SMALL_MODEL, load_model  # noqa: E402

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-test"
KS = (1, 5, 10)


def repeated_gallery(sources: list[Path], n: int, dest: Path) -> Path:
    """A folder of ``n`` symlinks cycling over ``sources`` (distinct names, so ``embed`` sees ``n`` images)."""
    dest.mkdir(parents=True)
    for i in range(n):
        (dest / f"img{i:06d}.jpg").symlink_to(sources[i % len(sources)].resolve())
    return dest


def make_reference(out: Path, n_images: int, data: Path = FLICKR) -> None:
    """CPU fp32 vlsearch-small embeddings of the first ``n_images`` flickr8k-test images and their captions."""
    paths, captions, text_image = read_split(data)
    keep = text_image < n_images
    enc = load_model(SMALL_MODEL, device="cpu", precision="fp32")
    images = enc.encode_images(paths[:n_images])
    texts = enc.encode_texts([c for c, k in zip(captions, keep) if k])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, names=np.array([p.name for p in paths[:n_images]]), image_emb=images, text_emb=texts,
             text_image=text_image[keep])


def quality(enc, folder: Path, reference: Path) -> dict:
    """This device's image embeddings against the CPU fp32 reference: min cosine and t2i recall."""
    ref = np.load(reference)
    mine = enc.encode_images([folder / str(name) for name in ref["names"]])
    cpu = retrieval_metrics(ref["text_emb"] @ ref["image_emb"].T, ref["text_image"], KS)["t2i"]
    dev = retrieval_metrics(ref["text_emb"] @ mine.T, ref["text_image"], KS)["t2i"]
    return {"images": int(len(mine)), "captions": int(len(ref["text_emb"])),
            "min_cos": round(float((mine * ref["image_emb"]).sum(1).min()), 5),
            "cpu_fp32": {k: round(100 * cpu[f"R@{k}"], 2) for k in KS},
            "device": {k: round(100 * dev[f"R@{k}"], 2) for k in KS}}


def text_latency(name: str, device: str, precision: str, n: int = 200) -> dict:
    """Batch-1 text encoding latency (ms, p50/p99) on ``device``; captions vary so no cache helps."""
    enc = load_model(name, device=device, precision=precision)
    texts = [f"a photo of {i} dogs running on a beach" for i in range(n + 10)]
    for t in texts[:10]:
        enc.encode_texts([t])
    times = []
    for t in texts[10:]:
        start = time.perf_counter()
        enc.encode_texts([t])
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return {"model": name, "precision": enc.precision, "p50": round(statistics.median(times), 2),
            "p99": round(times[int(0.99 * (len(times) - 1))], 2)}


def faiss_status() -> str:
    try:
        import faiss
    except ImportError as exc:
        return f"not importable ({exc})"
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return f"faiss {faiss.__version__}, {gpus} GPU(s) visible to it"


def run(args: argparse.Namespace) -> dict:
    sources = sorted(args.data.glob("*.jpg"))[: args.images]
    if not sources:
        sys.exit(f"no JPEGs in {args.data}")
    result: dict = {"machine": machine(), "command": command_line(), "gpu": torch.cuda.get_device_name(0)
                    if torch.cuda.is_available() else "none", "torch": torch.__version__, "cpus": os.cpu_count(),
                    "faiss": faiss_status(), "encode": [], "camera": [], "text": [], "quality": None, "errors": []}
    bench = argparse.Namespace(device=args.device, precision="auto", model_images=args.model_images,
                               batch_size=args.batch_size, gallery="small", repeats=args.repeats,
                               gpu_decode={"auto": None, "on": True, "off": False}[args.gpu_decode])
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        small = repeated_gallery(sources, args.n, tmp / "small")
        camera = (camera_gallery(args.camera, tmp / "camera", os.cpu_count() or 2, sources)
                  if args.camera else None)
        for name in args.models.split(","):
            _attempt(result, f"{name} small", lambda: result["encode"].extend(
                bench_model(name, small, _fresh(tmp, name), bench, workers)))
            if camera is not None:
                cam = argparse.Namespace(**{**vars(bench), "gallery": "camera"})
                _attempt(result, f"{name} camera", lambda: result["camera"].extend(
                    bench_model(name, camera, _fresh(tmp, name + "-camera"), cam, workers[-1:])))
            _save(args.json, result)
        if args.reference:
            _attempt(result, "quality", lambda: result.update(
                quality=quality(load_model(SMALL_MODEL, device=args.device), args.data, args.reference)))
            _save(args.json, result)
    for name in args.models.split(","):
        for precision in ("fp32", "auto"):
            _attempt(result, f"{name} text {precision}",
                     lambda: result["text"].append(text_latency(name, args.device, precision)))
    _save(args.json, result)
    return result


def _attempt(result: dict, what: str, step) -> None:
    """Run one measurement; a failure is recorded (and the run goes on), since a GPU lease is short."""
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - recorded in the figures, not hidden
        result.setdefault("errors", []).append(f"{what}: {type(exc).__name__}: {exc}")
        print(f"FAILED {what}: {type(exc).__name__}: {exc}", flush=True)


def _fresh(tmp: Path, name: str) -> Path:
    path = tmp / f"work-{name}"
    path.mkdir()
    return path


def _save(path: Path | None, result: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=1), encoding="utf-8")


def render(result: dict) -> str:
    """The RESULTS.md section for one run's JSON."""
    parts = ["## GPU: encoding on CUDA (issue 21)",
             f"{result['machine']}; GPU {result['gpu']}, {result['cpus']} CPU cores, torch {result['torch']}. "
             f"Precision auto = bf16 autocast on this GPU; decode workers are processes (nice +19) feeding "
             f"pinned uint8 batches that are normalised on the GPU.",
             f"`{result['command']}`",
             "Small JPEGs (flickr8k-test 224 px files, repeated):",
             markdown_table(HEADERS, result["encode"])]
    if result["camera"]:
        parts += ["Camera-sized JPEGs (3000x2000, upscaled from them; stage figures from one process):",
                  markdown_table(HEADERS + STAGE_HEADERS, result["camera"])]
    q = result["quality"]
    if q:
        parts += [f"Quality, vlsearch-small on {q['images']} flickr8k-test images and their {q['captions']} captions "
                  f"(caption embeddings from the CPU in fp32 in both rows): smallest cosine between this GPU's "
                  f"image embeddings and the CPU's fp32 ones **{q['min_cos']}**.",
                  markdown_table(["image embeddings", "t2i R@1", "R@5", "R@10"],
                                 [["CPU fp32", *q["cpu_fp32"].values()], ["GPU auto", *q["device"].values()]])]
    if result["text"]:
        parts += ["Text-query latency, batch 1 (ms):",
                  markdown_table(["model", "precision", "p50", "p99"],
                                 [[t["model"], t["precision"], t["p50"], t["p99"]] for t in result["text"]])]
    parts.append(f"FAISS on that machine: {result['faiss']}.")
    parts += [f"Failed: {e}" for e in result.get("errors", [])]
    parts += [f"- {note}" for note in result.get("notes", [])]
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FLICKR / "images", help="folder of small JPEGs")
    ap.add_argument("--images", type=int, default=500, help="how many of them to use")
    ap.add_argument("--n", type=int, default=8000, help="gallery entries (the images repeated)")
    ap.add_argument("--camera", type=int, default=1000, help="camera-sized JPEGs to make (0: skip)")
    ap.add_argument("--models", default=f"{SMALL_MODEL},ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", default="4,8,15", help="decode worker counts (the last one for the camera gallery)")
    ap.add_argument("--model-images", type=int, default=2048,
                    help="gallery images held as tensors for model-only timing")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gpu-decode", choices=("auto", "on", "off"), default="auto",
                    help="end-to-end JPEG decoding: nvjpeg (on; auto on CUDA) or the CPU workers (off)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reference", type=Path, default=None, help="CPU fp32 reference (--make-reference)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here as they come")
    ap.add_argument("--make-reference", type=Path, default=None, metavar="NPZ")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON", help="write RESULTS.md from a run's JSON")
    ap.add_argument("--note", action="append", default=[], help="a remark to print under the figures (with --render)")
    args = ap.parse_args()
    if args.make_reference:
        make_reference(args.make_reference, args.images)
        return
    if args.render:
        result = json.loads(args.render.read_text(encoding="utf-8"))
        body = render({**result, "notes": result.get("notes", []) + args.note})
    else:
        body = render(run(args))
    print(body)
    if args.render:
        write_section("bench_gpu", body)


if __name__ == "__main__":
    main()
