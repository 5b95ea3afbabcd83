"""The import rule of the package layout, checked by reading every module's imports with ``ast``.

* core ``vlsearch/*`` never imports ``indexing`` or ``vlsearch.app``;
* ``indexing`` imports the core only (never ``vlsearch.app``);
* ``vlsearch.app`` may import both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (at any depth: function-level imports too)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def forbidden(path: Path) -> tuple[str, ...]:
    parts = path.relative_to(ROOT).parts
    if parts[0] == "indexing":
        return ("vlsearch.app",)
    if parts[0] == "vlsearch" and parts[1] != "app":
        return ("indexing", "vlsearch.app")
    return ()


def violations(path: Path) -> list[str]:
    banned = forbidden(path)
    return sorted(m for m in imported_modules(path) if any(m == b or m.startswith(b + ".") for b in banned))


MODULES = sorted([*ROOT.glob("vlsearch/**/*.py"), *ROOT.glob("indexing/**/*.py")])


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_import_rule(path):
    assert violations(path) == [], f"{path.relative_to(ROOT)} imports {violations(path)}"


def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    """A rule that cannot fail protects nothing: each spelling of a forbidden import is caught."""
    core = ROOT / "vlsearch" / "_layout_probe.py"
    for source in ("import indexing.build", "from indexing import plan", "def f():\n    from .app import cli",
                   "from vlsearch.app.cli import app", "from . import app"):
        monkeypatch.setattr(Path, "read_text", lambda self, encoding=None, s=source: s)
        assert violations(core), source
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: "from .app import cli")
    assert violations(ROOT / "vlsearch" / "app" / "demo.py") == []  # app may import app
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: "from vlsearch.app import cli")
    assert violations(ROOT / "indexing" / "probe.py")


def test_readme_module_map_names_every_module():
    """Every module of the package is in the README's module map (and the map names no ghost)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("**Module map**"):readme.index("### A collection on disk")]
    missing = [str(p.relative_to(ROOT)) for p in MODULES if f"`{p.relative_to(ROOT)}`" not in table]
    assert missing == []
    import re

    named = re.findall(r"`((?:vlsearch|indexing)/[\w/]+\.py)`", table)
    assert [n for n in named if not (ROOT / n).is_file()] == []
