"""Image sources: a folder, a CSV/TSV/Parquet manifest, or webdataset ``.tar`` shards, behind one interface.

Every source yields :class:`ImageRecord` s in a deterministic order (sorted paths, manifest rows
sorted by image path, tars by name then member order), streamed, so a resumed run can skip the
records already committed and end with exactly the ids of an uninterrupted run.

**Stable ids.** A record's id is the first 63 bits of ``blake2b`` of its identity: the path
relative to the folder root, the image path as written in the manifest, or ``<tar name>/<key>``.
It is the same on every run and on every machine, survives moving the source root, needs no
central counter (so it is safe with parallel or resumed runs), is non-negative (FAISS reserves
-1) and is used as the FAISS id. Two records with the same id (a hash collision, ~1e-7 for 1M
images, or a duplicate webdataset key) raise :class:`SourceError` instead of silently merging.

**Remote sources.** A source may be an fsspec URL (``s3://bucket/photos``, ``gs://...``,
``file:///mnt/shared/x.csv``, ``memory://...``): folders, manifests and ``.tar`` shards (and
``*.tar`` globs) are then listed and read through fsspec, and each record's ``location`` is a URL
that any worker (a DataLoader process, a Ray actor on another node) opens itself. The protocol's
package must be installed where the records are read (``pip install s3fs`` for ``s3://``); if it
is not, :class:`FilesystemNotInstalledError` says which. A manifest's image column may also hold
URLs. Ids come from the same relative paths, so a tree read through ``file://`` gets the ids it
gets as a local path.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from vlsearch.store.layout import FILE_COLUMNS, IMAGE_COLUMNS
from vlsearch.core.errors import SourceError
from vlsearch.core.fsutil import MANIFEST_NAMES, find_manifest
from vlsearch.data.formats import IMAGE_EXTENSIONS, SNIFF_BYTES, is_image_name, sniff, worth_sniffing
from vlsearch.data.locations import is_url, location_suffix, open_location, url_fs
from vlsearch.data.manifest import is_manifest, read_manifest
from vlsearch.data.photo import PHOTO_SCHEMA

log = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "image_path", "path", "filepath", "file", "filename")
CAPTION_COLUMN_CANDIDATES = ("caption", "text", "captions", "title")
#: Metadata columns that would clash with a shard's own columns are renamed with this prefix.
RENAME_PREFIX = "source_"
RESERVED_COLUMNS = frozenset({*IMAGE_COLUMNS, *FILE_COLUMNS, *PHOTO_SCHEMA.names, "embedding"})


def stable_id(identity: str | bytes) -> int:
    """Deterministic non-negative 63-bit id of a record identity (see module docstring)."""
    data = identity if isinstance(identity, bytes) else identity.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") & (2**63 - 1)


def display_path(path: str) -> str:
    """A path as valid UTF-8 text for the shards: undecodable bytes become ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def read_record(record: ImageRecord) -> bytes:
    """A record's encoded image bytes (a tar member's from its offset)."""
    with open_location(record.location) as fh:
        if record.tar_range is None:
            return fh.read()
        fh.seek(record.tar_range[0])
        return fh.read(record.tar_range[1])


def _url_stat(url: str) -> tuple[int, int] | None:
    """``(size, modified ns)`` of a URL; None when its filesystem reports no modification time."""
    import datetime

    from fsspec.implementations.local import LocalFileSystem

    fs, path = url_fs(url)
    if isinstance(fs, LocalFileSystem):  # file://: the nanosecond mtime a local path gets
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    size = int(fs.info(path)["size"])
    try:
        modified = fs.modified(path)
    except (NotImplementedError, KeyError):
        return None
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=datetime.timezone.utc)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    return size, (modified - epoch) // datetime.timedelta(microseconds=1) * 1000


def _fs_path(location: str | os.PathLike) -> str:
    """A location's path: inside its filesystem for a URL, as given for a local path."""
    return url_fs(location)[1] if is_url(location) else os.fspath(location)


def _is_dir(location: str | os.PathLike) -> bool:
    if is_url(location):
        fs, path = url_fs(location)
        return fs.isdir(path)
    return os.path.isdir(location)


@dataclass(frozen=True)
class ImageRecord:
    """One image of a source.

    ``path`` is what the shards store (relative to the source root); ``location`` is the file to
    read, a local path or an fsspec URL (for a tar, the tar file, with the member's
    ``tar_range = (offset, size)``). ``sniffed``: for a file a folder walk took for its bytes
    and not its extension, the format they say (it is refused, with a rename hint).
    """

    id: int
    path: str
    location: str
    captions: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    tar_range: tuple[int, int] | None = None
    sniffed: str | None = None


def file_stat(record: ImageRecord) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a record's image: the file's, or for a tar member its size and the
    tar's mtime. None when it cannot be read (it is then treated as changed)."""
    try:
        if is_url(record.location):
            stat = _url_stat(record.location)
            if stat is None:
                return None
            size, mtime = stat
        else:
            st = os.stat(record.location)
            size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        return None
    size = record.tar_range[1] if record.tar_range is not None else size
    return int(size), int(mtime)


def bytes_hash(data: bytes) -> str:
    """blake2b-128 (hex) of image bytes already in memory: what :func:`content_hash` gives for them."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def content_hash(record: ImageRecord) -> str | None:
    """blake2b-128 (hex) of a record's image bytes (read in 1 MiB blocks), or None if unreadable."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open_location(record.location) as fh:
            left = None
            if record.tar_range is not None:
                fh.seek(record.tar_range[0])
                left = record.tar_range[1]
            while left is None or left > 0:
                block = fh.read(1 << 20 if left is None else min(1 << 20, left))
                if not block:
                    break
                digest.update(block)
                left = None if left is None else left - len(block)
    except OSError:
        return None
    return digest.hexdigest()


def record_hash(record: ImageRecord) -> str:
    """blake2b-128 (hex) of what a record says besides its image: path, captions and metadata."""
    text = json.dumps([record.path, list(record.captions), record.metadata], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


class ImageSource:
    """Base class: iterate records in a deterministic order; ``describe()`` goes into the manifest."""

    kind = "source"
    #: Arrow schema of the metadata columns every record carries (same types in every shard).
    metadata_schema: pa.Schema = pa.schema([])

    def __init__(self, root: Path | str):
        self.root = root  # a local Path, or an fsspec URL (str)

    def __iter__(self) -> Iterator[ImageRecord]:
        seen: set[int] = set()  # ~70 bytes per image: 700 MB for 10M images
        for rec in self._records():
            if rec.id in seen:
                raise SourceError(
                    f"{rec.path!r} in {self.root} has the id {rec.id} of an earlier record "
                    "(a duplicate key or path, or a 63-bit hash collision); make each image's path/key unique"
                )
            seen.add(rec.id)
            yield rec
        if not seen:
            raise SourceError(f"{self.kind} source {self.root} holds no images ({self._empty_hint()})")

    def size_hint(self) -> int | None:
        """Number of records when known without a full scan (for progress bars), else None."""
        return None

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the source (``type`` and ``path`` identify it)."""
        return {"type": self.kind, "path": self.root.rstrip("/") if is_url(self.root) else os.path.abspath(self.root)}

    def _records(self) -> Iterator[ImageRecord]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _empty_hint(self) -> str:
        return "nothing to index"


def _sniffed(location: str) -> str | None:
    """The image format a file's first bytes say (:func:`vlsearch.data.formats.sniff`); None: none, or unreadable."""
    try:
        with open_location(location) as fh:
            return sniff(fh.read(SNIFF_BYTES))
    except OSError:
        return None


def _fs_sorted(names: list[str]) -> list[str]:
    return sorted(names, key=os.fsencode)  # byte order: the same whatever the locale


class FolderSource(ImageSource):
    """Every image file under a directory, recursively; ``photo.txt`` beside ``photo.jpg`` holds
    its captions, one per non-empty line. Directory symlinks are not followed (no cycles).

    An image file is one with an image extension (:data:`vlsearch.data.formats.IMAGE_EXTENSIONS`,
    RAW included) or, whatever its extension, one whose first bytes say image: the decoder then
    records why it is not indexed (:func:`vlsearch.data.formats.refusal`) instead of the walk
    skipping it silently."""

    kind = "folder"

    def image_files(self) -> Iterator[str]:
        """The location of every image file, in record order, without reading captions (and
        without the error of an empty folder): the walk shared by every folder reader."""
        return (location for location, _, _, _ in self._walk())

    def _records(self) -> Iterator[ImageRecord]:
        for location, rel, sidecar, sniffed in self._walk():
            captions = _read_sidecar(sidecar) if sidecar is not None else ()
            yield ImageRecord(stable_id(os.fsencode(rel)), display_path(rel), location, captions, sniffed=sniffed)

    def _walk(self) -> Iterator[tuple[str, str, str | None, str | None]]:
        """``(location, path relative to the root, location of its captions file or None, the format
        its bytes say when it was taken for them and not for its extension)`` per image file."""
        fs, top = url_fs(self.root) if is_url(self.root) else (None, self.root)
        where = fs.unstrip_protocol if fs is not None else os.fspath  # a location: a URL or a path
        for dirpath, dirnames, filenames in (fs.walk(top) if fs is not None else os.walk(top)):
            dirnames[:] = _fs_sorted(dirnames)  # both walks recurse into dirnames as left here
            names = set(filenames)
            images = {n: None for n in filenames if is_image_name(n)}
            for n in filter(worth_sniffing, filenames):
                if (fmt := _sniffed(where(os.path.join(dirpath, n)))) is not None:
                    images[n] = fmt
            for name in _fs_sorted(list(images)):
                path = os.path.join(dirpath, name)
                sidecar = os.path.splitext(name)[0] + ".txt"
                yield where(path), os.path.relpath(path, top), (
                    where(os.path.join(dirpath, sidecar)) if sidecar in names else None), images[name]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "extensions": sorted(IMAGE_EXTENSIONS), "sidecar_captions": ".txt"}

    def _empty_hint(self) -> str:
        return f"no files with extensions {', '.join(sorted(IMAGE_EXTENSIONS))}"


def _read_sidecar(path: str) -> tuple[str, ...]:
    try:
        with io.TextIOWrapper(open_location(path), encoding="utf-8", errors="replace") as f:
            return tuple(line.strip() for line in f if line.strip())
    except OSError as exc:
        log.warning("cannot read captions %s: %s", path, exc)
        return ()


class ManifestSource(ImageSource):
    """A CSV, TSV or Parquet table (:func:`vlsearch.data.manifest.read_manifest`): an image-path
    column (relative to the table's folder), an optional caption column, and any other columns,
    carried into the shards as metadata with their types.

    Rows of the same image (one per caption) become one record with all its captions, in row
    order; its metadata are taken from its first row. Records are sorted by image path.
    """

    kind = "manifest"

    def __init__(self, root: Path | str, image_column: str | None = None, caption_column: str | None = None):
        super().__init__(root)
        self.table = read_manifest(root)
        names = self.table.column_names
        self.image_column = _pick_column(names, image_column, IMAGE_COLUMN_CANDIDATES, "image", root)
        self.caption_column = _pick_column(names, caption_column, CAPTION_COLUMN_CANDIDATES, "caption", root,
                                           required=False)
        meta = [f for f in self.table.schema if f.name not in (self.image_column, self.caption_column)]
        self._meta_names = [f.name for f in meta]
        self.metadata_schema = pa.schema([f.with_name(_metadata_name(f.name)) for f in meta])
        self._order = self._sorted_row_order()

    def _sorted_row_order(self) -> pa.Array:
        import pyarrow.compute as pc

        paths = self.table.column(self.image_column)
        if paths.null_count:
            raise SourceError(f"column {self.image_column!r} of {self.root} has {paths.null_count} empty image paths")
        indexed = pa.table({"p": pc.cast(paths, pa.string()), "row": pa.array(range(len(paths)), pa.int64())})
        return pc.sort_indices(indexed, sort_keys=[("p", "ascending"), ("row", "ascending")])

    def size_hint(self) -> int | None:
        import pyarrow.compute as pc

        return len(pc.unique(self.table.column(self.image_column)))

    def _records(self) -> Iterator[ImageRecord]:
        base = self.root.rsplit("/", 1)[0] if is_url(self.root) else self.root.parent
        order = self._order.to_pylist()
        paths = self.table.column(self.image_column).to_pylist()
        captions = self.table.column(self.caption_column).to_pylist() if self.caption_column else None
        meta_columns = {_metadata_name(k): self.table.column(k).to_pylist() for k in self._meta_names}
        i = 0
        while i < len(order):
            first, path = order[i], str(paths[order[i]])
            j = i
            while j < len(order) and str(paths[order[j]]) == path:
                j += 1
            caps = () if captions is None else tuple(str(captions[r]) for r in order[i:j] if captions[r] is not None)
            meta = {name: values[first] for name, values in meta_columns.items()}
            yield ImageRecord(stable_id(path), path, _join(base, path), caps, meta)
            i = j

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "image_column": self.image_column, "caption_column": self.caption_column,
                "metadata_columns": self.metadata_schema.names, "rows": self.table.num_rows}

    def _empty_hint(self) -> str:
        return "the table has no rows"


def _metadata_name(name: str) -> str:
    return RENAME_PREFIX + name if name in RESERVED_COLUMNS else name


def _join(base: Path | str, name: str) -> str:
    """``name`` under ``base`` (a local folder or a URL); a ``name`` that is itself a URL stays as is."""
    if is_url(name):
        return name
    return f"{base.rstrip('/')}/{name}" if is_url(base) else str(Path(base) / name)


def _pick_column(names: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path,
                 required: bool = True) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise SourceError(f"{path} has no {what} column {wanted!r}; its columns are {names}")
        return wanted
    for name in candidates:
        if name in names:
            return name
    if required:
        raise SourceError(f"{path} has none of the {what} columns {list(candidates)}; its columns are {names}. "
                          f"Name it with --{what}-column.")
    return None


class TarSource(ImageSource):
    """webdataset-style ``.tar`` shards: ``key.jpg`` (any image extension) with ``key.txt`` (one
    caption) and/or ``key.json`` (``caption``/``captions``/``text`` fields) next to it.

    Tars are read as streams, in name order; a key's files must be adjacent (webdataset's rule).
    Only uncompressed tars: workers read each image straight from its offset in the tar.
    Metadata columns: ``key`` and ``json`` (the raw JSON text, or null).
    """

    kind = "webdataset"
    metadata_schema = pa.schema([("key", pa.string()), ("json", pa.string())])

    def __init__(self, root: Path | str, tars: list[Path] | list[str]):
        super().__init__(root)
        self.tars = tars

    def _records(self) -> Iterator[ImageRecord]:
        top, root_is_dir = _fs_path(self.root), _is_dir(self.root)
        for tar in self.tars:
            rel = os.path.relpath(_fs_path(tar), top) if root_is_dir else os.path.basename(_fs_path(tar))
            for key, members in _tar_groups(tar):
                image = next(((name, off, size) for name, off, size, _ in members if is_image_name(name)), None)
                if image is None:
                    log.debug("%s: key %s has no image file; skipped", tar, key)
                    continue
                texts = {os.path.splitext(n)[1].lower(): data for n, _, _, data in members if data is not None}
                captions, raw_json = _tar_captions(texts)
                name, off, size = image
                path = display_path(f"{rel}/{name}")
                yield ImageRecord(stable_id(f"{rel}/{key}"), path, str(tar), captions,
                                  {"key": display_path(key), "json": raw_json}, (off, size))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tars": len(self.tars)}

    def _empty_hint(self) -> str:
        return "no image members in the tars"


def _tar_groups(tar: Path | str) -> Iterator[tuple[str, list[tuple[str, int, int, bytes | None]]]]:
    """Stream a tar: ``(key, [(name, offset, size, text bytes or None)])`` per run of same-key members."""
    try:
        with open_location(tar) as fh, tarfile.open(fileobj=fh, mode="r|") as tf:
            key, group = None, []
            for member in tf:
                tf.members = []  # stream mode keeps every TarInfo otherwise
                if not member.isfile():
                    continue
                dirname, base = os.path.split(member.name)
                mkey = os.path.join(dirname, base.split(".", 1)[0])
                if mkey != key and group:
                    yield key, group
                    group = []
                key = mkey
                ext = os.path.splitext(base)[1].lower()
                data = tf.extractfile(member).read() if ext in (".txt", ".json") else None
                group.append((base, member.offset_data, member.size, data))
            if group:
                yield key, group
    except tarfile.TarError as exc:
        raise SourceError(f"cannot read tar {tar}: {exc} (only uncompressed .tar shards are supported)") from exc


def _tar_captions(texts: dict[str, bytes]) -> tuple[tuple[str, ...], str | None]:
    captions: list[str] = []
    if ".txt" in texts:
        text = texts[".txt"].decode("utf-8", "replace").strip()
        captions += [text] if text else []
    raw = texts[".json"].decode("utf-8", "replace") if ".json" in texts else None
    if raw is not None:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            for name in ("caption", "text", "captions"):
                value = obj.get(name)
                values = value if isinstance(value, list) else [value]
                captions += [str(v) for v in values if isinstance(v, str) and v and str(v) not in captions]
    return tuple(captions), raw


def open_source(spec: str | os.PathLike, *, kind: str = "auto", image_column: str | None = None,
                caption_column: str | None = None) -> ImageSource:
    """Open an image source from a path, an fsspec URL (``s3://...``, see the module doc), or a
    ``*.tar`` glob of either.

    ``kind``: ``auto`` (a ``.csv``/``.tsv``/``.parquet`` file, or a folder holding ``captions.csv`` or
    another of ``MANIFEST_NAMES``, is a manifest; a ``.tar`` file, a glob, or a folder with
    ``.tar`` files at its top level is webdataset; any other folder is a folder of images), or one
    of ``folder``, ``manifest``, ``webdataset``. Raises :class:`SourceError`
    (:class:`FilesystemNotInstalledError` when a URL's protocol needs a package that is missing).
    """
    text = os.fspath(spec)
    if kind not in ("auto", "folder", "manifest", "webdataset"):
        raise SourceError(f"unknown source kind {kind!r}: use auto, folder, manifest or webdataset")
    if is_url(text):
        return _open_url(text, kind, image_column, caption_column)
    if glob.has_magic(text):
        tars = [Path(p) for p in sorted(glob.glob(text)) if p.endswith(".tar")]
        if not tars:
            raise SourceError(f"no .tar files match {text}")
        return TarSource(Path(os.path.dirname(text) or "."), tars)
    path = Path(text).expanduser()
    if not path.exists():
        raise SourceError(f"image source {path} does not exist")
    if path.is_file():
        return _open_file(path, kind, image_column, caption_column)
    manifest = find_manifest(path) if kind in ("auto", "manifest") else None
    tars = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
    return _open_folder(path, kind, manifest, tars, image_column, caption_column)


def _open_url(url: str, kind: str, image_column: str | None, caption_column: str | None) -> ImageSource:
    """:func:`open_source` of an fsspec URL: the same rules, listed through its filesystem."""
    fs, path = url_fs(url)
    if glob.has_magic(path):
        tars = [fs.unstrip_protocol(p) for p in sorted(fs.glob(path)) if p.endswith(".tar")]
        if not tars:
            raise SourceError(f"no .tar files match {url}")
        return TarSource(url.rsplit("/", 1)[0], tars)
    if not fs.exists(path):
        raise SourceError(f"image source {url} does not exist")
    if fs.isfile(path):
        return _open_file(url, kind, image_column, caption_column)
    url, path = url.rstrip("/"), path.rstrip("/")
    manifest = next((f"{url}/{n}" for n in MANIFEST_NAMES if fs.isfile(f"{path}/{n}")), None) \
        if kind in ("auto", "manifest") else None
    tars = [fs.unstrip_protocol(p) for p in sorted(fs.ls(path, detail=False)) if p.endswith(".tar") and fs.isfile(p)]
    return _open_folder(url, kind, manifest, tars, image_column, caption_column)


def _open_file(location: Path | str, kind: str, image_column: str | None, caption_column: str | None) -> ImageSource:
    suffix = location_suffix(location)
    if kind in ("auto", "webdataset") and suffix == ".tar":
        return TarSource(location, [location])
    if kind in ("auto", "manifest") and is_manifest(location):
        return ManifestSource(location, image_column, caption_column)
    raise SourceError(f"{location} is not a folder, a .csv/.tsv/.parquet manifest or a .tar shard")


def _open_folder(root: Path | str, kind: str, manifest: Path | str | None, tars: list, image_column: str | None,
                 caption_column: str | None) -> ImageSource:
    if manifest is not None:  # a dataset folder: its captions.csv (or ...) lists the images
        return ManifestSource(manifest, image_column, caption_column)
    if kind == "manifest":
        raise SourceError(f"{root} is a folder without a manifest ({', '.join(MANIFEST_NAMES)})")
    if kind == "webdataset" or (kind == "auto" and tars):
        if not tars:
            raise SourceError(f"no .tar files in {root}")
        return TarSource(root, tars)
    return FolderSource(root)
