"""The folders ``vlsearch import`` reads, scanned and checked before anything is written.

* **clip-retrieval** (``clip-retrieval inference``, 2.45 ``clip_inference/writer.py``)::

      DIR/img_emb/img_emb_{k}.npy      float16 (N_k, d), row i <-> row i of metadata_{k}
      DIR/text_emb/text_emb_{k}.npy    where texts were embedded (caption embeddings)
      DIR/metadata/metadata_{k}.parquet  image_path, caption, url, ... (the json metadata, flattened)

  ``k`` is zero-padded to the digits of the run's partition count, so the padding can differ
  between two runs into one folder: partitions are ordered by the number, not the name, and must
  run 0..K-1 with no gap.
* **embeddings** (the embedding-reader layout other tools write): ``DIR/*.npy`` in name order,
  each with the ``.parquet`` of the same stem, or else paired with the parquet files by sort order.

A partition's rows have global positions ``start .. start + rows`` in partition order; these are
the imported rows' ids (clip-retrieval's own ids: its back-end numbers rows the same way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlsearch.core.errors import ImportFolderError

CLIP_RETRIEVAL, EMBEDDINGS = "clip-retrieval", "embeddings"
_PART_RE = {"img_emb": re.compile(r"^img_emb_(\d+)\.npy$"), "text_emb": re.compile(r"^text_emb_(\d+)\.npy$"),
            "metadata": re.compile(r"^metadata_(\d+)\.parquet$")}


@dataclass(frozen=True)
class Partition:
    """One partition: its image vectors, optional caption vectors and optional metadata."""

    number: int
    image: Path
    metadata: Path | None
    text: Path | None
    start: int
    rows: int

    @property
    def stop(self) -> int:
        return self.start + self.rows


@dataclass(frozen=True)
class ImportFolder:
    """A scanned, checked folder: its partitions in order, the vectors' dimension, the metadata schema."""

    path: Path
    layout: str
    partitions: tuple[Partition, ...]
    dim: int
    metadata_schema: pa.Schema

    @property
    def rows(self) -> int:
        return self.partitions[-1].stop if self.partitions else 0

    @property
    def has_text(self) -> bool:
        return any(p.text is not None for p in self.partitions)

    def describe(self) -> dict[str, object]:
        return {"type": self.layout, "path": str(self.path)}


def scan_clip_retrieval(path: str | Path) -> ImportFolder:
    """Scan and check a clip-retrieval output folder (ImportFolderError when it is malformed)."""
    root = _folder(path)
    found = {kind: _numbered(root / kind, regex) for kind, regex in _PART_RE.items()}
    if not found["img_emb"]:
        raise ImportFolderError(f"{root} is not a clip-retrieval folder: no img_emb/img_emb_<k>.npy")
    numbers = sorted(found["img_emb"])
    _check_numbers(root, numbers, found)
    texts = found["text_emb"]
    files = [(k, found["img_emb"][k], found["metadata"].get(k), texts.get(k)) for k in numbers]
    return _checked(root, CLIP_RETRIEVAL, files)


def scan_embeddings(path: str | Path) -> ImportFolder:
    """Scan and check a folder of ``*.npy`` with their ``*.parquet`` (same stem, else sort order)."""
    root = _folder(path)
    npys = sorted(root.glob("*.npy"))
    if not npys:
        raise ImportFolderError(f"{root} holds no .npy embedding files")
    parquets = sorted(root.glob("*.parquet"))
    by_stem = {p.stem: p for p in parquets}
    if parquets and all(n.stem in by_stem for n in npys):
        metas: list[Path | None] = [by_stem[n.stem] for n in npys]
    elif len(parquets) == len(npys):
        metas = list(parquets)
    elif not parquets:
        metas = [None] * len(npys)
    else:
        raise ImportFolderError(f"{root}: {len(npys)} .npy files but {len(parquets)} .parquet files, and their "
                                "names do not pair them up (same stem)")
    return _checked(root, EMBEDDINGS, [(k, n, m, None) for k, (n, m) in enumerate(zip(npys, metas))])


def _folder(path: str | Path) -> Path:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise ImportFolderError(f"no folder at {root}")
    return root


def _numbered(folder: Path, regex: re.Pattern[str]) -> dict[int, Path]:
    if not folder.is_dir():
        return {}
    out: dict[int, Path] = {}
    for p in folder.iterdir():
        m = regex.match(p.name)
        if m:
            k = int(m.group(1))
            if k in out:
                raise ImportFolderError(f"partition {k} appears twice: {out[k].name} and {p.name}")
            out[k] = p
    return out


def _check_numbers(root: Path, numbers: list[int], found: dict[str, dict[int, Path]]) -> None:
    """Partitions 0..K-1 with no gap; every one has its metadata; text vectors for all or none."""
    missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
    if missing:
        raise ImportFolderError(f"{root}: partition {missing[0]} is missing (img_emb/img_emb_{missing[0]}.npy); "
                                f"found {len(numbers)} of 0..{max(numbers)}")
    for kind in ("metadata", "text_emb"):
        have = found[kind]
        if kind == "text_emb" and not have:
            continue
        lacking = [k for k in numbers if k not in have]
        if lacking:
            raise ImportFolderError(f"{root}: partition {lacking[0]} has no {kind} file "
                                    f"({kind}/{kind}_{lacking[0]}.{'parquet' if kind == 'metadata' else 'npy'})")
        extra = sorted(set(have) - set(numbers))
        if extra:
            raise ImportFolderError(f"{root}: {kind} partition {extra[0]} has no img_emb/img_emb_{extra[0]}.npy")


def _checked(root: Path, layout: str, files: list[tuple[int, Path, Path | None, Path | None]]) -> ImportFolder:
    """Row counts and dimensions from the npy headers and parquet footers (no data read)."""
    parts, start, dims, schemas = [], 0, set(), []
    for k, image, meta, text in files:
        rows, dim = _npy_shape(image)
        dims.add(dim)
        if text is not None:
            trows, tdim = _npy_shape(text)
            if (trows, tdim) != (rows, dim):
                raise ImportFolderError(f"{text} holds {trows} x {tdim} vectors but {image.name} {rows} x {dim}")
        if meta is not None:
            footer = pq.ParquetFile(meta)
            if footer.metadata.num_rows != rows:
                raise ImportFolderError(f"{meta} has {footer.metadata.num_rows} rows but {image} has {rows} vectors: "
                                        "row i of each must describe the same item")
            schemas.append(footer.schema_arrow)
        parts.append(Partition(k, image, meta, text, start, rows))
        start += rows
    if len(dims) > 1:
        raise ImportFolderError(f"{root}: the partitions' vectors have different dimensions {sorted(dims)}")
    return ImportFolder(root, layout, tuple(parts), dims.pop(), _unify(root, schemas))


class NpyRows:
    """The rows of a 2-d ``.npy`` file, read on demand with plain reads. Not a memory map: mapped
    pages count in the importing process's resident memory, which would then grow with the folder."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, self.dtype = read_header(fh)
                self.offset = fh.tell()
        except (OSError, ValueError) as exc:
            raise ImportFolderError(f"cannot read {path} as a .npy array: {exc}") from exc
        if len(shape) != 2 or fortran or not np.issubdtype(self.dtype, np.floating):
            raise ImportFolderError(f"{path} must hold a 2-d C-order float array, not {self.dtype} {shape}")
        self.rows, self.dim = int(shape[0]), int(shape[1])

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo .. hi`` as a new array."""
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + lo * self.dim * self.dtype.itemsize)
            out = np.fromfile(fh, self.dtype, (hi - lo) * self.dim).reshape(hi - lo, self.dim)
        if len(out) != hi - lo:
            raise ImportFolderError(f"{self.path} is truncated: rows {lo}..{hi} are not all there")
        return out


def _npy_shape(path: Path) -> tuple[int, int]:
    rows = NpyRows(path)
    return rows.rows, rows.dim


def _unify(root: Path, schemas: list[pa.Schema]) -> pa.Schema:
    if not schemas:
        return pa.schema([])
    try:
        return pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ImportFolderError(f"{root}: the metadata parquet files have conflicting columns: {exc}") from exc
