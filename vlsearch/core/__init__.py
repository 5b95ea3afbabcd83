"""Infrastructure every layer uses: errors, progress callbacks, atomic file writes, thread and allocator
settings, the byte-bounded cache, model identity and retrieval metrics. Imports nothing else of vlsearch."""
