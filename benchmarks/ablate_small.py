"""Ablation table for vlsearch-small: each run of ``train_small.py`` scored on Flickr8k-test.

    python benchmarks/train_small.py --out runs/abl-base --epochs 30 ...   # one run per choice
    python benchmarks/ablate_small.py runs/abl-base runs/abl-96 ...

For every run folder it reads ``train.json`` (config, validation metrics, wall time), loads its
``model.pt`` with the architecture recorded in ``model_config.json`` (variant configs from the
run's ``configs/`` folder), scores text->image and
image->text retrieval on ``flickr8k-test`` (never used for training or for choosing settings:
choices are made on the validation split) and rewrites the ``small-ablation`` section of
``benchmarks/RESULTS.md``. Scores are cached in each run folder (``test.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402
from vlsearch.core.threads import set_process_threads  # noqa: E402
from benchmarks.bench_small import DATA, flickr_metrics  # noqa: E402
from benchmarks.train_small import MODEL_CONFIG  # noqa: E402


def run_model(run: Path, config: dict, infer_size: int | None = None) -> tuple[str, dict]:
    """Register the architecture ``run`` trained and return (its model name, its config).

    A run's ``model_config.json`` (written by ``train_small.py``) wins over today's built-in config of
    the same name, which may have changed since; it is registered under a name unique to the run.
    ``infer_size`` scores the run at another input size than its config's."""
    import open_clip

    if (run / "configs").is_dir():  # variant configs (--image-size / --trunk)
        open_clip.add_model_config(run / "configs")
    saved = run / MODEL_CONFIG
    if not saved.is_file():
        return config["model"], open_clip.get_model_config(config["model"])
    model_cfg = json.loads(saved.read_text())["config"]
    if infer_size:
        model_cfg["vision_cfg"]["image_size"] = infer_size
    name = f"{config['model']}--{run.name}" + (f"--{infer_size}" if infer_size else "")
    folder = Path(tempfile.mkdtemp(prefix="vlsearch-ablate-"))
    (folder / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(folder)
    return name, model_cfg


def describe(config: dict, model_cfg: dict) -> list[object]:
    vision, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    aug = config.get("augment")
    augment = "none" if not aug else f"crop {aug['scale'][0]:g}-1, jitter {aug['brightness']:g}" + (
        f", flip {aug['hflip']:g}" if aug.get("hflip") else "")
    text = "locked" if config["lock_text_unlocked_layers"] == 0 else f"last {config['lock_text_unlocked_layers']} tuned"
    projection = f"{text_cfg.get('hf_proj_type') or 'none'}, {model_cfg['embed_dim']}-d"
    groups = config.get("lock_image_unlocked_groups", 0)
    image = ("trained" if not config.get("lock_image") else "locked" if not groups else f"last {groups} stage(s) tuned")
    views = config.get("image_views", 1)
    if config.get("lock_image") and views == 1:
        augment = "none (plain view)"
    train_px = config.get("image_size") or vision["image_size"]
    autocast = {"auto": "fp32"}.get(config.get("precision", "auto"), config.get("precision"))  # auto: fp32 on CPU
    return [vision["timm_model_name"], image, vision.get("timm_proj", "linear"), f"{train_px}/{vision['image_size']}",
            config["epochs"], config.get("captions_per_image", 1), views, augment, text, projection, autocast]


def score(run: Path, model: str, cache: Path, threads: int, infer_size: int | None = None,
          locked_trunk: bool = False) -> dict:
    """Flickr8k-test figures of ``run``'s model.pt (``model``'s config must be registered)."""

    from vlsearch.models.factory import load_model

    cached = run / (f"test-{infer_size}px.json" if infer_size else "test.json")
    if cached.is_file() and cached.stat().st_mtime >= (run / "model.pt").stat().st_mtime:
        return json.loads(cached.read_text())
    set_process_threads(threads)
    encoder = load_model(model, pretrained=run / "model.pt", device="cpu", precision="fp32")
    metrics = flickr_metrics(encoder, DATA / "flickr8k-test", cache=cache, locked_trunk=locked_trunk)
    cached.write_text(json.dumps(metrics, indent=1))
    return metrics


def _extraction(log: dict) -> str:
    """Seconds the run spent computing its frozen-tower caches ('reused' when it found them cached)."""
    spent = log.get("precompute_seconds")
    if spent is None:
        return "-"
    return " + ".join(f"{k} {v:.0f}" for k, v in spent.items()) or "reused"


def curve(run: Path, every: int = 5) -> str:
    """The validation curve of ``run`` (every ``every`` epochs and the last) as a table."""
    val = json.loads((run / "train.json").read_text())["val"]
    points = [v for v in val if v["epoch"] % every == 0 or v is val[-1]]
    return "\n".join([
        f"Validation curve of `{run.name}`:",
        "",
        markdown_table(["epoch"] + [str(v["epoch"]) for v in points],
                       [["val T->I R@10 %"] + [round(100 * v["t2i"]["R@10"], 1) for v in points],
                        ["val I->T R@10 %"] + [round(100 * v["i2t"]["R@10"], 1) for v in points]]),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="train_small.py output folders; RUN@PX scores RUN at PX input pixels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "vlsearch" / "bench_small"))
    ap.add_argument("--note", default="", help="a line written above the table")
    args = ap.parse_args()
    rows = []
    for spec in args.runs:
        path, _, px = spec.partition("@")
        run, infer_size = Path(path), int(px) if px else None
        log = json.loads((run / "train.json").read_text())
        config = log["config"]
        model, model_cfg = run_model(run, config, infer_size)
        locked = bool(config.get("lock_image")) and not config.get("lock_image_unlocked_groups")
        test = score(run, model, Path(args.cache), args.threads, infer_size, locked_trunk=locked)
        val = log["val"][-1]["t2i"] if log["val"] else {}
        t = test["t2i"]
        row = [run.name + (f" @{px} px" if px else "")] + describe(config, model_cfg) + [
            round(log["seconds"] / 60, 1), _extraction(log), round(100 * val.get("R@10", float("nan")), 1),
            round(100 * t["R@1"], 1), round(100 * t["R@5"], 1), round(100 * t["R@10"], 1), t["median_rank"],
            round(100 * test["i2t"]["R@10"], 1)]
        rows.append(row)
        print(" | ".join(map(str, row)), flush=True)
    table = markdown_table(["run", "image trunk", "image tower", "head", "px train/test", "epochs", "captions/step",
                            "views", "augmentation", "text tower", "text projection", "training autocast", "train min",
                            "of which feature caches s", "val T->I R@10 %", "test T->I R@1 %", "R@5 %", "R@10 %", "median rank",
                            "test I->T R@10 %"], rows)
    body = "\n".join(filter(lambda line: line is not None, [
        f"`{command_line()}` — {machine()}.",
        "Each row is one `benchmarks/train_small.py` run (seed 0); validation = 300 held-out *training* images "
        "(1,500 captions, chance R@10 3.3 %), test = flickr8k-test (1,000 images, 5,000 captions, chance R@10 1 %).",
        args.note or None, "", table]))
    write_section("small_ablation", "## vlsearch-small: training curve and ablation (Flickr8k)\n\n" + body + "\n\n"
                  + curve(Path(args.runs[0])))


if __name__ == "__main__":
    main()
