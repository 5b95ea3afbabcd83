"""fsspec URL sources (``s3://``, ``file://``...): the same records, ids and collection as local paths,
read through fsspec, offline (``memory://`` and ``file://``); a clear error naming the package to
install when a protocol's implementation is missing."""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from test_embed import _config, _jpeg
from test_sources import _folder, _tar
from typer.testing import CliRunner

from indexing.embed import embed
from indexing.sync import sync
from vlsearch.app.cli import app
from vlsearch.core.errors import FilesystemNotInstalledError, SourceError
from vlsearch.data.sources import FolderSource, ManifestSource, TarSource, file_stat, open_source, read_record


@pytest.fixture
def memory_url():
    """A fresh ``memory://`` folder URL, removed afterwards (the memory filesystem is process-global)."""
    fs = fsspec.filesystem("memory")
    root = f"/vlsearch-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{root}", fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _upload(fs, local: Path, root: str) -> None:
    for dirpath, _, names in os.walk(local):
        for name in names:
            path = Path(dirpath, name)
            fs.pipe(f"{root}/{path.relative_to(local).as_posix()}", path.read_bytes())


def _dataset(tmp: Path) -> Path:
    """A folder of images (sidecar captions, sub-folders), a manifest with typed metadata, two tars."""
    _folder(tmp / "folder")
    (tmp / "manifest" / "img").mkdir(parents=True)
    for i in range(3):
        (tmp / "manifest" / "img" / f"{i}.jpg").write_bytes(_jpeg(i))
    (tmp / "manifest" / "captions.csv").write_text(
        "image,caption,label\nimg/1.jpg,one,1\nimg/0.jpg,zero,0\nimg/1.jpg,uno,1\nimg/2.jpg,two,2\n")
    (tmp / "tars").mkdir()
    _tar(tmp / "tars" / "a.tar", [("k0.jpg", _jpeg(0)), ("k0.txt", b"first"), ("k1.png", _jpeg(1))])
    _tar(tmp / "tars" / "b.tar", [("k2.jpg", _jpeg(2)), ("k2.json", b'{"caption": "json caption"}')])
    return tmp


def _as_rows(source) -> list[tuple]:
    return [(r.id, r.path, r.captions, r.metadata, r.tar_range, read_record(r)) for r in source]


@pytest.mark.parametrize("name,kind", [("folder", FolderSource), ("manifest", ManifestSource),
                                       ("manifest/captions.csv", ManifestSource), ("tars", TarSource),
                                       ("tars/a.tar", TarSource), ("tars/*.tar", TarSource)])
def test_url_sources_list_the_records_of_the_same_local_source(tmp_path, memory_url, name, kind):
    url, fs, root = memory_url
    local = _dataset(tmp_path)
    _upload(fs, local, root)
    want = _as_rows(open_source(local / name))
    described = open_source(local / name).describe()["path"]
    for base in (url, f"file://{local}"):
        source = open_source(f"{base}/{name}")
        assert isinstance(source, kind)
        assert _as_rows(source) == want, base  # same ids, paths, captions, metadata and bytes
        assert all(r.location.startswith(base.split("://")[0] + "://") for r in source)
        assert source.describe()["path"] == described.replace(str(local), base)


def test_url_records_have_file_stats_and_errors_stay_typed(tmp_path, memory_url):
    url, fs, root = memory_url
    _upload(fs, _folder(tmp_path / "f"), root)
    record = next(iter(open_source(url)))
    size, mtime = file_stat(record)
    assert size == len(read_record(record)) and mtime > 0
    with pytest.raises(SourceError, match="does not exist"):
        open_source(f"{url}/nope")
    with pytest.raises(SourceError, match="no .tar files match"):
        open_source(f"{url}/*.tar")
    with pytest.raises(SourceError, match="not a protocol fsspec knows"):
        open_source("nosuchprotocol://bucket/x")


def test_a_missing_protocol_package_says_what_to_pip_install(monkeypatch):
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "vlsfake",
                        {"class": "vlsfake_pkg.FakeFileSystem", "err": "Install vlsfake_pkg to access vlsfake"})
    with pytest.raises(FilesystemNotInstalledError, match="pip install vlsfake_pkg") as info:
        open_source("vlsfake://bucket/photos")
    assert isinstance(info.value, SourceError) and isinstance(info.value, ImportError)
    result = CliRunner().invoke(app, ["embed", "vlsfake://bucket/photos", "coll"])
    assert result.exit_code == 1 and "pip install vlsfake_pkg" in result.output
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(FilesystemNotInstalledError, match="pip install s3fs"):
            open_source("s3://bucket/photos")


def test_embed_from_a_url_equals_embed_from_the_path_and_syncs(tmp_path, memory_url, tiny_encoder):
    url, fs, root = memory_url
    local = _dataset(tmp_path / "data") / "folder"
    _upload(fs, local, root)
    want = embed(local, tmp_path / "local", _config(), encoder=tiny_encoder)
    got = embed(url, tmp_path / "url", _config(workers=2), encoder=tiny_encoder)  # forked decoders read it too
    assert got.read_table(columns=["id", "path", "captions"]).equals(want.read_table(columns=["id", "path", "captions"]))
    np.testing.assert_allclose(got.read_embeddings()[1], want.read_embeddings()[1], atol=1e-6)
    assert got.failures().num_rows == 0 and got.manifest.source["path"] == url

    assert sync(url, got.path, _config(), encoder=tiny_encoder).encoded == 0  # unchanged: file stats match
    fs.pipe(f"{root}/b/C.JPG", _jpeg(7))
    fs.rm(f"{root}/b/e.webp")
    report = sync(url, got.path, _config(), encoder=tiny_encoder)
    assert (report.changed, report.deleted, report.encoded) == (["b/C.JPG"], ["b/e.webp"], 1)
