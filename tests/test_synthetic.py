"""benchmarks/synthetic.py: the 'real' generator matches the statistics it was fitted to; data and truth are right."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from benchmarks.synthetic import KINDS, _Model, embedding_stats, fit_spectrum, load_dataset  # noqa: E402
from vlsearch.store.collection import Collection  # noqa: E402


def sample(kind: str, dim: int, n: int = 1000) -> np.ndarray:
    return _Model(replace(KINDS[kind], dim=dim), 0).sample(np.random.default_rng(1), n)


def test_real_generator_reproduces_the_fitted_statistics():
    # vlsearch-small on flickr8k-test (benchmarks/RESULTS.md "Synthetic data fit"): mean norm 0.32,
    # 94 % of the variance in the top 10 % of directions, k-means(32) explains 48 %
    got = embedding_stats(sample("real", 256))
    assert got["mean_norm"] == pytest.approx(0.32, abs=0.05)
    assert got["top10_var"] == pytest.approx(0.94, abs=0.03)
    assert got["kmeans32"] == pytest.approx(0.48, abs=0.06)
    hard = embedding_stats(sample("hard", 256))
    assert hard["top10_var"] < 0.75  # the hard case keeps its slow spectrum


def test_fit_spectrum_recovers_the_generating_spectrum():
    spec = replace(KINDS["real"], dim=128, spectrum_floor=0.0)
    x = _Model(spec, 0).sample(np.random.default_rng(2), 20_000)
    tau, power = fit_spectrum(x)
    assert tau == pytest.approx(spec.spectrum_tau, rel=0.3) and power == pytest.approx(spec.spectrum_power, rel=0.3)


@pytest.mark.parametrize("kind", ["real", "hard"])
def test_dataset_truth_is_exact_and_cached(tmp_path, kind):
    data = load_dataset(3000, 32, 20, out_dir=tmp_path, log=lambda *a: None, kind=kind)
    assert data.collection.parent.name.startswith("synthetic-n" if kind == "hard" else "synthetic-real-n")
    ids, base = Collection.open(data.collection).read_embeddings()
    scores = data.queries @ base.T
    assert np.array_equal(np.sort(data.gt_ids[:, :10], 1), np.sort(ids[np.argsort(-scores, 1)[:, :10]], 1))
    again = load_dataset(3000, 32, 20, out_dir=tmp_path, log=lambda *a: None, kind=kind)
    assert np.array_equal(again.gt_ids, data.gt_ids)
