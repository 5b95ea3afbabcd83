"""The demo end to end at a tiny size: every stage runs for real (generate, train, embed, index,
search, benchmark, contact sheet). Accuracy is not checked here (see the README's full run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlsearch.ann.plan import small_collection_factory as index_factory
from vlsearch.app.contact_sheet import FIT, LABEL_W, MISFIT, PAD, draw_contact_sheet, hit_label
from vlsearch.app.demo import (PHOTO_TEXT_QUERIES, SHAPES_TEXT_QUERIES, DemoConfig, QueryResult, _fresh_out_dir,
                               format_report, run_demo)
from vlsearch.models import factory as models
from vlsearch.query.results import Hit
from vlsearch.store.collection import Collection
from vlsearch.store.layout import CAPTIONS_DIR
from vlsearch.core.errors import VlsearchError
from vlsearch.data.shapes import (PARTIAL_TEMPLATES, ShapesConfig, generate_shapes, parse_attributes,
                                  read_attributes)

TINY = DemoConfig(size=48, heldout=40, epochs=1, batch_size=24, k=4, n_image_queries=2, workers=0,
                  shapes_model="vlsearch-tiny")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    stages = []
    report = run_demo(tmp_path_factory.mktemp("demo") / "out", seed=1, config=TINY,
                      progress=lambda done, total=None, stage="", **_: stages.append(stage))
    return report, stages


def _exact_ranks(coll: Collection) -> dict[str, np.ndarray]:
    """t2i and i2t ranks from the stored vectors alone (ties count against the query)."""
    image_ids, images = coll.read_embeddings()
    owners, captions = coll.read_embeddings(CAPTIONS_DIR)  # a caption row's id is its image's
    sim = captions @ images.T
    position = {int(i): n for n, i in enumerate(image_ids)}
    own = np.array([position[int(i)] for i in owners])
    t2i = (sim >= sim[np.arange(len(captions)), own][:, None]).sum(axis=1)
    i2t = np.array([1 + (sim[owners != i, j] >= sim[owners == i, j].max()).sum() for j, i in enumerate(image_ids)])
    return {"t2i": t2i, "i2t": i2t}


def test_collection_and_index(demo):
    report, _ = demo
    coll = Collection.open(report.collection)
    assert coll.count() == 40 and coll.count("captions") == 80  # held-out split, 2 captions each
    assert coll.manifest.model.name == "vlsearch-tiny" and coll.manifest.model.dim == 64
    assert coll.manifest.model.pretrained == report.training["checkpoint"]  # the trained weights
    assert coll.has_index()
    assert report.index["factory"].startswith("IVF") and "PQ" in report.index["factory"]
    assert report.index["ntotal"] == 40


def test_queries_hits_and_their_scores(demo):
    report, _ = demo
    assert [q.query for q in report.text_queries] == list(SHAPES_TEXT_QUERIES)
    assert len(report.image_queries) == 2 and all(q.caption for q in report.image_queries)
    attrs = read_attributes(report.collection.parent / "data" / "heldout")
    for q in report.text_queries:
        assert len(q.hits) == 4 and [h.rank for h in q.hits] == [1, 2, 3, 4]
        scores = [h.score for h in q.hits]
        assert scores == sorted(scores, reverse=True)
        wanted = parse_attributes(q.query)
        expected = [all(attrs[h.path][key] == value for key, value in wanted.items()) for h in q.hits]
        assert q.matches == expected
        assert q.precision == sum(expected) / 4
        assert set(q.attribute_matches) == set(wanted)
        for attr, value in wanted.items():
            assert q.attribute_precision[attr] == sum(attrs[h.path][attr] == value for h in q.hits) / 4
    for q in report.image_queries:  # a query picture is compared on all four attributes
        assert list(q.attribute_matches) == ["color", "size", "shape", "position"]


def test_benchmark_and_report_fields(demo):
    report, stages = demo
    b = report.benchmark
    assert b["n_images"] == 40 and b["n_captions"] == 80
    recomputed = _exact_ranks(Collection.open(report.collection))
    for direction, ranks in recomputed.items():  # the recorded figures are the collection's own
        m = b["exact"][direction]
        assert [m[f"R@{k}"] for k in (1, 5, 10)] == pytest.approx([np.mean(ranks <= k) for k in (1, 5, 10)])
        assert m["median_rank"] == pytest.approx(np.median(ranks)) and m["n_queries"] == len(ranks)
    assert b["ann"] and all(0 <= a["ann_recall"]["recall"] <= 1 for a in b["ann"])
    assert report.chance == pytest.approx({"R@1": 1 / 40, "R@5": 5 / 40, "R@10": 10 / 40})
    assert report.training["steps"] == 2 and np.isfinite(report.training["last_loss"])
    assert report.notes == []  # the trained checkpoint is not flagged as untrained
    assert set(report.timings) == {"generate", "train", "embed", "index", "queries", "benchmark", "contact sheet"}
    assert report.seconds >= sum(report.timings.values()) - 1e-6
    assert {"generate", "train", "embed"} <= set(stages)  # progress is forwarded, tagged by stage
    saved = json.loads(report.report_path.read_text())
    assert saved["benchmark"]["exact"]["t2i"] == b["exact"]["t2i"]
    assert len(saved["text_queries"][0]["hits"]) == 4
    text = format_report(report)
    assert "a large red circle in the center" in text and "R@10" in text and str(report.contact_sheet) in text


def test_contact_sheet_has_a_row_per_query(demo):
    report, _ = demo
    with Image.open(report.contact_sheet) as sheet:
        assert sheet.format == "PNG"
        rows = len(report.text_queries) + len(report.image_queries)
        assert sheet.height >= rows * 96 and sheet.width >= 4 * 96
        pixels = np.asarray(sheet.convert("RGB"))
    assert pixels.std() > 10  # thumbnails were drawn, not a blank canvas


def _hit(path: str, rank: int) -> Hit:
    return Hit(id=rank, score=1 - rank / 10, rank=rank, path=path, caption=f"caption of {path}")


def test_sheet_frames_hits_by_colour_and_shape_and_labels_their_position(tmp_path):
    """The frame follows the report's figure (colour and shape); the position is in the label."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / name)
    result = QueryResult("text", "a large red circle in the center", [_hit("a.png", 1), _hit("b.png", 2)],
                         attribute_matches={"color": [True, False], "size": [True, True], "shape": [True, True],
                                            "position": [False, True]})
    positions = {"a.png": {"position": "top left"}, "b.png": {"position": "center"}}
    thumb = 40
    sheet = draw_contact_sheet([result], tmp_path / "sheet.png", {"collection": tmp_path, "query": tmp_path},
                               thumb=thumb, attributes=positions)
    pixels = np.asarray(Image.open(sheet).convert("RGB"))
    frame_x = [LABEL_W + i * (thumb + PAD) - 1 for i in range(2)]  # the frames' left edges
    assert tuple(pixels[PAD + thumb // 2, frame_x[0]]) == FIT  # colour and shape right, position wrong
    assert tuple(pixels[PAD + thumb // 2, frame_x[1]]) == MISFIT  # wrong colour
    assert hit_label(result, 0, "top left") == [("0.90 top left", MISFIT), ("caption of a.png", "black")]
    assert hit_label(result, 1, "center") == [("0.80 center", FIT), ("caption of b.png", "black")]
    label_a = pixels[PAD + thumb + 2:, frame_x[0] + 1:frame_x[0] + 1 + thumb]
    assert (label_a == MISFIT).all(axis=-1).any()  # drawn: the first hit's position in red under its green frame
    no_attributes = QueryResult("text", "a dog", [_hit("a.png", 1)])
    assert hit_label(no_attributes, 0, None) == [("0.90 caption of a.png", "black")]


def test_out_dir_rules(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(VlsearchError, match="not empty"):
        _fresh_out_dir(tmp_path / "mine")
    demo_dir = _fresh_out_dir(tmp_path / "demo")
    (demo_dir / "collection").mkdir()
    (demo_dir / "report.json").write_text("{}")
    _fresh_out_dir(demo_dir)  # an earlier demo's outputs are cleared
    assert not (demo_dir / "collection").exists() and not (demo_dir / "report.json").exists()
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_index_factory_shapes():
    assert index_factory(40, 64) == "IVF4,PQ16x4fs,RFlat"
    assert index_factory(250, 64) == "IVF8,PQ16x4fs,RFlat"
    assert index_factory(1000, 30).startswith("IVF16,PQ") and 30 % int(index_factory(1000, 30).split("PQ")[1].split("x")[0]) == 0


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="heldout"):
        DemoConfig(heldout=2)


def test_cli_demo(tmp_path):
    from vlsearch.app.cli import app

    out = tmp_path / "cli-demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--size", "32", "--heldout", "24",
                                      "--epochs", "1", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "text queries" in result.output and "R@10" in result.output and "contact sheet" in result.output
    assert (out / "contact_sheet.png").is_file() and (out / "report.json").is_file()
    assert Collection.open(out / "collection").count() == 24
    refused = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])  # not empty, not a demo folder
    assert refused.exit_code == 1 and "not empty" in refused.output


def test_data_mode_indexes_a_captioned_folder(tmp_path):
    data = generate_shapes(tmp_path / "photos", ShapesConfig(n_train=0, n_heldout=20, seed=5))
    config = DemoConfig(k=3, n_image_queries=2, workers=0, model="vlsearch-tiny")
    # the folder holding captions.csv is read as that manifest (captions included), like the file itself
    report = run_demo(tmp_path / "out", data=data.heldout_manifest.parent, config=config)
    assert report.mode == "data" and report.training is None and "generate" not in report.timings
    assert not (tmp_path / "out" / "data").exists()  # nothing generated, nothing trained
    assert Collection.open(report.collection).count() == 20 and report.index["ntotal"] == 20
    assert [q.query for q in report.text_queries] == list(PHOTO_TEXT_QUERIES)
    assert all(q.matches is None and len(q.hits) == 3 for q in report.text_queries + report.image_queries)
    assert report.image_queries[0].query == "images/000000.png"  # paths as the source records them
    assert report.benchmark["n_captions"] == 40 and report.contact_sheet.is_file()
    assert "random initialisation" in report.notes[0]  # the untrained tiny model is flagged
    assert "note: vlsearch-tiny has no trained weights" in format_report(report)


def test_default_demo_fits_vlsearch_small_lit_style(tmp_path):
    """Without data the demo fits vlsearch-small's heads and the trunk's last 2 stage groups to the
    shapes (the rest of the pretrained towers locked and precomputed; training pictures also
    described by partial captions such as "a red circle") and
    scores the hits' colour and shape against each query. A small fit already finds them far above
    chance (1 in 30 pictures has a given colour and shape); the full-size figure is in the README."""
    if not models.small_model_available():
        pytest.skip("vlsearch-small is not installed here")
    config = DemoConfig(size=200, heldout=120, k=4, n_image_queries=3, workers=0)
    report = run_demo(tmp_path / "out", config=config)
    coll = Collection.open(report.collection)
    assert coll.manifest.model.name == "vlsearch-small" and coll.manifest.model.dim == 384
    assert report.training["image_groups_tuned"] == 2
    assert report.training["epochs"] == 15 and report.dataset["partial_captions"] == len(PARTIAL_TEMPLATES)
    train_captions = (report.collection.parent / "data" / "train" / "captions.csv").read_text()
    assert train_captions.count("\n") == 1 + 200 * (2 + len(PARTIAL_TEMPLATES))
    fits = [c and s for q in report.text_queries + report.image_queries
            for c, s in zip(q.attribute_matches["color"], q.attribute_matches["shape"])]
    assert report.color_shape_precision == pytest.approx(sum(fits) / len(fits))
    assert report.color_shape_precision >= 0.25  # chance: 1/30
    assert "hits with the query's colour and shape" in format_report(report)


def test_the_demos_fit_of_vlsearch_small_prints_no_timm_deprecation():
    """Locking vlsearch-small's trunk but its last stage groups makes open_clip import timm's
    deprecated timm.models.helpers, whose FutureWarning the demo used to print."""
    if not models.small_model_available():
        pytest.skip("vlsearch-small is not installed here")
    code = ("from vlsearch.app.demo import DemoConfig, _shapes_train_config\n"
            "from vlsearch.models.factory import SMALL_MODEL, create_model\n"
            "from vlsearch.train.locks import apply_locks\n"
            "apply_locks(create_model(SMALL_MODEL)[0], _shapes_train_config(DemoConfig(size=8), SMALL_MODEL))\n")
    done = subprocess.run([sys.executable, "-W", "error:Importing from timm:FutureWarning", "-c", code],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
