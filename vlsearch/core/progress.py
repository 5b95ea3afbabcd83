"""The progress callback type shared by every long-running library call.

A library function that takes ``progress`` calls ``progress(done, total, **postfix)`` as it
goes (``total`` may be None; ``stage="..."`` names a sub-stage). The library never prints: the
CLI turns these calls into tqdm bars (:class:`vlsearch.app.cli.TqdmProgress`).
"""

from __future__ import annotations

from typing import Callable

#: ``progress(done, total=None, **postfix)``; see the module docstring.
Progress = Callable[..., None]


def no_progress(*args: object, **kwargs: object) -> None:
    """A progress callback that ignores every report."""
