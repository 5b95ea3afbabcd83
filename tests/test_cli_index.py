"""The everyday CLI path: `vlsearch index` (embed + build-index), `build-index` with a factory, then `search`."""

from __future__ import annotations

import json

from PIL import Image
from typer.testing import CliRunner

from vlsearch.app.cli import app
from vlsearch.store.collection import Collection

runner = CliRunner()


def _gallery(folder, n=24):
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (48, 40), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"picture number {i}\n")
    return folder


def test_index_then_rebuild_then_search(tmp_path, tiny_checkpoint):
    gallery = _gallery(tmp_path / "photos")
    coll_dir = tmp_path / "coll"
    result = runner.invoke(app, ["index", str(gallery), str(coll_dir), "--model", "vlsearch-tiny",
                                 "--pretrained", str(tiny_checkpoint), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "24 images, 24 captions, 0 failures" in result.output
    coll = Collection.open(coll_dir)
    assert coll.has_index() and coll.manifest.index["factory"] == "Flat"  # small N: exact
    assert coll.manifest.index["ntotal"] == 24

    result = runner.invoke(app, ["build-index", str(coll_dir), "--index-type", "IVF2,Flat", "--nprobe-default", "2"])
    assert result.exit_code == 0, result.output
    entry = Collection.open(coll_dir).manifest.index
    assert entry["factory"] == "IVF2,Flat" and entry["nprobe_default"] == 2

    result = runner.invoke(app, ["search", str(coll_dir), "picture number 3", "-k", "5", "--json"])
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all("img" in h["path"] and h["caption"].startswith("picture number") for h in hits)


def test_build_index_rejects_a_bad_factory(tmp_path, tiny_checkpoint):
    gallery = _gallery(tmp_path / "photos", n=4)
    coll_dir = tmp_path / "coll"
    assert runner.invoke(app, ["embed", str(gallery), str(coll_dir), "--model", "vlsearch-tiny",
                               "--pretrained", str(tiny_checkpoint), "--workers", "0"]).exit_code == 0
    result = runner.invoke(app, ["build-index", str(coll_dir), "--index-type", "IVF4,NoSuchCode"])
    assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output
    assert not Collection.open(coll_dir).has_index()


def test_index_takes_embeds_source_options(tmp_path, tiny_checkpoint):
    """`index` reads a manifest with custom column names, as `embed` does, with the same thread option."""
    gallery = _gallery(tmp_path / "photos", n=6)
    rows = ["picture,alt"] + [f"{p},caption of {p.stem}" for p in sorted(gallery.glob("*.png"))]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    coll_dir = tmp_path / "coll"
    args = ["index", str(tmp_path / "m.csv"), str(coll_dir), "--model", "vlsearch-tiny", "--pretrained",
            str(tiny_checkpoint), "--workers", "0", "--threads", "1", "--decode-timeout", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "image column" in result.output  # "picture" is not a default name
    result = runner.invoke(app, args + ["--source-type", "manifest", "--image-column", "picture", "--caption-column", "alt"])
    assert result.exit_code == 0, result.output
    assert "6 images, 6 captions, 0 failures" in result.output
    assert Collection.open(coll_dir).manifest.index["ntotal"] == 6
