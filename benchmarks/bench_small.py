"""Figures for vlsearch-small: Flickr8k-test retrieval, zero-shot flowers, encode speed.

    nice -n 10 python benchmarks/bench_small.py            # all three, writes RESULTS.md "small"

* Flickr8k-test (1,000 images, 5,000 captions): text->image and image->text Recall@1/5/10, MRR,
  median rank for the shipped vlsearch-small (flickr8k-v4), the previous weights (flickr8k-v3 and
  flickr8k-v2, still loadable) and chance, from one run.
* Zero-shot top-1 on flowers-test (5 classes, chance 20 %) with ``vlsearch.eval.zeroshot``'s default
  prompt templates.
* Model-only encode speed (``bench_models.measure``) of vlsearch-small v4 (v3's architecture too)
  and v2, vlsearch-tiny and ViT-B-32 (random init) at one batch size and thread count.

With ``--provenance`` the test figures are also stored in ``vlsearch/models/weights/vlsearch-small.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vlsearch.core.allocator import enable_huge_pages  # noqa: E402

enable_huge_pages()  # before torch's first allocation
import torch  # noqa: E402

from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402
from vlsearch.core.threads import set_process_threads  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SMALL = "vlsearch-small"


def read_split(folder: Path) -> tuple[list[Path], list[str], np.ndarray]:
    """(unique image paths, captions, image index of each caption) of a captions.csv split."""
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(folder / "captions.csv").to_pydict()
    images: dict[str, int] = {}
    text_image = [images.setdefault(img, len(images)) for img in table["image"]]
    return [folder / p for p in images], list(table["caption"]), np.array(text_image)


def text_backbone_features(encoder, captions: list[str], cache: Path | None) -> torch.Tensor:
    """The text tower's pooled caption features (before ``text.proj``): the same for every
    vlsearch-small weights with the same text transformer, so cached in ``cache`` (when given)
    under the captions and those weights."""
    import hashlib

    from vlsearch.models.towers import text_backbone_features

    digest = hashlib.sha1("\n".join(captions).encode())
    for value in encoder.model.text.transformer.state_dict().values():
        digest.update(value.detach().float().cpu().numpy().tobytes())
    key = digest.hexdigest()
    file = cache / f"minilm-{key[:16]}.pt" if cache else None
    if file is not None and file.is_file():
        return torch.load(file, weights_only=True)
    out = text_backbone_features(encoder.model, encoder.tokenize(captions))
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, file)
    return out


def flickr_metrics(encoder, folder: Path, cache: Path | None = None, batch_size: int = 64,
                   locked_trunk: bool = False) -> dict:
    """Retrieval figures on a captions.csv split; the text side is ``encode_texts`` computed in
    two parts (shared text backbone, then this model's projection) — the same numbers. With
    ``locked_trunk`` (the timm trunk is the pretrained one) the image side is computed the same way:
    pooled trunk features, cached per input size, then this model's head."""
    import torch.nn.functional as F

    from vlsearch.core.metrics import retrieval_metrics

    paths, captions, text_image = read_split(folder)
    if locked_trunk:
        with torch.inference_mode():
            pooled = trunk_features(encoder, paths, cache, batch_size)
            image_feats = F.normalize(encoder.model.visual.head(pooled), dim=-1).numpy()
    else:
        image_feats = encoder.encode_images(paths, batch_size=batch_size)
    with torch.inference_mode():
        text_feats = F.normalize(encoder.model.text.proj(text_backbone_features(encoder, captions, cache)), dim=-1).numpy()
    return retrieval_metrics(text_feats @ image_feats.T, text_image)


def trunk_features(encoder, paths: list[Path], cache: Path | None, batch_size: int = 64) -> torch.Tensor:
    """Pooled pretrained-trunk features of ``paths`` at the encoder's input size (cached in ``cache``)."""
    import hashlib

    from vlsearch.data.images import open_image

    visual = encoder.model.visual
    key = hashlib.sha1(("\n".join(map(str, paths)) + f"|{encoder.image_size}|"
                        + visual.trunk.pretrained_cfg["architecture"]).encode()).hexdigest()
    file = cache / f"trunk-{key[:16]}.pt" if cache else None
    if file is not None and file.is_file():
        return torch.load(file, weights_only=True)
    out = []
    for i in range(0, len(paths), batch_size):
        pixels = torch.stack([encoder.preprocess(open_image(p, draft_size=2 * encoder.image_size))
                              for p in paths[i : i + batch_size]])
        with torch.inference_mode():
            out.append(visual.trunk(encoder.image_input(pixels)).float())
    out = torch.cat(out)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, file)
    return out


def chance_metrics(n_images: int = 1000, per_image: int = 5) -> dict:
    """Expected figures of a random ranking (exact, not simulated)."""
    ranks = np.arange(1, n_images + 1)
    t2i = {f"R@{k}": k / n_images for k in (1, 5, 10)}
    t2i.update(mrr=float(np.mean(1 / ranks)), median_rank=(n_images + 1) / 2)
    # image->text: rank of the first of `per_image` relevant captions among n_images*per_image.
    n = n_images * per_image
    first = np.arange(1, n - per_image + 2)
    p = np.array([math.comb(n - r, per_image - 1) for r in first], dtype=float) / math.comb(n, per_image)
    cdf = np.cumsum(p)
    i2t = {f"R@{k}": float(cdf[k - 1]) for k in (1, 5, 10)}
    i2t.update(mrr=float((p / first).sum()), median_rank=float(first[np.searchsorted(cdf, 0.5)]))
    return {"t2i": t2i, "i2t": i2t}


PREVIOUS = ("flickr8k-v3", "flickr8k-v2")  #: earlier shipped weights, compared in the same run
V2 = "flickr8k-v2"  #: the last other architecture (speed row)


def zero_shot(encoder, folder: Path) -> tuple[float, list[str]]:
    from vlsearch.eval.zeroshot import DEFAULT_TEMPLATES, zero_shot_classify

    result = zero_shot_classify(encoder, folder, templates=DEFAULT_TEMPLATES)
    return float((result.predictions == result.labels).mean()), list(DEFAULT_TEMPLATES)


def retrieval_rows(figures: dict[str, dict]) -> list[list[object]]:
    rows = []
    for label, m in figures.items():
        t, i = m["t2i"], m["i2t"]
        rows.append([label] + [round(100 * t[k], 1) for k in ("R@1", "R@5", "R@10")] + [round(t["mrr"], 3), t["median_rank"]]
                    + [round(100 * i[k], 1) for k in ("R@1", "R@5", "R@10")] + [round(i["mrr"], 3), i["median_rank"]])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="batch size of the encode-speed measurement")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "vlsearch" / "bench_small"),
                    help="where MiniLM's test-caption features are cached ('' disables)")
    ap.add_argument("--provenance", action="store_true", help="store the test figures in the weights' provenance JSON")
    args = ap.parse_args()
    set_process_threads(args.threads)
    from vlsearch.models.factory import WEIGHTS_DIR, load_model

    data = Path(args.data)
    cache = Path(args.cache) if args.cache else None
    small = load_model(SMALL, device="cpu", precision="fp32")
    earlier = {tag: load_model(SMALL, pretrained=tag, device="cpu", precision="fp32") for tag in PREVIOUS}
    figures = {f"vlsearch-small {small.pretrained} (shipped)": flickr_metrics(small, data / "flickr8k-test", cache)}
    figures.update({f"vlsearch-small {tag} (previous)": flickr_metrics(enc, data / "flickr8k-test", cache)
                    for tag, enc in earlier.items()})
    figures["chance"] = chance_metrics()
    headers = ["model", "T->I R@1", "R@5", "R@10", "MRR", "median rank", "I->T R@1", "R@5", "R@10", "MRR", "median rank"]
    retrieval = markdown_table(headers, retrieval_rows(figures))
    print(retrieval)
    top1, templates = zero_shot(small, data / "flowers-test")
    others = ", ".join(f"{tag} {100 * zero_shot(enc, data / 'flowers-test')[0]:.1f} %" for tag, enc in earlier.items())
    zs = (f"Zero-shot top-1 on flowers-test (500 images, 5 classes, chance 20 %): vlsearch-small {small.pretrained} "
          f"**{100 * top1:.1f} %**, {others}. Templates: " + "; ".join(f"`{t}`" for t in templates) + ".")
    print(zs)
    speed = ""
    if not args.skip_speed:
        from benchmarks.bench_models import measure

        rows = [measure(m, args.batch_size, args.seconds, p)
                for m, p in ((SMALL, None), (SMALL, V2), ("vlsearch-tiny", None), ("ViT-B-32", None))]
        speed = markdown_table(["model", "params", "input px", "dim", "images/s", "texts/s"], rows)
        from vlsearch.models.precision import describe_auto

        speed = (f"Model-only encode speed, batch {args.batch_size}, {args.threads} torch threads, precision auto "
                 f"({describe_auto()['precision_auto']} here) "
                 f"(tiny and ViT-B-32 random init; speed does not depend on the weights):\n\n{speed}\n")
        print(speed)
    provenance = json.loads((WEIGHTS_DIR / f"{SMALL}.json").read_text())
    train_note = (f"Weights: `vlsearch/models/weights/{SMALL}.pt`, trained by `{provenance.get('command')}` "
                  f"({provenance.get('steps')} steps, {provenance.get('train_seconds')} s, commit "
                  f"{provenance.get('git_commit')}).")
    write_section("small", f"## vlsearch-small (MiniLM text tower + ImageNet EfficientNet-Lite0 trunk + head trained "
                           f"on Flickr8k-train)\n\n"
                           f"{machine()}\n\n`{command_line()}`\n\n{train_note}\n\nFlickr8k-test (1,000 images, "
                           f"5,000 captions), recall in %:\n\n{retrieval}\n\n{zs}\n\n{speed}")
    if args.provenance:
        from vlsearch.core.fsutil import write_json

        provenance["test"] = {"flickr8k-test": figures[f"vlsearch-small {small.pretrained} (shipped)"],
                              "flowers-test zero-shot top-1": top1, "zero-shot templates": templates,
                              "command": command_line()}
        write_json(WEIGHTS_DIR / f"{SMALL}.json", provenance)


if __name__ == "__main__":
    main()
