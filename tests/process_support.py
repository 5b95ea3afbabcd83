"""Waiting on a child process's output without hanging the test run."""

from __future__ import annotations

import re
import select
import subprocess
import time

import pytest


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    """The first line ``proc`` writes to its stdout that matches ``pattern``, waited for at most
    ``timeout`` seconds in all. If the child exits or the time runs out first, it is killed and the
    test fails with what it wrote (and its stderr, when that is a separate pipe).

    ``proc`` must be started with ``stdout=subprocess.PIPE, bufsize=0``: unbuffered, a line
    read here leaves nothing behind in a Python buffer that ``select`` cannot see.
    """
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while (left := deadline - time.monotonic()) > 0 and select.select([proc.stdout], [], [], left)[0]:
        line = proc.stdout.readline().decode("utf-8", "replace")
        if not line:  # end of file: the child exited
            break
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    proc.kill()
    code = proc.wait()
    stderr = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
    pytest.fail(f"no line matching {pattern!r} within {timeout:g} s (exit code {code}); the child wrote:\n"
                + ("".join(seen) + stderr)[-3000:], pytrace=False)
