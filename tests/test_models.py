from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlsearch.core.errors import (
    CheckpointMismatchError,
    ModelNotFoundError,
    PretrainedNotFoundError,
    WeightsUnavailableError,
)
from vlsearch.models.factory import TINY_MODEL, available_models, load_model, save_checkpoint


def _image(color=(200, 30, 30), size=(90, 70)) -> Image.Image:
    img = Image.new("RGB", size, color)
    img.paste((20, 20, 220), (10, 10, 40, 40))
    return img


def test_tiny_model_is_registered_and_small():
    assert TINY_MODEL in available_models()
    enc = load_model(TINY_MODEL, device="cpu")
    n_params = sum(p.numel() for p in enc.model.parameters())
    assert n_params < 5_000_000
    assert 64 <= enc.dim <= 128


def test_embeddings_are_float32_unit_norm(tiny_encoder):
    imgs = tiny_encoder.encode_images([_image(), _image((0, 200, 0))], batch_size=1)
    txts = tiny_encoder.encode_texts(["a red square", "a green field", "x" * 1000])
    assert imgs.shape == (2, tiny_encoder.dim) and txts.shape == (3, tiny_encoder.dim)
    assert imgs.dtype == np.float32 and txts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(imgs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txts, axis=1), 1.0, atol=1e-5)


def test_batching_does_not_change_results(tiny_encoder):
    texts = [f"caption number {i}" for i in range(7)]
    np.testing.assert_allclose(
        tiny_encoder.encode_texts(texts, batch_size=2), tiny_encoder.encode_texts(texts, batch_size=100), atol=1e-5
    )


def test_encoding_is_deterministic(tiny_encoder):
    a = tiny_encoder.encode_images([_image()])
    b = tiny_encoder.encode_images([_image()])
    np.testing.assert_array_equal(a, b)


def test_image_inputs_in_all_three_forms_agree(tiny_encoder, tmp_path):
    img = _image()
    path = tmp_path / "q.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    vecs = tiny_encoder.encode_images([img, path, str(path), buf.getvalue()])
    for v in vecs[1:]:
        np.testing.assert_array_equal(vecs[0], v)


def test_checkpoint_round_trip_is_exact(tiny_encoder, tmp_path):
    path = save_checkpoint(tiny_encoder, tmp_path / "copy.pt")
    again = load_model(TINY_MODEL, pretrained=path, device="cpu")
    assert again.pretrained == str(path.resolve())
    for (k1, v1), (k2, v2) in zip(tiny_encoder.model.state_dict().items(), again.model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    np.testing.assert_array_equal(tiny_encoder.encode_texts(["a dog"]), again.encode_texts(["a dog"]))


def test_half_checkpoint_is_smaller_and_close(tiny_encoder, tmp_path):
    full = save_checkpoint(tiny_encoder, tmp_path / "full.pt")
    half = save_checkpoint(tiny_encoder, tmp_path / "half.pt", half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    again = load_model(TINY_MODEL, pretrained=half, device="cpu")
    a, b = tiny_encoder.encode_texts(["a cat"]), again.encode_texts(["a cat"])
    assert float((a @ b.T)[0, 0]) > 0.999


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelNotFoundError, match="ViT-B-32"):
        load_model("ViT-B-3")


def test_bad_pretrained_tag_lists_valid_tags():
    with pytest.raises(PretrainedNotFoundError, match="laion2b_s34b_b79k"):
        load_model("ViT-B-32", pretrained="no_such_tag")


def test_known_tag_offline_says_how_to_get_weights():
    with pytest.raises(WeightsUnavailableError, match="--pretrained PATH"):
        load_model("RN50", pretrained="openai")


def test_hf_hub_id_offline_is_weights_unavailable():
    with pytest.raises(WeightsUnavailableError, match="hf-hub:"):
        load_model(TINY_MODEL, pretrained="hf-hub:nobody/no-such-repo")


def test_checkpoint_of_other_architecture_is_refused(tmp_path):
    other = torch.nn.Linear(3, 3)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "linear.pt")
    with pytest.raises(CheckpointMismatchError, match="does not fit"):
        load_model(TINY_MODEL, pretrained=tmp_path / "linear.pt")


def test_garbage_checkpoint_is_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointMismatchError):
        load_model(TINY_MODEL, pretrained=tmp_path / "junk.pt")


def test_encode_texts_rejects_a_bare_string(tiny_encoder):
    with pytest.raises(TypeError):
        tiny_encoder.encode_texts("a dog")
