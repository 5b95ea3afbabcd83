"""What a score means: cosine distributions of matching and non-matching pairs, text->image and
image->image, for vlsearch-small on Flickr8k-test; and what ``min_score`` / ``autocut`` keep.

    nice -n 10 python benchmarks/bench_scores.py                 # writes RESULTS.md "scores"
    nice -n 10 python benchmarks/bench_scores.py --part cost     # RESULTS.md "shaping-cost"

* text->image: each of the 5,000 captions against the 1,000 images; a pair matches when the
  caption was written for the image (5,000 matching, 4,995,000 non-matching pairs).
* image->image: Flickr8k has no image-to-image relevance labels, so each image's query is a
  modified copy of it (a 80 % centre crop, mirrored, re-encoded as JPEG quality 60): the pair
  (query, its original) matches, the query against the 999 other images does not.
* ``--part cost``: the latency of each shaping option on a synthetic collection (100,000 x 384,
  the index build_index picks, metadata columns ``label``, ``album``, ``taken``), against the plain search.
* For a few thresholds (percentiles of the distributions above), how much of each kind passes; and for ``autocut=1`` over each query's top 10: the mean list length and
  how often the matching item is kept (text->image: is its image in the cut list).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "flickr8k-test"
PERCENTILES = (5, 25, 50, 75, 95)


def read_split(folder: Path) -> tuple[list[Path], list[str], np.ndarray]:
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(folder / "captions.csv").to_pydict()
    images: dict[str, int] = {}
    text_image = [images.setdefault(img, len(images)) for img in table["image"]]
    return [folder / p for p in images], list(table["caption"]), np.array(text_image)


def modified_copy(path: Path) -> bytes:
    """The image query for ``path``: a centre crop of 80 %, mirrored, saved as JPEG quality 60."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        box = (int(w * 0.1), int(h * 0.1), int(w * 0.9), int(h * 0.9))
        out = io.BytesIO()
        ImageOps.mirror(im.crop(box)).save(out, format="JPEG", quality=60)
        return out.getvalue()


def distribution(values: np.ndarray) -> list[object]:
    return [len(values), float(values.mean()), float(values.std()), *(float(np.percentile(values, p))
                                                                        for p in PERCENTILES)]


def autocut_figures(sims: np.ndarray, match: np.ndarray, k: int = 10) -> tuple[float, float, float]:
    """Over each query's top ``k``: (mean kept by autocut=1, % of queries whose match is in the top
    k, % whose match is in the cut list)."""
    from vlsearch.query.shaping import autocut

    top = np.argsort(-sims, axis=1)[:, :k]
    kept, in_top, in_cut = [], 0, 0
    for q in range(len(sims)):
        n = autocut(sims[q, top[q]], 1)
        kept.append(n)
        hit = np.flatnonzero(match[q, top[q]])
        in_top += len(hit) > 0
        in_cut += len(hit) > 0 and hit[0] < n
    return float(np.mean(kept)), 100 * in_top / len(sims), 100 * in_cut / len(sims)


def _columns(ids: np.ndarray) -> dict:
    import pyarrow as pa

    rng = np.random.default_rng(ids[0] if len(ids) else 0)
    return {"label": pa.array([f"label-{v}" for v in rng.integers(0, 20, len(ids))]),
            "album": pa.array(rng.integers(0, 1000, len(ids)).astype(np.int32)),
            "taken": pa.array(rng.integers(0, 10**9, len(ids)).astype(np.int64))}


def cost(args: argparse.Namespace) -> None:
    """Latency of each shaping option against the plain search, on a synthetic collection."""
    from benchmarks._results import ensure_index
    from benchmarks.synthetic import load_dataset
    from vlsearch.query.searcher import Searcher

    data = load_dataset(args.n, args.dim, 1000, 0, None, kind="real", columns=_columns, variant="-shaping")
    path = data.collection
    entry = ensure_index(path)
    queries = data.queries[: args.queries]
    with Searcher.open(path) as s:
        s.search_vector(queries[0], k=10, facets=["label"])  # builds the metadata table once (as a first filter does)
        deep = s.search_vector(queries[:50], k=500, exact=True)
        threshold = float(np.median([hits[-1].score for hits in deep]))  # about 500 hits pass, per query
        cases = [("plain top 10", {}),
                 (f"min_score={threshold:.3f}", dict(min_score=threshold)),
                 ("autocut=1", dict(autocut=1)),
                 ("group_by=album, per_group=1", dict(group_by="album")),
                 ("facets=[label, album] (depth 100)", dict(facets=["label", "album"])),
                 ("order_by=taken DESC (depth 100)", dict(order_by="taken DESC")),
                 (f"order_by=taken DESC, min_score={threshold:.3f}", dict(order_by="taken DESC", min_score=threshold)),
                 (f"facets=[label], min_score={threshold:.3f}", dict(facets=["label"], min_score=threshold))]
        rows = []
        for name, shape in cases:
            times, relevant = [], []
            for q in queries:
                t0 = time.perf_counter()
                hits = s.search_vector(q, k=10, **shape)
                times.append((time.perf_counter() - t0) * 1e3)
                relevant.append(getattr(hits, "relevant", None) or len(hits))
            rows.append([name, float(np.median(times)), float(np.percentile(times, 95)), float(np.mean(relevant))])
    body = "\n\n".join([
        f"## Shaping cost ({args.n:,} x {args.dim} synthetic)\n\n`{command_line()}`",
        f"{machine()}. {len(queries)} single vector queries, k=10, index `{entry.get('factory')}` (build_index's auto choice; "
        "an IVF index probes its tuned nprobe); the metadata table (`FilterEngine`) built before timing; a deeper "
        "fetch searches again from the start. `relevant`: mean size of the relevant "
        "set (hits for the plain search).",
        markdown_table(["search", "median ms", "p95 ms", "relevant"], rows)])
    print(body)
    if not args.no_write:
        write_section("shaping-cost", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("scores", "cost"), default="scores")
    ap.add_argument("--model", default="vlsearch-small")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--n", type=int, default=100_000, help="--part cost: collection size")
    ap.add_argument("--dim", type=int, default=384, help="--part cost: vector dimension")
    ap.add_argument("--queries", type=int, default=200, help="--part cost: timed queries")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = ap.parse_args()
    if args.part == "cost":
        cost(args)
        return

    from vlsearch.models.factory import load_model

    started = time.perf_counter()
    encoder = load_model(args.model, device="cpu")
    paths, captions, text_image = read_split(Path(args.data))
    images = encoder.encode_images(paths)
    queries = encoder.encode_texts(captions)
    copies = encoder.encode_images([modified_copy(p) for p in paths])

    t2i = queries @ images.T                      # (5000, 1000)
    t2i_match = text_image[:, None] == np.arange(len(paths))[None, :]
    i2i = copies @ images.T                       # (1000, 1000)
    i2i_match = np.eye(len(paths), dtype=bool)

    rows = [["text->image, matching", *distribution(t2i[t2i_match])],
            ["text->image, non-matching", *distribution(t2i[~t2i_match])],
            ["text->image, best non-matching per query", *distribution(np.where(t2i_match, -2, t2i).max(axis=1))],
            ["image->image, matching (modified copy)", *distribution(i2i[i2i_match])],
            ["image->image, non-matching", *distribution(i2i[~i2i_match])],
            ["image->image, best non-matching per query", *distribution(np.where(i2i_match, -2, i2i).max(axis=1))]]
    headers = ["pairs", "n", "mean", "std", *(f"p{p}" for p in PERCENTILES)]

    thresholds = {"text->image matching median": float(np.median(t2i[t2i_match])),
                  "text->image matching p5": float(np.percentile(t2i[t2i_match], 5)),
                  "image->image non-matching p95": float(np.percentile(i2i[~i2i_match], 95)),
                  "image->image matching p5": float(np.percentile(i2i[i2i_match], 5))}
    cut_rows = []
    for name, value in thresholds.items():
        cut_rows.append([f"{name} = {value:.3f}",
                         100 * float((t2i[t2i_match] >= value).mean()), 100 * float((t2i[~t2i_match] >= value).mean()),
                         100 * float((i2i[i2i_match] >= value).mean()), 100 * float((i2i[~i2i_match] >= value).mean())])
    cut_headers = ["min_score", "t2i matching kept %", "t2i non-matching kept %", "i2i matching kept %",
                   "i2i non-matching kept %"]
    auto_rows = [["text->image", *autocut_figures(t2i, t2i_match)],
                 ["image->image", *autocut_figures(i2i, i2i_match)]]
    auto_headers = ["queries", "mean hits kept of 10", "match in top 10 %", "match in autocut list %"]
    took = time.perf_counter() - started

    body = "\n\n".join([
        f"## Scores: what min_score means (vlsearch-small, Flickr8k-test)\n\n`{command_line()}`",
        f"{machine()}; {took:.0f} s. Cosine similarities of L2-normalised embeddings, exact (no index). "
        "text->image: 5,000 captions x 1,000 images, a pair matches when the caption was written for the "
        "image. image->image: each image's query is a modified copy of it (80 % centre crop, mirrored, "
        "JPEG quality 60); it matches its original only (Flickr8k has no image-image labels).",
        markdown_table(headers, rows),
        "What one threshold keeps of each kind (share of pairs scoring >= min_score):",
        markdown_table(cut_headers, cut_rows),
        "autocut=1 over each query's exact top 10 (`vlsearch.query.shaping.autocut`):",
        markdown_table(auto_headers, auto_rows),
    ])
    print(body)
    if not args.no_write:
        write_section("scores", body)


if __name__ == "__main__":
    main()
