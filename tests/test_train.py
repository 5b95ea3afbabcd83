"""Contrastive training: the loss, the temperature clamp, learning, resume, locked towers."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vlsearch.core.errors import TrainingError
from vlsearch.models.towers import text_backbone, text_head, trim_padding
from vlsearch.train.locks import lock_hf_text
from vlsearch.train.loop import _Run, train
from vlsearch.train.loss import MAX_LOGIT_SCALE, clip_loss
from vlsearch.train.optim import Optimization
from vlsearch.train.config import TrainConfig
from vlsearch.train.data import epoch_order, read_pairs, split_images

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ("circle", "square")


def make_shapes(root: Path, n: int, size: int = 64, seed: int = 0, broken: bool = False) -> Path:
    """n coloured shapes on dark noise, 2 captions each ("a red circle", ...); returns the manifest."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        color, shape = list(COLORS)[i % 4], SHAPES[(i // 4) % 2]
        img = Image.fromarray(rng.integers(0, 60, (size, size, 3), dtype=np.uint8))
        r = int(rng.integers(size // 5, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
        img.save(root / "images" / f"{i}.png")
        rows += [(f"images/{i}.png", f"a {color} {shape}"), (f"images/{i}.png", f"a photo of a {color} {shape}")]
    if broken:
        (root / "images" / "broken.png").write_bytes(b"not a png at all")
        rows.append(("images/broken.png", "a broken picture"))
    manifest = root / "captions.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "caption"), *rows])
    return manifest


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), 24, broken=True)


FAST = TrainConfig(epochs=1, batch_size=8, lr=2e-3, warmup_steps=2, augment=None, val_fraction=0.0,
                   workers=0, checkpoint_every=0, threads=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_clip_loss_matches_hand_computed_3x3():
    # Images e1, e2, e3; texts e1, e1, e3 (text 2 is wrong: it equals text 1); logit scale 1.
    # Logits (image rows x text columns): [[1,1,0], [0,0,0], [0,0,1]].
    # image->text CE per row: -log(e/(2e+1)) = 0.86201, -log(1/3) = 1.09861, -log(e/(e+2)) = 0.55144
    #   mean 0.83735
    # text->image CE per column: -log(e/(e+2)) = 0.55144, -log(1/(e+2)) = 1.55144, 0.55144
    #   mean 0.88477
    # loss = (0.83735 + 0.88477) / 2 = 0.86106
    images = torch.eye(3)
    texts = torch.stack([torch.eye(3)[0], torch.eye(3)[0], torch.eye(3)[2]])
    e = math.e
    i2t = (-math.log(e / (2 * e + 1)) + math.log(3) - math.log(e / (e + 2))) / 3
    t2i = (-2 * math.log(e / (e + 2)) - math.log(1 / (e + 2))) / 3
    assert (i2t + t2i) / 2 == pytest.approx(0.86106, abs=1e-5)
    assert clip_loss(images, texts, 1.0).item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    # Perfect pairs with scale 2: each side is -log(e^2 / (e^2 + 2)) = log(1 + 2e^-2) = 0.23954.
    assert clip_loss(torch.eye(3), torch.eye(3), torch.tensor(2.0)).item() == pytest.approx(0.23954, abs=1e-5)
    with pytest.raises(ValueError):
        clip_loss(torch.eye(3), torch.eye(2), 1.0)


def _previous_clip_loss(image_features, text_features, logit_scale):
    """The loss vlsearch computed by hand before it called open_clip's ClipLoss."""
    logits_per_image = logit_scale * image_features.float() @ text_features.float().T
    labels = torch.arange(logits_per_image.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def test_clip_loss_is_the_previous_formula_in_float32_also_under_autocast():
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(16, 32, generator=gen), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(16, 32, generator=gen), dim=-1).requires_grad_()
    scale = torch.tensor(1 / 0.07)
    got, want = clip_loss(images, texts, scale), _previous_clip_loss(images, texts, scale)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(got, (images, texts))
    torch.testing.assert_close(grads, torch.autograd.grad(want, (images, texts)), rtol=1e-5, atol=1e-7)
    # Training's bf16 autocast: features come out of the towers in bf16; the loss stays a float32 one.
    half_images, half_texts = images.detach().bfloat16(), texts.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = clip_loss(half_images, half_texts, scale)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, _previous_clip_loss(half_images, half_texts, scale), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("warmup, total", [(0, 7), (2, 10), (5, 5), (8, 3), (100, 1000)])
def test_learning_rate_per_step_is_the_previous_warmup_cosine(warmup, total):
    def previous(step: int) -> float:  # the closed form vlsearch applied through LambdaLR before
        if step < warmup:
            return (step + 1) / warmup
        decay = max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / decay)))

    model = torch.nn.Linear(3, 2)
    optim = Optimization(model, replace(FAST, lr=0.003, warmup_steps=warmup), total, torch.device("cpu"),
                         scale_gradients=False)
    seen = []
    for step in range(total):
        optim.step(model(torch.ones(1, 3)).sum(), step)
        seen.append([g["lr"] for g in optim.optimizer.param_groups])
    want = [[0.003 * previous(step)] * 2 for step in range(total)]
    np.testing.assert_allclose(seen, want, rtol=1e-12, atol=0)


def test_read_pairs_reads_tsv_and_captions_with_newlines(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text('image\tcaption\n007.png\t"a red circle,\nin two lines"\n007.png\ta circle\nb.png\t"a, b"\n')
    pairs = read_pairs(tsv)
    assert pairs.images == ["007.png", "b.png"]  # read as text: not the number 7
    assert pairs.captions == ["a red circle,\nin two lines", "a circle", "a, b"]
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('image,caption\na.png,"two\nlines"\nb.png,one\n')
    assert read_pairs(csv_file).captions == ["two\nlines", "one"]


def test_read_pairs_groups_captions_by_image(shapes):
    pairs = read_pairs(shapes.parent)  # a folder with captions.csv works too
    assert len(pairs.images) == 25 and len(pairs.captions) == 49
    assert pairs.captions[pairs.starts[3] : pairs.starts[4]] == ["a yellow circle", "a photo of a yellow circle"]
    assert (pairs.caption_image[pairs.starts[3] : pairs.starts[4]] == 3).all()


def test_read_pairs_errors(tmp_path):
    with pytest.raises(TrainingError, match="not found"):
        read_pairs(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\na.png,hello\n")
    with pytest.raises(TrainingError, match="caption"):
        read_pairs(bad)
    with pytest.raises(TrainingError, match="without a manifest"):
        read_pairs(tmp_path)


def test_split_and_epoch_order_are_seeded_and_batches_have_unique_images(shapes):
    pairs = read_pairs(shapes)
    train_idx, val_idx = split_images(len(pairs.images), 0.2, seed=3)
    assert len(val_idx) == 5 and not set(train_idx) & set(val_idx)
    assert (split_images(len(pairs.images), 0.2, seed=3)[1] == val_idx).all()
    order, captions = epoch_order(train_idx, pairs, seed=0, epoch=1)
    assert sorted(order) == sorted(train_idx) and len(set(order)) == len(order)  # each image once per epoch
    assert (pairs.caption_image[captions] == order).all()
    again = epoch_order(train_idx, pairs, seed=0, epoch=1)
    assert (again[0] == order).all() and (again[1] == captions).all()
    assert not (epoch_order(train_idx, pairs, seed=0, epoch=2)[0] == order).all()


def test_logit_scale_initialised_and_clamped(shapes, tmp_path):
    run = _Run(read_pairs(shapes), tmp_path, FAST)
    assert run.model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-5)
    with torch.no_grad():
        run.model.logit_scale.fill_(math.log(1000.0))
    images, ids = torch.randn(4, 3, 64, 64), torch.tensor([0, 2, 4, 6])
    run.train_step(images, ids)
    assert run.model.logit_scale.item() <= MAX_LOGIT_SCALE + 1e-6
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100))


def test_weight_decay_groups_exclude_biases_norms_and_logit_scale(shapes, tmp_path):
    run = _Run(read_pairs(shapes), tmp_path, FAST)
    decay = {id(p) for g in run.optim.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in run.model.named_parameters() if id(p) in decay}
    assert names and all(run.model.get_parameter(n).ndim >= 2 for n in names)
    assert "logit_scale" not in names and not any("bias" in n or ".ln" in n for n in names)


def test_training_lowers_loss_skips_broken_image_and_loads(shapes, tmp_path, caplog):
    from vlsearch.models.factory import TINY_MODEL, load_model

    seen = []
    config = replace(FAST, epochs=6, val_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="vlsearch.train.loop"):
        result = train(shapes, tmp_path / "run", config, progress=lambda s, t, **kw: seen.append((s, t, kw)))
    assert result.steps == 6 * 2 and len(result.losses) == result.steps  # 20 train images / 8 = 2 steps/epoch
    assert [s for s, _, _ in seen] == list(range(1, 13)) and seen[-1][1] == 12
    assert set(seen[0][2]) == {"loss", "temperature"}
    first, last = np.nanmean(result.losses[:2]), np.nanmean(result.losses[-2:])
    assert last < first - 0.2, result.losses
    assert len(result.val) == 6 and result.val[-1]["t2i"]["R@10"] > 0
    if any("broken.png" in r.getMessage() for r in caplog.records):  # only when it landed in the train split
        assert any("skipping unreadable" in r.getMessage() for r in caplog.records)
    enc = load_model(TINY_MODEL, pretrained=result.checkpoint, device="cpu", precision="fp32")
    assert torch.allclose(enc.model.logit_scale, torch.load(result.checkpoint)["state_dict"]["logit_scale"].float())
    with pytest.raises(TrainingError, match="resume"):
        train(shapes, tmp_path / "run", config)


class _Interrupt(Exception):
    pass


def test_resume_continues_the_exact_step_count(shapes, tmp_path):
    config = replace(FAST, epochs=2, checkpoint_every=2)  # 2 epochs x 3 steps (24 images, no val)
    full = train(shapes, tmp_path / "full", config)

    def stop_at_5(step, total, **_):
        if step == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(shapes, tmp_path / "cut", config, progress=stop_at_5)
    steps = []
    resumed = train(shapes, tmp_path / "cut", config, resume=True, progress=lambda s, t, **_: steps.append(s))
    assert steps == [5, 6]  # last.pt was written at step 4, mid-epoch 2
    assert resumed.steps == full.steps == 6
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-4)


def test_lock_text_freezes_text_tower_and_precompute_gives_the_same_loss(shapes, tmp_path):
    pairs = read_pairs(shapes)
    locked = replace(FAST, lock_text=True, precompute_text=False)
    plain = _Run(pairs, tmp_path / "a", locked)
    calls = []
    cached = _Run(pairs, tmp_path / "b", replace(locked, precompute_text=True), lambda *a, **kw: calls.append((a, kw)))
    assert cached.text.features is not None and plain.text.features is None
    assert calls[-1] == ((49, 49), {"stage": "text"})
    assert (tmp_path / "b" / "text_features.pt").is_file()
    images, ids = torch.randn(6, 3, 64, 64), torch.tensor([0, 3, 5, 8, 11, 13])
    assert plain.loss(images, ids).item() == pytest.approx(cached.loss(images, ids).item(), abs=1e-5)

    text_before = {n: p.detach().clone() for n, p in plain.model.named_parameters() if not n.startswith("visual")}
    visual_before = plain.model.visual.conv1.weight.detach().clone()
    plain.train_step(images, ids)
    cached.train_step(images, ids)
    for name, before in text_before.items():
        if name != "logit_scale":
            assert torch.equal(plain.model.get_parameter(name), before), name
    assert not torch.equal(plain.model.visual.conv1.weight, visual_before)
    torch.testing.assert_close(plain.model.visual.conv1.weight, cached.model.visual.conv1.weight, rtol=1e-4, atol=1e-6)


def test_unlocked_text_layers_and_config_validation(shapes, tmp_path):
    run = _Run(read_pairs(shapes), tmp_path, replace(FAST, lock_text=True, lock_text_unlocked_layers=1))
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("transformer.resblocks.1.") for n in trainable)
    assert not any(n.startswith("transformer.resblocks.0.") or n == "token_embedding.weight" for n in trainable)
    assert run.text.features is None and run.text.states is None  # a built-in tower runs every step
    with pytest.raises(ValueError, match="precompute_text"):
        TrainConfig(precompute_text=True)  # nothing locked to precompute
    with pytest.raises(TrainingError, match="Hugging Face"):  # token states below unlocked layers: HF towers only
        _Run(read_pairs(shapes), tmp_path / "b", replace(FAST, lock_text=True, lock_text_unlocked_layers=1,
                                                         precompute_text=True))
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)


def test_hf_text_tower_split_keeps_projection_trainable(tmp_path):
    import transformers
    from open_clip.hf_model import HFTextEncoder

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    cfg.save_pretrained(tmp_path)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text = HFTextEncoder(str(tmp_path), output_dim=8, pooler_type="mean_pooler", proj_type="linear",
                                      pretrained=False)

    model = Tiny().eval()
    tokens = torch.tensor([[2, 7, 9, 3, 0, 0, 0, 0], [2, 5, 3, 0, 0, 0, 0, 0]])
    assert trim_padding(model, tokens).shape == (2, 4)
    with torch.no_grad():  # the split, with padding trimmed, equals the full tower on padded tokens
        torch.testing.assert_close(text_head(model, text_backbone(model, tokens)), model.text(tokens))
    lock_hf_text(model.text, 0)
    assert model.text.proj.weight.requires_grad
    assert not any(p.requires_grad for p in model.text.transformer.parameters())
    lock_hf_text(model.text, 1)  # open_clip 3.3's own HF lock fails on BERT for partial unlocking
    layers = model.text.transformer.encoder.layer
    assert all(p.requires_grad for p in layers[1].parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert not any(p.requires_grad for p in model.text.transformer.embeddings.parameters())
    with pytest.raises(TrainingError, match="has 2 layers"):
        lock_hf_text(model.text, 3)


def test_cli_train(shapes, tmp_path):
    from typer.testing import CliRunner

    from vlsearch.app.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["train", str(shapes), str(out), "--epochs", "1", "--batch-size", "8",
                                      "--no-augment", "--workers", "0", "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    assert (out / "model.pt").is_file() and "model.pt" in result.output
    result = CliRunner().invoke(app, ["train", str(tmp_path / "missing.csv"), str(tmp_path / "x")])
    assert result.exit_code == 1 and "not found" in result.output


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_runs_through_autocast_and_grad_scaler(shapes, tmp_path, precision):
    # On CPU here; the same code path (autocast + GradScaler for fp16, unscale before clipping)
    # is what runs on a GPU.
    run = _Run(read_pairs(shapes), tmp_path, replace(FAST, precision=precision, device="cpu"))
    assert run.optim.scaler.is_enabled() == (precision == "fp16")
    before = run.model.visual.conv1.weight.detach().clone()
    loss = run.train_step(torch.randn(4, 3, 64, 64), torch.tensor([0, 2, 4, 6]))
    assert math.isfinite(loss) and not torch.equal(before, run.model.visual.conv1.weight)
    assert run.model.visual.conv1.weight.dtype == torch.float32  # master weights stay fp32
