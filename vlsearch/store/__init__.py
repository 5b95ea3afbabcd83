"""The collection format: manifest and versions, shard files, tombstones and garbage collection, the
writer lock, updates, and row-level reads. FAISS indexes are reached only through :mod:`vlsearch.ann`."""
