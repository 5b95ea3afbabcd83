"""Cross-attention re-ranking: ITM training on synthetic features, the re-ranker file, and
``Searcher.search_text(rerank=K)`` with recomputed and stored candidate features (tiny model)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from vlsearch.store.collection import Collection
from vlsearch.store.manifest import Manifest
from vlsearch.store.arrays import embedding_array
from vlsearch.core.errors import (
    InvalidQueryError,
    RerankFeaturesError,
    RerankerMismatchError,
    RerankerNotFoundError,
    TrainingError,
)
from vlsearch.rerank.model import (
    builtin_reranker_path, FusionConfig, FusionITM, image_tokens, load_reranker, Reranker, text_tokens,
    tower_identity,
)
from vlsearch.rerank.features import image_file, store_rerank_features, stored_info
from vlsearch.rerank.training import (
    _neighbourhood_order, hard_negatives, hub_bank, PairFeatures, rerank_ranks, RerankTrainConfig, train_itm,
    train_reranker, tune_weight,
)
from vlsearch.query.searcher import Searcher

TINY_FUSION = FusionConfig(text_dim=64, image_dim=128, width=32, heads=2, layers=1, dropout=0.0)


# ---- training -------------------------------------------------------------------------------

def _synthetic(n_images: int = 64, n_classes: int = 16, seed: int = 0) -> PairFeatures:
    """Images and captions of n_classes "concepts": an image's tokens carry its class pattern
    in a few positions, each of its 2 captions carries the class code in its first tokens."""
    rng = np.random.default_rng(seed)
    cls = np.arange(n_images) % n_classes
    img_code, txt_code = rng.standard_normal((n_classes, 16)), rng.standard_normal((n_classes, 12))
    tokens = rng.standard_normal((n_images, 9, 16)) * 0.3
    tokens[:, :3] += img_code[cls][:, None]
    caption_image = np.repeat(np.arange(n_images), 2)
    states = rng.standard_normal((len(caption_image), 6, 12)) * 0.3
    states += txt_code[cls[caption_image]][:, None]
    emb = rng.standard_normal((n_images, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    temb = emb[caption_image] + 0.1 * rng.standard_normal((len(caption_image), 8)).astype(np.float32)
    return PairFeatures(tokens.astype(np.float16), emb, states.astype(np.float16), np.ones((len(caption_image), 6), bool),
                        temb / np.linalg.norm(temb, axis=1, keepdims=True), caption_image)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_itm_scores_matched_pairs_above_shuffled_after_a_few_steps(one_torch_thread, precision):
    feats = _synthetic()
    config = RerankTrainConfig(fusion=FusionConfig(width=32, heads=2, layers=1, dropout=0.0), epochs=30,
                               random_epochs=10, batch_size=16, lr=3e-3, val_fraction=0.1, precision=precision)
    model = train_itm(feats, config)
    rr = Reranker(model, {"model": "synthetic"}, 0.0)
    kv = rr.image_kv(feats.image_tokens)
    matched, shuffled = [], []
    rng = np.random.default_rng(1)
    for c in range(len(feats.caption_image)):
        img = feats.caption_image[c]
        other = (img + rng.integers(1, 16)) % 64  # another class: a true non-match
        logits = rr.itm_logits(torch.from_numpy(feats.text_states[c]).float(), torch.from_numpy(feats.text_mask[c]),
                               kv[[img, other]])
        matched.append(logits[0])
        shuffled.append(logits[1])
    matched, shuffled = np.array(matched), np.array(shuffled)
    assert (matched > shuffled).mean() > 0.9
    assert matched.mean() > 0 > shuffled.mean()


def test_training_is_seeded():
    feats = _synthetic(n_images=32)
    config = RerankTrainConfig(fusion=FusionConfig(width=16, heads=2, layers=1), epochs=2, batch_size=8)
    a, b = train_itm(feats, config), train_itm(feats, config)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_training_precision_must_be_fp32_or_bf16():
    with pytest.raises(TrainingError, match="precision must be fp32 or bf16"):
        RerankTrainConfig(precision="fp16")


def test_cli_train_rerank_refuses_a_bad_precision_or_grid_before_loading_anything(tmp_path):
    from typer.testing import CliRunner

    from vlsearch.app.cli import app

    out = CliRunner().invoke(app, ["train-rerank", str(tmp_path), "--out", str(tmp_path / "rr.pt"),
                                   "--precision", "fp16"])
    assert out.exit_code != 0 and "precision must be fp32 or bf16" in out.output
    out = CliRunner().invoke(app, ["train-rerank", str(tmp_path), "--out", str(tmp_path / "rr.pt"), "--grid", "0"])
    assert out.exit_code != 0 and "--grid" in out.output
    assert not (tmp_path / "rr.pt").exists()


def test_hard_negatives_never_pick_the_positive():
    gen = torch.Generator().manual_seed(0)
    sim = torch.eye(6) * 50  # the positive is by far the most similar
    same = torch.eye(6, dtype=torch.bool)
    for _ in range(20):
        picks = hard_negatives(sim, same, gen)
        assert (picks != torch.arange(6)).all()
    sim = torch.zeros(4, 4)
    sim[:, 2] = 30.0  # column 2 is the hard negative of every other row
    picks = torch.stack([hard_negatives(sim, torch.eye(4, dtype=torch.bool), gen) for _ in range(50)])
    assert (picks[:, [0, 1, 3]] == 2).float().mean() > 0.95


def test_hard_epochs_batch_neighbourhoods_of_similar_images():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 16))
    emb = np.repeat(centres, 4, axis=0) + 0.01 * rng.standard_normal((24, 16))  # 6 tight clusters of 4
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    order = rng.permutation(24)
    images, caps = _neighbourhood_order(emb, order, order * 10, group=4, batch_size=8)
    assert sorted(images.tolist()) == list(range(24)) and (caps == images * 10).all()
    assert all(len(set(images[g: g + 4] // 4)) == 1 for g in range(0, 24, 4))  # each group is one cluster


def test_rerank_ranks_and_weight_tuning():
    sim = np.array([[0.9, 0.8, 0.1], [0.5, 0.7, 0.6]], np.float32)
    top = np.array([[0, 1, 2], [1, 2, 0]])
    itm = np.array([[-5.0, 5.0, 0.0], [0.0, 0.0, 9.0]], np.float32)  # ITM prefers the targets
    target = np.array([1, 0])
    assert rerank_ranks(sim, top, itm, target, 1, 0.0).tolist() == [2, 3]  # dual alone
    assert rerank_ranks(sim, top, itm, target, 3, None).tolist() == [1, 1]  # ITM alone
    assert rerank_ranks(sim, top, itm, target, 2, None).tolist() == [1, 3]  # target 0 outside top 2
    weight, hub_weight, table = tune_weight(sim, top, itm, target, (3,), (0.0, 0.001, 1.0))
    assert (weight, hub_weight) == (1.0, 0.0) and table["0.0"][0] == 0.0 and table["1.0"][0] == 100.0
    # a hubness penalty on image 0 (the "hub" each query wrongly prefers) fixes both without the ITM
    sim = np.array([[0.9, 0.8, 0.1], [0.9, 0.1, 0.6]], np.float32)
    top, target, itm = np.array([[0, 1, 2], [0, 2, 1]]), np.array([1, 2]), np.zeros((2, 3), np.float32)
    hub = np.array([0.5, 0.0, 0.0], np.float32)
    assert rerank_ranks(sim, top, itm, target, 3, 0.0, 0.5 * hub).tolist() == [1, 2]
    assert rerank_ranks(sim, top, itm, target, 3, 0.0, 1.0 * hub).tolist() == [1, 1]
    assert rerank_ranks(sim, top, itm, target, 1, 0.0, 1.0 * hub).tolist() == [2, 2]  # only the top K re-scored
    weight, hub_weight, table = tune_weight(sim, top, itm, target, (3,), (0.0, 1.0), hub, (0.0, 0.5, 1.0, 2.0))
    assert (weight, hub_weight) == (0.0, 1.0)  # ties at R@1 100: the smaller hub weight, then weight
    assert table["0.0/1.0"][0] == 100.0 and table["0.0/0.0"][0] == 0.0 and len(table) == 8


def test_hub_offsets_are_mean_cosines_to_the_nearest_bank_captions():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((50, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    images = bank[:5] + 0.1 * rng.standard_normal((5, 8)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    rr = Reranker(FusionITM(TINY_FUSION), tower_identity("vlsearch-tiny"), 0.5, bank=bank, hub_k=3, hub_weight=0.5)
    sims = images @ rr.bank.astype(np.float32).T
    expected = np.sort(sims, axis=1)[:, -3:].mean(1)
    assert np.allclose(rr.hub_offsets(images), expected, atol=1e-6)
    assert np.allclose(rr.hub_offsets(images, batch_size=2), expected, atol=1e-6)
    assert rr.combine([1.0], [2.0], [0.4]) == pytest.approx([1.0 + 0.5 * 2.0 - 0.5 * 0.4])
    with pytest.raises(ValueError, match="hub offsets"):
        rr.combine([1.0], [2.0])
    plain = Reranker(rr.model, rr.towers, 0.5)
    assert not plain.has_hub and (plain.hub_offsets(images) == 0).all()
    assert plain.combine([1.0], [2.0]) == pytest.approx([2.0])
    with pytest.raises(ValueError, match="hub_k"):
        Reranker(rr.model, rr.towers, 0.5, bank=bank[:2], hub_k=3)
    sample = hub_bank(bank, 20, seed=0)
    assert sample.dtype == np.float16 and sample.shape == (20, 8) and np.array_equal(sample, hub_bank(bank, 20, 0))
    assert hub_bank(bank, 0, 0) is None and len(hub_bank(bank, 500, 0)) == 50


# ---- the re-ranker file -----------------------------------------------------------------------

def test_reranker_round_trips_in_fp16_and_refuses_another_model(tmp_path):
    torch.manual_seed(0)
    rr = Reranker(FusionITM(TINY_FUSION), tower_identity("vlsearch-tiny"), 0.25, info={"seed": 0})
    path = rr.save(tmp_path / "rr.pt")
    back = load_reranker("vlsearch-tiny", path)
    assert back.weight == 0.25 and back.info == {"seed": 0} and back.digest == rr.digest
    kv = torch.randn(3, TINY_FUSION.image_tokens, 32).half()
    states, mask = torch.randn(5, 64), torch.tensor([1, 1, 1, 0, 0], dtype=torch.bool)
    assert np.allclose(back.itm_logits(states, mask, kv), rr.itm_logits(states, mask, kv), atol=0.05)
    # padding does not change a score
    assert np.allclose(rr.itm_logits(states[:3], mask[:3], kv), rr.itm_logits(states, mask, kv), atol=1e-5)
    with pytest.raises(RerankerMismatchError, match="vlsearch-small"):
        load_reranker("vlsearch-small", path)
    with pytest.raises(RerankerNotFoundError, match="train-rerank"):
        load_reranker("vlsearch-tiny")  # nothing ships for the tiny model
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RerankerNotFoundError, match="not a vlsearch re-ranker"):
        Reranker.load(tmp_path / "junk.pt")
    # a hubness bank, its k and weight travel with the file and change the digest
    bank = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    banked = Reranker(rr.model, rr.towers, 0.25, bank=bank, hub_k=2, hub_weight=0.75)
    back = Reranker.load(banked.save(tmp_path / "banked.pt"))
    assert (back.hub_k, back.hub_weight) == (2, 0.75) and np.array_equal(back.bank, bank.astype(np.float16))
    assert back.digest == banked.digest != rr.digest
    payload = torch.load(path, weights_only=True)  # a file written before banks existed
    for key in ("bank", "hub_k", "hub_weight"):
        del payload[key]
    torch.save(payload, tmp_path / "old.pt")
    old = Reranker.load(tmp_path / "old.pt")
    assert old.bank is None and old.hub_weight == 0.0 and not old.has_hub and old.digest == rr.digest


# ---- search -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_encoder(tiny_checkpoint):
    """fp32 here: these tests recompute re-rank scores through other code paths and compare them to
    1e-4, and bf16 results (auto on a CPU with bf16 units) shift with the batch's shape."""
    from vlsearch.models.factory import TINY_MODEL, load_model

    return load_model(TINY_MODEL, pretrained=tiny_checkpoint, device="cpu", precision="fp32")


N_IMAGES = 24


@pytest.fixture(scope="module")
def rr_collection(tmp_path_factory, tiny_encoder):
    """A folder-source collection of N_IMAGES small images (2 shards) and a tiny re-ranker."""
    root = tmp_path_factory.mktemp("rerank")
    src = root / "images"
    src.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(N_IMAGES):
        arr = (rng.random((48, 48, 3)) * 255 * (0.2 + 0.8 * (i % 4) / 3)).astype(np.uint8)
        names.append(f"img-{i:02d}.png")
        Image.fromarray(arr).save(src / names[-1])
    vectors = tiny_encoder.encode_images([src / n for n in names])
    coll = Collection.create(root / "coll", Manifest(model=tiny_encoder.info, shard_size=16,
                                                     source={"type": "folder", "path": str(src)}))
    ids = np.arange(N_IMAGES, dtype=np.int64) * 7 + 3
    captions = [f"picture {i} of shade {i % 4}" for i in range(N_IMAGES)]
    cap_vecs = tiny_encoder.encode_texts(captions)
    for s, start in enumerate(range(0, N_IMAGES, 16)):
        sl = slice(start, start + 16)
        coll.write_shard(s, pa.table({
            "id": ids[sl], "path": names[sl], "width": pa.array(np.full(len(ids[sl]), 48, np.int32)),
            "height": pa.array(np.full(len(ids[sl]), 48, np.int32)),
            "captions": pa.array([[c] for c in captions[sl]], type=pa.list_(pa.string())),
            "embedding": embedding_array(vectors[sl])}),
            captions=pa.table({"image_id": ids[sl], "caption": captions[sl], "embedding": embedding_array(cap_vecs[sl])}))
    coll.update_manifest(counts={"images": N_IMAGES, "captions": 0, "failures": 0, "shards": 2}, complete=True)
    torch.manual_seed(0)
    rr = Reranker(FusionITM(TINY_FUSION), tower_identity(tiny_encoder.info), 0.5)
    return coll.path, src, rr


@pytest.fixture(scope="module")
def hub_reranker(rr_collection, tiny_encoder):
    """The collection's re-ranker with a hubness bank of caption vectors and a large hub weight."""
    _, _, rr = rr_collection
    bank = tiny_encoder.encode_texts([f"a {c} {t} picture" for c in ("dark", "bright", "grey", "noisy")
                                      for t in ("square", "photo", "texture")])
    return Reranker(rr.model, rr.towers, 0.5, bank=bank, hub_k=3, hub_weight=2.0)


def test_reranked_hits_are_the_top_k_candidates_in_rescored_order(rr_collection, tiny_encoder):
    path, src, rr = rr_collection
    s = Searcher.open(path, encoder=tiny_encoder, reranker=rr, rerank_features="recompute")
    query = "a dark noisy square"
    first = s.search_text(query, k=10, exact=True)
    hits = s.search_text(query, k=10, exact=True, rerank=10)
    assert {h.id for h in hits} == {h.id for h in first}
    # expected order: cosine + weight * ITM logit, computed here from the image files
    tokens = image_tokens(tiny_encoder, [src / h.path for h in first])
    states, mask = text_tokens(tiny_encoder, [query])
    itm = rr.itm_logits(states[0], mask[0], rr.image_kv(tokens))
    expected = np.array([h.score for h in first]) + 0.5 * itm
    order = np.argsort(-expected, kind="stable")
    assert [h.id for h in hits] == [first[i].id for i in order]
    assert [h.rank for h in hits] == list(range(1, 11))
    assert np.allclose([h.score for h in hits], expected[order], atol=1e-4)
    assert [h.first_stage_score for h in hits] == pytest.approx([first[i].score for i in order])
    assert all(h.first_stage_score is None for h in first)
    # K > k: the best k of the top K
    deeper = s.search_text([query, "x"], k=3, exact=True, rerank=N_IMAGES)
    assert len(deeper) == 2 and all(len(h) == 3 for h in deeper)
    assert all(a.score >= b.score for a, b in zip(deeper[0], deeper[0][1:]))
    assert "first_stage_score" in deeper[0][0].to_dict()
    assert "first_stage_score" in deeper.to_arrow().column_names


def test_rerank_zero_is_no_rerank_and_bad_k_is_refused(rr_collection, tiny_encoder):
    path, _, rr = rr_collection
    s = Searcher.open(path, encoder=tiny_encoder, reranker=rr)
    assert s.search_text("a cat", k=5, exact=True, rerank=0) == s.search_text("a cat", k=5, exact=True)
    assert not s.reranking.loaded  # nothing loaded for rerank=0
    for bad in (-1, 4, 2.5, True, "10"):
        with pytest.raises(InvalidQueryError, match="rerank"):
            s.search_text("a cat", k=5, exact=True, rerank=bad)


def test_a_reranker_for_another_model_is_refused(rr_collection, tiny_encoder, tmp_path):
    path, _, rr = rr_collection
    other = Reranker(rr.model, tower_identity("vlsearch-small"), 0.5)
    s = Searcher.open(path, encoder=tiny_encoder, reranker=other)
    with pytest.raises(RerankerMismatchError, match="train-rerank"):
        s.search_text("a cat", k=5, exact=True, rerank=10)
    s = Searcher.open(path, encoder=tiny_encoder, reranker=other.save(tmp_path / "other.pt"))
    with pytest.raises(RerankerMismatchError):
        s.search_text("a cat", k=5, exact=True, rerank=10)
    s = Searcher.open(path, encoder=tiny_encoder)  # none given, none ships for the tiny model
    with pytest.raises(RerankerNotFoundError, match="vlsearch train-rerank"):
        s.search_text("a cat", k=5, exact=True, rerank=10)


def test_recomputed_features_read_only_files_inside_the_source(tmp_path):
    assert image_file({"type": "folder", "path": str(tmp_path)}, "a/b.jpg") == str((tmp_path / "a/b.jpg").resolve())
    with pytest.raises(RerankFeaturesError, match="outside"):
        image_file({"type": "folder", "path": str(tmp_path)}, "../elsewhere.jpg")
    with pytest.raises(RerankFeaturesError, match="webdataset"):
        image_file({"type": "webdataset", "path": str(tmp_path)}, "x.tar/0001.jpg")


def test_stored_features_round_trip_and_are_required_when_asked(rr_collection, tiny_encoder, tmp_path):
    import shutil

    path, _, rr = rr_collection
    dest = tmp_path / "coll"
    shutil.copytree(path, dest)
    with pytest.raises(RerankFeaturesError, match="vlsearch rerank-features"):
        Searcher.open(dest, encoder=tiny_encoder, reranker=rr, rerank_features="stored").search_text(
            "a cat", k=5, exact=True, rerank=10)
    info = store_rerank_features(Collection.open(dest), rr, tiny_encoder)
    assert info == stored_info(Collection.open(dest)) and sorted(info["shards"]) == ["0", "1"]
    stored = np.load(dest / "rerank" / "part-00000.npy")
    assert stored.dtype == np.float16 and stored.shape == (16, TINY_FUSION.image_tokens, 32)
    queries = ["a cat", "bright squares", "noise"]
    a = Searcher.open(dest, encoder=tiny_encoder, reranker=rr, rerank_features="stored")
    b = Searcher.open(dest, encoder=tiny_encoder, reranker=rr, rerank_features="recompute")
    for hits_a, hits_b in zip(a.search_text(queries, k=8, exact=True, rerank=16),
                              b.search_text(queries, k=8, exact=True, rerank=16)):
        assert [h.id for h in hits_a] == [h.id for h in hits_b]
        assert np.allclose([h.score for h in hits_a], [h.score for h in hits_b], atol=1e-4)
    assert a.rerank_features.stored_shards == 2
    # features made by another re-ranker are not used (and refused when required)
    torch.manual_seed(1)
    other = Reranker(FusionITM(TINY_FUSION), rr.towers, 0.5)
    with pytest.raises(RerankerMismatchError, match="another re-ranker"):
        Searcher.open(dest, encoder=tiny_encoder, reranker=other, rerank_features="stored").search_text(
            "a cat", k=5, exact=True, rerank=10)
    auto = Searcher.open(dest, encoder=tiny_encoder, reranker=other)
    auto.search_text("a cat", k=5, exact=True, rerank=10)
    assert auto.rerank_features.stored_shards == 0


def test_hubness_offsets_are_stored_and_recomputed_alike(rr_collection, hub_reranker, tiny_encoder, tmp_path):
    import shutil

    path, src, _ = rr_collection
    dest = tmp_path / "coll"
    shutil.copytree(path, dest)
    info = store_rerank_features(Collection.open(dest), hub_reranker, tiny_encoder)
    assert info["hub"] is True and info["reranker"] == hub_reranker.digest
    coll = Collection.open(dest)
    ids, vectors = coll.read_embeddings()
    offsets = np.concatenate([np.load(dest / "rerank" / f"hub.part-0000{s}.npy") for s in (0, 1)])
    assert offsets.dtype == np.float32 and np.allclose(offsets, hub_reranker.hub_offsets(vectors), atol=1e-3)
    stored = Searcher.open(dest, encoder=tiny_encoder, reranker=hub_reranker, rerank_features="stored")
    fresh = Searcher.open(dest, encoder=tiny_encoder, reranker=hub_reranker, rerank_features="recompute")
    query = "a bright square"
    first = fresh.search_text(query, k=12, exact=True)
    hits = stored.search_text(query, k=12, exact=True, rerank=12)
    assert [h.id for h in hits] == [h.id for h in fresh.search_text(query, k=12, exact=True, rerank=12)]
    # the order is cosine + weight * ITM - hub_weight * offset
    states, mask = text_tokens(tiny_encoder, [query])
    itm = hub_reranker.itm_logits(states[0], mask[0], hub_reranker.image_kv(image_tokens(tiny_encoder,
                                                                                        [src / h.path for h in first])))
    row = {int(i): r for r, i in enumerate(ids)}
    hub = offsets[[row[h.id] for h in first]]
    expected = np.array([h.score for h in first]) + 0.5 * itm - 2.0 * hub
    order = np.argsort(-expected, kind="stable")
    assert [h.id for h in hits] == [first[i].id for i in order]
    assert np.allclose([h.score for h in hits], expected[order], atol=1e-3)
    # a store made without a bank (another digest) is not used by the banked re-ranker
    shutil.rmtree(dest / "rerank")
    _, _, plain = rr_collection
    store_rerank_features(Collection.open(dest), plain, tiny_encoder)
    assert not (dest / "rerank" / "hub.part-00000.npy").exists()
    auto = Searcher.open(dest, encoder=tiny_encoder, reranker=hub_reranker)
    auto.search_text(query, k=5, exact=True, rerank=10)
    assert auto.rerank_features.stored_shards == 0


def test_server_search_takes_rerank_for_text_queries(rr_collection, tiny_encoder):
    from fastapi.testclient import TestClient

    from vlsearch.app.serve import ServeConfig, create_app

    path, _, rr = rr_collection
    searcher = Searcher.open(path, encoder=tiny_encoder, reranker=rr, rerank_features="recompute")
    expected = searcher.search_text("a cat", k=4, exact=True, rerank=12)
    with TestClient(create_app({"c": searcher}, ServeConfig(log_level="warning"))) as http:
        body = http.post("/api/collections/c/search", json={"text": "a cat", "k": 4, "exact": True, "rerank": 12}).json()
        assert [int(h["id"]) for h in body["hits"]] == [h.id for h in expected]
        assert [h["first_stage_score"] for h in body["hits"]] == pytest.approx([h.first_stage_score for h in expected])
        plain = http.post("/api/collections/c/search", json={"text": "a cat", "k": 4, "exact": True}).json()
        assert all(h["first_stage_score"] is None for h in plain["hits"])
        for bad in ({"rerank": 3}, {"rerank": -1}, {"rerank": 12, "vector": [0.1] * 64, "text": None}):
            r = http.post("/api/collections/c/search", json={"text": "a cat", "k": 4, "exact": True, **bad})
            assert r.status_code in (400, 422) and "rerank" in r.text


def test_bench_reports_metrics_with_and_without_rerank_from_one_run(rr_collection, tmp_path):
    from typer.testing import CliRunner

    from vlsearch.app.cli import app
    from vlsearch.eval.bench import BenchConfig, format_table, run_benchmark

    path, _, rr = rr_collection
    file = rr.save(tmp_path / "rr.pt")
    result = run_benchmark(path, BenchConfig(ks=(1, 5, 10), nprobes=(1,), latency_queries=3, rerank=10,
                                             reranker=str(file)))
    exact, reranked = result["exact"]["t2i"], result["rerank"]["t2i"]
    assert result["rerank"]["k"] == 10 and result["rerank"]["latency_ms"]["n"] == 3
    assert reranked["R@10"] == exact["R@10"]  # re-ranking the top 10 keeps its set
    assert reranked["n_queries"] == exact["n_queries"] == N_IMAGES
    assert "exact+rerank@10" in format_table(result)
    with pytest.raises(ValueError, match="rerank"):
        BenchConfig(ks=(1, 5, 10), rerank=5)
    out = CliRunner().invoke(app, ["bench", str(path), "--k", "1,5", "--rerank", "8", "--reranker", str(file),
                                   "--latency-queries", "2"])
    assert out.exit_code == 0, out.output
    assert "exact+rerank@8" in out.output


def test_cli_search_rerank_and_rerank_features(rr_collection, tmp_path, tiny_checkpoint, monkeypatch):
    import dataclasses
    import json
    import shutil

    from typer.testing import CliRunner

    from vlsearch.app.cli import app

    path, _, rr = rr_collection
    dest = tmp_path / "coll"
    shutil.copytree(path, dest)
    coll = Collection.open(dest)  # the CLI loads the collection's model by name and pretrained: the tiny checkpoint
    coll.update_manifest(model=dataclasses.replace(coll.model, pretrained=str(tiny_checkpoint)))
    file = str(rr.save(tmp_path / "rr.pt"))
    runner = CliRunner()
    out = runner.invoke(app, ["search", str(dest), "a cat", "--exact", "-k", "3", "--rerank", "10", "--reranker", file,
                              "--json"])
    assert out.exit_code == 0, out.output
    hits = [json.loads(line) for line in out.output.strip().splitlines()]
    assert len(hits) == 3 and all("first_stage_score" in h for h in hits)
    out = runner.invoke(app, ["search", str(dest), "a cat", "--exact", "-k", "3", "--rerank", "2", "--reranker", file])
    assert out.exit_code != 0 and "rerank" in out.output
    out = runner.invoke(app, ["rerank-features", str(dest), "--reranker", file, "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert f"{2 * TINY_FUSION.image_tokens * 32} bytes per image" in out.output
    out = runner.invoke(app, ["search", str(dest), "a cat", "--exact", "-k", "3", "--rerank", "10", "--reranker", file,
                              "--rerank-features", "stored", "--json"])
    assert out.exit_code == 0, out.output
    assert [json.loads(line)["id"] for line in out.output.strip().splitlines()] == [h["id"] for h in hits]


def test_train_reranker_end_to_end_tunes_both_weights_and_keeps_a_bank(rr_collection, tiny_encoder, tmp_path):
    import csv

    _, src, _ = rr_collection
    with open(tmp_path / "captions.csv", "w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(["image", "caption"])
        for i in range(N_IMAGES):
            for words in (f"shade {i % 4} picture", f"a square of shade {i % 4}"):
                rows.writerow([str(src / f"img-{i:02d}.png"), words])
    config = RerankTrainConfig(fusion=FusionConfig(width=16, heads=2, layers=1, image_tokens=4), epochs=2,
                               batch_size=8, val_fraction=0.25, tune_k=(3,), weights=(0.0, 0.1),
                               bank_size=12, hub_k=2, hub_weights=(0.0, 0.5))
    result = train_reranker(tiny_encoder, tmp_path, config)
    rr = result.reranker
    assert rr.bank.shape == (12, tiny_encoder.info.dim) and rr.hub_k == 2 and rr.grid == 2
    assert rr.weight in (0.0, 0.1) and rr.hub_weight in (0.0, 0.5)
    assert sorted(result.metrics["weight_table"]) == ["0.0/0.0", "0.0/0.5", "0.1/0.0", "0.1/0.5"]
    assert {"dual", "itm@3", "combined@3", "hub@3"} <= set(result.metrics["val"])
    back = Reranker.load(rr.save(tmp_path / "rr.pt"))
    assert back.digest == rr.digest and back.hub_weight == rr.hub_weight
    without = train_reranker(tiny_encoder, tmp_path, RerankTrainConfig(**{**config.__dict__, "bank_size": 0}))
    assert without.reranker.bank is None and "hub@3" not in without.metrics["val"]
    with pytest.raises(TrainingError, match="hub_k"):
        RerankTrainConfig(bank_size=4, hub_k=5)


def test_the_shipped_reranker_of_vlsearch_small_loads_offline_with_its_provenance():
    import json

    path = builtin_reranker_path("vlsearch-small")
    rr = load_reranker("vlsearch-small")  # offline: the file is in the package
    assert rr.towers == tower_identity("vlsearch-small")
    assert rr.towers["image_tower"] == "tf_efficientnet_lite0"
    assert 0 <= rr.weight <= 1 and rr.tokens == 49
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["bytes"] == path.stat().st_size and info["dtype"] == "float16" and info["weight"] == rr.weight
    assert rr.has_hub and info["hub_weight"] == rr.hub_weight and info["bank_captions"] == len(rr.bank)
    assert rr.bank.shape[1] == 384 and rr.bank.dtype == np.float16  # vlsearch-small's dual-encoder vectors
    assert info["digest"] == rr.digest and info["seed"] == 0 and info["data"] == "../shared/data/flickr8k-train"
    assert info["command"].startswith("vlsearch train-rerank") and info["git_commit"]
    assert all(v.dtype == torch.float16 for v in torch.load(path, weights_only=True)["state_dict"].values()
               if v.is_floating_point())
    with pytest.raises(RerankerMismatchError):
        rr.check_model("vlsearch-tiny")


def test_a_reranker_belongs_to_the_weights_that_set_its_towers():
    """vlsearch-small v4 tunes MiniLM's last two layers: a re-ranker trained on its token states is
    refused for v3 (same tower names, other weights), and nothing ships for v3."""
    from vlsearch.core.modelinfo import ModelInfo

    v4, v3 = ModelInfo("vlsearch-small", "flickr8k-v4", 384), ModelInfo("vlsearch-small", "flickr8k-v3", 384)
    assert tower_identity(v4) == tower_identity("vlsearch-small") != tower_identity(v3)
    assert tower_identity(v3) == tower_identity("vlsearch-small", "flickr8k-v3")
    assert tower_identity(ModelInfo("vlsearch-tiny", "/runs/a/model.pt", 64))["weights"] == "checkpoint"
    rr = Reranker(FusionITM(TINY_FUSION), tower_identity(v4), 0.5)
    rr.check_model(v4)
    with pytest.raises(RerankerMismatchError, match="flickr8k-v3"):
        rr.check_model(v3)
    with pytest.raises(RerankerNotFoundError, match="weights flickr8k-v3.*train-rerank"):
        load_reranker(v3)


# ---- the first stage of a re-ranked search is the plain search --------------------------------

def _probe_texts(n: int = 200) -> list[str]:
    """The collection's captions, then edits of them (a word swapped in, dropped or added)."""
    captions = [f"picture {i} of shade {i % 4}" for i in range(N_IMAGES)]
    words = ["a", "dark", "bright", "noisy", "grey", "square", "texture", "photo", "red", "two", "dog", "beach"]
    rng, out = np.random.default_rng(0), list(captions)
    while len(out) < n:
        tokens = captions[rng.integers(len(captions))].split()
        at = int(rng.integers(len(tokens)))
        edit = rng.integers(3)
        if edit == 0:
            tokens[at] = str(rng.choice(words))
        elif edit == 1 and len(tokens) > 2:
            del tokens[at]
        else:
            tokens.insert(at, str(rng.choice(words)))
        if " ".join(tokens) not in out:
            out.append(" ".join(tokens))
    return out


@pytest.fixture(scope="module")
def ann_collection(rr_collection, hub_reranker, tiny_encoder, tmp_path_factory):
    """A copy of the re-rank collection with an IVF index and stored re-rank features."""
    import shutil

    from indexing.build import build_index

    dest = tmp_path_factory.mktemp("rerank-ann") / "coll"
    shutil.copytree(rr_collection[0], dest)
    build_index(dest, index_type="IVF2,Flat", nprobe_default=1)
    store_rerank_features(Collection.open(dest), hub_reranker, tiny_encoder)
    return dest


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_reranked_search_reorders_exactly_the_plain_search(precision, ann_collection, hub_reranker, tiny_encoder,
                                                            tiny_checkpoint, one_torch_thread):
    """``search_text(q, k, rerank=k)`` re-orders the hits of ``search_text(q, k)``: both rank with
    the one text vector of ``encode_texts``, computed twice (text cache off) or cached in either order."""
    from vlsearch.models.factory import TINY_MODEL, load_model

    encoder = tiny_encoder if precision == "fp32" else load_model(TINY_MODEL, pretrained=tiny_checkpoint,
                                                                  device="cpu", precision="bf16")
    assert encoder.precision == precision
    texts = _probe_texts()
    for batch in (texts, texts + [t + " again" for t in texts]):  # one batch of the text tower, and two
        states, mask, vectors = text_tokens(encoder, batch, with_embeddings=True)
        assert np.array_equal(vectors, encoder.encode_texts(batch))
        assert states.shape[:2] == mask.shape and len(states) == len(batch) and mask.any(1).all()

    def first_stage(hits) -> dict[int, float]:
        return {h.id: h.first_stage_score if h.first_stage_score is not None else h.score for h in hits}

    def differing(searcher: Searcher, exact: bool, rerank_first: bool, ks=(20,)) -> list[tuple[int, str]]:
        """The (k, text) whose re-ranked search re-orders other hits, or the same hits by other cosines."""
        bad = []
        for k in ks:
            for q in texts:
                runs = [dict(rerank=k), {}] if rerank_first else [{}, dict(rerank=k)]
                a, b = (searcher.search_text(q, k=k, exact=exact, **run) for run in runs)
                if {h.id for h in a} != {h.id for h in b} or first_stage(a) != first_stage(b):
                    bad.append((k, q))
        return bad

    for exact in (True, False):
        off = Searcher.open(ann_collection, encoder=encoder, reranker=hub_reranker, text_cache_mb=0,
                            rerank_features="stored")
        assert differing(off, exact, rerank_first=False, ks=(10, 20)) == []
        assert len(off.text_cache) == 0
        for rerank_first in (False, True):
            cached = Searcher.open(ann_collection, encoder=encoder, reranker=hub_reranker, rerank_features="stored")
            assert differing(cached, exact, rerank_first) == []
            assert len(cached.text_cache) == len(texts)
    assert off.has_index and off.rerank_features.stored_shards == 2


def test_a_reranked_batch_with_repeated_and_cached_texts_keeps_each_texts_vector(rr_collection, tiny_encoder):
    path, _, rr = rr_collection
    s = Searcher.open(path, encoder=tiny_encoder, reranker=rr, rerank_features="recompute")
    plain = s.search_text(["a dark square"], k=5, exact=True)[0]  # cached now
    texts = ["a bright square", "a dark square", "a bright square"]
    query = s.text_query(texts, tokens=True)
    assert np.array_equal(query.vectors[1], s.text_cache.get("a dark square"))
    assert np.array_equal(query.vectors[0], query.vectors[2])
    assert np.array_equal(query.vectors[0], s.text_cache.get("a bright square"))  # the pass's vector, now cached
    states, mask = query.tokens
    alone_states, alone_mask = text_tokens(tiny_encoder, ["a bright square", "a dark square"])
    assert torch.equal(states, alone_states[[0, 1, 0]]) and torch.equal(mask, alone_mask[[0, 1, 0]])
    reranked = s.search_text_query(query, k=5, exact=True, rerank=5)[1]
    assert {h.id: h.first_stage_score for h in reranked} == {h.id: h.score for h in plain}


def test_token_states_are_kept_from_this_threads_pass_only(tiny_encoder):
    import threading

    from vlsearch.models.encoder import TokenStates

    texts = ["a dark noisy square", "two bright pictures"]
    tokens = tiny_encoder.tokenize(texts)
    with TokenStates(tiny_encoder.model, tokens) as kept:
        other = threading.Thread(target=tiny_encoder.encode_texts, args=(["another thread's text"],))
        other.start()
        other.join()  # its pass ran while the hook was on: not kept
        with pytest.raises(RuntimeError, match="has not run"):
            kept.states
        with torch.inference_mode():
            tiny_encoder.model.encode_text(tokens)
    states, mask = text_tokens(tiny_encoder, texts)
    assert torch.equal(kept.states, states) and torch.equal(kept.mask, mask)
    assert not tiny_encoder.model.ln_final._forward_hooks  # removed on leaving
    with pytest.raises(TypeError, match="no token states"):
        TokenStates(torch.nn.Linear(2, 2), tokens, "a linear layer")
