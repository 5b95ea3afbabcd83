"""Helpers shared by the benchmark scripts: machine description, RESULTS.md sections, and the
index a benchmark measures (built once, reused).

Each script owns one section of ``benchmarks/RESULTS.md`` between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` markers and rewrites only that section, so scripts can run in any order.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# vlsearch benchmark results\n\nEach section is written by the script it names; rerun it to refresh.\n"


def evict_from_page_cache(path: str | os.PathLike) -> None:
    """Drop a file's cached pages (``posix_fadvise DONTNEED``): its next reads come from the disk.
    Pages a process still maps stay: unmap first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def machine() -> str:
    """One line describing the machine, torch threads and device (:func:`vlsearch.models.precision.describe_machine`)."""
    from vlsearch.models.precision import describe_machine

    return describe_machine()


def command_line() -> str:
    """The command that is running, with its ``nice`` level when it was started under one."""
    import shlex

    niceness = os.nice(0)
    prefix = f"nice -n {niceness} " if niceness > 0 else ""
    return prefix + "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md with ``body`` (markdown)."""
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    block = f"<!-- {name}:start -->\n{body.rstrip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def ensure_index(collection_dir: str | os.PathLike, index_type: str = "auto", **build_options: object) -> dict:
    """The collection's index entry: the existing one, else ``indexing.build.build_index``'s."""
    from indexing.build import build_index
    from vlsearch.store.collection import Collection

    coll = Collection.open(collection_dir)
    if coll.has_index():
        return coll.manifest.index
    return build_index(coll.path, index_type=index_type, **build_options)


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
