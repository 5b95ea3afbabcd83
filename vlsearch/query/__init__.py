"""Searching a collection: the ``Searcher``, exact top-k, metadata filters, subset search and results."""
