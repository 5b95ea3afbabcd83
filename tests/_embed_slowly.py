"""Run the ``vlsearch`` CLI with every image decode slowed down, so a test can kill it mid-run.

Usage: ``python tests/_embed_slowly.py embed SOURCE COLLECTION ...`` (delay: $VLSEARCH_TEST_DECODE_DELAY s).
"""

import os
import time

from indexing import decode

_load_image = decode.load_image


def _slow_load_image(*args, **kwargs):
    time.sleep(float(os.environ.get("VLSEARCH_TEST_DECODE_DELAY", "0.1")))
    return _load_image(*args, **kwargs)


decode.load_image = _slow_load_image

if __name__ == "__main__":
    from vlsearch.app.cli import app

    app(prog_name="vlsearch")
