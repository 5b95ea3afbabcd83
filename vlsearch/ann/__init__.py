"""FAISS: index io, the auto plan, tuning, the on-disk refine rows file, live-id maintenance and merging.
Takes paths and manifest entries, never a ``Collection``."""
