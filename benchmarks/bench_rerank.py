"""Cross-attention re-ranking on flickr8k-test: quality, a word-order probe, and cost.

    python benchmarks/bench_rerank.py            # the shipped re-ranker of vlsearch-small

1. **Quality** (one run): text->image R@1/5/10 and MRR over the 1,000 test images (5,000
   captions), for the dual encoder alone, ITM alone, the hubness correction alone
   (``cosine - hub_weight * hub_offset``) and the combined score
   (``cosine + weight * itm - hub_weight * hub_offset``, the weights recorded with the re-ranker,
   tuned on validation), re-ranking the dual encoder's top K = 10, 20, 50. Features come from the
   frozen towers (the same functions ``Searcher.search_text(rerank=K)`` uses).
2. **Word-order probe**: test captions with an automatic minimal edit that keeps the words and
   changes the meaning (swap the two nouns of "a DOG chasing a MAN"-like captions, else swap two
   colour words); how often each scorer prefers the true caption for the true image.
3. **Cost**: a flickr8k-test collection (embedded once under ``bench-data/``, with
   ``--rerank-features`` stored), ``search_text(k=10, exact=True, rerank=K)`` ms per query with
   stored vs recomputed candidate features, and bytes per image.

Writes the ``rerank`` section of ``benchmarks/RESULTS.md`` and the raw figures to
``bench-data/rerank/bench_rerank.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._results import command_line, machine, markdown_table, write_section  # noqa: E402

TEST = ROOT.parent / "shared" / "data" / "flickr8k-test"
OUT = ROOT / "bench-data" / "rerank"
KS = (10, 20, 50)
COLOURS = ("black", "white", "brown", "red", "blue", "green", "yellow", "pink", "orange", "purple", "grey", "gray")
_AFTER_OBJECT = r"^( ?[.,!]?$| ?[.,]| (in|on|at|with|over|through|into|across|down|up|near|by|under|from|to|while|and)\b)"
_SWAP = re.compile(r"^(a|an|the|two|three) (\w+) (is |are )?(\w+ing|\w+s) (a|an|the) (\w+)\b(.*)$", re.I)


def edit_caption(caption: str) -> str | None:
    """A minimal meaning-changing edit with the same words: swap the subject and object nouns of
    "DET N1 (is) VERB DET N2 [end | preposition ...]", else two colour words that describe
    different things (not "black and white")."""
    m = _SWAP.match(caption.strip())
    if m:
        det1, n1, aux, verb, det2, n2, rest = m.groups()
        if n1.lower() != n2.lower() and re.match(_AFTER_OBJECT, rest):
            return f"{det1} {n2} {aux or ''}{verb} {det2} {n1}{rest}"
    words = caption.split()
    found = [i for i, w in enumerate(words) if w.lower().strip(",.") in COLOURS]
    for a, b in zip(found, found[1:]):
        joined = b - a == 2 and words[a + 1].lower() in ("and", "&", "or")
        if not joined and b - a > 1 and words[a].lower() != words[b].lower():
            words[a], words[b] = words[b], words[a]
            return " ".join(words)
    return None


def probe_pairs(captions: list[str], caption_image: np.ndarray, n: int = 100) -> list[tuple[int, str]]:
    """Up to ``n`` (caption row, edited caption), at most one per image, in caption order."""
    out, seen = [], set()
    for i, cap in enumerate(captions):
        edited = edit_caption(cap)
        if edited and edited != cap and caption_image[i] not in seen:
            out.append((i, edited))
            seen.add(caption_image[i])
        if len(out) == n:
            break
    return out


def word_order(encoder, reranker, feats, captions: list[str], pairs: list[tuple[int, str]]) -> dict:
    import torch

    from vlsearch.rerank.model import text_tokens

    rows = [i for i, _ in pairs]
    images = feats.caption_image[rows]
    kv = reranker.image_kv(feats.image_tokens[images])
    edited_states, edited_mask, edited_emb = text_tokens(encoder, [e for _, e in pairs], with_embeddings=True)
    true_states, true_mask, true_emb = text_tokens(encoder, [captions[i] for i in rows], with_embeddings=True)
    dual_true = (true_emb * feats.image_emb[images]).sum(1)
    dual_edit = (edited_emb * feats.image_emb[images]).sum(1)
    itm_true = np.array([reranker.itm_logits(true_states[j], true_mask[j], kv[j:j + 1])[0] for j in range(len(rows))])
    itm_edit = np.array([reranker.itm_logits(edited_states[j], edited_mask[j], kv[j:j + 1])[0]
                         for j in range(len(rows))])
    hub = reranker.hub_offsets(feats.image_emb[images])  # the same image: the same offset for both captions
    comb_true, comb_edit = reranker.combine(dual_true, itm_true, hub), reranker.combine(dual_edit, itm_edit, hub)
    del torch
    return {"pairs": len(rows),
            "dual": round(100 * float((dual_true > dual_edit).mean()), 1),
            "itm": round(100 * float((itm_true > itm_edit).mean()), 1),
            "combined": round(100 * float((comb_true > comb_edit).mean()), 1),
            "examples": [[captions[i], e] for i, e in pairs[:5]]}


def quality(reranker, feats) -> dict:
    from vlsearch.rerank.training import candidate_itm, rerank_metrics

    t0 = time.perf_counter()
    sim, top, itm = candidate_itm(reranker, feats, max(KS))
    seconds = time.perf_counter() - t0
    penalty = None if reranker.bank is None else reranker.hub_weight * reranker.hub_offsets(feats.image_emb)
    out = rerank_metrics(sim, top, itm, feats.caption_image, KS, reranker.weight, penalty)
    return {**out, "score_seconds_all_queries_k50": round(seconds, 1)}


def ensure_collection(encoder, reranker) -> Path:
    from indexing.embed import EmbedConfig, embed
    from vlsearch.store.collection import Collection
    from vlsearch.rerank.features import store_rerank_features

    path = OUT / "flickr8k-test-coll"
    if (path / "manifest.json").is_file() and Collection.open(path).manifest.model != encoder.info:
        shutil.rmtree(path)  # embedded with other weights (an earlier shipped model)
    if not (path / "manifest.json").is_file() or not Collection.open(path).manifest.complete:
        embed(str(TEST / "captions.csv"), path, EmbedConfig(workers=0, device="cpu", precision="fp32"), encoder=encoder)
    store_rerank_features(Collection.open(path), reranker, encoder)
    return path


def cost(path: Path, encoder, reranker, captions: list[str], n_queries: int) -> dict:
    from vlsearch.query.searcher import Searcher

    queries = [captions[i] for i in np.random.default_rng(0).choice(len(captions), n_queries, replace=False)]
    out: dict = {"queries": n_queries, "tokens": reranker.tokens, "width": reranker.width}
    npy = sorted((path / "rerank").glob("part-*.npy"))  # keys/values; hub.part-*.npy: hubness offsets
    n_images = sum(np.load(p, mmap_mode="r").shape[0] for p in npy)
    stored = list((path / "rerank").glob("*.npy"))
    out["stored_bytes_per_image"] = round(sum(p.stat().st_size for p in stored) / n_images)
    jpegs = list((TEST / "images").glob("*.jpg"))
    out["jpeg_bytes_per_image"] = round(sum(p.stat().st_size for p in jpegs) / len(jpegs))
    base = Searcher.open(path, encoder=encoder, reranker=reranker)
    base.search_text(queries[0], k=10, exact=True)
    out["first_stage_ms"] = _ms(lambda q: base.search_text(q, k=10, exact=True), queries)
    for mode in ("stored", "recompute"):
        s = Searcher.open(path, encoder=encoder, reranker=reranker, rerank_features=mode)
        s.search_text(queries[0], k=10, exact=True, rerank=10)  # warm up
        for k in KS:
            out[f"{mode}@{k}_ms"] = _ms(lambda q: s.search_text(q, k=10, exact=True, rerank=k),
                                        queries if mode == "stored" else queries[: max(10, n_queries // 5)])
    return out


def _ms(fn, queries: list[str]) -> float:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t0) * 1e3)
    return round(float(np.median(times)), 1)


def report(fig: dict) -> str:
    q, c, w = fig["quality"], fig["cost"], fig["word_order"]
    hub = fig.get("hub_weight") or 0.0
    rows = [["dual encoder alone", "-", *_m(q["dual"])]]
    for k in KS:
        rows.append(["ITM alone", k, *_m(q[f"itm@{k}"])])
        if f"hub@{k}" in q:
            rows.append([f"hubness correction alone (cosine - {hub} x offset)", k, *_m(q[f"hub@{k}"])])
        combined = f"cosine + {fig['weight']} x ITM" + (f" - {hub} x offset" if hub else "")
        rows.append([f"combined ({combined})", k, *_m(q[f"combined@{k}"])])
    timing = [[k, c[f"stored@{k}_ms"], c[f"recompute@{k}_ms"]] for k in KS]
    return "\n".join([
        "## Cross-attention re-ranking (ITM) on flickr8k-test (`benchmarks/bench_rerank.py`)",
        "",
        f"Machine: {fig['machine']}; load average {fig.get('load_avg', '?')} when it finished. "
        f"Command: `{fig['command']}`. Towers in fp32. "
        f"Re-ranker: `{fig['reranker']}` ({fig['reranker_bytes'] / 1e6:.2f} MB fp16) for "
        f"{fig['towers']['model']}; weight {fig['weight']} and hub weight {hub} tuned on the flickr8k-train "
        f"validation split. A candidate's hubness offset is its mean cosine to its {fig.get('hub_k')} nearest of "
        f"the {fig.get('bank_captions', 0)} training captions the re-ranker carries (CSLS): it lowers images that are "
        f"near many captions.",
        "",
        "Text->image over the 1,000 test images (5,000 captions), re-ranking the dual encoder's top K:",
        "",
        markdown_table(["scoring", "K", "R@1", "R@5", "R@10", "MRR"], rows),
        "",
        f"Word-order probe ({w['pairs']} test captions with an automatic minimal edit: subject/object "
        f"nouns swapped, else two colour words swapped): the true caption scores above the edited one "
        f"for the true image in **{w['itm']} %** of pairs with the ITM head, {w['dual']} % with the dual "
        f"encoder, {w['combined']} % combined. E.g. \"{w['examples'][0][0]}\" vs \"{w['examples'][0][1]}\".",
        "",
        f"Cost per query (`search_text(k=10, exact=True, rerank=K)`, median of {c['queries']} queries, "
        f"2 torch threads, query model in {c.get('query_precision', 'fp32')} (what `precision=auto` picks here); "
        f"the first stage alone takes {c['first_stage_ms']} ms): stored features "
        f"{c['stored_bytes_per_image']} bytes per image "
        f"({c['tokens']} x {c['width']} fp16 in `rerank/part-*.npy`, plus a float32 hubness offset in "
        f"`rerank/hub.part-*.npy`); "
        f"recomputed features store nothing but decode each candidate's image (JPEGs average "
        f"{c['jpeg_bytes_per_image']} bytes) and run the image trunk.",
        "",
        markdown_table(["K", "stored ms/query", "recomputed ms/query"], timing),
    ])


def _m(m: dict) -> list:
    return [m["R@1"], m["R@5"], m["R@10"], m["MRR"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reranker", default=None, help="re-ranker file (default: the shipped one)")
    ap.add_argument("--queries", type=int, default=100, help="queries timed per setting")
    ap.add_argument("--cache-dir", default=str(ROOT / "bench-data" / "rr"), help="frozen-tower feature cache")
    ap.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    ap.add_argument("--part", choices=("all", "quality", "cost"), default="all",
                    help="run only part of it (each fits a 10-minute slot of a shared machine); the parts are "
                         "merged in bench-data/rerank/bench_rerank.json and RESULTS.md is written once both exist")
    args = ap.parse_args()

    import torch

    from vlsearch.models.factory import load_model
    from vlsearch.rerank.model import builtin_reranker_path, load_reranker
    from vlsearch.rerank.training import extract_features
    from vlsearch.train.data import read_pairs

    torch.set_num_threads(2)
    encoder = load_model("vlsearch-small", device="cpu", precision="fp32")
    reranker = load_reranker(encoder.info, args.reranker)
    pairs = read_pairs(TEST)
    feats = extract_features(encoder, pairs, reranker.grid, cache_dir=args.cache_dir)
    file = Path(args.reranker) if args.reranker else builtin_reranker_path(encoder.name, encoder.info.pretrained)
    saved = OUT / "bench_rerank.json"
    fig = json.loads(saved.read_text()) if saved.is_file() and args.part != "all" else {}
    if fig.get("digest") not in (None, reranker.digest):
        fig = {}  # figures of another re-ranker: start again
    fig.update({"machine": machine(), "reranker": str(file.resolve().relative_to(ROOT) if
                file.resolve().is_relative_to(ROOT) else file), "reranker_bytes": file.stat().st_size,
                "towers": reranker.towers, "weight": reranker.weight, "digest": reranker.digest,
                "hub_weight": reranker.hub_weight, "hub_k": reranker.hub_k,
                "bank_captions": 0 if reranker.bank is None else len(reranker.bank)})
    fig.setdefault("commands", {})[args.part] = command_line()
    if args.part in ("all", "quality"):
        fig["quality"] = quality(reranker, feats)
        print(json.dumps(fig["quality"], indent=1), flush=True)
        fig["word_order"] = word_order(encoder, reranker, feats, pairs.captions,
                                       probe_pairs(pairs.captions, feats.caption_image))
        print(json.dumps(fig["word_order"], indent=1), flush=True)
    if args.part in ("all", "cost"):
        # timed with the query model a user gets (precision auto: bf16 weights on a CPU with bf16 units)
        user = load_model(encoder.name, encoder.pretrained, device="cpu")
        fig["cost"] = cost(ensure_collection(encoder, reranker), user, reranker, pairs.captions, args.queries)
        fig["cost"]["query_precision"] = user.precision
        print(json.dumps(fig["cost"], indent=1), flush=True)
    fig["load_avg"] = round(os.getloadavg()[0], 1)
    OUT.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(fig, indent=1))
    if "quality" in fig and "cost" in fig:
        fig["command"] = " ; ".join(fig["commands"].values())
        text = report(fig)
        print(text)
        if not args.no_write:
            write_section("rerank", text)


if __name__ == "__main__":
    main()
