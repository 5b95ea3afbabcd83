"""Decode JPEGs on the GPU (nvjpeg): decode workers only read bytes and parse headers.

On a GPU the model encodes several thousand images a second and the CPU decoders are the limit
(issue 36). Here each worker process reads a record's bytes (with the same stat and content hash
as :mod:`indexing.decode`) and parses the JPEG header with Pillow (size, mode, EXIF: no pixels);
the encoding process hands a whole batch of bytes to ``torchvision.io.decode_jpeg(list, device=...)``,
turns each image upright, runs the model's own ``Resize``/``CenterCrop`` on the device, and yields
the same :class:`~indexing.decode.DecodedBatch` of uint8 pixels the CPU path yields (the encoder
normalises them on the device).

Everything else goes the CPU way, per file: a record that is not a plain RGB or grayscale JPEG
(PNG, HEIC, CMYK, a refused RAW, a bomb...) is decoded in its worker by
:func:`indexing.decode.decode_record`, and a JPEG the GPU decoder refuses is decoded the same way
in this process, so corrupt data ends in the failures table with the usual kind. Ids and paths
come from the records, so they are the CPU path's byte for byte.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from indexing.decode import (DEFAULT_TIMEOUT, DecodedBatch, FileFacts, decode_record, init_worker, mp_context,
                             name_hangs, read_bytes, stack_pixels, time_limit)
from vlsearch.core.errors import DecodeError
from vlsearch.data.formats import refusal
from vlsearch.data.images import MAX_PIXELS, image_exif
from vlsearch.data.photo import exif_values
from vlsearch.data.sources import ImageRecord

#: File name endings counted as JPEG when choosing the decoder.
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
#: Share of JPEG records above which the GPU decoder is chosen automatically.
JPEG_HEAVY = 0.5
#: Pillow modes nvjpeg decodes to RGB like Pillow does (CMYK/YCCK JPEGs go the CPU way).
GPU_MODES = ("RGB", "L")
#: EXIF orientation -> the tensor ops of Pillow's ``exif_transpose`` on ``(3, H, W)`` pixels.
_UPRIGHT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda x: x.flip(2),
    3: lambda x: x.flip(1, 2),
    4: lambda x: x.flip(1),
    5: lambda x: x.transpose(1, 2),
    6: lambda x: torch.rot90(x, -1, (1, 2)),
    7: lambda x: x.transpose(1, 2).flip(1, 2),
    8: lambda x: torch.rot90(x, 1, (1, 2)),
}

#: A batch decoder: encoded JPEG bytes (1-D uint8 tensors) -> ``(3, H, W)`` uint8 images.
JpegDecoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def jpeg_share(records: Sequence[ImageRecord]) -> float:
    """Share of ``records`` whose name says JPEG."""
    return sum(r.path.lower().endswith(JPEG_SUFFIXES) for r in records) / max(len(records), 1)


def use_gpu_decode(device_type: str, records: Sequence[ImageRecord], choice: bool | None = None) -> bool:
    """Whether to decode on the GPU: ``choice`` when given (False turns it off), else automatically
    when the encoder is on CUDA and most records are JPEGs."""
    if choice is not None:
        return choice
    return device_type == "cuda" and jpeg_share(records) > JPEG_HEAVY


def tensor_steps(preprocess: Any) -> list[Any] | None:
    """The model preprocess's resize and crop as steps that also take tensors (torchvision's
    ``Resize``/``CenterCrop``, what open_clip's eval transform uses); None when it has others."""
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", None) or [])
    pil = [s for s in steps if not isinstance(s, (T.ToTensor, T.Normalize))
           and getattr(s, "__name__", type(s).__name__) not in ("MaybeConvertMode", "_convert_to_rgb")]
    if not pil or not all(type(s) in (T.Resize, T.CenterCrop) for s in pil):
        return None
    return pil


def nvjpeg_decoder(device: torch.device | str) -> JpegDecoder:
    """``torchvision.io.decode_jpeg`` on ``device`` for a list of images, as RGB."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return partial(decode_jpeg, mode=ImageReadMode.RGB, device=device)


class Header(NamedTuple):
    """What a worker ships for a GPU-decodable JPEG: its bytes and what the header says."""

    data: torch.Tensor
    size: tuple[int, int]
    orientation: int
    exif: dict[str, Any]


def read_header(data: bytes, max_pixels: int = MAX_PIXELS) -> Header | None:
    """The :class:`Header` of a plain RGB/grayscale JPEG within ``max_pixels`` (upright size from its
    EXIF orientation); None for anything else (the CPU decoder then handles, or refuses, it)."""
    try:
        img = Image.open(io.BytesIO(data))
    except Exception:  # not an image Pillow knows: the CPU path names the failure
        return None
    w, h = img.size
    if img.format != "JPEG" or img.mode not in GPU_MODES or w * h > max_pixels:
        return None
    exif = image_exif(img)
    orientation = exif.get(0x0112, 1) if exif is not None else 1
    orientation = orientation if orientation in _UPRIGHT else 1
    size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return Header(torch.frombuffer(bytearray(data), dtype=torch.uint8), size, orientation, exif_values(exif))


class ByteDataset(Dataset):
    """Item ``i``: ``(i, Header or None, pixels or None, failure or None, FileFacts or None, EXIF or None)``:
    a JPEG's bytes and header for the GPU, else the CPU decode of the record."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable[[Any], torch.Tensor], *,
                 draft_size: int | None, timeout: float | None, max_pixels: int):
        self.records, self.transform = records, transform
        self.draft_size, self.timeout, self.max_pixels = draft_size, timeout, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple:
        record = self.records[i]
        try:
            with time_limit(self.timeout):
                header, facts = self._read(record)
        except DecodeError:
            header = None
        if header is not None:
            return i, header, None, None, facts, header.exif
        try:
            pixels, size, facts, exif = decode_record(record, self.transform, draft_size=self.draft_size,
                                                      timeout=self.timeout, max_pixels=self.max_pixels)
        except DecodeError as exc:
            return i, None, None, (exc.kind, exc.message), None, None
        return i, None, (pixels, size), None, facts, exif

    def _read(self, record: ImageRecord) -> tuple[Header | None, FileFacts | None]:
        if refusal(record.path, record.sniffed) is not None:
            return None, None
        data, facts = read_bytes(record)
        return (read_header(data, self.max_pixels) if data is not None else None), facts


@dataclass(frozen=True)
class RawBatch:
    """A worker task: the collated items of :class:`ByteDataset`, in record order."""

    items: list[tuple]


def collate_raw(items: list[tuple]) -> RawBatch:
    return RawBatch(items)


@dataclass(frozen=True)
class GpuDecoder:
    """Turns a :class:`RawBatch` into a :class:`DecodedBatch` of ``device`` pixels.

    ``decode``: the batch JPEG decoder (nvjpeg by default; tests put a CPU one behind this seam);
    ``steps``: the model's resize/crop (:func:`tensor_steps`); ``cpu_decode``: the per-file fallback
    (``indexing.decode.decode_record`` with the model's PIL transform) for files ``decode`` refuses."""

    decode: JpegDecoder
    steps: list[Any]
    cpu_decode: Callable[[ImageRecord], Any]
    device: torch.device

    def __call__(self, raw: RawBatch, records: Sequence[ImageRecord]) -> DecodedBatch:
        gpu = [it for it in raw.items if it[1] is not None]
        pixels = dict(zip((it[0] for it in gpu), self._decode_all([it[1].data for it in gpu])))
        done: dict[int, tuple] = {}
        for i, header, cpu, failure, facts, exif in raw.items:
            if header is not None and pixels[i] is not None:
                done[i] = (self._shape(pixels[i], header.orientation), header.size, facts, exif)
            elif header is not None:  # refused by the GPU decoder: the CPU one decodes or names the failure
                done[i] = self._fallback(records[i])
            elif cpu is not None:
                done[i] = (cpu[0].to(self.device, non_blocking=True), cpu[1], facts, exif)
            else:
                done[i] = failure
        return self._batch(done)

    def _decode_all(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decode the batch in one call; if it fails, file by file (None: this file refused)."""
        if not data:
            return []
        try:
            return list(self.decode(data))
        except Exception:  # one bad file fails the whole batched call
            return [self._decode_one(d) for d in data]

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return self.decode([data])[0]
        except Exception:
            return None

    def _shape(self, pixels: torch.Tensor, orientation: int) -> torch.Tensor:
        """Upright, then the model's resize and crop (antialiased, rounded back to uint8)."""
        x = pixels.to(self.device, non_blocking=True)
        x = _UPRIGHT[orientation](x) if orientation in _UPRIGHT else x
        for step in self.steps:
            x = step(x)
        return x.contiguous()

    def _fallback(self, record: ImageRecord) -> tuple:
        try:
            pixels, size, facts, exif = self.cpu_decode(record)
        except DecodeError as exc:
            return (exc.kind, exc.message)
        return (pixels.to(self.device, non_blocking=True), size, facts, exif)

    def _batch(self, done: dict[int, tuple]) -> DecodedBatch:
        ok = [i for i in sorted(done) if len(done[i]) == 4]
        fails = [(i, *done[i]) for i in sorted(done) if len(done[i]) == 2]
        pixels = stack_pixels([done[i][0] for i in ok]) if ok else torch.empty(0)
        return DecodedBatch(pixels, ok, [done[i][1] for i in ok], fails, [done[i][2] for i in ok],
                            [done[i][3] for i in ok])


def gpu_decode_batches(
    records: Sequence[ImageRecord],
    transform: Callable[[Any], torch.Tensor],
    steps: list[Any],
    *,
    device: torch.device | str,
    batch_size: int = 64,
    workers: int = 2,
    timeout: float | None = DEFAULT_TIMEOUT,
    draft_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
    decode: JpegDecoder | None = None,
) -> Iterator[DecodedBatch]:
    """:func:`indexing.decode.decode_batches` with JPEGs decoded, made upright and resized on
    ``device`` (``decode``: the batch decoder, default nvjpeg there); ``transform`` is the model's
    PIL preprocess the CPU fallback runs (it must make the same uint8 pixels as ``steps``)."""
    device = torch.device(device)
    dataset = ByteDataset(records, transform, draft_size=draft_size, timeout=timeout, max_pixels=max_pixels)
    cpu = partial(decode_record, transform=transform, draft_size=draft_size, timeout=timeout, max_pixels=max_pixels)
    decoder = GpuDecoder(decode or nvjpeg_decoder(device), steps, cpu, device)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = {"prefetch_factor": 2, "multiprocessing_context": mp_context(), "worker_init_fn": init_worker}
        if timeout:
            kwargs["timeout"] = batch_size * timeout + 60
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_raw, **kwargs)
    for raw in name_hangs(iter(loader), records, batch_size, kwargs.get("timeout")):
        yield decoder(raw, records)


def gpu_batches(records: Sequence[ImageRecord], encoder: Any, choice: bool | None, **kwargs: Any
                ) -> Iterator[DecodedBatch] | None:
    """:func:`gpu_decode_batches` on ``encoder``'s device when :func:`use_gpu_decode` says so
    and its preprocess has tensor steps and splits into uint8 pixels; None: use the CPU decoders.
    ``kwargs``: :func:`gpu_decode_batches`'s batch, worker and decode settings."""
    if not use_gpu_decode(encoder.device.type, records, choice):
        return None
    steps = tensor_steps(encoder.preprocess)
    if steps is None or encoder.decode_transform is encoder.preprocess:  # no uint8 split: CPU path
        return None
    return gpu_decode_batches(records, encoder.decode_transform, steps, device=encoder.device, **kwargs)
