"""Captions for uncaptioned photos (indexing.captioning) with a tiny random CoCa loaded from a
checkpoint file through the model factory: only empty captions are filled, an interrupted run
resumes, bad weights are typed errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import indexing.captioning as captioning
from indexing.captioning import CHECKPOINT, CaptionConfig, caption_collection, clean_caption, load_captioner
from indexing.embed import embed
from indexing.shards import EmbedConfig
from vlsearch.app.cli import app
from vlsearch.core.errors import CollectionLockedError, PretrainedNotFoundError, TaggingError
from vlsearch.query.searcher import Searcher
from vlsearch.store.collection import Collection

TINY_COCA = "coca-tiny-test"
#: A CoCa of open_clip's coca_ViT-B-32 layout, one layer of width 32 (the real tokenizer's vocabulary).
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}
NAMES = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]


@pytest.fixture(scope="module")
def coca_checkpoint(tmp_path_factory):
    """The tiny CoCa registered through open_clip's registry, randomly initialised, saved as a file."""
    import open_clip
    import torch

    from vlsearch.models.factory import create_model, save_checkpoint

    folder = tmp_path_factory.mktemp("coca")
    (folder / f"{TINY_COCA}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(folder / f"{TINY_COCA}.json")
    torch.manual_seed(0)
    model, _ = create_model(TINY_COCA, None)
    return str(save_checkpoint(model, folder / "coca.pt", name=TINY_COCA))


@pytest.fixture
def coll(tmp_path, tiny_encoder) -> Collection:
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(NAMES):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(src / name)
    (src / "b.txt").write_text("a person's own caption\n")
    return embed(src, tmp_path / "c", EmbedConfig(model="vlsearch-tiny", workers=0, device="cpu"),
                 encoder=tiny_encoder)


def _config(ckpt: str, **kw) -> CaptionConfig:
    return CaptionConfig(**{"model": TINY_COCA, "pretrained": ckpt, "device": "cpu", "batch_size": 2,
                            "seq_len": 8, **kw})


def _captions(path) -> dict[str, tuple[list[str], str | None]]:
    table = Collection.open(path).read_table(columns=["path", "captions", "caption_model"]).to_pydict()
    return {p: (c, m) for p, c, m in zip(table["path"], table["captions"], table["caption_model"])}


def test_only_empty_captions_are_filled_and_marked_with_the_model(coll, coca_checkpoint):
    version = coll.manifest.version
    report = caption_collection(coll.path, _config(coca_checkpoint))
    assert (report.rows, report.generated, report.resumed, report.failures) == (5, 5, 0, [])
    assert report.version == version + 1 and not (coll.path / CHECKPOINT).exists()
    got = _captions(coll.path)
    assert got["b.png"] == (["a person's own caption"], None)
    for name in set(NAMES) - {"b.png"}:
        captions, model = got[name]
        assert len(captions) == 1 and captions[0].strip() and model.startswith(f"{TINY_COCA}/")
    hits = Searcher.open(coll.path).search_vector(Collection.open(coll.path).read_embeddings()[1][0], k=6, where="caption_model IS NULL")
    assert [h.path for h in hits] == ["b.png"]
    again = caption_collection(coll.path, _config(coca_checkpoint))
    assert (again.rows, again.version) == (0, None)  # nothing left empty


def test_an_image_gone_from_the_source_is_reported_and_left_uncaptioned(coll, coca_checkpoint, tmp_path):
    (tmp_path / "src" / "e.png").unlink()
    report = caption_collection(coll.path, _config(coca_checkpoint))
    assert (report.rows, report.generated) == (5, 4) and [p for p, _ in report.failures] == ["e.png"]
    assert _captions(coll.path)["e.png"] == ([], None)
    assert caption_collection(coll.path, _config(coca_checkpoint)).rows == 1  # a rerun tries it again


def test_overwrite_captions_every_row(coll, coca_checkpoint):
    caption_collection(coll.path, _config(coca_checkpoint, overwrite=True))
    captions, model = _captions(coll.path)["b.png"]
    assert model is not None and captions != ["a person's own caption"]


def test_an_interrupted_run_resumes_without_redoing_done_rows(coll, coca_checkpoint, monkeypatch):
    generated = []
    real = captioning.generate_captions
    monkeypatch.setattr(captioning, "generate_captions",
                        lambda model, images, config: generated.append(len(images)) or real(model, images, config))

    def stop_after_two_batches(done, total, **kw):
        if done >= 4:
            raise KeyboardInterrupt

    version = coll.manifest.version
    with pytest.raises(KeyboardInterrupt):
        caption_collection(coll.path, _config(coca_checkpoint), progress=stop_after_two_batches)
    assert generated == [2, 2] and Collection.open(coll.path).manifest.version == version
    lines = (coll.path / CHECKPOINT).read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["model"].startswith(TINY_COCA)
    with open(coll.path / CHECKPOINT, "a") as fh:
        fh.write('{"id": 1, "capt')  # a line torn by a kill
    before = {json.loads(line)["id"]: json.loads(line)["caption"] for line in lines[1:]}
    report = caption_collection(coll.path, _config(coca_checkpoint))
    assert (report.resumed, report.generated, generated) == (4, 1, [2, 2, 1])
    table = Collection.open(coll.path).read_table(columns=["id", "captions"]).to_pydict()
    by_id = dict(zip(table["id"], table["captions"]))
    assert all(by_id[i] == [c] for i, c in before.items()) and not (coll.path / CHECKPOINT).exists()


def test_a_second_run_meanwhile_is_refused(coll, coca_checkpoint):
    import threading

    from vlsearch.store.lock import CollectionLock

    held, release = threading.Event(), threading.Event()

    def other_run():  # another thread: the lock is re-entrant only in the thread holding it
        with CollectionLock(coll.path / captioning.CHECKPOINT_LOCK):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=other_run)
    thread.start()
    try:
        assert held.wait(60)
        with pytest.raises(CollectionLockedError, match="another caption run"):
            caption_collection(coll.path, _config(coca_checkpoint))
    finally:
        release.set()
        thread.join()
    assert caption_collection(coll.path, _config(coca_checkpoint)).generated == 5


def test_a_checkpoint_of_another_model_is_discarded(coll, coca_checkpoint):
    (coll.path / CHECKPOINT).write_text(json.dumps({"model": "other/x"}) + "\n"
                                        + json.dumps({"id": int(coll.read_embeddings()[0][0]), "caption": "stale"}))
    report = caption_collection(coll.path, _config(coca_checkpoint))
    assert report.resumed == 0 and report.generated == 5
    assert all(c != ["stale"] for c, _ in _captions(coll.path).values())


def test_bad_weights_and_models_are_typed_errors(coll, coca_checkpoint, tiny_checkpoint, monkeypatch):
    with pytest.raises(PretrainedNotFoundError, match="not a tag of coca-tiny-test"):
        load_captioner(_config("no-such-tag"))
    with pytest.raises(TaggingError, match="need trained weights"):
        load_captioner(_config(None))
    with pytest.raises(TaggingError, match="cannot write captions"):
        load_captioner(_config(str(tiny_checkpoint), model="vlsearch-tiny"))
    from open_clip import coca_model

    monkeypatch.setattr(coca_model, "_has_transformers", False)
    with pytest.raises(TaggingError, match="greedy"):
        caption_collection(coll.path, _config(coca_checkpoint, generation_type="beam_search"))
    assert Collection.open(coll.path).manifest.version == coll.manifest.version


def test_cli_caption(coll, coca_checkpoint):
    runner = CliRunner()
    result = runner.invoke(app, ["caption", str(coll.path), "--model", TINY_COCA, "--pretrained", "nope.pt",
                                 "--device", "cpu"])
    assert result.exit_code == 1 and "is not a tag of coca-tiny-test" in result.output
    result = runner.invoke(app, ["caption", str(coll.path), "--model", TINY_COCA, "--pretrained", coca_checkpoint,
                                 "--device", "cpu", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "5 of 5 photos captioned (0 from an interrupted run, 0 empty, 0 unreadable)" in result.output


def test_clean_caption():
    assert clean_caption("<start_of_text>a dog runs on the beach . <end_of_text>!!!!") == "a dog runs on the beach."
