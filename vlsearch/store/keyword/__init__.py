"""The keyword (full-text, BM25) index of a collection: one immutable tantivy index per images shard.

::

    my-collection/
      images/part-00007.parquet
      keyword/part-00007/         tantivy index of shard 7's rows (written before the images file)

**Why tantivy** (measured by ``benchmarks/bench_hybrid.py --engines 100000``; RESULTS.md): it is
the engine LanceDB uses, a ~4 MB wheel with no dependencies; on 100,000 synthetic captions it
built vlsearch's per-shard layout in 4.6 s and answered a 3-word query in 2.0 ms over 10 shards
(1.2 ms as one index), where ``bm25s`` 0.3 took 4.5 s to build and 9 ms per query (on 1M rows in
100 shards, a keyword query takes 27 ms p50, one thread; RESULTS.md); and its query
parser gives phrases (``"red car"``), field prefixes (``path:beach``), boolean operators and
syntax errors to turn into InvalidQueryError, where ``bm25s`` has bag-of-words queries only.
DuckDB's ``fts`` extension downloads itself at first use (no offline install), so it was not an
option.

**Why one index per shard**: shards are immutable, so their keyword indexes are too. A shard's
index is written (into a temporary directory renamed into place) *before* its images file, so a
committed shard always has one, and the keyword index of a version is exactly its live shards'
indexes: versions, leases, crash safety and garbage collection (:mod:`vlsearch.store.gc`) apply
unchanged. A ``kill -9`` mid-sync leaves keyword directories of uncommitted shards, which no
version references and the next writer removes. Deleted rows are filtered at query time by the
version's dead-row set (tombstones), as in vector search.

**Per-shard BM25 statistics.** Each shard's index scores with its own document frequencies and
average lengths; the hits of all shards are merged by score. Measured cost: keyword R@10 on the
flickr8k-test split (first captions stored, the other four as queries) is 60.9 % with its 1,000
images in one index, 60.0 % in 4 shards of 250 and 59.0 % in 10 shards of 100. vlsearch's shards
hold 10,000 rows, so their statistics are closer still to the global ones; accepted, for the
immutability (no global file to rewrite on every sync) it buys.

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
