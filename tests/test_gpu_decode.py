"""The GPU (nvjpeg) decode path, run on CPU: ``torchvision.io.decode_jpeg(device="cpu")`` stands in
for nvjpeg, so the real pixel path (bytes -> upright -> the model's resize and crop) runs."""

from __future__ import annotations

import io
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from indexing import gpu_decode
from indexing.decode import decode_record
from indexing.embed import EmbedConfig, embed
from indexing.gpu_decode import (ByteDataset, GpuDecoder, collate_raw, gpu_batches, gpu_decode_batches,
                                 nvjpeg_decoder, read_header, tensor_steps, use_gpu_decode)
from vlsearch.data.sources import ImageRecord, open_source


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _quadrants(size=(60, 40)) -> Image.Image:
    """Four differently coloured quadrants: any wrong flip or rotation shows."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = (250, 10, 10)
    arr[: h // 2, w // 2 :] = (10, 250, 10)
    arr[h // 2 :, : w // 2] = (10, 10, 250)
    arr[h // 2 :, w // 2 :] = (240, 240, 20)
    return Image.fromarray(arr)


def _oriented(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(_quadrants(), "JPEG", quality=95, exif=exif)


GOOD = {
    "a.jpg": _save(_quadrants((120, 80)), "JPEG"),
    "b-rotated.jpg": _oriented(6),
    "c-gray.jpg": _save(Image.new("L", (50, 70), 90), "JPEG"),
    "d-png.png": _save(_quadrants(), "PNG"),
    "e-cmyk.jpg": _save(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"),
    "f-progressive.jpg": _save(_quadrants((90, 90)), "JPEG", progressive=True),
    "g with space.jpg": _save(_quadrants(), "JPEG"),
}
NOISE = _save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
BAD = {
    "h-truncated.jpg": NOISE[: len(NOISE) // 2],  # a whole header, half the scan
    "i-empty.jpg": b"",
    "j-text.jpg": b"not a jpeg at all",
}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    for name, data in {**GOOD, **BAD}.items():
        (root / name).write_bytes(data)
    with open(os.path.join(os.fsencode(root), b"latin1-\xe9.jpg"), "wb") as f:
        f.write(_save(_quadrants(), "JPEG"))
    return root


def _records(names: list[str]) -> list[ImageRecord]:
    return [ImageRecord(i, n, n) for i, n in enumerate(names)]


def test_the_gpu_decoder_is_chosen_automatically_for_cuda_and_jpegs_only():
    jpegs, pngs = _records(["a.jpg", "b.JPEG", "c.png"]), _records(["a.png", "b.png", "c.jpg"])
    assert use_gpu_decode("cuda", jpegs) and not use_gpu_decode("cpu", jpegs)
    assert not use_gpu_decode("cuda", pngs)
    assert not use_gpu_decode("cuda", jpegs, False) and use_gpu_decode("cpu", jpegs, True)
    preprocess = SimpleNamespace(transforms=tensor_steps_source())
    split = object()  # a decode transform other than the whole preprocess: it splits into uint8 pixels
    on_cuda = SimpleNamespace(device=torch.device("cuda"), preprocess=preprocess, decode_transform=split)
    on_cpu = SimpleNamespace(device=torch.device("cpu"), preprocess=preprocess, decode_transform=split)
    assert gpu_batches(jpegs, on_cuda, None) is not None  # a generator: nothing runs on the absent GPU
    assert gpu_batches(jpegs, on_cpu, None) is None
    assert gpu_batches(jpegs, on_cuda, False) is None


def tensor_steps_source():
    from torchvision import transforms as T

    return [T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64), T.ToTensor(),
            T.Normalize((0.5,) * 3, (0.5,) * 3)]


def test_tensor_steps_take_the_models_resize_and_crop(tiny_encoder):
    steps = tensor_steps(tiny_encoder.preprocess)
    assert [type(s).__name__ for s in steps] == ["Resize", "CenterCrop"]
    assert tensor_steps(SimpleNamespace(transforms=[ImageOps.grayscale])) is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_on_the_device_as_pillow_does(orientation):
    data = _oriented(orientation)
    header = read_header(data)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoder = GpuDecoder(nvjpeg_decoder("cpu"), [], decode_record, torch.device("cpu"))
    got = decoder._shape(decoder.decode([header.data])[0], header.orientation).permute(1, 2, 0).numpy()
    assert header.size == (expected.shape[1], expected.shape[0])
    assert got.shape == expected.shape and np.abs(got.astype(int) - expected).max() <= 8


def test_workers_ship_jpeg_bytes_and_decode_other_files_on_the_cpu(gallery, tiny_encoder):
    records = list(open_source(gallery))
    items = [ByteDataset(records, tiny_encoder.decode_transform, draft_size=None, timeout=10, max_pixels=10**8)[i]
             for i in range(len(records))]
    kind = {records[i].path: ("gpu" if it[1] is not None else "cpu" if it[2] is not None else it[3][0])
            for i, it in enumerate(items)}
    assert kind["a.jpg"] == kind["b-rotated.jpg"] == kind["c-gray.jpg"] == kind["f-progressive.jpg"] == "gpu"
    assert kind["d-png.png"] == kind["e-cmyk.jpg"] == "cpu"
    assert kind["i-empty.jpg"] == "empty" and kind["j-text.jpg"] == "unidentified"
    assert kind["h-truncated.jpg"] == "gpu"  # its header is fine: the GPU decoder refuses it, then the CPU one


def test_a_file_the_gpu_refuses_is_decoded_on_the_cpu_and_the_batch_call_is_retried_per_file(gallery, tiny_encoder):
    records = [r for r in open_source(gallery) if r.path in ("a.jpg", "f-progressive.jpg", "g with space.jpg")]
    refused = len((gallery / "f-progressive.jpg").read_bytes())
    calls: list[int] = []
    real = nvjpeg_decoder("cpu")

    def picky(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        calls.append(len(batch))
        if any(len(t) == refused for t in batch):
            raise RuntimeError("nvjpeg: unsupported")
        return real(batch)

    dataset = ByteDataset(records, tiny_encoder.decode_transform, draft_size=None, timeout=10, max_pixels=10**8)
    raw = collate_raw([dataset[i] for i in range(len(records))])
    cpu = []

    def cpu_decode(record):
        cpu.append(record.path)
        return decode_record(record, tiny_encoder.decode_transform)

    batch = GpuDecoder(picky, tensor_steps(tiny_encoder.preprocess), cpu_decode, torch.device("cpu"))(raw, records)
    assert calls == [3, 1, 1, 1] and cpu == ["f-progressive.jpg"]
    assert batch.ok == [0, 1, 2] and not batch.failures and batch.pixels.shape == (3, 3, 64, 64)
    assert torch.equal(batch.pixels[1], decode_record(records[1], tiny_encoder.decode_transform).pixels)


def test_batches_keep_record_order_across_workers_and_batch_sizes(gallery, tiny_encoder):
    records = list(open_source(gallery))
    runs = [list(gpu_decode_batches(records, tiny_encoder.decode_transform, tensor_steps(tiny_encoder.preprocess),
                                    device="cpu", batch_size=size, workers=workers, timeout=10,
                                    decode=nvjpeg_decoder("cpu")))
            for size, workers in ((3, 0), (4, 2))]
    for batches in runs:
        assert [i for b in batches for i in b.ok] + [f[0] for b in batches for f in b.failures] != []
        assert sorted(i for b in batches for i in [*b.ok, *(f[0] for f in b.failures)]) == list(range(len(records)))
        assert all(b.ok == sorted(b.ok) and len(b.pixels) == len(b.ok) for b in batches)
    assert torch.equal(torch.cat([b.pixels for b in runs[0]]), torch.cat([b.pixels for b in runs[1]]))


def _table(coll, kind: str, columns: list[str]) -> dict:
    return coll.read_table(kind, columns=columns).to_pydict()


def test_embedding_on_the_gpu_path_gives_the_cpu_paths_ids_paths_sizes_and_failures(gallery, tiny_encoder, tmp_path):
    cpu = embed(gallery, tmp_path / "cpu", EmbedConfig(workers=1, batch_size=4, decode_timeout=10, gpu_decode=False),
                encoder=tiny_encoder)
    gpu = embed(gallery, tmp_path / "gpu", EmbedConfig(workers=1, batch_size=4, decode_timeout=10, gpu_decode=True),
                encoder=tiny_encoder)
    columns = ["id", "path", "width", "height", "content_hash"]
    assert _table(gpu, "images", columns) == _table(cpu, "images", columns)
    assert _table(gpu, "failures", ["path", "kind"]) == _table(cpu, "failures", ["path", "kind"])
    assert sorted(_table(gpu, "failures", ["path"])["path"]) == sorted(BAD)
    a, b = cpu.read_embeddings()[1], gpu.read_embeddings()[1]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98  # torch's antialiased bicubic vs Pillow's: a few grey levels apart


def test_the_module_decoder_seam_defaults_to_torchvision(monkeypatch):
    seen = {}
    monkeypatch.setattr(gpu_decode, "nvjpeg_decoder", lambda device: seen.setdefault("device", device))
    gen = gpu_decode_batches([], lambda img: img, [], device="cpu", workers=0)
    assert list(gen) == [] and seen["device"] == torch.device("cpu")


def test_no_gpu_decode_turns_the_gpu_decoder_off_from_the_command_line():
    from typer.testing import CliRunner

    from vlsearch.app.cli import app
    from vlsearch.app.options import EmbedOptions

    assert EmbedOptions().config().gpu_decode is None
    assert EmbedOptions(no_gpu_decode=True).config().gpu_decode is False
    assert "--no-gpu-decode" in CliRunner().invoke(app, ["embed", "--help"], terminal_width=200).output
