"""Measuring retrieval: the benchmark of a collection and zero-shot classification."""
