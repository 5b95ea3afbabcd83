"""Run the ``vlsearch`` CLI with every image decode slowed down, so a test can kill it mid-run.

Usage: ``python tests/_embed_slowly.py embed SOURCE COLLECTION ...`` (delay: $VLSEARCH_TEST_DECODE_DELAY s).
"""

import os
import time

from indexing import decode

_open_record = decode.open_record  # what decode_record calls for each image


def _slow_open_record(*args, **kwargs):
    time.sleep(float(os.environ.get("VLSEARCH_TEST_DECODE_DELAY", "0.1")))
    return _open_record(*args, **kwargs)


decode.open_record = _slow_open_record

if __name__ == "__main__":
    from vlsearch.app.cli import app

    app(prog_name="vlsearch")
