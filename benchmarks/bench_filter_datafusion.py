"""DataFusion on bench_filter's filters: the engine vlsearch did not choose, measured for the record.

DataFusion is not a vlsearch dependency, so run this in any Python that has it::

    python -m venv /tmp/dfv && /tmp/dfv/bin/pip install datafusion pyarrow
    /tmp/dfv/bin/python benchmarks/bench_filter_datafusion.py bench-data/synthetic-n1000000-d512-q1000-s0-filter/collection

Prints one markdown paragraph (pass it to ``bench_filter.py --note``): the time to read the
non-embedding columns and to evaluate ``bucket < X AND label <> 'nothing'`` (first and second run)
at each selectivity, with DDL, DML and statements disallowed (``SQLOptions``).
"""

import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datafusion import SessionContext, SQLOptions, __version__

paths = sorted((Path(sys.argv[1]) / "images").glob("part-*.parquet"))
t = time.perf_counter()
tables = []
for p in paths:
    pf = pq.ParquetFile(p)
    tables.append(pf.read(columns=[n for n in pf.schema_arrow.names if n != "embedding"]))
table = pa.concat_tables(tables)
read_s = time.perf_counter() - t
ctx = SessionContext()
ctx.register_record_batches("images", [table.to_batches()])
opts = SQLOptions().with_allow_ddl(False).with_allow_dml(False).with_allow_statements(False)
parts = []
for pct in (50, 10, 1, 0.1, 0.01):
    sql = f"SELECT id FROM images WHERE (bucket < {int(round(pct * 100))}) AND (label <> 'nothing')"
    times = []
    for _ in range(2):
        t = time.perf_counter()
        ctx.sql_with_options(sql, opts).to_arrow_table()
        times.append((time.perf_counter() - t) * 1e3)
    parts.append(f"{pct:g} %: {times[0]:.1f} / {times[1]:.1f} ms")
print(f"DataFusion {__version__} on the same filters (`benchmarks/bench_filter_datafusion.py`, separate venv, "
      f"run just before this benchmark; {table.num_rows:,} rows read in {read_s:.2f} s; first / second "
      f"evaluation): " + "; ".join(parts) + ".")
