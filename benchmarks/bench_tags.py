"""Auto-tags: calibrate the tag score on Flickr8k-train, measure tag precision@1 on Flickr8k-test
and flowers-test, per built-in model (writes RESULTS.md "Auto-tags").

    taskset -c 1 python benchmarks/bench_tags.py                       # measure with the recorded calibration
    taskset -c 1 python benchmarks/bench_tags.py --write-calibration   # recalibrate, record, then measure

Each split is embedded once per model into ``--work`` (a folder source: images only, no captions
encoded) and tagged through :func:`indexing.tagging.tag_collection`, from the stored embeddings.

* **Calibration** (Flickr8k-train, 6,000 images, never the test split): every photo's top tag of the
  built-in vocabulary and its score (``min_score=-1, max_tags=1``); a top tag is right when it or a
  synonym listed with it is a word (or phrase) of one of the photo's five captions.
  ``min_score`` = :func:`indexing.tagging.calibrate_min_score` at ``--target`` precision, and
  per-tag thresholds (:func:`indexing.tagging.calibrate_tag_scores`) for frequent top tags.
* **Flickr8k-test**: tags at the calibrated thresholds (``tag_collection``'s default); precision@1 = the share of tagged photos
  whose top tag is right (as above), coverage = the share of photos with any tag, and the share of
  all kept tags that are right.
* **flowers-test**: the five class names (``daisy``, ``dandelion``, ``rose``, ``sunflower``,
  ``tulip``) added to the built-in vocabulary; precision@1 = the share of tagged photos whose top
  tag is their class; also with the five class names alone (plain zero-shot classification, every
  photo's top tag, no ``min_score``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SPLITS = {"train": DATA / "flickr8k-train", "test": DATA / "flickr8k-test", "flowers": DATA / "flowers-test"}
FLOWERS = [("daisy", "daisy", []), ("dandelion", "dandelion", []), ("roses", "rose", ["roses"]),
           ("sunflowers", "sunflower", ["sunflowers"]), ("tulips", "tulip", ["tulips"])]
MODELS = ("vlsearch-small/flickr8k-v4", "vlsearch-small/flickr8k-v3", "vlsearch-small/flickr8k-v2")


def collection(work: Path, model: str, split: str, encoder) -> Path:
    """The split embedded with ``encoder`` (embedded now unless done before)."""
    from indexing.embed import EmbedConfig, embed

    path = work / model.replace("/", "-") / split
    folder = SPLITS[split] / "images" if split != "flowers" else SPLITS[split]
    name, tag = model.split("/")
    config = EmbedConfig(model=name, pretrained=tag, batch_size=64, workers=1, device="cpu", threads=1)
    return embed(folder, path, config, encoder=encoder).path


def captions_by_file(split: str) -> dict[str, list[str]]:
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(SPLITS[split] / "captions.csv").to_pydict()
    out: dict[str, list[str]] = {}
    for image, caption in zip(table["image"], table["caption"]):
        out.setdefault(Path(image).name, []).append(caption)
    return out


def tag_table(coll: Path, config, encoder) -> tuple[list[str], list[list[str]], list[list[float]]]:
    from indexing.tagging import tag_collection
    from vlsearch.store.collection import Collection

    tag_collection(coll, config, encoder=encoder)
    table = Collection.open(coll).read_table(columns=["path", "tags", "tag_scores"]).to_pydict()
    return table["path"], table["tags"], table["tag_scores"]


def flickr_correct(vocab, paths, tags, split: str) -> list[list[bool]]:
    """For each photo, whether each of its tags is a word of its captions (or a listed synonym is)."""
    caps = captions_by_file(split)
    index = {t: i for i, t in enumerate(vocab.tags)}
    return [[vocab.matches(index[t], " . ".join(caps[Path(p).name])) for t in row] for p, row in zip(paths, tags)]


def top_tags(work: Path, model: str, split: str, encoder) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every photo's top tag (built-in vocabulary, no threshold), its score and whether it is right."""
    from indexing.tagging import TagConfig, read_vocabulary

    paths, tags, scores = tag_table(collection(work, model, split, encoder), TagConfig(min_score=-1.0, max_tags=1),
                                    encoder)
    correct = np.array([row[0] for row in flickr_correct(read_vocabulary(), paths, tags, split)])
    return [t[0] for t in tags], np.array([s[0] for s in scores]), correct


def calibrate(work: Path, model: str, encoder, target: float) -> dict:
    from indexing.tagging import MIN_CALIBRATION_PHOTOS, calibrate_min_score, calibrate_tag_scores

    names, top, correct = top_tags(work, model, "train", encoder)
    threshold = calibrate_min_score(top, correct, target)
    per_tag = calibrate_tag_scores(names, top, correct, target)
    kept = top >= np.array([per_tag.get(t, threshold) for t in names])
    return {"min_score": round(threshold, 4), "vocabulary": "everyday", "target_precision": target,
            "calibrated_on": f"flickr8k-train ({len(top)} images)",
            "train_precision_at_1": round(float(correct[kept].mean()), 4),
            "train_coverage": round(float(kept.mean()), 4), "train_precision_unthresholded": round(float(correct.mean()), 4),
            "command": "taskset -c 1 python benchmarks/bench_tags.py --write-calibration",
            "tag_scores_from": f"tags that are the top tag of >= {MIN_CALIBRATION_PHOTOS} calibration photos",
            "tag_scores": per_tag}


def curve(work: Path, model: str, encoder, targets=(0.5, 0.6, 0.7, 0.8, 0.9)) -> list[list[object]]:
    """For other calibration targets: the model's min_score, and the test P@1 and coverage of the
    top tag (no per-tag thresholds: one threshold for all tags; and with them)."""
    from indexing.tagging import calibrate_min_score, calibrate_tag_scores

    train_tags, train, train_ok = top_tags(work, model, "train", encoder)
    test_tags, test, test_ok = top_tags(work, model, "test", encoder)
    rows = []
    for target in targets:
        threshold = calibrate_min_score(train, train_ok, target)
        per_tag = calibrate_tag_scores(train_tags, train, train_ok, target)
        one = test >= threshold
        own = test >= np.array([per_tag.get(t, threshold) for t in test_tags])
        rows.append([target, round(threshold, 4), *_share(test_ok, one), *_share(test_ok, own)])
    return rows


def _share(correct: np.ndarray, kept: np.ndarray) -> list[float]:
    return [float(correct[kept].mean()) if kept.any() else float("nan"), float(kept.mean())]


def measure_flickr(work: Path, model: str, encoder, min_score: float | None, max_tags: int) -> dict:
    from indexing.tagging import TagConfig, read_vocabulary

    vocab = read_vocabulary()
    coll = collection(work, model, "test", encoder)
    paths, tags, _ = tag_table(coll, TagConfig(min_score=min_score, max_tags=max_tags), encoder)
    correct = flickr_correct(vocab, paths, tags, "test")
    tagged = [row for row in correct if row]
    _, top_only, _ = tag_table(coll, TagConfig(min_score=-1.0, max_tags=1), encoder)
    unthresholded = flickr_correct(vocab, paths, top_only, "test")
    return {"photos": len(paths), "coverage": len(tagged) / len(paths),
            "precision_at_1": float(np.mean([row[0] for row in tagged])) if tagged else float("nan"),
            "tag_precision": float(np.mean([c for row in tagged for c in row])) if tagged else float("nan"),
            "tags_per_photo": float(np.mean([len(row) for row in tags])),
            "precision_at_1_all": float(np.mean([row[0] for row in unthresholded]))}


def measure_flowers(work: Path, model: str, encoder, min_score: float | None, max_tags: int, tmp: Path) -> dict:
    from indexing.tagging import BUILTIN_VOCABULARY, TagConfig

    coll = collection(work, model, "flowers", encoder)
    classes = [{"tag": tag, "synonyms": syns} for _, tag, syns in FLOWERS]
    builtin = [e for e in json.loads(BUILTIN_VOCABULARY.read_text()) if e["tag"] not in {c["tag"] for c in classes}]
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "with-builtin.json").write_text(json.dumps(classes + builtin))
    (tmp / "classes.json").write_text(json.dumps(classes))
    truth = {folder: tag for folder, tag, _ in FLOWERS}
    paths, tags, _ = tag_table(coll, TagConfig(str(tmp / "with-builtin.json"), min_score, max_tags), encoder)
    right = [row[0] == truth[Path(p).parts[0]] for p, row in zip(paths, tags) if row]
    flower = [row[0] in (truth[Path(p).parts[0]], "flower") for p, row in zip(paths, tags) if row]
    _, alone, _ = tag_table(coll, TagConfig(str(tmp / "classes.json"), -1.0, 1), encoder)
    return {"photos": len(paths), "coverage": len(right) / len(paths),
            "precision_at_1": float(np.mean(right)) if right else float("nan"),
            "class_or_flower_at_1": float(np.mean(flower)) if flower else float("nan"),
            "classes_only_top1": float(np.mean([row[0] == truth[Path(p).parts[0]] for p, row in zip(paths, alone)]))}


def run_model(args: argparse.Namespace, model: str) -> dict:
    from indexing.tagging import read_calibration
    from vlsearch.models.factory import load_model

    start = time.perf_counter()
    name, tag = model.split("/")
    encoder = load_model(name, tag, device="cpu", threads=1)
    if args.write_calibration:
        write_calibration(model, calibrate(args.work, model, encoder, args.target))
    calibration = read_calibration().get(model)
    if calibration is None:
        raise SystemExit(f"{model} has no recorded calibration: run with --write-calibration")
    min_score = None  # the calibrated thresholds
    out = {"model": model, "calibration": calibration,
           "flickr8k_test": measure_flickr(args.work, model, encoder, min_score, args.max_tags),
           "flowers_test": measure_flowers(args.work, model, encoder, min_score, args.max_tags, args.work / "vocab"),
           "curve": curve(args.work, model, encoder),
           "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(out), flush=True)
    return out


def write_calibration(model: str, calibration: dict) -> None:
    from indexing.tagging import CALIBRATION_FILE, read_calibration
    from vlsearch.core.fsutil import write_json

    write_json(CALIBRATION_FILE, {**read_calibration(), model: calibration})


def report(results: list[dict], args: argparse.Namespace) -> str:
    rows = [[r["model"], r["calibration"]["min_score"], r["calibration"]["train_precision_at_1"],
             r["calibration"]["train_coverage"], r["flickr8k_test"]["precision_at_1"], r["flickr8k_test"]["coverage"],
             r["flickr8k_test"]["tag_precision"], r["flickr8k_test"]["tags_per_photo"],
             r["flickr8k_test"]["precision_at_1_all"], r["flowers_test"]["precision_at_1"],
             r["flowers_test"]["class_or_flower_at_1"], r["flowers_test"]["coverage"],
             r["flowers_test"]["classes_only_top1"]] for r in results]
    table = markdown_table(["model", "min_score", "train P@1", "train cov.", "flickr8k-test P@1", "coverage",
                            "all-tags precision", "tags/photo", "P@1 unthresholded", "flowers P@1", "flowers: class or 'flower'", "flowers cov.",
                            "flowers 5-class top-1"], rows)
    return "\n".join([
        "## Auto-tags", "",
        f"`vlsearch tag` with the built-in vocabulary ({args.vocab_size} tags), at most {args.max_tags} tags per "
        "photo, tags from the stored image embeddings. The thresholds are calibrated per model on Flickr8k-train "
        f"(6,000 images, 160 px; never the test split) as the lowest top-tag score at which the photos' top tags "
        f"are right at least {args.target:.0%} of the time (`indexing/vocabularies/calibration.json`): per tag for "
        "the tags that are the top tag of at least 40 calibration photos, one threshold (`min_score`) for the "
        "others. A tag is "
        "right when it or a synonym listed with it is a word of one of the photo's five captions (captions do "
        "not name everything a photo shows, so this undercounts). P@1: among the photos with a kept tag, the "
        "share whose top tag is right; coverage: the share of photos with any kept tag; all-tags precision: "
        "the share of all kept tags that are right; P@1 unthresholded: every photo's top tag. flowers-test: "
        "the five class names added to the vocabulary (P@1: the top kept tag is the photo's class, 'flower' "
        "counts as wrong; also the share whose top kept tag is the class or 'flower'), and the five class "
        "names alone (top-1, no threshold). vlsearch-small was trained "
        "on Flickr8k-train, so its calibration split is not unseen by the model.", "",
        table, "", f"Other calibration targets, {results[0]['model']} (the min_score each gives on Flickr8k-train, "
        "and the Flickr8k-test P@1 and coverage of the top tag at that score; `--min-score` trades one for the "
        "other; the default is the target above, with per-tag thresholds):", "",
        markdown_table(["target", "min_score", "one threshold: test P@1", "coverage", "per-tag thresholds: test P@1 (top tag)",
                        "coverage"], results[0]["curve"]),
        "", f"Command: `taskset -c 1 {command_line()}`  ", f"Machine: {machine()}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="name/pretrained of each model")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlsearch-bench-tags"))
    parser.add_argument("--target", type=float, default=0.8, help="calibration precision target")
    parser.add_argument("--max-tags", type=int, default=5)
    parser.add_argument("--write-calibration", action="store_true")
    parser.add_argument("--no-results", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    from indexing.tagging import read_vocabulary

    args.vocab_size = len(read_vocabulary().tags)
    results = [run_model(args, m) for m in args.models]
    if not args.no_results:
        write_section("tags", report(results, args))


if __name__ == "__main__":
    main()
