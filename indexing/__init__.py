"""vlsearch's offline indexer: sources -> decode -> encode -> Parquet shards -> FAISS index."""
