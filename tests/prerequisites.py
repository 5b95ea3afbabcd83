"""What some tests need from the machine: the shared real-data folder, a browser. Without it they
skip, except where a variable says it must be there: CI sets ``VLSEARCH_REQUIRE_SHARED_DATA=1`` and
``VLSEARCH_REQUIRE_BROWSER=1`` (``.ci/run``), so a test that would silently skip fails there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

REQUIRE_SHARED_DATA = "VLSEARCH_REQUIRE_SHARED_DATA"
REQUIRE_BROWSER = "VLSEARCH_REQUIRE_BROWSER"


def skip_or_fail(reason: str, variable: str) -> NoReturn:
    """Skip the test with ``reason``, or fail it when ``$variable`` is ``1``."""
    if os.environ.get(variable) == "1":
        pytest.fail(f"{reason}, and {variable}=1 says this run must have it", pytrace=False)
    pytest.skip(reason)


def shared_data_dir(path: Path) -> Path:
    """``path`` if it is a folder, else skip (fail under ``VLSEARCH_REQUIRE_SHARED_DATA=1``)."""
    if not path.is_dir():
        skip_or_fail(f"shared data not found at {path}", REQUIRE_SHARED_DATA)
    return path


def chromium_path() -> str:
    """Debian's chromium, else skip (fail under ``VLSEARCH_REQUIRE_BROWSER=1``)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        skip_or_fail("Debian's chromium is not installed here (apt-get install -y chromium), so the page "
                     "cannot be driven in a browser", REQUIRE_BROWSER)
    return found
