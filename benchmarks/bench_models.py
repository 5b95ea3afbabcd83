"""Encode speed of models on this machine: images/s and texts/s at a fixed batch size and threads.

Model-only timing (pre-processed pixel tensors, pre-tokenised texts); the end-to-end pipeline
(decode + preprocess + encode) is measured by bench_encode.py. Random-init weights are as fast
as trained ones, so no download is needed.

    python benchmarks/bench_models.py --models vlsearch-tiny,ViT-B-32 --batch-size 32 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlsearch.core.allocator import enable_huge_pages  # noqa: E402
enable_huge_pages()  # before torch's first allocation: its allocator on huge pages, as in the CLI
import torch  # noqa: E402
from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402
from vlsearch.core.threads import set_process_threads  # noqa: E402
from vlsearch.models.factory import load_model  # noqa: E402

CAPTION = "a brown dog runs along the beach with a red ball in its mouth"


def _rate(fn, items_per_call: int, min_seconds: float) -> float:
    fn()  # warm-up
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or calls < 2:
        fn()
        calls += 1
    return calls * items_per_call / (time.perf_counter() - start)


def measure(name: str, batch_size: int, min_seconds: float, pretrained: str | None = None) -> list[object]:
    """[label, params, input px, dim, images/s, texts/s] of ``name`` (with ``pretrained`` weights)."""
    enc = load_model(name, pretrained=pretrained, device="auto")
    size = enc.image_size
    pixels = torch.randn(batch_size, 3, size, size)
    tokens = enc.tokenize([CAPTION] * batch_size)
    n_params = sum(p.numel() for p in enc.model.parameters()) / 1e6

    def images() -> None:
        enc.encode_image_tensors(pixels)

    def texts() -> None:
        with torch.inference_mode(), enc.autocast():
            enc.model.encode_text(tokens.to(enc.device), normalize=True)

    return [f"{name} ({pretrained})" if pretrained else name, f"{n_params:.1f}M", size, enc.dim, round(_rate(images, batch_size, min_seconds), 1),
            round(_rate(texts, batch_size, min_seconds), 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vlsearch-tiny,ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0, help="minimum timing window per measurement")
    args = ap.parse_args()
    set_process_threads(args.threads)
    rows = [measure(m, args.batch_size, args.seconds) for m in args.models.split(",")]
    table = markdown_table(["model", "params", "input px", "dim", "images/s", "texts/s"], rows)
    print(table)
    write_section(
        "bench_models",
        f"## Model encode speed (model only)\n\n{machine()}; batch size {args.batch_size}, "
        f"{args.threads} torch threads, fp32 on CPU.\n\n`{command_line()}`\n\n{table}\n",
    )


if __name__ == "__main__":
    main()
