"""The keyword (full-text, BM25) index of a collection: one immutable tantivy index per images shard.

::

    my-collection/
      images/part-00007.parquet
      keyword/part-00007/         tantivy index of shard 7's rows (written before the images file)

**Why tantivy** (measured by ``benchmarks/bench_hybrid.py --engines``; figures in
``benchmarks/RESULTS.md``): it is the engine LanceDB uses, a ~4 MB wheel with no dependencies,
it builds 1M short captions in seconds, answers a query in well under a millisecond per 10k-row
shard, and its query parser gives us phrases (``"red car"``), field prefixes (``path:beach``),
boolean operators and a syntax error to turn into InvalidQueryError. ``bm25s`` (the alternative
measured) builds and queries as fast but has no phrases, fields or query syntax at all, and
DuckDB's ``fts`` extension downloads itself at first use (no offline install).

**Why one index per shard**: shards are immutable, so their keyword indexes are too. A shard's
index is written (into a temporary directory renamed into place) *before* its images file, so a
committed shard always has one, and the keyword index of a version is exactly its live shards'
indexes: versions, leases, crash safety and garbage collection (:mod:`vlsearch.store.gc`) apply
unchanged. A ``kill -9`` mid-sync leaves keyword directories of uncommitted shards, which no
version references and the next writer removes. Deleted rows are filtered at query time by the
version's dead-row set (tombstones), as in vector search.

**Per-shard BM25 statistics.** Each shard's index scores with its own document frequencies and
average lengths; hits of all shards are merged by score. With shards of thousands of rows from
one source the statistics barely differ; ``bench_hybrid.py --engines`` measures the top-10
agreement with one global index (see RESULTS.md).

Indexed fields: ``caption`` (all captions of the image, English stemming), ``path`` (the file
name and folder words: ``/photos/beach/dog_01.jpg`` gives ``photos beach dog 01 jpg``) and one
field per text metadata column (every string column but the file hashes, under its own name
when that is a plain identifier). A query without a prefix searches all of them.
"""

from vlsearch.store.keyword.index import (
    KEYWORD_DIR, build_shard_index, keyword_dir_name, keyword_path, missing_keyword_shards, text_columns,
)
from vlsearch.store.keyword.search import KeywordSearcher, ShardKeywordIndex

__all__ = ["KEYWORD_DIR", "build_shard_index", "keyword_dir_name", "keyword_path", "missing_keyword_shards",
           "text_columns", "KeywordSearcher", "ShardKeywordIndex"]
