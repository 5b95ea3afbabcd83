"""Bad input: every kind of garbage a real gallery holds is indexed or refused with its reason."""

from __future__ import annotations

import io
import multiprocessing
import os
import resource
import signal
import struct
import time
import zlib
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from indexing import decode
from indexing.decode import (MAX_AUTO_WORKERS, decode_batches, decode_record, decode_task_size, default_workers,
                             stack_pixels)
from indexing.embed import EmbedConfig, embed
from vlsearch.data.sources import ImageRecord, content_hash, file_stat, open_source
from vlsearch.core.errors import DecodeError, DecodeHangError


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a 10-gigapixel image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _rgb(size=(24, 16), color=(30, 160, 90)) -> Image.Image:
    return Image.new("RGB", size, color)


GOOD = {  # file name -> (bytes, recorded upright (width, height))
    "png-named.jpg": (_save(_rgb(), "PNG"), (24, 16)),
    "cmyk.jpg": (_save(Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG"), (20, 10)),
    "sixteen-bit.png": (_save(Image.fromarray(np.arange(200, dtype=np.uint16).reshape(10, 20) * 300), "PNG"), (20, 10)),
    "grayscale.jpg": (_save(Image.new("L", (12, 12), 90), "JPEG"), (12, 12)),
    "one-pixel.png": (_save(_rgb((1, 1)), "PNG"), (1, 1)),
    "with space.jpg": (_save(_rgb(), "JPEG"), (24, 16)),
    "ünïcødé 图片.jpg": (_save(_rgb(), "JPEG"), (24, 16)),
}
BAD = {  # file name -> (bytes, failure kind)
    "zero.jpg": (b"", "empty"),
    "truncated.jpg": (_save(_rgb((64, 64)), "JPEG")[:300], "corrupt"),
    "random.jpg": (np.random.default_rng(0).bytes(2048), "unidentified"),
    "text.png": (b"I am a text file, not a PNG\n", "unidentified"),
    "bomb.png": (_bomb_png(), "bomb"),
}


def _palette_png() -> bytes:
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    return _save(img, "PNG", transparency=0)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return _save(_rgb((40, 20)), "JPEG", exif=exif)


def _animated_gif() -> bytes:
    frames = [Image.new("P", (10, 8), i) for i in (1, 2, 3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    for name, (data, _) in {**GOOD, **BAD}.items():
        (root / name).write_bytes(data)
    (root / "palette-alpha.png").write_bytes(_palette_png())
    (root / "exif-rotated.jpg").write_bytes(_exif_rotated_jpeg())
    (root / "animated.gif").write_bytes(_animated_gif())
    with open(os.path.join(os.fsencode(root), b"latin1-\xe9.jpg"), "wb") as f:
        f.write(_save(_rgb(), "JPEG"))
    os.symlink(root / "does-not-exist.jpg", root / "broken-link.jpg")
    os.mkfifo(root / "fifo.jpg")  # reading it would block forever
    return root


@pytest.fixture(scope="module")
def embedded(gallery, tiny_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("coll") / "c"
    return embed(gallery, out, EmbedConfig(workers=1, batch_size=4, shard_size=8, decode_timeout=10),
                 encoder=tiny_encoder)


def test_every_good_file_is_indexed_upright_as_rgb(embedded):
    rows = {r["path"]: r for r in embedded.read_table("images", ["path", "width", "height"]).to_pylist()}
    expected = {name: size for name, (_, size) in GOOD.items()}
    expected.update({"palette-alpha.png": (10, 10), "exif-rotated.jpg": (20, 40), "animated.gif": (10, 8),
                     "latin1-\\xe9.jpg": (24, 16)})
    assert {p: (r["width"], r["height"]) for p, r in rows.items()} == expected


def test_every_refused_file_is_in_the_failures_table_with_its_reason(embedded):
    failures = {r["path"]: (r["kind"], r["message"]) for r in embedded.failures().to_pylist()}
    expected = {name: kind for name, (_, kind) in BAD.items()}
    expected.update({"broken-link.jpg": "broken-symlink", "fifo.jpg": "not-a-file"})
    assert {p: k for p, (k, _) in failures.items()} == expected
    assert all(message for _, message in failures.values())
    assert "exceeds" in failures["bomb.png"][1]
    counts = embedded.manifest.counts
    assert counts["failures"] == len(expected) and counts["images"] == len(GOOD) + 4 and embedded.manifest.complete


def test_decompression_bomb_is_refused_before_allocating(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_bomb_png())
    rec = ImageRecord(1, "bomb.png", str(tmp_path / "bomb.png"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DecodeError) as info:
        decode_record(rec, lambda img: img)
    assert info.value.kind == "bomb"
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100  # decoding it would take 30 GB


def test_large_jpeg_is_drafted_but_records_its_full_size(tmp_path):
    (tmp_path / "big.jpg").write_bytes(_save(_rgb((1600, 1200)), "JPEG"))
    rec = ImageRecord(1, "big.jpg", str(tmp_path / "big.jpg"))
    pixels, size, *_ = decode_record(rec, lambda img: img, draft_size=128)
    assert size == (1600, 1200)
    assert pixels.size == (200, 150)  # DCT-scaled by 1/8 while decoding, still >= 128 a side


def test_drafted_decode_gives_the_model_the_same_upright_input(tmp_path, tiny_encoder):
    """A camera-sized, EXIF-rotated JPEG: DCT-domain draft (2x the model input) changes neither the
    preprocessed tensor's shape nor its orientation, and its pixels only by resampling noise."""
    h, w = 1500, 2400  # stored landscape, EXIF orientation 6: shown portrait
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "cam.jpg").write_bytes(_save(Image.fromarray(pixels), "JPEG", quality=92, exif=exif.tobytes()))
    rec = ImageRecord(1, "cam.jpg", str(tmp_path / "cam.jpg"))
    full, size_full, *_ = decode_record(rec, tiny_encoder.preprocess, draft_size=None)
    drafted, size_drafted, *_ = decode_record(rec, tiny_encoder.preprocess, draft_size=2 * tiny_encoder.image_size)
    assert size_full == size_drafted == (h, w)  # upright original size, recorded before the draft
    assert drafted.shape == full.shape == (3, tiny_encoder.image_size, tiny_encoder.image_size)
    assert (drafted - full).abs().mean() < 0.05  # normalised units: resampling noise only
    # upright: after rotating 90 degrees clockwise, red (the stored x gradient) grows top to bottom
    assert drafted[0, -1].mean() > drafted[0, 0].mean() + 1 and full[0, -1].mean() > full[0, 0].mean() + 1
    img, _ = decode.open_record(rec, draft_size=2 * tiny_encoder.image_size)
    assert min(img.size) < h and min(img.size) >= 2 * tiny_encoder.image_size  # really DCT-scaled


_real_open_record = decode.open_record


def _hanging_on(marker: str, body: Callable[[], None]) -> Callable[..., Any]:
    """decode.open_record, except records whose path holds ``marker`` run ``body`` (a hang) first."""
    def open_record(record, **kwargs):
        if marker in record.path:
            body()
        return _real_open_record(record, **kwargs)
    return open_record


def _sleep_30_s() -> None:  # a slow decoder the per-image alarm interrupts
    time.sleep(30)


def _stuck_in_c() -> None:
    # A decoder stuck inside C code: the per-image SIGALRM never gets to run its handler.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(60)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_hanging_decode_is_bounded_by_the_timeout(tmp_path, monkeypatch, workers):
    (tmp_path / "ok.jpg").write_bytes(_save(_rgb(), "JPEG"))
    monkeypatch.setattr(decode, "open_record", _hanging_on("slow", _sleep_30_s))  # inherited by the forked worker
    monkeypatch.setenv("VLSEARCH_DECODE_NICE", "0")  # the good images must not starve on a loaded machine
    recs = [ImageRecord(i, f"{'slow' if i < 2 else 'ok'}{i}.jpg", str(tmp_path / "ok.jpg")) for i in range(4)]
    slow, after = decode_batches(recs, lambda img: torch.zeros(3, 4, 4), batch_size=2, workers=workers, timeout=0.3)
    assert slow.ok == [] and [(i, k) for i, k, _ in slow.failures] == [(0, "timeout"), (1, "timeout")]
    assert after.ok == [2, 3] and after.failures == []  # the same process decodes on after the timeouts


def test_a_decode_the_alarm_cannot_interrupt_fails_the_batch_with_its_images(tmp_path, monkeypatch):
    (tmp_path / "ok.jpg").write_bytes(_save(_rgb(), "JPEG"))
    monkeypatch.setattr(decode, "open_record", _hanging_on("stuck", _stuck_in_c))
    monkeypatch.setenv("VLSEARCH_DECODE_NICE", "0")  # the good batch must not starve on a loaded machine
    recs = [ImageRecord(i, f"{'stuck' if i >= 2 else 'ok'}{i}.jpg", str(tmp_path / "ok.jpg")) for i in range(4)]
    options = dict(batch_size=2, workers=1, timeout=1.0, hang_timeout=5)
    batches = decode_batches(recs, lambda img: torch.zeros(3, 4, 4), **options)
    assert next(batches).ok == [0, 1]  # a good batch passes
    with pytest.raises(DecodeHangError, match=r"batch 1 \(images 2-3\).*stuck2\.jpg, stuck3\.jpg"):
        next(batches)
    # The job gave up: its loader stops the stuck worker (SIGTERM at the latest, not awaited), well
    # before the worker's 60 s hang would end by itself.
    for child in multiprocessing.active_children():
        child.join(timeout=30)
    assert multiprocessing.active_children() == []
    (again,) = decode_batches(recs[:2], lambda img: torch.zeros(3, 4, 4), **options)
    assert again.ok == [0, 1]  # the next job's worker decodes


def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(DecodeError) as info:
        decode_record(ImageRecord(1, "pipe.jpg", str(tmp_path / "pipe.jpg")), lambda img: img, timeout=None)
    assert info.value.kind == "not-a-file"


def test_decode_batches_keeps_order_and_failures(tmp_path):
    good = _save(_rgb(), "JPEG")
    recs = []
    for i in range(7):
        (tmp_path / f"{i}.jpg").write_bytes(good if i % 3 else b"")
        recs.append(ImageRecord(i, f"{i}.jpg", str(tmp_path / f"{i}.jpg")))
    src_order = [r.path for r in open_source(tmp_path)]
    assert src_order == [f"{i}.jpg" for i in range(7)]
    batches = list(decode_batches(recs, lambda img: torch.ones(3, 2, 2), batch_size=3, workers=2))
    assert [b.ok for b in batches] == [[1, 2], [4, 5], []]
    assert [[i for i, _, _ in b.failures] for b in batches] == [[0], [3], [6]]
    assert batches[0].pixels.shape == (2, 3, 2, 2) and batches[0].sizes == [(24, 16)] * 2


def test_decode_workers_return_each_decoded_files_stat_and_hash(tmp_path):
    """The encoding process gets (file_stat, content_hash) from the workers instead of re-reading files."""
    recs = []
    for i in range(5):
        (tmp_path / f"{i}.jpg").write_bytes(_save(_rgb(), "JPEG") if i != 2 else b"broken")
        recs.append(ImageRecord(i, f"{i}.jpg", str(tmp_path / f"{i}.jpg")))
    batches = list(decode_batches(recs, lambda img: torch.ones(3, 2, 2), batch_size=3, workers=1))
    assert [b.ok for b in batches] == [[0, 1], [3, 4]]
    for b in batches:
        assert b.files == [(file_stat(recs[i]), content_hash(recs[i])) for i in b.ok]


def test_decode_workers_run_at_lower_priority_than_the_encoder(tmp_path, monkeypatch):
    monkeypatch.delenv("VLSEARCH_DECODE_NICE", raising=False)
    (tmp_path / "ok.jpg").write_bytes(_save(_rgb(), "JPEG"))
    recs = [ImageRecord(i, f"ok{i}.jpg", str(tmp_path / "ok.jpg")) for i in range(2)]
    mine = os.nice(0)
    (batch,) = list(decode_batches(recs, lambda img: torch.full((1,), float(os.nice(0))), batch_size=2, workers=1))
    assert batch.pixels.ravel().tolist() == [float(min(19, mine + decode.DECODE_NICE))] * 2
    assert os.nice(0) == mine  # the encoding process keeps its priority
    (batch,) = list(decode_batches(recs, lambda img: torch.full((1,), float(os.nice(0))), batch_size=2, workers=0))
    assert batch.pixels.ravel().tolist() == [float(mine)] * 2  # in-process decoding is not reniced
    monkeypatch.setenv("VLSEARCH_DECODE_NICE", "0")  # a shared machine: decode at the encoder's priority
    (batch,) = list(decode_batches(recs, lambda img: torch.full((1,), float(os.nice(0))), batch_size=2, workers=1))
    assert batch.pixels.ravel().tolist() == [float(mine)] * 2


def test_decode_tasks_split_batches_only_when_there_are_fewer_batches_than_workers():
    assert decode_task_size(256, 15, 100_000) == 256  # enough batches for every worker: whole batches
    assert decode_task_size(256, 15, 1000) == 64  # 4 batches, 15 workers: 16 tasks of 64
    assert decode_task_size(64, 2, 64) == 32
    assert decode_task_size(100, 8, 200) == 25  # largest divisor of 100 <= 100 * 2 // 8
    assert decode_task_size(64, 1, 10) == 64 and decode_task_size(64, 0, 10) == 64  # one worker / in-process
    assert decode_task_size(61, 8, 61) == 61  # a prime batch would split into single images: kept whole
    assert decode_task_size(6, 8, 6) == 6  # tasks under MIN_TASK images are not worth it


def test_split_decode_tasks_rejoin_into_whole_batches_in_order(tmp_path):
    """With more workers than a batch needs, workers decode slices of a batch; the caller still gets
    batches of batch_size records, in order, with each failure at its own position."""
    good = _save(_rgb(), "JPEG")
    recs = []
    for i in range(21):
        (tmp_path / f"{i}.jpg").write_bytes(b"" if i in (5, 13) else good)
        recs.append(ImageRecord(i, f"{i}.jpg", str(tmp_path / f"{i}.jpg")))
    assert decode_task_size(8, 4, len(recs)) == 4  # 3 batches, 4 workers
    batches = list(decode_batches(recs, lambda img: torch.full((1, 2, 2), 7, dtype=torch.uint8), batch_size=8,
                                  workers=4))
    assert [b.ok for b in batches] == [[0, 1, 2, 3, 4, 6, 7], [8, 9, 10, 11, 12, 14, 15], [16, 17, 18, 19, 20]]
    assert [[i for i, _, _ in b.failures] for b in batches] == [[5], [13], []]
    assert [tuple(b.pixels.shape) for b in batches] == [(7, 1, 2, 2), (7, 1, 2, 2), (5, 1, 2, 2)]
    assert all(b.pixels.dtype == torch.uint8 and int(b.pixels.min()) == 7 for b in batches)
    assert [len(b.sizes) for b in batches] == [7, 7, 5] and [len(b.files) for b in batches] == [7, 7, 5]
    assert batches[0].files[5] == (file_stat(recs[6]), content_hash(recs[6]))


def test_default_workers_use_the_cores_the_model_leaves():
    assert default_workers("cuda", cores=16) == 15  # the GPU runs the model: every core but the encoder's
    assert default_workers("cuda", cores=128) == MAX_AUTO_WORKERS
    assert default_workers("cuda", cores=1) == 1
    assert default_workers("cpu", cores=16, threads=8) == 8
    assert default_workers("cpu", cores=2, threads=2) == 2  # a saturated CPU still gets 2 (nice +19) workers


def test_stack_pixels_keeps_hwc_pixels_channels_last_and_equal():
    hwc = [torch.randint(0, 256, (5, 6, 3), dtype=torch.uint8) for _ in range(3)]
    views = [p.permute(2, 0, 1) for p in hwc]  # what the split preprocess's workers make
    batch = stack_pixels(views)
    assert batch.shape == (3, 3, 5, 6) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack(views))
    chw = [p.contiguous() for p in views]  # a whole preprocess's float/CHW output: a plain stack
    assert stack_pixels(chw).is_contiguous() and torch.equal(stack_pixels(chw), torch.stack(chw))
    flat = [torch.arange(4.0), torch.arange(4.0)]  # any other shape: a plain stack
    assert torch.equal(stack_pixels(flat), torch.stack(flat))


def test_a_local_file_is_read_once_for_pixels_stat_and_hash(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(_save(_rgb(), "JPEG"))
    rec = ImageRecord(0, "a.jpg", str(tmp_path / "a.jpg"))
    expected = (file_stat(rec), content_hash(rec))
    assert decode_record(rec, lambda img: torch.zeros(1)).file == expected

    def second_read(record):
        raise AssertionError("the file was read a second time")

    monkeypatch.setattr(decode, "file_stat", second_read)
    monkeypatch.setattr(decode, "content_hash", second_read)
    (batch,) = decode_batches([rec], lambda img: torch.zeros(1), batch_size=1, workers=0)
    assert batch.files == [expected]


def test_files_too_big_to_hold_are_decoded_from_their_path_and_hashed_in_blocks(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(_save(_rgb(), "PNG"))
    rec = ImageRecord(0, "a.png", str(tmp_path / "a.png"))
    monkeypatch.setattr(decode, "READ_ONCE_BYTES", 10)
    decoded = decode_record(rec, lambda img: torch.zeros(1))
    assert decoded.file is None and decoded.size == _rgb().size
    (batch,) = decode_batches([rec], lambda img: torch.zeros(1), batch_size=1, workers=0)
    assert batch.files == [(file_stat(rec), content_hash(rec))]


def _camera_jpeg(size=(1000, 700), **kw) -> bytes:
    """A textured JPEG big enough for ``draft`` to scale (smooth gradients plus noise)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    arr = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1) + rng.integers(0, 40, (size[1], size[0], 3))
    return _save(Image.fromarray(arr.clip(0, 255).astype("uint8")), "JPEG", quality=90, **kw)


@pytest.mark.parametrize("kw", [{}, {"progressive": True}], ids=["baseline", "progressive"])
@pytest.mark.parametrize("draft", [None, 64, 224, 448])
def test_simplejpeg_decodes_the_same_pixels_at_the_same_scale_as_pillow(monkeypatch, kw, draft):
    from vlsearch.data import images

    assert images.simplejpeg is not None  # a dependency: the fast path must be the one tested
    data = _camera_jpeg(**kw)
    fast = images.open_image(data, draft_size=draft)
    monkeypatch.setattr(images, "simplejpeg", None)
    slow = images.open_image(data, draft_size=draft)
    assert fast.size == slow.size and images.original_size(fast) == images.original_size(slow) == (1000, 700)
    assert np.array_equal(np.asarray(fast), np.asarray(slow))


def test_simplejpeg_path_keeps_exif_orientation_grayscale_and_refuses_truncated_data(monkeypatch):
    from vlsearch.data import images

    rotated = images.open_image(_exif_rotated_jpeg())
    gray = images.open_image(_save(Image.new("L", (40, 30), 99), "JPEG"))
    monkeypatch.setattr(images, "simplejpeg", None)
    assert rotated.size == images.open_image(_exif_rotated_jpeg()).size
    assert images.file_exif(rotated).get(0x0112) == 6
    assert gray.mode == "RGB" and np.array_equal(np.asarray(gray), np.asarray(images.open_image(
        _save(Image.new("L", (40, 30), 99), "JPEG"))))
    monkeypatch.undo()
    with pytest.raises(DecodeError) as err:
        images.open_image(_camera_jpeg()[:5000], draft_size=224)
    assert err.value.kind == "corrupt"


def test_draft_scale_follows_pillows_rule():
    from vlsearch.data.images import draft_scale

    assert [draft_scale((3000, 2000), d) for d in (None, 224, 448, 1000, 2500)] == [1, 8, 4, 2, 1]
    img = Image.open(io.BytesIO(_camera_jpeg((3000, 2000))))
    img.draft("RGB", (448, 448))
    assert img.size == (3000 // 4, 2000 // 4)
