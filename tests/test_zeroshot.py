"""Zero-shot classification: prototypes, folder labels, accuracy, collections, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from vlsearch.core.errors import SourceError
from vlsearch.models.factory import ModelInfo
from vlsearch.eval.zeroshot import DEFAULT_TEMPLATES, zero_shot_classifier, zero_shot_classify

pytestmark = pytest.mark.usefixtures("one_torch_thread")


RGB = {"red": (230, 20, 20), "green": (20, 210, 20), "blue": (20, 20, 230)}


class ColourEncoder:
    """A planted, trivially separable encoder: an image is its mean colour; a text mentioning a
    colour name is that colour's unit direction (plus a small template-dependent offset)."""

    info = ModelInfo("colour", None, 3)
    dim, image_size = 3, 8

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32).mean(axis=(0, 1)))

    def encode_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        v = pixels.numpy()
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def encode_texts(self, texts):
        out = []
        for t in texts:
            v = np.array([0.2 * len(t) % 1, 0.1, 0.1])  # template noise
            for i, name in enumerate(RGB):
                if name in t.lower():
                    v[i] += 3.0
            out.append(v / np.linalg.norm(v))
        return np.array(out, dtype=np.float32)


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, rgb in RGB.items():
        (root / name).mkdir()
        for i in range(4):
            noise = rng.integers(-20, 20, (16, 16, 3))
            Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


def test_prototypes_are_renormalised_means_of_normalised_template_embeddings(tiny_encoder):
    templates = ["a photo of a {}.", "a drawing of a {}.", "{}"]
    protos = zero_shot_classifier(tiny_encoder, ["cat", "dog"], templates)
    assert protos.shape == (2, tiny_encoder.dim) and protos.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0, atol=1e-5)
    emb = tiny_encoder.encode_texts([t.format("dog") for t in templates])
    mean = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).mean(axis=0)
    np.testing.assert_allclose(protos[1], mean / np.linalg.norm(mean), atol=1e-5)
    with pytest.raises(ValueError, match="'\\{\\}'"):
        zero_shot_classifier(tiny_encoder, ["cat", "dog"], ["no slot"])
    with pytest.raises(ValueError, match="2 non-empty"):
        zero_shot_classifier(tiny_encoder, ["cat"])


def test_class_folders_give_labels_and_a_planted_signal_is_classified(colour_folder):
    result = zero_shot_classify(ColourEncoder(), colour_folder)
    assert result.classnames == ["blue", "green", "red"]  # sub-folder names, sorted
    assert len(result.paths) == 12 and len(result.failures) == 1 and "broken" in result.failures[0][0]
    assert result.top1 == 1.0 and result.top5 == 1.0  # chance would be 1/3
    assert result.per_class_accuracy() == {"blue": 1.0, "green": 1.0, "red": 1.0}
    assert result.topk.shape == (12, 3) and result.scores.shape == (12, 3)
    # Given class names may differ in case/underscores from the folder names; order is theirs.
    named = zero_shot_classify(ColourEncoder(), colour_folder, classnames=["Red", "Green", "Blue"])
    assert named.top1 == 1.0 and named.predicted_names()[0] == "Blue"
    with pytest.raises(ValueError, match="not one of the classes"):
        zero_shot_classify(ColourEncoder(), colour_folder, classnames=["red", "green"])


def test_class_folders_are_walked_recursively_in_path_order_without_hidden_files(colour_folder, tmp_path):
    import shutil

    root = tmp_path / "classes"
    shutil.copytree(colour_folder, root)
    (root / "blue" / "deep" / "er").mkdir(parents=True)
    shutil.copy(root / "blue" / "0.png", root / "blue" / "deep" / "er" / "5.png")
    shutil.copy(root / "blue" / "0.png", root / "blue" / "deep" / "4.PNG")
    shutil.copy(root / "blue" / "0.png", root / "blue" / ".hidden.png")
    (root / "blue" / "notes.txt").write_text("not an image")
    (root / "blue" / "gone.png").symlink_to(root / "missing.png")  # a broken link is not an image
    result = zero_shot_classify(ColourEncoder(), root)
    blue = [Path(p).relative_to(root).as_posix() for p in result.paths if p.startswith(str(root / "blue"))]
    assert blue == ["blue/0.png", "blue/1.png", "blue/2.png", "blue/3.png", "blue/deep/4.PNG", "blue/deep/er/5.png"]
    assert result.top1 == 1.0 and len(result.paths) == 14  # 4 red (+1 broken, in failures), 4 green, 6 blue
    assert [Path(p).name for p, _ in result.failures] == ["broken.jpg"]


def test_image_list_without_labels_and_with_labels(colour_folder):
    images = [Image.new("RGB", (8, 8), RGB["green"]), colour_folder / "red" / "0.png"]
    result = zero_shot_classify(ColourEncoder(), images, ["red", "green", "blue"])
    assert result.predicted_names() == ["green", "red"] and result.top1 is None
    labelled = zero_shot_classify(ColourEncoder(), images, ["red", "green", "blue"], labels=["green", "blue"])
    assert labelled.top1 == 0.5
    with pytest.raises(SourceError, match="class names"):
        zero_shot_classify(ColourEncoder(), images)


def test_real_tiny_encoder_on_class_folders(tiny_encoder, colour_folder):
    result = zero_shot_classify(tiny_encoder, colour_folder, templates=DEFAULT_TEMPLATES[:2], batch_size=5)
    assert len(result.predictions) == 12 and 0.0 <= result.top1 <= 1.0 and result.top5 == 1.0
    np.testing.assert_allclose(result.scores.max(axis=1), result.scores[np.arange(12), result.predictions])


def test_collection_embeddings_are_classified_without_reencoding(tmp_path):
    from vlsearch.store.collection import Collection
    from vlsearch.store.manifest import Manifest
    from vlsearch.store.arrays import embedding_array

    coll = Collection.create(tmp_path / "coll", Manifest(model=ColourEncoder.info))
    vecs = np.array([[0.9, 0.1, 0.1], [0.1, 0.1, 0.9]], dtype=np.float32)
    coll.write_shard(0, pa.table({"id": pa.array([7, 9], pa.int64()), "path": ["a.png", "b.png"],
                                  "embedding": embedding_array(vecs)}))
    result = zero_shot_classify(ColourEncoder(), tmp_path / "coll", ["red", "green", "blue"])
    assert result.paths == ["a.png", "b.png"] and result.predicted_names() == ["red", "blue"]


def test_cli_classify(colour_folder, tiny_checkpoint):
    from typer.testing import CliRunner

    from vlsearch.app.cli import app

    args = ["classify", str(colour_folder), "--model", "vlsearch-tiny", "--pretrained", str(tiny_checkpoint)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output and "12 images" in result.output
    result = CliRunner().invoke(app, [*args[:2], "--classes", "red,green,blue", *args[2:], "--templates", "a {} thing"])
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output
    result = CliRunner().invoke(app, ["classify", str(colour_folder / "red"), "--classes", "red,blue", *args[2:]])
    assert result.exit_code == 0 and "0.png\t" in result.output
    result = CliRunner().invoke(app, ["classify", str(colour_folder / "red")] + args[2:])
    assert result.exit_code == 1 and "class names" in result.output
