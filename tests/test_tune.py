"""Default search settings tuned on fresh (leave-one-out) queries: vlsearch.ann.tune, build_index, Searcher, CLI."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner  # noqa: E402

from indexing import build as B  # noqa: E402
from tests.test_build import SMALL, clustered, make_collection  # noqa: E402
from vlsearch.ann import faiss_index as F  # noqa: E402
from vlsearch.ann import tune as T  # noqa: E402
from vlsearch.ann.tune import drop_self, recall_at  # noqa: E402
from vlsearch.app.cli import app  # noqa: E402
from vlsearch.query.exact import exact_search  # noqa: E402
from vlsearch.query.searcher import Searcher  # noqa: E402
from vlsearch.store.collection import Collection  # noqa: E402

N, FRESH = 3000, 200


@pytest.fixture(scope="module")
def base_and_fresh() -> tuple[np.ndarray, np.ndarray]:
    x = clustered(N + FRESH)  # one distribution; the last FRESH rows are never indexed
    return x[:N], x[N:]


def test_drop_self_removes_own_id_keeps_order():
    found = np.array([[7, 3, 5, 9], [4, 8, 6, 2], [1, 1, 7, 0]])
    out = drop_self(found, np.array([7, 6, 9]), 3)
    assert out.tolist() == [[3, 5, 9], [4, 8, 2], [1, 1, 7]]
    assert recall_at(out, np.array([[3, 5, 9], [4, 8, 2], [1, 2, 7]]), 3) == pytest.approx(8 / 9)


def test_defaults_reach_target_on_fresh_queries(tmp_path, base_and_fresh):
    base, fresh = base_and_fresh
    coll = make_collection(tmp_path / "c", base)
    entry = B.build_index(coll.path, "IVF32,PQ8x4fs,Refine(SQ8)", policy=SMALL)
    assert entry["target_met"] is True and entry["recall_at_10"] >= 0.95
    assert entry["nprobe_default"] >= 1 and entry["k_factor_default"] >= 1
    assert "leave-one-out" in entry["recall_eval"] and entry["tuning"]
    index = Collection.open(coll.path).load_index()  # the chosen settings are stored in the file too
    assert F.find_ivf(index).nprobe == entry["nprobe_default"]
    assert F.find_refine(index).k_factor == entry["k_factor_default"]

    s = Searcher.open(coll.path)
    assert (s.nprobe_default, s.k_factor_default) == (entry["nprobe_default"], entry["k_factor_default"])
    _, ids = s.knn(fresh, k=10)  # defaults: no nprobe, no k_factor
    _, truth = exact_search(fresh, Collection.open(coll.path), 10)
    assert recall_at(ids, truth, 10) >= 0.93  # 200 fresh queries: the 0.95 target within sampling error
    _, same = s.knn(fresh, k=10, nprobe=entry["nprobe_default"], k_factor=entry["k_factor_default"])
    assert np.array_equal(ids, same)


def test_k_factor_is_the_lever_when_nprobe_is_fixed(tmp_path, base_and_fresh):
    coll = make_collection(tmp_path / "c", base_and_fresh[0])
    entry = B.build_index(coll.path, "IVF32,PQ8x4fs,Refine(SQ8)", nprobe_default=32, policy=SMALL)
    assert entry["nprobe_default"] == 32 and entry["target_met"]
    assert {row[0] for row in entry["tuning"]} == {32} and len({row[1] for row in entry["tuning"]}) >= 1
    fixed = B.build_index(coll.path, "IVF32,PQ8x4fs,Refine(SQ8)", k_factor_default=2, policy=SMALL)
    assert fixed["k_factor_default"] == 2 and {row[1] for row in fixed["tuning"]} == {2}


def test_unreachable_target_is_said_plainly(tmp_path, base_and_fresh):
    coll = make_collection(tmp_path / "c", base_and_fresh[0])
    entry = B.build_index(coll.path, "IVF32,PQ4x4fs", policy=SMALL)  # 2-byte codes, no refine stage
    assert entry["target_met"] is False and entry["recall_at_10"] < 0.95
    assert "NOT met" in entry["tuning_message"] and "nprobe <= 32" in entry["tuning_message"]
    assert entry["nprobe_default"] in [row[0] for row in entry["tuning"]]

    runner = CliRunner()
    out = runner.invoke(app, ["info", str(coll.path)])
    assert out.exit_code == 0, out.output
    assert "WARNING: recall@10 target 0.95 NOT met" in out.output
    out = runner.invoke(app, ["build-index", str(coll.path), "--index-type", "IVF32,PQ4x4fs"])
    assert out.exit_code == 0, out.output
    assert "WARNING: recall@10 target 0.95 NOT met" in out.output


def test_flat_needs_no_tuning(tmp_path, base_and_fresh):
    coll = make_collection(tmp_path / "c", base_and_fresh[0][:500])
    entry = B.build_index(coll.path, "Flat", policy=SMALL)
    assert entry["target_met"] and entry["recall_at_10"] == 1.0
    assert entry["nprobe_default"] is None and entry["k_factor_default"] is None


def _tune_with_fixed_recalls(monkeypatch, recall, clock=1.0, **kwargs):
    """vlsearch.ann.tune over canned trials: ``recall[(nprobe, k_factor)]``; nprobe 4 measures ``clock`` ms."""

    def trial(search, queries, own, truth, k, nprobe, k_factor):
        return T.Trial(nprobe, k_factor, recall.get((nprobe, k_factor), 0.0), clock if nprobe == 4 else 1.0)

    monkeypatch.setattr(T, "_trial", trial)
    return T.tune(lambda q, k, p, kf: np.zeros((len(q), k), np.int64), np.zeros((3, 4), np.float32),
                  np.zeros(3, np.int64), np.zeros((3, 10), np.int64), target=0.95, nlist=64, refine=True,
                  k_factors=(4.0, 8.0), ntotal=64_000, **kwargs)


def test_defaults_are_chosen_by_cost_not_by_the_clock(monkeypatch):
    """Same trials, wildly different timings: the same (cheapest) setting wins, so builds reproduce."""
    recall = {(4, 8.0): 0.96, (8, 4.0): 0.96, (1, 8.0): 0.5, (2, 8.0): 0.7}
    picks = {(t.nprobe, t.k_factor) for t in (_tune_with_fixed_recalls(monkeypatch, recall, clock)
                                              for clock in (1.0, 100.0)) if t.met}
    assert picks == {(4, 8.0)}  # 4 lists of 1,000 codes + 80 re-scores beats 8 lists + 40 re-scores
    # re-scores that cost 200 code comparisons each (a slow refine) make the 40-candidate setting cheaper
    dear = _tune_with_fixed_recalls(monkeypatch, recall, rescore_cost=200.0)
    assert (dear.nprobe, dear.k_factor) == (8, 4.0) and dear.met
