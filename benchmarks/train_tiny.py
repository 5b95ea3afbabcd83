"""Training throughput of `vlsearch train` on CPU: optimizer steps/s of the tiny model.

Generates the procedural shapes set (64 px) in a temp folder, then times ``--steps`` steps of
``train()`` per setting (threads, locked/precomputed text tower, augmentation). The rate is taken
between the first and the last step, so model creation, tokenisation, text precomputation and
worker start-up are excluded (they are reported as "setup s"). CPU s/step is the main process's
CPU time (decoding workers excluded). The 1-minute load average is printed: on a shared machine
it says how much of the wall time was spent waiting for a core.

    python benchmarks/train_tiny.py [--steps 20] [--batch-size 128] [--images 2048]
    python benchmarks/train_tiny.py --model vlsearch-small --data ../shared/data/flickr8k-train

With ``--model vlsearch-small`` (locked MiniLM text tower, precomputed) the rows compare images
decoded every step by DataLoader workers against images decoded once into memory and augmented as
batched tensors (``cache_images``), on real JPEGs when ``--data`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402
from vlsearch.data.shapes import ShapesConfig, generate_shapes  # noqa: E402
from vlsearch.train.loop import TrainConfig, train  # noqa: E402


def timed_run(manifest: Path, out: Path, config: TrainConfig) -> dict[str, float]:
    stamps: list[tuple[float, float]] = []
    started = time.perf_counter()

    def progress(step: int, total: int, stage: str = "train", **_: object) -> None:
        if stage == "train":
            stamps.append((time.perf_counter(), time.process_time()))

    result = train(manifest, out, config, progress=progress)
    (w0, c0), (w1, c1) = stamps[0], stamps[-1]
    n = len(stamps) - 1
    return {"steps/s": n / (w1 - w0), "cpu s/step": (c1 - c0) / n, "setup s": stamps[0][0] - started,
            "final loss": result.losses[-1], "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="vlsearch-tiny")
    parser.add_argument("--data", default=None, help="a captions manifest/folder instead of generated shapes")
    args = parser.parse_args()

    base = TrainConfig(model=args.model, batch_size=args.batch_size, max_steps=args.steps, warmup_steps=5,
                       val_fraction=0.0, checkpoint_every=0, workers=args.workers, threads=1)
    if args.model == "vlsearch-tiny":
        settings = [
            ("full model, augment, 1 thread", base),
            ("full model, augment, 2 threads", replace(base, threads=2)),
            ("full model, no augment, 1 thread", replace(base, augment=None)),
            ("locked text, precomputed, 1 thread", replace(base, lock_text=True)),
            ("locked text, not precomputed, 1 thread", replace(base, lock_text=True, precompute_text=False)),
            ("full model, images in memory, 1 thread", replace(base, cache_images=True)),
        ]
    else:
        locked = replace(base, lock_text=True, threads=2)
        settings = [
            ("locked text, DataLoader decoding, 2 threads", locked),
            ("locked text, images in memory, 2 threads", replace(locked, cache_images=True)),
            ("locked text, images in memory, 5 captions/step, 2 threads",
             replace(locked, cache_images=True, captions_per_image=5)),
        ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(args.data) if args.data else generate_shapes(
            Path(tmp) / "shapes", ShapesConfig(n_train=args.images, n_heldout=0)).train_manifest
        for i, (name, config) in enumerate(settings):
            r = timed_run(manifest, Path(tmp) / f"run{i}", config)
            print(f"{name:42} {r['steps/s']:.2f} steps/s  {r['cpu s/step']:.3f} cpu s/step  "
                  f"setup {r['setup s']:.1f}s  load {r['load']:.1f}", flush=True)
            rows.append([name, round(r["steps/s"], 2), round(r["steps/s"] * args.batch_size, 1),
                         round(r["cpu s/step"], 3), round(r["setup s"], 1), round(r["load"], 1)])
    source = f"images of {args.data}" if args.data else "generated shapes images"
    body = "\n".join([
        f"## Training throughput ({args.model}, CPU)",
        "",
        f"`{command_line()}` — {args.model}, batch {args.batch_size}, "
        f"{args.workers} decoding workers, {args.steps} steps per row, {source}.",
        f"Machine: {machine()}.",
        "",
        markdown_table(["setting", "steps/s", "pairs/s", "CPU s/step (main)", "setup s", "load avg"], rows),
        "",
        "A load average above the core count means other jobs shared the cores: wall-clock rates are then",
        "lower bounds; CPU s/step is the steadier figure.",
    ])
    write_section("train_tiny" if args.model == "vlsearch-tiny" else f"train_speed_{args.model}", body)


if __name__ == "__main__":
    main()
