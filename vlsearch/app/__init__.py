"""The application layer: entry points over both halves of the package.

``vlsearch.app`` may import the core (``vlsearch.*``) and the offline side (``indexing``); neither
of them imports it. :mod:`vlsearch.app.cli` is the ``vlsearch`` command (the only code that prints
or exits), :mod:`vlsearch.app.demo` the end-to-end demo behind ``vlsearch demo``.
"""
