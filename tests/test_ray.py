"""The Ray engine on a local Ray instance: same collection and index as the local engine, survives
a killed worker and a killed driver, and a clear error when ray is missing."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from conftest import kill_9_when
from test_embed import _folder, _jpeg
from typer.testing import CliRunner

from indexing.embed import EmbedConfig, embed
from vlsearch.app.cli import app
from vlsearch.store.collection import Collection
from vlsearch.core.errors import CollectionMismatchError, DistributedError, IndexConfigError, RayNotInstalledError
from vlsearch.models.factory import TINY_MODEL

FAULTS = Path(__file__).resolve().parent / "_ray_faults.py"


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance for the whole session (2 CPUs); its GCS address."""
    ray = pytest.importorskip("ray")
    import _ray_faults

    ray.cloudpickle.register_pickle_by_value(_ray_faults)  # workers import it before they see sys.path
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"worker_process_setup_hook": _ray_faults.install})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _manifest_source(root: Path, n: int) -> Path:
    """``n`` images (one truncated: a failure row), 2 captions each, int and string metadata."""
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        data = _jpeg(i)
        (root / "img" / f"{i}.jpg").write_bytes(data[: len(data) // 3] if i == 4 else data)
        rows += [{"image": f"img/{i}.jpg", "caption": f"caption {k} of {i}", "label": i, "site": f"s{i % 3}"}
                 for k in range(2)]
    pcsv.write_csv(pa.Table.from_pylist(rows), root / "captions.csv")
    return root / "captions.csv"


def _config(checkpoint: Path, **kw) -> EmbedConfig:
    return EmbedConfig(**{"model": TINY_MODEL, "pretrained": str(checkpoint), "workers": 0, "batch_size": 2,
                          "shard_size": 3, "device": "cpu", "threads": 1, **kw})


def _assert_same_collection(got: Collection, want: Collection, source_path: str | None = None) -> None:
    """Same ids, paths, metadata, captions and failures; embeddings equal within fp16 rounding
    (and the same source description, but for its ``path`` when ``source_path`` is given)."""
    assert got.shard_numbers() == want.shard_numbers()
    a, b = got.read_table(), want.read_table()
    assert a.schema == b.schema
    for name in a.column_names:
        if name != "embedding":
            assert a.column(name).to_pylist() == b.column(name).to_pylist(), name
    for kind in ("images", "captions"):
        (ids_a, va), (ids_b, vb) = got.read_embeddings(kind), want.read_embeddings(kind)
        assert ids_a.tolist() == ids_b.tolist()
        np.testing.assert_allclose(va, vb, atol=2e-3)  # fp16 storage: ~5e-4 relative on unit vectors
    assert got.read_table("captions", ["image_id", "caption"]).equals(want.read_table("captions", ["image_id", "caption"]))
    assert got.failures().equals(want.failures())
    assert got.manifest.counts == want.manifest.counts and got.manifest.complete
    assert got.model == want.model
    assert got.manifest.source == {**want.manifest.source, **({"path": source_path} if source_path else {})}


def test_embed_matches_the_local_engine_even_with_a_worker_killed_mid_shard(ray_address, tmp_path, tiny_checkpoint):
    """One job checks both (each Ray Data job and actor costs seconds of imports): the Ray engine,
    reading through fsspec, writes the local engine's collection, though an actor dies mid-shard
    (``os._exit``, like a lost node) and its shard is redone: no lost and no duplicated ids."""
    from indexing.ray_engine import RayConfig, embed_ray

    src = _manifest_source(tmp_path / "src", 10)
    url = f"file://{src}"  # the actors read the images through fsspec, as from s3:// on a cluster
    marker = tmp_path / "crashed"  # 4 shards (3, 3, 3, 1 images) on 2 actors: one decodes >= 6 images
    env = {"VLSEARCH_TEST_CRASH_MARKER": str(marker), "VLSEARCH_TEST_CRASH_AFTER": "4"}
    calls = []
    # fp32 on both engines: "auto" precision is decided per process by a timed probe, and under load an
    # actor and this process could decide differently (bf16 vs fp32 vectors differ by ~3e-3)
    fp32 = _config(tiny_checkpoint, precision="fp32")
    got = embed_ray(url, tmp_path / "ray", fp32, RayConfig(actors=2, runtime_env={"env_vars": env}),
                    progress=lambda done, total=None, **kw: calls.append((done, total, kw["failures"])))
    assert marker.exists(), "the fault was not injected: the test would prove nothing"
    want = embed(src, tmp_path / "local", fp32)
    _assert_same_collection(got, want, source_path=url)
    assert want.manifest.counts["failures"] == 1 and want.manifest.counts["shards"] == 4
    ids = got.read_table(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 9
    assert calls and calls[-1] == (10, 10, 1)  # one progress feed, fed from the actors (the retry overwrote its shard)

    again = embed_ray(url, tmp_path / "ray", fp32)  # complete: synced, nothing changed
    assert again.manifest.version == got.manifest.version
    (src.parent / "img" / "10.jpg").write_bytes(_jpeg(10))
    with open(src, "a") as f:
        f.write("img/10.jpg,new caption,10,s1\n")
    synced = embed_ray(url, tmp_path / "ray", fp32)  # one new image: a new version
    assert synced.manifest.counts["images"] == got.manifest.counts["images"] + 1
    assert synced.manifest.version == got.manifest.version + 1
    with pytest.raises(CollectionMismatchError):
        embed_ray(_folder(tmp_path / "other", 2), tmp_path / "ray", fp32)


def test_a_killed_driver_is_resumed_by_a_rerun(ray_address, tmp_path, tiny_checkpoint):
    src = _folder(tmp_path / "src", 24)
    out = tmp_path / "killed"
    # fp32 everywhere: "auto" is a timed probe cached per thread count, and under load the 1-thread
    # embed and the reference could pick bf16 and fp32 (vectors ~3e-3 apart)
    args = ["embed", str(src), str(out), "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint),
            "--workers", "0", "--batch-size", "3", "--shard-size", "3", "--device", "cpu", "--threads", "1",
            "--precision", "fp32", "--engine", "ray", "--actors", "1"]
    kill_9_when([sys.executable, str(FAULTS), ray_address, "0.15", *args],
                (out / "images" / "part-00000.parquet").exists, "a committed shard")
    killed = Collection.open(out)
    assert not killed.manifest.complete and 1 <= len(killed.shard_numbers()) < 8

    result = CliRunner().invoke(app, args)  # the same command again (this process's Ray): resumes
    assert result.exit_code == 0, result.output
    assert "24 images, 24 captions, 0 failures" in result.output
    want = embed(src, tmp_path / "local", _config(tiny_checkpoint, precision="fp32"))
    _assert_same_collection(Collection.open(out), want)


def _same_top10(a: Searcher, b: Searcher, queries: np.ndarray) -> None:  # noqa: F821
    """Same top-10 ids. Tie handling: both are asked for 11 hits; ids scoring strictly above the
    10th score must be the same set, and the ids tied with the 10th score are compared as a set of
    candidates (either index may order equal scores differently or cut the tie elsewhere)."""
    sa, ia = a.knn(queries, 11)
    sb, ib = b.knn(queries, 11)
    np.testing.assert_allclose(sa[:, :10], sb[:, :10], atol=1e-6)
    for q in range(len(queries)):
        tenth = sa[q, 9]
        above_a, above_b = set(ia[q][sa[q] > tenth + 1e-6]), set(ib[q][sb[q] > tenth + 1e-6])
        assert above_a == above_b, q
        tied_a = set(ia[q][np.abs(sa[q] - tenth) <= 1e-6])
        tied_b = set(ib[q][np.abs(sb[q] - tenth) <= 1e-6])
        assert tied_a & tied_b, q


@pytest.mark.parametrize("index_type,on_disk,max_bytes", [
    ("auto", False, None),  # IVF64,PQ16x4fs,Refine(SQ8): the in-RAM default
    ("auto", True, 40),  # IVF64,PQ32x4fs,Refine(disk): re-scored from the rows file the parts write; merged on disk
    ("IVF32,SQ8", True, None),  # plain IVF codes: searched from the merged on-disk lists
])
def test_index_matches_the_local_build(ray_address, tmp_path, index_type, on_disk, max_bytes):
    """Same plan, tuned defaults, recall and top-10 as the local build; the same rows file."""
    from test_build import SMALL, clustered, make_collection

    from indexing.build import build_index
    from indexing.ray_engine import RayConfig, build_index_ray
    from vlsearch.query.searcher import Searcher

    x = clustered(4000)
    ids = np.arange(len(x), dtype=np.int64) * 7 + 1000
    local, ray_built = make_collection(tmp_path / "l", x, ids, 500), make_collection(tmp_path / "r", x, ids, 500)
    want = build_index(local.path, index_type, policy=SMALL, seed=3, max_bytes_per_vector=max_bytes)
    got = build_index_ray(ray_built.path, index_type, policy=SMALL, seed=3, ray_config=RayConfig(actors=2),
                          parts=3, on_disk=on_disk, max_bytes_per_vector=max_bytes)
    same = ("factory", "nprobe_default", "k_factor_default", "refine", "recall_at_10", "bytes_per_vector")
    assert {k: got[k] for k in same} == {k: want[k] for k in same} and got["ntotal"] == 4000
    assert got["parts"] == 3 and got["engine"] == "ray" and got["merge"] == ("ondisk" if on_disk else "memory")
    assert got["layout"] == ("ondisk" if index_type != "auto" else "memory")
    assert got["factory"].endswith("Refine(disk)") == bool(max_bytes)
    rows = [np.load(c.path / e["rows_file"]) for c, e in ((ray_built, got), (local, want))]
    assert np.array_equal(*rows) and rows[0].shape == (4000, x.shape[1])  # every vector, in id order
    files = {".lock", "images", "index.faiss", "keyword", "manifest.json", "versions", got["rows_file"],
             got["rows_ids_file"], *([got["ivfdata"]] if got["layout"] == "ondisk" else [])}
    assert sorted(p.name for p in ray_built.path.iterdir()) == sorted(files)  # no part, temp or merge file left
    queries = x[::97] + 0.01
    _same_top10(Searcher.open(ray_built.path, mmap=on_disk), Searcher.open(local.path), queries)
    filtered = [Searcher.open(c.path).knn(queries, 10, exact=True, where="id % 3 = 0") for c in (ray_built, local)]
    assert np.array_equal(filtered[0][1], filtered[1][1])
    if got["layout"] == "ondisk":
        assert (ray_built.path / got["ivfdata"]).stat().st_size > 0
        _updates_follow_the_on_disk_index(local, ray_built, ids, queries)


def test_on_disk_merge_refuses_an_in_ram_refine_before_training(tmp_path):
    from test_build import clustered, make_collection

    from indexing.ray_engine import _check_on_disk_factory

    coll = make_collection(tmp_path / "c", clustered(100), shard_size=50)
    with pytest.raises(IndexConfigError, match="in-RAM refine"):
        _check_on_disk_factory("IVF16,PQ8x4fs,Refine(SQ8)", coll.dim, "ip")
    with pytest.raises(IndexConfigError, match="inverted lists"):
        _check_on_disk_factory("HNSW32", coll.dim, "ip")
    _check_on_disk_factory("IVF16,PQ8x4fs,Refine(disk)", coll.dim, "ip")  # fast-scan + disk refine: allowed


def _updates_follow_the_on_disk_index(local: Collection, ray_built: Collection, ids: np.ndarray,
                                      queries: np.ndarray) -> None:
    """Removing and adding rows (what `vlsearch index`'s sync does) updates an on-disk index by
    copy on write: version N+1 gets its own .ivfdata, version N's stays for its readers until GC."""
    from test_build import clustered

    from vlsearch.store.arrays import embedding_array
    from vlsearch.query.searcher import Searcher

    first = Collection.open(ray_built.path).manifest.index["ivfdata"]
    before = Searcher.open(ray_built.path, mmap=True)  # a reader of version N during the update
    new = clustered(300, seed=5)
    new_ids = np.arange(300, dtype=np.int64) * 7 + 3  # never one of the build's ids (x 7 + 1000)
    removed = ids[::40]
    for coll in (local, ray_built):
        with coll.update() as update:
            update.remove(removed)
            update.add(pa.table({"id": new_ids, "path": [f"new/{i}.jpg" for i in new_ids],
                                 "embedding": embedding_array(new)}))
    entry = Collection.open(ray_built.path).manifest.index
    assert entry["ivfdata"] != first and entry["layout"] == "ondisk" and entry["ntotal"] == 4000 - 100 + 300
    assert (ray_built.path / first).exists()
    probe = np.concatenate([queries, new[::30] + 0.01])
    got = Searcher.open(ray_built.path, mmap=True)
    _same_top10(got, Searcher.open(local.path), probe)
    assert not np.isin(got.knn(probe, 20)[1], removed).any()
    assert before.knn(queries, 10)[1].shape == (len(queries), 10)  # version N still answers (leased)
    before.close()  # its reader lets go of version N
    with ray_built.update() as update:  # one more version: version N's lists are collected
        update.remove(new_ids[:5])
    assert not (ray_built.path / first).exists()
    assert sorted(p.name for p in ray_built.path.glob("*.ivfdata")) == sorted(
        {entry["ivfdata"], Collection.open(ray_built.path).manifest.index["ivfdata"]})


def test_merge_refuses_overlapping_ids_and_foreign_quantizers():
    from indexing.ray_engine import _check_parts, _Part

    def part(ids, digest="d"):
        return _Part("p", np.asarray(ids, np.int64), digest, np.zeros((0, 10)), np.zeros((0, 10)), 0.0, 0.0)

    _check_parts([part([1, 2]), part([3])], "d")
    with pytest.raises(CollectionMismatchError, match="3651"):
        _check_parts([part([1, 2]), part([2, 5])], "d")
    with pytest.raises(DistributedError, match="2970"):
        _check_parts([part([1]), part([2], digest="other")], "d")


def test_a_missing_ray_says_how_to_install_it(tmp_path, monkeypatch):
    from indexing.ray_engine import build_index_ray, require_ray

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(RayNotInstalledError, match=r"pip install 'vlsearch\[ray\]'"):
        require_ray()
    with pytest.raises(RayNotInstalledError):
        build_index_ray(tmp_path)
    result = CliRunner().invoke(app, ["build-index", str(tmp_path), "--engine", "ray"])
    assert result.exit_code == 1 and "pip install 'vlsearch[ray]'" in result.output


def test_index_build_modules_do_not_load_torch():
    """A Ray index worker imports indexing.ray_engine and indexing.build: torch (~0.8 GB resident
    per worker) must not come with them."""
    import subprocess
    import sys

    code = "import sys, indexing.ray_engine, indexing.build; print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_cli_builds_a_disk_refine_plan_on_ray_merged_through_a_file(ray_address, tmp_path):
    from test_build import clustered, make_collection
    from typer.testing import CliRunner

    from vlsearch.app.cli import app

    coll = make_collection(tmp_path / "c", clustered(3000), shard_size=500)
    result = CliRunner().invoke(app, ["build-index", str(coll.path), "--engine", "ray", "--address", ray_address,
                                      "--parts", "3", "--on-disk", "--index-type", "IVF16,PQ16x4fs,Refine(disk)"])
    assert result.exit_code == 0, result.output
    assert "3 parts merged through a file, inverted lists in RAM" in result.output
    entry = Collection.open(coll.path).manifest.index
    assert (entry["refine"], entry["merge"], entry["layout"]) == ("disk-fp16", "ondisk", "memory")
    rows = np.load(coll.path / entry["rows_file"])
    np.testing.assert_array_equal(rows, clustered(3000).astype(np.float16))  # every vector, row = id
