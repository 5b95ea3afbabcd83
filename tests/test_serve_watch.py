"""``vlsearch serve COLL --watch SOURCE``: one command keeps a served collection in step with a
folder. A real server process; files written into the folder (one slowly, in chunks) are served
within 10 s, and a deleted one is never returned once its version is served."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from process_support import wait_for_line
from test_embed import _jpeg
from test_watch import built  # noqa: F401  (fixture: a folder of 4 images and its indexed collection)

from vlsearch.app.serve import ServeConfig, create_app
from vlsearch.app.serve.watching import parse_watches
from vlsearch.core.errors import ServeConfigError, SourceError

WITHIN = 10.0  # seconds from the last write to the server returning it


def _paths(http: httpx.Client) -> tuple[int, set[str]]:
    """The version a search was served from and every path it returns (exact, k above the count).
    The version comes with the hits: read apart, a reload between two requests would pair them wrongly."""
    r = http.post("/api/collections/coll/search", json={"text": "picture", "k": 100, "exact": True})
    assert r.status_code == 200, r.text
    return r.json()["version"], {h["path"] for h in r.json()["hits"]}


def _write_slowly(path: Path, data: bytes, pause: float) -> None:
    with open(path, "wb") as fh:
        for i in range(4):
            fh.write(data[i * len(data) // 4:(i + 1) * len(data) // 4])
            fh.flush()
            time.sleep(pause)


def test_serve_watch_serves_new_files_within_seconds_and_never_a_deleted_one(built):  # noqa: F811
    src, coll = built
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "vlsearch.app.cli", "serve", str(coll), "--watch", str(src),
                             "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    try:
        port = wait_for_line(proc, r"Uvicorn running on http://127\.0\.0\.1:(\d+)", timeout=300).group(1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            start_version, before = _paths(http)
            assert before == {f"img{i:03d}.jpg" for i in range(4)}
            (src / "img100.jpg").write_bytes(_jpeg(100))
            (src / "img001.jpg").unlink()
            # 4 chunks 0.7 s apart: longer than the watcher's 1 s settle would allow only if it waited for them
            _write_slowly(src / "slow.jpg", _jpeg(101), pause=0.7)
            written = time.monotonic()
            seen: list[tuple[int, set[str]]] = []
            while time.monotonic() - written < WITHIN:
                seen.append(_paths(http))
                if {"img100.jpg", "slow.jpg"} <= seen[-1][1]:
                    break
                time.sleep(0.2)
        assert {"img100.jpg", "slow.jpg"} <= seen[-1][1], f"not served within {WITHIN} s: {seen[-1]}"
        deleted_at = min(v for v, paths in seen if "img001.jpg" not in paths)
        assert all("img001.jpg" not in paths for v, paths in seen if v >= deleted_at)
        assert seen[-1][0] > start_version
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0].decode()
    assert "coll: +" in out and "deleted -> version" in out and "failures" not in out  # never half-written


def test_serve_watch_arguments_are_checked_before_anything_runs(built, tmp_path):  # noqa: F811
    src, coll = built
    assert parse_watches((str(src),), ["coll"]) == {"coll": str(src)}
    assert parse_watches((f"b={src}",), ["a", "b"]) == {"b": str(src)}
    with pytest.raises(ServeConfigError, match="NAME=SOURCE"):
        parse_watches((str(src),), ["a", "b"])
    with pytest.raises(ServeConfigError, match="watched twice"):
        parse_watches((str(src), f"coll={src}"), ["coll"])
    with pytest.raises(ServeConfigError, match="pin-version"):
        ServeConfig(watch=(str(src),), pin_version=True)
    with pytest.raises(SourceError, match="cannot watch"):
        create_app({"coll": coll}, ServeConfig(watch=(str(tmp_path / "missing"),)))


def test_served_watchers_start_and_stop_with_the_app(built):  # noqa: F811
    from fastapi.testclient import TestClient

    src, coll = built
    rounds: list = []
    app = create_app({"coll": coll}, ServeConfig(watch=(str(src),)), on_watch=lambda name, r: rounds.append(name))
    assert not any(t.name.startswith("vlsearch-watch") for t in threading.enumerate())
    with TestClient(app):
        assert any(t.name.startswith("vlsearch-watch") for t in threading.enumerate())
        deadline = time.monotonic() + 60
        while not rounds and time.monotonic() < deadline:  # the catch-up round at start
            time.sleep(0.1)
    assert rounds[:1] == ["coll"]
    assert not any(t.name.startswith("vlsearch-watch") and t.is_alive() for t in threading.enumerate())
