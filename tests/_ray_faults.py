"""Faults the Ray tests inject into Ray worker processes.

Installed in every worker of a test job by ``runtime_env={"worker_process_setup_hook": install}``
(pickled by value: workers run the hook before they see the driver's sys.path); inert unless the job sets these environment variables:

- ``VLSEARCH_TEST_DECODE_DELAY``: seconds each image decode sleeps (a job slow enough to kill);
- ``VLSEARCH_TEST_CRASH_MARKER`` + ``VLSEARCH_TEST_CRASH_AFTER``: the worker process dies
  (``os._exit``, like a lost node) at its N-th image decode, once: the marker file records it.
"""

import os
import time

def install() -> None:
    if not (os.environ.get("VLSEARCH_TEST_DECODE_DELAY") or os.environ.get("VLSEARCH_TEST_CRASH_MARKER")):
        return  # no fault asked: import nothing (indexing.decode imports torch, ~3 s in every worker)
    from indexing import decode

    original = decode.open_record  # what decode_record calls for each image
    calls = [0]

    def open_record(*args, **kwargs):
        delay = os.environ.get("VLSEARCH_TEST_DECODE_DELAY")
        if delay:
            time.sleep(float(delay))
        marker = os.environ.get("VLSEARCH_TEST_CRASH_MARKER")
        calls[0] += 1
        if marker and calls[0] > int(os.environ.get("VLSEARCH_TEST_CRASH_AFTER", "0")) and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return original(*args, **kwargs)

    decode.open_record = open_record


if __name__ == "__main__":  # python tests/_ray_faults.py RAY_ADDRESS DELAY vlsearch-args...: a slow CLI driver
    import sys

    import ray

    from vlsearch.app.cli import app

    address, delay, *args = sys.argv[1:]
    ray.init(address=address, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": install, "env_vars": {"VLSEARCH_TEST_DECODE_DELAY": delay}})
    app(args, prog_name="vlsearch")
