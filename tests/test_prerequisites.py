"""The switch that turns a missing prerequisite (shared data, browser) from a skip into a failure
where a run requires it (CI: .ci/run sets the variables)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prerequisites import REQUIRE_BROWSER, REQUIRE_SHARED_DATA, chromium_path, shared_data_dir

ROOT = Path(__file__).resolve().parents[1]


def test_missing_shared_data_skips_on_a_fresh_clone_and_fails_where_required(tmp_path, monkeypatch):
    missing = tmp_path / "no-shared-data"
    monkeypatch.delenv(REQUIRE_SHARED_DATA, raising=False)
    with pytest.raises(pytest.skip.Exception, match="shared data not found"):
        shared_data_dir(missing)
    monkeypatch.setenv(REQUIRE_SHARED_DATA, "1")
    with pytest.raises(pytest.fail.Exception, match=f"shared data not found at {missing}.*{REQUIRE_SHARED_DATA}=1"):
        shared_data_dir(missing)
    assert shared_data_dir(tmp_path) == tmp_path  # present: used, required or not


def test_missing_browser_skips_on_a_fresh_clone_and_fails_where_required(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no chromium on an empty PATH
    monkeypatch.delenv(REQUIRE_BROWSER, raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        chromium_path()
    monkeypatch.setenv(REQUIRE_BROWSER, "1")
    with pytest.raises(pytest.fail.Exception, match=f"chromium is not installed.*{REQUIRE_BROWSER}=1"):
        chromium_path()


def test_ci_requires_the_shared_data_and_the_browser():
    script = (ROOT / ".ci" / "run").read_text()
    for variable in (REQUIRE_SHARED_DATA, REQUIRE_BROWSER):
        assert script.index(f"\nexport {variable}=1\n") < script.index("python -m pytest")


def test_a_fixture_run_fails_not_skips_when_required(tmp_path):
    """Through pytest itself: a test using the shared_data fixture logic, with the folder missing."""
    (tmp_path / "test_needs_data.py").write_text(
        "from pathlib import Path\nfrom prerequisites import shared_data_dir\n\n"
        "def test_data():\n    shared_data_dir(Path('/nonexistent/shared/data'))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    outcome = {}
    for required in ("0", "1"):
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsf",
                               str(tmp_path)], env={**env, REQUIRE_SHARED_DATA: required},
                              capture_output=True, text=True, cwd=tmp_path)
        outcome[required] = (done.returncode, done.stdout.splitlines()[-1])
    assert outcome["0"][0] == 0 and "1 skipped" in outcome["0"][1]
    assert outcome["1"][0] == 1 and "1 failed" in outcome["1"][1]
