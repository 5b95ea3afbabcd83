"""vlsearch.ann.merge: an index built in parts and merged (as the Ray engine does, without Ray) is
the index one add over all the vectors gives: same ids, same top-k ids and distances."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from test_build import DIM, clustered

from indexing.build import add_vectors
from vlsearch.ann import merge
from vlsearch.ann.faiss_index import make_index, search_parameters, supports_ids
from vlsearch.core.errors import IndexConfigError

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

#: (factory, ids 0..N-1?, on-disk lists?): every kind of layer the Ray engine's plans merge.
PLANS = [
    ("IVF16,PQ16x4fs,Refine(SQ8)", False, False),  # the auto plan: IDMap(Refine(fast-scan IVF))
    ("IVF16,PQ16x4fs,Refine(SQ8)", True, False),  # Refine without IDMap
    ("IDMap2,IVF16,PQ16x4fs,Refine(SQ8)", False, False),
    ("IVF16,PQ16x4fs", False, False),  # the in-RAM index of a Refine(disk) plan
    ("IVF16,PQ16x4fs,RFlat", False, False),
    ("IVF16,PQ8x4fs,Refine(PCA16,SQ8)", False, False),
    ("PCAR32,IVF16,PQ16x4fs,Refine(SQ8)", False, False),
    ("PQ8x4,Refine(SQ8)", False, False),  # a Refine over flat codes
    ("IVF16,SQ8", False, False),
    ("IVF16,SQ8", False, True),
    ("PCA16,IVF16,SQ8", False, True),
    ("PCA16,IVF16,PQ8x4", False, False),
    ("IDMap2,PCA16,IVF16,Flat", False, False),  # an IVF under an IDMap numbers its entries by position
    ("Flat", False, False),
    ("SQ8", True, False),
    ("PQ8x4fs", False, False),
]
#: Uneven parts, one of a single vector.
PARTS = [(0, 1100), (1100, 1101), (1101, 3000)]


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(3000)


def _trained(factory: str, x: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """The trained empty index as indexing.build makes it (IDMap where the type cannot hold the ids)."""
    index = make_index(factory, DIM, "ip")
    index.train(x)
    contiguous = np.array_equal(ids, np.arange(len(ids)))
    return index if supports_ids(index) or contiguous else faiss.IndexIDMap(index)


def _merged_parts(index: faiss.Index, x: np.ndarray, ids: np.ndarray, tmp_path, on_disk: bool) -> faiss.Index:
    """What the Ray engine does: parts of the (plain-coded) template written to files, then merged."""
    fast = merge.fastscan_ivf(index) is not None
    template = merge.as_plain_ivfpq(index) if fast else index
    blob = faiss.serialize_index(template)
    paths = []
    for k, (lo, hi) in enumerate(PARTS):
        part = faiss.deserialize_index(blob)
        add_vectors(part, ids[lo:hi], x[lo:hi])
        paths.append(tmp_path / f"part-{k}.faiss")
        faiss.write_index(part, str(paths[-1]))
    merged = merge.merge_on_disk(template, paths, tmp_path / "lists.ivfdata") if on_disk else merge.merge_files(paths)
    return merge.as_fastscan(merged) if fast else merged


@pytest.mark.parametrize("factory,contiguous,on_disk", PLANS)
def test_merged_parts_equal_one_index_over_all_vectors(tmp_path, data, factory, contiguous, on_disk):
    ids = np.arange(len(data), dtype=np.int64) * (1 if contiguous else 7) + (0 if contiguous else 1000)
    whole = _trained(factory, data, ids)
    merged = _merged_parts(whole, data, ids, tmp_path, on_disk)
    for lo, hi in PARTS:  # the same batches: encoding (PCA, PQ assignment) may round differently per batch
        add_vectors(whole, ids[lo:hi], data[lo:hi])
    assert merged.ntotal == whole.ntotal == len(data)
    queries = data[::37] + 0.01
    for nprobe in (2, 16):
        want = whole.search(queries, 20, params=search_parameters(whole, nprobe, 4.0))
        got = merged.search(queries, 20, params=search_parameters(merged, nprobe, 4.0))
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    assert np.isin(got[1], ids).all()
    if factory.startswith("IDMap2"):
        merged.check_consistency()  # its id -> entry map follows the appended ids


def test_an_index_faiss_cannot_merge_is_refused_naming_its_layers(tmp_path, data):
    ids = np.arange(len(data), dtype=np.int64) * 7
    with pytest.raises(IndexConfigError, match=r"IndexIDMap\(IndexHNSWFlat\).*local engine"):
        _merged_parts(_trained("HNSW16", data, ids), data, ids, tmp_path, on_disk=False)


def test_parts_with_another_training_have_another_digest(data):
    ids = np.arange(len(data))
    a, b = _trained("IVF16,PQ16x4fs", data, ids), _trained("IVF16,PQ16x4fs", data[::-1].copy(), ids)
    assert merge.trained_digest(a) == merge.trained_digest(faiss.clone_index(a)) != merge.trained_digest(b)


@pytest.mark.parametrize("factory", ["IVF16,PQ16x4fs", "IVF16,PQ16x4fs,Refine(SQ8)", "IDMap,IVF16,PQ16x4fs"])
def test_fastscan_lists_are_found_at_any_depth_and_the_plain_copy_leaves_the_index_alone(factory):
    """A bare fast-scan IVF is found too (FAISS hands it back typed as IndexIVF), so its parts are
    merged as plain IVFPQ; the plain template is a copy: the index it came from stays fast-scan."""
    index = make_index(factory, DIM, "ip")
    assert isinstance(merge.fastscan_ivf(index), faiss.IndexIVFPQFastScan)
    plain = merge.as_plain_ivfpq(index)
    assert merge.fastscan_ivf(plain) is None and isinstance(merge.fastscan_ivf(index), faiss.IndexIVFPQFastScan)
