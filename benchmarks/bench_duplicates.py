"""Near-duplicate groups measured (``indexing.duplicates``, ``vlsearch duplicates``).

**Quality.** A generated photo library: ``--originals`` held-out photos of flickr8k-test, each
**upscaled to 1024 px first** (camera-like size: the shared photos are 224 px, and at 224 px a 50 %
copy is 112 px that the model's preprocess upsamples back, so vlsearch-small gives it a median
cosine of only 0.76 to its original; a real camera's 50 % copy still has more pixels than the
model looks at). Each original gets five copies: resized 50 %, re-encoded at JPEG quality 30,
cropped 5 % on each side, rotated 4 degrees (then cropped to its inner rectangle, as a
straightened photo is), colour-jittered (brightness, contrast, saturation in [0.8, 1.2]). Hard
negatives: for each original, the most similar *other* flickr8k-test photo (by vlsearch-small's
image embedding, among photos not used as originals), upscaled the same way: a different photo of
a similar scene. Every file is embedded through ``indexing.embed`` with each built-in model that
has real weights (vlsearch-small flickr8k-v4, the default, and its older tags v3 and v2), and
``find_duplicates`` groups the collection at each threshold of a sweep. Precision and recall are
pairwise: a pair of items in one group is a true positive when both are copies of the same
original (the original included); recall counts the 15 true pairs of each original's six files.

**Scale.** ``--scale N``: the time of ``find_duplicates`` on the N x 512 synthetic collection of
``benchmarks/synthetic.py`` ('real' generator) with an IVF index (built once, cached under
bench-data/).

    taskset -c 1 python benchmarks/bench_duplicates.py --originals 250
    taskset -c 1 python benchmarks/bench_duplicates.py --skip-quality --scale 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402
from benchmarks.synthetic import DEFAULT_DIR, make_dataset  # noqa: E402
from indexing.build import build_index  # noqa: E402
from indexing.duplicates import find_duplicates  # noqa: E402
from indexing.embed import embed  # noqa: E402
from indexing.shards import EmbedConfig  # noqa: E402
from vlsearch.ann.duplicates import DEFAULT_DUPLICATE_THRESHOLD  # noqa: E402
from vlsearch.core.threads import cpu_threads  # noqa: E402
from vlsearch.models.factory import SMALL_MODEL, load_model  # noqa: E402
from vlsearch.store.collection import Collection  # noqa: E402

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-test" / "images"
SIZE = 1024
VARIANTS = ("half", "q30", "crop5", "rot4", "jitter")
TAGS = ("flickr8k-v4", "flickr8k-v3", "flickr8k-v2")
SWEEP = tuple(round(t, 2) for t in np.arange(0.80, 0.99, 0.01))


def command(*notes: str) -> str:
    """The command line, with the ``taskset -c`` it runs under when pinned to some cores, and
    ``notes`` (printed below it) elided."""
    cpus = sorted(os.sched_getaffinity(0))
    pinned = f"taskset -c {','.join(map(str, cpus))} " if len(cpus) < os.cpu_count() else ""
    line = pinned + command_line()
    for note in notes:
        if note:
            line = line.replace(shlex.quote(note), "'<the note below>'")
    return line


# ---- the generated library ------------------------------------------------------------------

def _upscaled(path: Path):
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = SIZE / max(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)


def _variant(img, kind: str, rng: np.random.Generator):
    from PIL import Image, ImageEnhance

    w, h = img.size
    if kind == "half":
        return img.resize((w // 2, h // 2), Image.LANCZOS)
    if kind == "crop5":
        return img.crop((w // 20, h // 20, w - w // 20, h - h // 20))
    if kind == "rot4":
        angle = float(rng.choice([-4.0, 4.0]))
        rotated = img.rotate(angle, Image.BICUBIC)
        # the largest axis-aligned rectangle inside a square rotated by a small angle
        side = int(w / (np.cos(np.radians(4.0)) + np.sin(np.radians(4.0))))
        return rotated.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
    if kind == "jitter":
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhance(img).enhance(float(rng.uniform(0.8, 1.2)))
        return img
    return img  # q30: the same pixels, re-encoded below


def _hard_negatives(originals: list[Path], pool: list[Path]) -> list[Path]:
    """For each original, the pool photo most similar to it (vlsearch-small image embeddings)."""
    enc = load_model(SMALL_MODEL, device="cpu")
    a, b = enc.encode_images(originals), enc.encode_images(pool)
    return sorted({pool[j] for j in np.argmax(a @ b.T, axis=1)})


def make_library(root: Path, n: int, seed: int = 0) -> dict[str, str | None]:
    """Write the library under ``root/photos`` once; returns file name -> original (None: negative)."""
    truth_file = root / "truth.json"
    if truth_file.is_file():
        return json.loads(truth_file.read_text())
    rng = np.random.default_rng(seed)
    photos = sorted(PHOTOS.glob("*.jpg"))
    chosen = rng.permutation(len(photos))
    originals, pool = [photos[i] for i in chosen[:n]], [photos[i] for i in chosen[n:]]
    out = root / "photos"
    out.mkdir(parents=True, exist_ok=True)
    truth: dict[str, str | None] = {}
    for photo in originals:
        img = _upscaled(photo)
        img.save(out / f"{photo.stem}-orig.jpg", quality=95)
        truth[f"{photo.stem}-orig.jpg"] = photo.stem
        for kind in VARIANTS:
            _variant(img, kind, rng).save(out / f"{photo.stem}-{kind}.jpg", quality=30 if kind == "q30" else 90)
            truth[f"{photo.stem}-{kind}.jpg"] = photo.stem
    for photo in _hard_negatives(originals, pool):
        _upscaled(photo).save(out / f"{photo.stem}-neg.jpg", quality=95)
        truth[f"{photo.stem}-neg.jpg"] = None
    truth_file.write_text(json.dumps(truth))
    return truth


# ---- measuring --------------------------------------------------------------------------------

def pair_scores(groups: list, truth: dict[str, str | None]) -> tuple[int, int]:
    """(pairs predicted, true positive pairs) of the groups."""
    predicted = correct = 0
    for group in groups:
        keys = [truth[Path(p).name] for p in group.paths]
        predicted += len(keys) * (len(keys) - 1) // 2
        _, counts = np.unique([k for k in keys if k is not None], return_counts=True)
        correct += int((counts * (counts - 1) // 2).sum())
    return predicted, correct


def variant_cosines(coll: Collection, truth: dict[str, str | None]) -> dict[str, float]:
    """Median cosine of each kind of copy to its original, and of each original's hard negative."""
    ids, x = coll.read_embeddings()
    table = coll.read_table(columns=["id", "path"]).to_pydict()
    paths = dict(zip(table["id"], table["path"]))
    by_name = {Path(paths[int(i)]).name: v for i, v in zip(ids, x)}
    origs = {k: by_name[f"{k}-orig.jpg"] for k in set(truth.values()) if k}
    out = {kind: float(np.median([origs[k] @ by_name[f"{k}-{kind}.jpg"] for k in origs])) for kind in VARIANTS}
    negatives = np.stack([by_name[name] for name, k in truth.items() if k is None])
    out["neg"] = float(np.median(np.max(np.stack(list(origs.values())) @ negatives.T, axis=1)))
    return out


def kind_recall(groups: list, truth: dict[str, str | None]) -> dict[str, float]:
    """Share of each kind of copy grouped with its original."""
    group = {Path(p).name: g for g, grp in enumerate(groups) for p in grp.paths}
    origs = [k for k in set(truth.values()) if k]
    return {kind: float(np.mean([group.get(f"{k}-{kind}.jpg", -1) == group.get(f"{k}-orig.jpg", -2) for k in origs]))
            for kind in VARIANTS}


def measure_model(root: Path, tag: str, truth: dict[str, str | None]) -> dict:
    """Embed the library with one model and sweep the threshold."""
    coll_dir = root / f"coll-{tag}"
    if not (coll_dir / "manifest.json").is_file() or not Collection.open(coll_dir).manifest.complete:
        embed(root / "photos", coll_dir, EmbedConfig(model=SMALL_MODEL, pretrained=tag, workers=0, threads=1))
    coll = Collection.open(coll_dir)
    if not coll.has_index():
        build_index(coll_dir)
    coll = Collection.open(coll_dir)
    true_pairs = 15 * sum(1 for k in truth.values() if k) // 6
    sweep = {}
    for t in SWEEP:
        report = find_duplicates(coll, t)
        predicted, correct = pair_scores(report.groups, truth)
        sweep[t] = (correct / predicted if predicted else 1.0, correct / true_pairs, report.method)
    kinds = kind_recall(find_duplicates(coll, DEFAULT_DUPLICATE_THRESHOLD).groups, truth)
    return {"sweep": sweep, "cosines": variant_cosines(coll, truth), "kinds": kinds, "items": coll.count()}


def best_threshold(sweep: dict) -> float | None:
    """The threshold of highest recall with precision >= 0.99 (None if none reaches it)."""
    ok = [(r, t) for t, (p, r, _) in sweep.items() if p >= 0.99]
    return max(ok)[1] if ok else None


def quality_section(n: int, results: dict, seconds: float, note: str) -> str:
    default = DEFAULT_DUPLICATE_THRESHOLD
    rows = []
    for tag, res in results.items():
        p, r, method = res["sweep"][round(default, 2)]
        best = best_threshold(res["sweep"])
        rows.append([f"{SMALL_MODEL} ({tag})", res["items"], default, f"{p:.3f}", f"{r:.3f}",
                     "yes" if p >= 0.99 and r >= 0.90 else "no", best, method])
    cos_rows = [[f"{SMALL_MODEL} ({tag})"] + [f"{res['cosines'][k]:.3f}" for k in (*VARIANTS, "neg")]
                for tag, res in results.items()]
    kind_rows = [[f"{SMALL_MODEL} ({tag})"] + [f"{res['kinds'][k]:.3f}" for k in VARIANTS] for tag, res in results.items()]
    sweep_rows = [[t] + [f"{res['sweep'][t][0]:.3f} / {res['sweep'][t][1]:.3f}" for res in results.values()]
                  for t in SWEEP]
    return "\n\n".join([
        f"## Near-duplicates\n\nCommand: `{command(note)}`  \nMachine: {machine()}  \n"
        f"{n} originals from flickr8k-test, upscaled to {SIZE} px, x (original + {len(VARIANTS)} copies) + "
        f"hard negatives = {next(iter(results.values()))['items']} files; this run {seconds:.0f} s (files and "
        "embeddings are reused from bench-data/ when an earlier run made them)." + (f"\n\n{note}" if note else ""),
        f"At the default threshold T = {default} (`DEFAULT_DUPLICATE_THRESHOLD`; pairwise precision / recall, goal "
        ">= 0.99 / >= 0.90):\n\n" + markdown_table(
            ["model", "items", "T", "precision", "recall", "goal met", "T of best recall at precision >= 0.99", "search"], rows),
        "Median cosine of each kind of copy to its original, and of each original to its hard negative:\n\n"
        + markdown_table(["model", *VARIANTS, "hard negative"], cos_rows),
        f"Share of each kind of copy grouped with its original at T = {default}:\n\n"
        + markdown_table(["model", *VARIANTS], kind_rows),
        "Threshold sweep (precision / recall):\n\n" + markdown_table(
            ["T", *[f"{SMALL_MODEL} ({tag})" for tag in results]], sweep_rows)])


def plant_copies(coll_dir: Path, count: int, seed: int = 0) -> np.ndarray:
    """Add ``count`` near copies of random rows (cosine U[0.90, 0.995] to their original) as one
    new version, once (the index follows); returns the ``(original id, copy id)`` pairs."""
    import pyarrow as pa

    from vlsearch.store.arrays import embedding_array

    marker = coll_dir.parent / f"planted-{count}.npy"
    if marker.is_file():
        return np.load(marker)
    coll, rng = Collection.open(coll_dir), np.random.default_rng(seed)
    n = coll.count()
    originals = np.sort(rng.choice(n, count, replace=False))  # the synthetic ids are the row numbers
    x = np.asarray(np.load(coll_dir.parent / "base_f16.npy", mmap_mode="r")[originals], np.float32)
    u = rng.standard_normal(x.shape).astype(np.float32)
    u -= (u * x).sum(axis=1, keepdims=True) * x
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    cos = rng.uniform(0.90, 0.995, (count, 1)).astype(np.float32)
    ids = np.arange(n, n + count, dtype=np.int64)
    coll.add(pa.table({"id": ids, "path": [f"synthetic/copy-{i:08d}.jpg" for i in ids],
                       "width": pa.array(np.full(count, 224, np.int32)),
                       "height": pa.array(np.full(count, 224, np.int32)),
                       "embedding": embedding_array((cos * x + np.sqrt(1 - cos ** 2) * u).astype(np.float16))}))
    pairs = np.stack([originals, ids], axis=1)
    np.save(marker, pairs)
    return pairs


def planted_recall(coll_dir: Path, pairs: np.ndarray, groups: list, threshold: float) -> tuple[float, int]:
    """Share of the planted pairs with a stored cosine >= threshold that share a group, and their count."""
    ids, x = Collection.open(coll_dir).read_embeddings()
    at = dict(zip(ids.tolist(), range(len(ids))))
    cos = np.array([x[at[a]] @ x[at[b]] for a, b in pairs])
    group = {i: g for g, grp in enumerate(groups) for i in grp.ids}
    due = pairs[cos >= threshold]
    found = sum(1 for a, b in due if group.get(int(a), -1) == group.get(int(b), -2))
    return found / max(len(due), 1), len(due)


def scale_section(n: int, nprobes: list[int | None], planted: int, note: str) -> str:
    """Time of find_duplicates on the n x 512 synthetic collection with planted near copies."""
    coll_dir = make_dataset(n, 512, 1000, 0)
    start = time.perf_counter()
    entry = Collection.open(coll_dir).manifest.index or build_index(coll_dir, nprobe_default=32, k_factor_default=10)
    built = time.perf_counter() - start
    pairs = plant_copies(coll_dir, planted)
    rows = []
    for nprobe in nprobes:
        report = find_duplicates(coll_dir, nprobe=nprobe)
        recall, due = planted_recall(coll_dir, pairs, report.groups, report.threshold)
        rows.append([f"{report.items:,}", entry["factory"], nprobe or (f"{entry.get('nprobe_default')} (index default)" if entry.get("nlist") else "-"),
                     report.method, f"{report.seconds:.0f}", f"{report.pairs_scored:,}", len(report.groups),
                     report.duplicates, f"{recall:.3f} of {due}"])
    return (f"### Near-duplicates at scale\n\nCommand: `{command(note)}`  \nMachine: {machine()}  \n"
            f"`find_duplicates` (T = {DEFAULT_DUPLICATE_THRESHOLD}, one thread) on the {n:,} x 512 synthetic 'real' "
            f"collection (benchmarks/synthetic.py) plus {planted} planted near copies of random rows (cosine "
            "U[0.90, 0.995]) added as a new version; seconds include reading the stored fp16 vectors. "
            "Index: `build_index(auto, nprobe_default=32, k_factor_default=10)` (fixed defaults, not tuned); its "
            f"build is not timed in the table ({'cached' if built < 1 else f'{built:.0f} s'})."
            + (f"\n\n{note}" if note else "") + "\n\n"
            + markdown_table(["items", "index", "nprobe", "search", "seconds", "pairs scored", "groups", "copies",
                              "planted pairs >= T found"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--originals", type=int, default=250)
    ap.add_argument("--tags", default=",".join(TAGS))
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--note", default="", help="a paragraph added to the quality section")
    ap.add_argument("--scale-note", default="", help="a paragraph added to the scale section")
    ap.add_argument("--scale", type=int, default=0, help="also time N synthetic vectors (0: skip)")
    ap.add_argument("--nprobe", default="", help="comma-separated nprobe values for --scale (default: the index's)")
    ap.add_argument("--planted", type=int, default=1000, help="near copies planted into the --scale collection")
    args = ap.parse_args()
    with cpu_threads(1):
        if not args.skip_quality:
            start, root = time.perf_counter(), DEFAULT_DIR / f"duplicates-n{args.originals}"
            truth = make_library(root, args.originals)
            results = {tag: measure_model(root, tag, truth) for tag in args.tags.split(",")}
            write_section("duplicates", quality_section(args.originals, results, time.perf_counter() - start,
                                                                args.note))
        if args.scale:
            nprobes = [int(v) for v in args.nprobe.split(",") if v] or [None]
            write_section("duplicates-scale", scale_section(args.scale, nprobes, args.planted, args.scale_note))


if __name__ == "__main__":
    main()
