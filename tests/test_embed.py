from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

import indexing.embed as embed_module
import indexing.shards as shards_module
from indexing.embed import EmbedConfig, embed, image_schema
from vlsearch.data.sources import content_hash, open_source, stable_id
from vlsearch.app.cli import app
from vlsearch.store.collection import Collection
from vlsearch.store.arrays import embedding_type
from vlsearch.core.errors import CollectionMismatchError, SourceError
from vlsearch.models.factory import TINY_MODEL

from conftest import kill_9_when

HELPER = Path(__file__).resolve().parent / "_embed_slowly.py"


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20 + i % 5, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"img{i:03d}.jpg").write_bytes(_jpeg(i))
        if i % 2:
            (root / f"img{i:03d}.txt").write_text(f"picture number {i}\nanother caption {i}\n")
    return root


def _config(**kw) -> EmbedConfig:
    return EmbedConfig(**{"model": TINY_MODEL, "workers": 0, "batch_size": 4, "shard_size": 5, "device": "cpu", **kw})


@pytest.fixture()
def manifest(tmp_path) -> Path:
    """7 images, 5 captions each (rows shuffled), a nullable int and a string metadata column."""
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(7):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(i))
        label = None if i < 3 else i  # the first shard holds only nulls: the type must still be int64
        rows += [{"image": f"img/{i}.jpg", "caption": f"caption {k} of image {i}", "label": label, "site": f"s{i}"}
                 for k in range(5)]
    rows = rows[::-1]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("image", pa.string()), ("caption", pa.string()),
                                                          ("label", pa.int64()), ("site", pa.string())]))
    pcsv.write_csv(table, tmp_path / "captions.csv")
    return tmp_path / "captions.csv"


def test_shard_schema_and_contents(manifest, tmp_path, tiny_encoder):
    coll = embed(manifest, tmp_path / "c", _config(shard_size=3), encoder=tiny_encoder)
    meta = pa.schema([("label", pa.int64()), ("site", pa.string())])
    assert [pq.read_schema(p).remove_metadata() for p in coll.shard_paths("images")] == [image_schema(64, meta)] * 3
    caption_schema = pa.schema([("image_id", pa.int64()), ("caption", pa.string()), ("embedding", embedding_type(64))])
    assert all(pq.read_schema(p).remove_metadata() == caption_schema for p in coll.shard_paths("captions"))
    failure_schema = pa.schema([("path", pa.string()), ("kind", pa.string()), ("message", pa.string())])
    assert all(pq.read_schema(p).remove_metadata() == failure_schema for p in coll.shard_paths("failures"))

    reopened = Collection.open(tmp_path / "c")
    m = reopened.manifest
    assert m.counts == {"images": 7, "captions": 35, "failures": 0, "shards": 3} and m.complete
    assert m.model == tiny_encoder.info and m.source["type"] == "manifest" and m.shard_size == 3

    rows = reopened.read_table("images", ["id", "path", "captions", "label", "site"]).to_pylist()
    assert [r["path"] for r in rows] == [f"img/{i}.jpg" for i in range(7)]
    assert [r["id"] for r in rows] == [stable_id(f"img/{i}.jpg") for i in range(7)]
    assert sorted(rows[4]["captions"]) == [f"caption {k} of image 4" for k in range(5)]
    assert [r["label"] for r in rows] == [None, None, None, 3, 4, 5, 6] and rows[0]["site"] == "s0"

    ids, vectors = reopened.read_embeddings("images")
    expected = tiny_encoder.encode_images([manifest.parent / "img" / f"{i}.jpg" for i in range(7)])
    np.testing.assert_allclose(vectors, expected, atol=2e-3)  # float16 storage
    caps = reopened.read_table("captions", ["image_id", "caption"]).to_pylist()
    cap_ids, cap_vectors = reopened.read_embeddings("captions")
    np.testing.assert_allclose(cap_vectors, tiny_encoder.encode_texts([c["caption"] for c in caps]), atol=2e-3)
    assert sorted(set(cap_ids.tolist())) == sorted(ids.tolist())


def test_webdataset_source_end_to_end(tmp_path, tiny_encoder):
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for i, (name, data) in enumerate([("a.jpg", _jpeg(1)), ("a.txt", b"first"), ("b.jpg", _jpeg(2)),
                                          ("b.json", json.dumps({"caption": "second"}).encode())]):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    coll = embed(tmp_path / "s.tar", tmp_path / "c", _config(workers=1), encoder=tiny_encoder)
    rows = coll.read_table("images", ["path", "captions", "key", "json"]).to_pylist()
    assert rows == [{"path": "s.tar/a.jpg", "captions": ["first"], "key": "a", "json": None},
                    {"path": "s.tar/b.jpg", "captions": ["second"], "key": "b", "json": '{"caption": "second"}'}]
    assert coll.count("captions") == 2


def test_progress_reports_images_rate_and_failures(tmp_path, tiny_encoder):
    src = _folder(tmp_path / "src", 6)
    (src / "bad.jpg").write_bytes(b"")
    calls = []
    embed(src, tmp_path / "c", _config(), progress=lambda done, total=None, **kw: calls.append((done, kw)),
          encoder=tiny_encoder)
    assert [done for done, _ in calls] == [4, 5, 7]  # batches never straddle a shard (5 records)
    assert calls[-1][1]["failures"] == 1 and float(calls[-1][1]["img/s"]) > 0


def test_rerun_of_a_complete_collection_is_a_no_op(tmp_path, tiny_checkpoint, monkeypatch):
    src = _folder(tmp_path / "src", 3)
    config = _config(pretrained=str(tiny_checkpoint))
    coll = embed(src, tmp_path / "c", config)
    # every file but the writer lock (.lock, stamped by each writer that takes it) stays untouched
    mtimes = lambda: {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*") if p.name != ".lock"}  # noqa: E731
    before = mtimes()

    def no_loading(*args, **kwargs):
        raise AssertionError("a complete collection must not load the model again")

    monkeypatch.setattr(embed_module, "load_model", no_loading)
    again = embed(src, tmp_path / "c", config)
    assert again.manifest == coll.manifest
    assert mtimes() == before


def test_rerun_with_another_model_or_source_is_refused(tmp_path, tiny_encoder):
    src = _folder(tmp_path / "src", 3)
    embed(src, tmp_path / "c", _config(), encoder=tiny_encoder)
    with pytest.raises(CollectionMismatchError, match="does not match"):
        embed(src, tmp_path / "c", _config(pretrained=None))  # the random-init tiny model
    with pytest.raises(CollectionMismatchError, match="ViT-B-32 does not match"):
        embed(src, tmp_path / "c", _config(model="ViT-B-32"))  # refused without loading it
    with pytest.raises(CollectionMismatchError, match="was embedded from folder"):
        embed(_folder(tmp_path / "other", 2), tmp_path / "c", _config(), encoder=tiny_encoder)


def test_missing_or_empty_source_creates_nothing(tmp_path, tiny_encoder):
    with pytest.raises(SourceError, match="does not exist"):
        embed(tmp_path / "nope", tmp_path / "c", _config(), encoder=tiny_encoder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        embed(tmp_path / "empty", tmp_path / "c", _config(), encoder=tiny_encoder)
    assert not (tmp_path / "c").exists()


def test_resume_after_a_crash_between_shard_files(tmp_path, tiny_encoder, monkeypatch):
    src = _folder(tmp_path / "src", 13)
    reference = embed(src, tmp_path / "ref", _config(), encoder=tiny_encoder)
    real_write = Collection.write_shard

    def crash_on_second_shard(self, number, images, captions=None, failures=None):
        if number == 1:  # captions and failures written, images (the commit) never
            real_write(self, 7, images.slice(0, 0), captions, failures)
            (self.path / "images" / "part-00007.parquet").unlink()
            raise KeyboardInterrupt
        return real_write(self, number, images, captions, failures)

    monkeypatch.setattr(Collection, "write_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        embed(src, tmp_path / "c", _config(), encoder=tiny_encoder)
    assert Collection.open(tmp_path / "c").shard_numbers() == [0]
    monkeypatch.setattr(Collection, "write_shard", real_write)
    resumed = embed(src, tmp_path / "c", _config(), encoder=tiny_encoder)
    assert resumed.shard_numbers("captions") == resumed.shard_numbers("images") == [0, 1, 2]
    _assert_same_collection(resumed, reference)


def _assert_same_collection(coll: Collection, reference: Collection) -> None:
    ids, vectors = coll.read_embeddings()
    ref_ids, ref_vectors = reference.read_embeddings()
    assert len(set(ids.tolist())) == len(ids)  # none twice
    assert ids.tolist() == ref_ids.tolist()  # none lost, same order
    np.testing.assert_allclose(vectors, ref_vectors, atol=1e-3)
    assert coll.manifest.counts == reference.manifest.counts and coll.manifest.complete
    cap_ids, _ = coll.read_embeddings("captions")
    assert cap_ids.tolist() == reference.read_embeddings("captions")[0].tolist()


def test_kill_9_of_a_real_embed_process_then_resume(tmp_path, tiny_checkpoint, tiny_encoder):
    src = _folder(tmp_path / "src", 30)
    out = tmp_path / "killed"
    args = ["embed", str(src), str(out), "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint),
            "--workers", "0", "--batch-size", "5", "--shard-size", "5", "--device", "cpu"]
    kill_9_when([sys.executable, str(HELPER), *args], (out / "images" / "part-00000.parquet").exists,
                "a committed shard", env={"VLSEARCH_TEST_DECODE_DELAY": "0.1"})
    killed = Collection.open(out)
    assert not killed.manifest.complete and 1 <= len(killed.shard_numbers()) < 6

    result = CliRunner().invoke(app, args)  # the same command again, resumes
    assert result.exit_code == 0, result.output
    assert "30 images, 30 captions, 0 failures" in result.output
    reference = embed(src, tmp_path / "ref", _config(batch_size=5), encoder=tiny_encoder)
    _assert_same_collection(Collection.open(out), reference)


def test_cli_reports_bad_source_clearly(tmp_path):
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "nope"), str(tmp_path / "c")])
    assert result.exit_code == 1 and "does not exist" in result.output


@pytest.mark.parametrize("workers", [0, 1])
def test_file_columns_come_from_the_decode_workers(tmp_path, tiny_encoder, monkeypatch, workers):
    """embed stores the workers' stat + content hash; the encoding process hashes no file itself."""
    folder = _folder(tmp_path / "img", 6)
    expected = {r.path: content_hash(r) for r in open_source(folder)}

    def no_hashing_here(record):
        raise AssertionError("the encoding process re-hashed a file")

    monkeypatch.setattr(shards_module, "content_hash", no_hashing_here)
    coll = embed(folder, tmp_path / "c", _config(workers=workers), encoder=tiny_encoder)
    rows = coll.read_table("images", ["path", "content_hash", "file_size"]).to_pylist()
    assert {r["path"]: r["content_hash"] for r in rows} == expected
    assert all(r["file_size"] == (folder / r["path"]).stat().st_size for r in rows)


def test_embedding_runs_with_freed_memory_kept_for_reuse(manifest, tmp_path, tiny_encoder, monkeypatch):
    from vlsearch.core import allocator

    monkeypatch.delenv("VLSEARCH_MALLOC", raising=False)
    depths = []
    real = tiny_encoder.encode_image_tensors
    monkeypatch.setattr(tiny_encoder, "encode_image_tensors", lambda px: depths.append(allocator._depth) or real(px))
    embed(manifest, tmp_path / "c", _config(shard_size=3), encoder=tiny_encoder)
    expected = 1 if allocator.enabled() else 0
    assert depths and set(depths) == {expected} and allocator._depth == 0  # inside the block, left afterwards
