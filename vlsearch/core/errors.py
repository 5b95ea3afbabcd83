"""Typed exceptions raised by vlsearch. The CLI turns them into messages and exit codes."""

from __future__ import annotations


class VlsearchError(Exception):
    """Base class of every error vlsearch raises on purpose."""


class ModelNotFoundError(VlsearchError, LookupError):
    """The model name is not a known open_clip / vlsearch architecture."""


class PretrainedNotFoundError(VlsearchError, LookupError):
    """The pretrained tag is not valid for the model, and is not a file or hub id either."""


class WeightsUnavailableError(VlsearchError):
    """Weights exist in principle but cannot be fetched here (offline, missing package...)."""


class CheckpointMismatchError(VlsearchError):
    """A checkpoint file does not match the architecture it is loaded into."""


class SourceError(VlsearchError):
    """An image source is missing, empty or malformed."""


class ImportFolderError(SourceError):
    """A folder to import (clip-retrieval output, npy + parquet embeddings) is malformed: a missing
    partition, row counts that differ between an npy file and its parquet, a dimension that does
    not match the model, partitions changed since the last import, or an index that does not match."""


class FilesystemNotInstalledError(SourceError, ImportError):
    """A source URL names an fsspec protocol whose package is not installed (e.g. ``s3://`` without
    ``s3fs``); the message says what to ``pip install``."""


class DecodeError(VlsearchError):
    """One image could not be decoded; ``kind`` names the reason (e.g. 'truncated', 'bomb')."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class DecodeHangError(VlsearchError):
    """A decoding worker produced nothing for far longer than its per-image timeouts allow: a hang
    inside C code that the per-image alarm could not interrupt. Names the batch's images."""


class CollectionError(VlsearchError):
    """A collection on disk is missing, damaged or inconsistent."""


class CollectionNotFoundError(CollectionError, FileNotFoundError):
    """No collection (manifest.json) at the given path."""


class CollectionLockedError(CollectionError):
    """Another live process is writing the collection (sync, compact, build-index)."""


class CollectionMismatchError(CollectionError):
    """A model, dimension or index does not match the collection it is used with."""


class IndexNotBuiltError(CollectionError):
    """ANN search was requested on a collection that has no index yet."""


class IndexConfigError(VlsearchError, ValueError):
    """An index type (FAISS factory string), metric or memory budget is not acceptable."""


class InvalidQueryError(VlsearchError, ValueError):
    """A search query (text, image, vector, k...) is not acceptable."""


class TrainingError(VlsearchError):
    """Training cannot start or continue (bad data, incompatible checkpoint...)."""


class ItemNotFoundError(VlsearchError, LookupError):
    """No item with the given id in the collection (or it has no readable image)."""


class ServeConfigError(VlsearchError, ValueError):
    """The server cannot start with these settings (e.g. an exposed address without a token)."""


class RemoteError(VlsearchError):
    """A vlsearch server answered with an error that has no more specific local type.

    ``status`` is the HTTP status code, ``message`` the server's explanation."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class RayNotInstalledError(VlsearchError, ImportError):
    """The Ray engine was asked for but the ``ray`` package is not installed (``pip install 'vlsearch[ray]'``)."""


class DistributedError(VlsearchError):
    """A distributed (Ray) job could not start, or a part of it failed after its retries."""


class PrecisionError(VlsearchError, ValueError):
    """An unknown inference precision, or one the device cannot run (int8 on CUDA)."""


class RerankerNotFoundError(VlsearchError, LookupError):
    """No re-ranker for this model (none ships and none was given), or the file is not one."""


class RerankerMismatchError(VlsearchError):
    """A re-ranker, or re-rank features stored in a collection, made for another model or re-ranker."""


class RerankFeaturesError(VlsearchError):
    """A candidate's re-rank features are neither stored in the collection nor recomputable."""


class TaggingError(VlsearchError, ValueError):
    """Auto-tags or captions cannot be made as asked: a malformed vocabulary, no calibrated
    ``min_score`` for the collection's model, or a model that cannot write captions."""
