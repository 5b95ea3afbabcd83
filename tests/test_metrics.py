"""vlsearch.core.metrics on hand-computed cases; each expected number is worked out in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlsearch.core import metrics
from vlsearch.core.metrics import (
    ann_recall,
    embedding_ranks,
    ann_recall_per_query,
    i2t_ranks,
    metrics_from_ranks,
    ranks_from_ids,
    retrieval_metrics,
    t2i_ranks,
)

# 4 captions, 3 images; captions 0 and 1 describe image 0, caption 2 image 1, caption 3 image 2.
TEXT_IMAGE = np.array([0, 0, 1, 2])
SIM = np.array([
    #  img0  img1  img2
    [0.9, 0.1, 0.2],  # c0 (img0)
    [0.3, 0.5, 0.3],  # c1 (img0)  own score 0.3 ties with img2
    [0.2, 0.4, 0.6],  # c2 (img1)
    [0.1, 0.2, 0.7],  # c3 (img2)
])


def test_t2i_hand_computed_with_tie():
    # c0: own 0.9, nothing else >= 0.9                          -> rank 1
    # c1: own 0.3; img1 0.5 > 0.3, img2 0.3 ties (pessimistic)  -> rank 3
    # c2: own 0.4; img2 0.6 > 0.4                                -> rank 2
    # c3: own 0.7 is the best                                    -> rank 1
    assert t2i_ranks(SIM, TEXT_IMAGE).tolist() == [1, 3, 2, 1]
    m = retrieval_metrics(SIM, TEXT_IMAGE, ks=(1, 2, 5))["t2i"]
    # R@1 = |{1,1}|/4 = 0.5; R@2 = |{1,2,1}|/4 = 0.75; R@5 = 4/4
    assert m["R@1"] == 0.5 and m["R@2"] == 0.75 and m["R@5"] == 1.0
    # MRR = (1 + 1/3 + 1/2 + 1) / 4 = (17/6) / 4 = 17/24
    assert m["mrr"] == pytest.approx(17 / 24)
    # sorted ranks 1,1,2,3: median (1+2)/2 = 1.5, mean 7/4
    assert m["median_rank"] == 1.5 and m["mean_rank"] == 1.75
    assert m["n_queries"] == 4


def test_i2t_several_captions_first_correct_counts():
    # img0 column [0.9, 0.3, 0.2, 0.1]: correct c0, c1; best 0.9, no wrong caption >= 0.9 -> 1
    # img1 column [0.1, 0.5, 0.4, 0.2]: correct c2 (0.4); wrong c1 0.5 >= 0.4          -> 2
    # img2 column [0.2, 0.3, 0.6, 0.7]: correct c3 (0.7) is the highest                  -> 1
    assert i2t_ranks(SIM, TEXT_IMAGE).tolist() == [1, 2, 1]
    m = retrieval_metrics(SIM, TEXT_IMAGE, ks=(1, 2))["i2t"]
    # R@1 = 2/3, R@2 = 3/3, MRR = (1 + 1/2 + 1)/3 = 5/6, median of 1,1,2 = 1, mean 4/3
    assert m["R@1"] == pytest.approx(2 / 3) and m["R@2"] == 1.0
    assert m["mrr"] == pytest.approx(5 / 6)
    assert m["median_rank"] == 1.0 and m["mean_rank"] == pytest.approx(4 / 3)
    assert m["n_queries"] == 3


def test_i2t_second_caption_can_be_the_hit():
    # image 0 has captions c0 (0.1) and c1 (0.8); wrong caption c2 scores 0.5.
    # first correct item is c1 at 0.8: wrong captions >= 0.8: none -> rank 1 (c0 being last is irrelevant)
    sim = np.array([[0.1, 0.0], [0.8, 0.0], [0.5, 1.0]])
    assert i2t_ranks(sim, np.array([0, 0, 1])).tolist() == [1, 1]
    # but with c2 at 0.9 > 0.8 -> rank 2
    sim[2, 0] = 0.9
    assert i2t_ranks(sim, np.array([0, 0, 1])).tolist() == [2, 1]


def test_constant_similarity_gets_the_worst_rank():
    # 2 images x 2 captions each, every score equal. Pessimistic ties:
    # t2i: both images score >= own -> rank 2 for all 4 captions; R@1 = 0, MRR = 1/2
    # i2t: 2 wrong captions tie with the best correct one -> rank 1 + 2 = 3; ties among correct ignored
    sim = np.full((4, 2), 0.5)
    text_image = np.array([0, 0, 1, 1])
    m = retrieval_metrics(sim, text_image, ks=(1, 2, 3))
    assert t2i_ranks(sim, text_image).tolist() == [2, 2, 2, 2]
    assert m["t2i"]["R@1"] == 0.0 and m["t2i"]["R@2"] == 1.0 and m["t2i"]["mrr"] == 0.5
    assert i2t_ranks(sim, text_image).tolist() == [3, 3]
    assert m["i2t"]["R@1"] == 0.0 and m["i2t"]["R@2"] == 0.0 and m["i2t"]["R@3"] == 1.0
    assert m["i2t"]["mrr"] == pytest.approx(1 / 3) and m["i2t"]["median_rank"] == 3.0


def test_perfect_ranking():
    # 3 images, 2 captions each; own image scores 1, others 0 -> every rank is 1
    text_image = np.repeat(np.arange(3), 2)
    sim = (text_image[:, None] == np.arange(3)[None, :]).astype(np.float32)
    m = retrieval_metrics(sim, text_image)
    for direction in ("t2i", "i2t"):
        assert m[direction] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "mrr": 1.0,
                                "median_rank": 1.0, "mean_rank": 1.0,
                                "n_queries": 6 if direction == "t2i" else 3}


def test_worst_ranking():
    # 4 images x 2 captions; own image scores -1, the others 1.
    # t2i: 3 other images above -> rank 4 for all 8 captions: R@1 = 0, R@5 = 1, MRR = 1/4
    # i2t: all 6 captions of other images above -> rank 1 + 6 = 7: R@5 = 0, R@10 = 1, MRR = 1/7
    text_image = np.repeat(np.arange(4), 2)
    sim = np.where(text_image[:, None] == np.arange(4)[None, :], -1.0, 1.0)
    m = retrieval_metrics(sim, text_image)
    assert m["t2i"]["R@1"] == 0.0 and m["t2i"]["R@5"] == 1.0
    assert m["t2i"]["mrr"] == 0.25 and m["t2i"]["median_rank"] == 4.0 and m["t2i"]["mean_rank"] == 4.0
    assert m["i2t"]["R@5"] == 0.0 and m["i2t"]["R@10"] == 1.0
    assert m["i2t"]["mrr"] == pytest.approx(1 / 7) and m["i2t"]["median_rank"] == 7.0


def test_images_without_captions_are_distractors_not_queries():
    # 3 images, captions only for images 0 and 1 (image 2 is a distractor)
    # c0: [0.2, 0.1, 0.9] -> img2 above own -> rank 2 ; c1: [0.0, 0.8, 0.1] -> rank 1
    # i2t: img0 column [0.2, 0.0]: wrong c1 0.0 < 0.2 -> 1; img1 column [0.1, 0.8] -> 1; img2 no query
    sim = np.array([[0.2, 0.1, 0.9], [0.0, 0.8, 0.1]])
    text_image = np.array([0, 1])
    assert t2i_ranks(sim, text_image).tolist() == [2, 1]
    ranks = i2t_ranks(sim, text_image)
    assert ranks[:2].tolist() == [1, 1] and math.isinf(ranks[2])
    m = retrieval_metrics(sim, text_image, ks=(1,))
    assert m["i2t"]["n_queries"] == 2 and m["i2t"]["R@1"] == 1.0
    assert m["t2i"]["R@1"] == 0.5 and m["t2i"]["mrr"] == 0.75  # (1/2 + 1)/2


def test_ranks_from_ids_and_truncated_lists():
    # target 0 at position 2 -> 2; not among [1, -1, -1] -> inf; first -> 1
    retrieved = np.array([[2, 0, 1], [1, -1, -1], [0, 1, 2]])
    ranks = ranks_from_ids(retrieved, np.array([0, 0, 0]))
    assert ranks[0] == 2 and math.isinf(ranks[1]) and ranks[2] == 1
    m = metrics_from_ranks(ranks, ks=(1, 3))
    # R@1 = 1/3, R@3 = 2/3, MRR@3 = (1/2 + 0 + 1)/3 = 1/2, median of (1, 2, inf) = 2, mean infinite -> None
    assert m["R@1"] == pytest.approx(1 / 3) and m["R@3"] == pytest.approx(2 / 3)
    assert m["mrr"] == pytest.approx(0.5)
    assert m["median_rank"] == 2.0 and m["mean_rank"] is None
    # MRR@1 keeps only rank-1 hits: (0 + 0 + 1)/3
    assert metrics_from_ranks(ranks, ks=(1,), depth=1)["mrr@1"] == pytest.approx(1 / 3)


def test_ranks_from_ids_first_of_several_correct():
    # i2t through labels: retrieved captions mapped to their image; first match at position 2
    assert ranks_from_ids(np.array([[3, 5, 5, 1]]), np.array([5])).tolist() == [2.0]


def test_ann_recall_hand_computed():
    ann = np.array([[1, 2, 3], [4, 5, 6]])
    exact = np.array([[3, 2, 9], [7, 8, 9]])
    # k=3: q0 {1,2,3} ∩ {3,2,9} = {2,3} -> 2/3 ; q1 no overlap -> 0 ; mean 1/3
    assert ann_recall_per_query(ann, exact, 3) == pytest.approx([2 / 3, 0.0])
    assert ann_recall(ann, exact, 3) == pytest.approx(1 / 3)
    # k=2: q0 {1,2} ∩ {3,2} = {2} -> 1/2 ; q1 0 ; mean 1/4 (order inside the top k is irrelevant)
    assert ann_recall(ann, exact, 2) == pytest.approx(0.25)
    assert ann_recall(exact[:, ::-1], exact, 3) == 1.0


def test_ann_recall_padding_and_duplicates():
    # ANN returned one result and -1 padding: {5} ∩ {5,6,7} -> 1/3
    assert ann_recall(np.array([[5, -1, -1]]), np.array([[5, 6, 7]]), 3) == pytest.approx(1 / 3)
    # a duplicated id counts once: {5} -> 1/3, not 3/3
    assert ann_recall(np.array([[5, 5, 5]]), np.array([[5, 6, 7]]), 3) == pytest.approx(1 / 3)
    # padding on both sides never matches: exact has only 1 item -> 1/2 at best
    assert ann_recall(np.array([[5, -1]]), np.array([[5, -1]]), 2) == 0.5


def _loop_reference(sim, text_image):
    """Straightforward per-query reference implementation of the pessimistic ranks."""
    t2i = [int((row >= row[t]).sum()) for row, t in zip(sim, text_image)]
    i2t = []
    for j in range(sim.shape[1]):
        col, own = sim[:, j], text_image == j
        best = col[own].max()
        i2t.append(1 + int(((col >= best) & ~own).sum()))
    return t2i, i2t


def test_vectorised_and_chunked_match_reference(monkeypatch):
    rng = np.random.default_rng(0)
    text_image = rng.permutation(np.repeat(np.arange(40), 5))
    sim = rng.integers(0, 6, size=(200, 40)).astype(np.float32)  # small integer scores: many ties
    t2i, i2t = _loop_reference(sim, text_image)
    full = retrieval_metrics(sim, text_image)
    assert t2i_ranks(sim, text_image).tolist() == t2i
    assert i2t_ranks(sim, text_image).tolist() == i2t
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 97)  # forces many row / column chunks
    assert t2i_ranks(sim, text_image).tolist() == t2i
    assert i2t_ranks(sim, text_image).tolist() == i2t
    assert retrieval_metrics(sim, text_image) == full
    ann, exact = rng.integers(0, 30, (50, 10)), np.argsort(-rng.random((50, 30)), axis=1)[:, :10]
    ref = [len(set(a) & set(e)) / 10 for a, e in zip(ann, exact)]
    assert ann_recall_per_query(ann, exact, 10) == pytest.approx(ref)


def test_embedding_ranks_match_the_full_matrix(monkeypatch):
    rng = np.random.default_rng(1)
    texts = rng.integers(-2, 3, (60, 4)).astype(np.float32)  # integer vectors: exact dot products, ties
    images = rng.integers(-2, 3, (15, 4)).astype(np.float32)
    text_image = np.repeat(np.arange(12), 5)  # images 12..14 have no caption
    sim = texts @ images.T
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 50)
    t2i, i2t = embedding_ranks(texts, images, text_image)
    assert t2i.tolist() == t2i_ranks(sim, text_image).tolist()
    assert i2t.tolist() == i2t_ranks(sim, text_image).tolist() and np.isinf(i2t[12:]).all()
    t2i_sub, i2t_sub = embedding_ranks(texts, images, text_image, text_queries=[3, 7], image_queries=[5, 0])
    assert t2i_sub.tolist() == [t2i[3], t2i[7]] and i2t_sub.tolist() == [i2t[5], i2t[0]]
    with pytest.raises(ValueError, match="same d"):
        embedding_ranks(texts, images[:, :3], text_image)


@pytest.mark.parametrize("sim, text_image, match", [
    (np.zeros((3, 2)), np.array([0, 1]), "shape"),
    (np.zeros((2, 2)), np.array([0, 2]), "image indices"),
    (np.zeros((2, 2)), np.array([0.0, 1.0]), "integer"),
    (np.array([[np.nan, 0.0], [0.0, 0.0]]), np.array([0, 1]), "NaN"),
    (np.zeros((0, 2)), np.zeros(0, int), "non-empty"),
])
def test_bad_input_is_a_clear_error(sim, text_image, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(sim, text_image)


def test_bad_k_is_a_clear_error():
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(SIM, TEXT_IMAGE, ks=(0,))
    with pytest.raises(ValueError, match="k=4"):
        ann_recall(np.zeros((1, 3), int), np.zeros((1, 3), int), 4)
