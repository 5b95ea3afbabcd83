"""``vlsearch index/embed`` on a finished collection syncs it with its source: new, changed,
deleted and renamed files, dry runs, manifest and webdataset sources, and kill -9 at every step."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from typer.testing import CliRunner

import indexing.sync as sync_module
from indexing.build import build_index
from indexing.embed import embed
from vlsearch.data.sources import ManifestSource, open_source, stable_id
from indexing.sync import sync
from conftest import kill_9_when
from test_embed import _config, _folder, _jpeg
from vlsearch.app.cli import app
from vlsearch.store.collection import Collection
from vlsearch.store.lease import lease_path
from vlsearch.models.factory import TINY_MODEL
from vlsearch.query.searcher import Searcher

HELPER = Path(__file__).resolve().parent / "_sync_crash.py"


def _by_id(coll: Collection, kind: str = "images") -> dict[int, np.ndarray]:
    ids, vectors = coll.read_embeddings(kind)
    assert kind != "images" or len(set(ids.tolist())) == len(ids)  # no duplicated ids
    return dict(zip(ids.tolist(), vectors))


def _edit(src: Path) -> None:
    """3 new files, 1 changed image, 1 caption-only change, 2 deleted, 1 renamed, 1 touched."""
    for i in (100, 101, 102):
        (src / f"img{i}.jpg").write_bytes(_jpeg(i))
    (src / "img003.jpg").write_bytes(_jpeg(50))
    (src / "img011.txt").write_text("a new caption\n")
    for name in ("img005.jpg", "img005.txt", "img007.jpg", "img007.txt"):
        (src / name).unlink()
    (src / "sub").mkdir()
    (src / "img009.jpg").rename(src / "sub" / "moved.jpg")
    (src / "img009.txt").rename(src / "sub" / "moved.txt")
    st = (src / "img001.jpg").stat()
    os.utime(src / "img001.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))


def test_sync_finds_every_kind_of_change_and_equals_a_fresh_embed(tmp_path, tiny_encoder, monkeypatch):
    src = _folder(tmp_path / "src", 12)
    coll = embed(src, tmp_path / "c", _config(), encoder=tiny_encoder)
    build_index(coll.path, "Flat")
    _edit(src)
    encoded = []
    real = tiny_encoder.encode_image_tensors
    monkeypatch.setattr(tiny_encoder, "encode_image_tensors", lambda x: encoded.append(len(x)) or real(x))
    report = sync(src, coll.path, _config(), encoder=tiny_encoder)
    assert report.summary() == "+4 new, ~2 changed, -3 deleted, 7 unchanged"
    assert sorted(report.deleted) == ["img005.jpg", "img007.jpg", "img009.jpg"]
    assert sorted(report.changed) == ["img003.jpg", "img011.jpg"]
    assert report.reused == 2 and sum(encoded) == 4 == report.encoded  # rename + caption edit reuse vectors
    monkeypatch.undo()

    synced = Collection.open(coll.path)
    fresh = embed(src, tmp_path / "fresh", _config(), encoder=tiny_encoder)
    mine, theirs = _by_id(synced), _by_id(fresh)
    assert sorted(mine) == sorted(theirs) and synced.count() == 13
    assert all(np.allclose(mine[i], theirs[i], atol=1e-3) for i in theirs)
    caps = lambda c: sorted(map(tuple, c.read_table("captions", ["image_id", "caption"]).to_pylist()))  # noqa: E731
    assert caps(synced) == caps(fresh)
    ids = np.array(sorted(theirs))
    searcher = Searcher.open(coll.path)
    assert searcher.index.ntotal == 13
    for exact in (False, True):
        _, found = searcher.knn(np.stack([theirs[i] for i in ids]), k=13, exact=exact)
        assert np.array_equal(found[:, 0], ids) and (found >= 0).all() and set(found.ravel()) == set(ids)
    again = sync(src, coll.path, _config(), encoder=tiny_encoder)
    assert again.summary() == "+0 new, ~0 changed, -0 deleted, 13 unchanged"
    assert again.version == report.version  # nothing changed: no new version


def test_rename_reuses_vectors_and_loads_no_model(tmp_path, tiny_encoder, tiny_checkpoint, monkeypatch):
    src = _folder(tmp_path / "src", 6)
    coll = embed(src, tmp_path / "c", _config(pretrained=str(tiny_checkpoint)), encoder=tiny_encoder)
    before = _by_id(coll)
    (src / "img002.jpg").rename(src / "renamed.jpg")
    (src / "img004.jpg").rename(src / "other.jpg")
    monkeypatch.setattr(sync_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    report = sync(src, coll.path, _config(pretrained=str(tiny_checkpoint)))
    assert report.summary() == "+2 new, ~0 changed, -2 deleted, 4 unchanged"
    assert report.reused == 2 and report.encoded == 0
    after = _by_id(Collection.open(coll.path))
    assert np.array_equal(after[stable_id(b"renamed.jpg")], before[stable_id(b"img002.jpg")])


def test_deferred_paths_stay_as_stored_until_a_later_sync(tmp_path, tiny_encoder):
    src = _folder(tmp_path / "src", 6)
    coll = embed(src, tmp_path / "c", _config(), encoder=tiny_encoder)
    build_index(coll.path, "Flat")
    before = _by_id(coll)
    (src / "img100.jpg").write_bytes(_jpeg(100))  # new
    (src / "img101.jpg").write_bytes(_jpeg(101))  # new, deferred
    (src / "img002.jpg").write_bytes(_jpeg(60))  # changed, deferred
    (src / "img003.jpg").unlink()  # deleted, deferred
    (src / "img004.jpg").unlink()  # deleted
    held = ["img002.jpg", "img003.jpg", "img101.jpg"]
    for defer in (set(held), held.__contains__):  # a collection of paths, or a predicate
        dry = sync(src, coll.path, _config(), encoder=tiny_encoder, dry_run=True, defer=defer)
        assert dry.summary() == "+1 new, ~0 changed, -1 deleted, 3 unchanged" and sorted(dry.deferred) == held
    report = sync(src, coll.path, _config(), encoder=tiny_encoder, defer=set(held))
    assert report.summary() == "+1 new, ~0 changed, -1 deleted, 3 unchanged" and sorted(report.deferred) == held
    after = _by_id(Collection.open(coll.path))
    id_of = lambda name: stable_id(name.encode())  # noqa: E731
    assert id_of("img101.jpg") not in after and id_of("img100.jpg") in after and id_of("img004.jpg") not in after
    for name in ("img002.jpg", "img003.jpg"):  # the stored rows, untouched
        assert np.array_equal(after[id_of(name)], before[id_of(name)])
    assert Searcher.open(coll.path).index.ntotal == len(after) == 6

    final = sync(src, coll.path, _config(), encoder=tiny_encoder)  # nothing deferred: the rest follows
    assert final.summary() == "+1 new, ~1 changed, -1 deleted, 4 unchanged" and final.deferred == []
    fresh = _by_id(embed(src, tmp_path / "fresh", _config(), encoder=tiny_encoder))
    mine = _by_id(Collection.open(coll.path))
    assert sorted(mine) == sorted(fresh) and all(np.allclose(mine[i], fresh[i], atol=1e-3) for i in fresh)


def test_dry_run_lists_changes_and_writes_nothing(tmp_path, tiny_encoder, tiny_checkpoint):
    src = _folder(tmp_path / "src", 6)
    coll = embed(src, tmp_path / "c", _config(pretrained=str(tiny_checkpoint)), encoder=tiny_encoder)
    (src / "img100.jpg").write_bytes(_jpeg(100))
    (src / "img001.jpg").unlink()
    snapshot = lambda: {p: p.stat().st_mtime_ns for p in coll.path.rglob("*")}  # noqa: E731
    before = snapshot()
    args = ["embed", str(src), str(coll.path), "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint),
            "--workers", "0", "--device", "cpu", "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "+ img100.jpg" in result.output and "- img001.jpg" in result.output
    assert "+1 new, ~0 changed, -1 deleted, 5 unchanged (dry run: nothing written)" in result.output
    assert snapshot() == before


def test_cli_index_rerun_syncs_and_the_index_follows(tmp_path, tiny_checkpoint):
    src = _folder(tmp_path / "src", 8)
    args = ["index", str(src), str(tmp_path / "c"), "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint),
            "--workers", "0", "--device", "cpu", "--index-type", "Flat"]
    assert CliRunner().invoke(app, args).exit_code == 0
    (src / "img100.jpg").write_bytes(_jpeg(100))
    (src / "img003.jpg").unlink()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "+1 new, ~0 changed, -1 deleted, 7 unchanged; 0 vectors reused, 1 encoded" in result.output
    assert "B/vector" not in result.output  # no rebuild
    coll = Collection.open(tmp_path / "c")
    assert coll.manifest.index["ntotal"] == 8 and coll.manifest.index["file"].startswith("index-v")


def test_manifest_sources_sync_by_row_key(tmp_path, tiny_encoder):
    (tmp_path / "img").mkdir()
    for i in range(5):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(i))

    def write(rows):
        pcsv.write_csv(pa.Table.from_pylist([{"image": f"img/{i}.jpg", "caption": c} for i, c in rows]),
                       tmp_path / "captions.csv")

    write([(i, f"caption {i}") for i in range(4)])
    coll = embed(tmp_path / "captions.csv", tmp_path / "c", _config(), encoder=tiny_encoder)
    write([(0, "caption 0"), (1, "a better caption"), (2, "caption 2"), (4, "caption 4")])
    source = open_source(tmp_path)  # the folder holding captions.csv is read as that manifest
    assert isinstance(source, ManifestSource)
    report = sync(source, coll.path, _config(), encoder=tiny_encoder)
    assert report.summary() == "+1 new, ~1 changed, -1 deleted, 2 unchanged"
    assert report.reused == 1 and report.encoded == 1  # the caption edit keeps the image vector
    rows = Collection.open(coll.path).read_table("captions", ["caption"]).column(0).to_pylist()
    assert sorted(rows) == ["a better caption", "caption 0", "caption 2", "caption 4"]


def test_webdataset_sources_sync_by_tar_and_key(tmp_path, tiny_encoder):
    def write(keys):
        with tarfile.open(tmp_path / "s.tar", "w") as tf:
            for key in keys:
                for name, data in ((f"{key}.jpg", _jpeg(ord(key))), (f"{key}.txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))

    write("abc")
    coll = embed(tmp_path / "s.tar", tmp_path / "c", _config(), encoder=tiny_encoder)
    write("abd")  # the tar is rewritten (new mtime): hashes confirm a and b did not change
    report = sync(tmp_path / "s.tar", coll.path, _config(), encoder=tiny_encoder)
    assert report.summary() == "+1 new, ~0 changed, -1 deleted, 2 unchanged"
    keys = Collection.open(coll.path).read_table(columns=["key"]).column(0).to_pylist()
    assert sorted(keys) == ["a", "b", "d"]


def test_folder_holding_captions_csv_is_its_manifest(shared_data):
    source = open_source(shared_data / "flickr8k-test")
    assert isinstance(source, ManifestSource) and source.size_hint() == 1000


POINTS = ["shard", "tombstones", "index", "versions", "committed"]


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_each_step_of_a_sync_then_rerun(tmp_path, tiny_encoder, tiny_checkpoint, point):
    src = _folder(tmp_path / "src", 10)
    config = _config(pretrained=str(tiny_checkpoint))
    coll = embed(src, tmp_path / "c", config, encoder=tiny_encoder)
    build_index(coll.path, "Flat")
    old_ids = set(_by_id(coll))
    (src / "img100.jpg").write_bytes(_jpeg(100))
    (src / "img101.jpg").write_bytes(_jpeg(101))
    (src / "img002.jpg").write_bytes(_jpeg(60))
    (src / "img004.jpg").unlink()
    new_ids = {r.id for r in open_source(src)}
    marker = tmp_path / "reached"
    args = ["embed", str(src), str(coll.path), "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint),
            "--workers", "0", "--device", "cpu", "--shard-size", "5"]
    kill_9_when([sys.executable, str(HELPER), point, str(marker), *args], marker.exists, f"sync step {point}")
    killed = Collection.open(coll.path)  # version N or N+1, whole
    expected = new_ids if point == "committed" else old_ids
    assert set(_by_id(killed)) == expected and killed.count() == len(expected)
    assert Searcher.open(coll.path).index.ntotal == len(expected)

    result = CliRunner().invoke(app, args)  # the same command again: completes (or finds nothing left)
    assert result.exit_code == 0, result.output
    assert ("+0 new" if point == "committed" else "+2 new, ~1 changed, -1 deleted, 8 unchanged") in result.output
    final = Collection.open(coll.path)
    assert set(_by_id(final)) == new_ids and final.count() == len(new_ids) == 11
    searcher = Searcher.open(coll.path)
    assert searcher.index.ntotal == 11 and len(searcher.row_locator) == 11
    assert (coll.path / ".lock").read_text() == ""  # the killed writer's lock is free, the rerun released it
    on_disk = {p for p in coll.path.rglob("*") if p.is_file()}
    kept = final.referenced_files() | {coll.path / "index.faiss", coll.path / ".lock",
                                       lease_path(coll.path, final.manifest.version)}
    assert on_disk <= kept  # the crash's leftovers are gone (the searcher above leases the current version)


def test_metadata_named_like_a_file_column_is_renamed(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg(1))
    pcsv.write_csv(pa.table({"image": ["a.jpg"], "caption": ["x"], "file_size": [3], "record_hash": ["mine"]}),
                   tmp_path / "m.csv")
    assert ManifestSource(tmp_path / "m.csv").metadata_schema.names == ["source_file_size", "source_record_hash"]
