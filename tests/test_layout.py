"""The package layout: the import-linter contracts of pyproject.toml hold (layers, no cycles, a light
client), the checker really catches a breach, and the module map names every module."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_MAP = ROOT / "docs" / "ARCHITECTURE.md"
LINT_IMPORTS = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                "sys.exit(lint_imports_command())"]


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([*LINT_IMPORTS, "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def _copy_sources(dest: Path) -> Path:
    """The packages' Python files and pyproject.toml (no weights or data) under ``dest``."""
    for path in [*ROOT.glob("vlsearch/**/*.py"), *ROOT.glob("indexing/**/*.py")]:
        target = dest / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    shutil.copyfile(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


@pytest.mark.parametrize("probe, broken", [
    ("vlsearch/core/probe.py", "def f():\n    from vlsearch.app import cli\n"),          # upward, inside a function
    ("vlsearch/store/probe.py", "def f():\n    from vlsearch.query import searcher\n"),
    ("vlsearch/ann/probe.py", "from vlsearch.store import collection\n"),                 # ann never imports store
    ("vlsearch/client_probe.py", "import torch\n"),                                       # not the client itself
    ("vlsearch/store/layout.py", "def f():\n    from vlsearch.store import collection\n"),  # a cycle in store
])
def test_a_breach_is_caught(tmp_path, probe, broken):
    """A checker that cannot fail protects nothing: each kind of breach breaks a contract."""
    tree = _copy_sources(tmp_path)
    target = tree / probe
    if probe.endswith("client_probe.py"):  # the client importing torch through a module it imports
        target.write_text(broken)
        client = tree / "vlsearch" / "client.py"
        client.write_text(client.read_text() + "\nfrom vlsearch import client_probe  # noqa\n")
    else:
        target.write_text((target.read_text() if target.exists() else "") + "\n" + broken)
    result = lint_imports(tree)
    assert result.returncode != 0 and "broken" in result.stdout, result.stdout


def _modules() -> list[Path]:
    paths = sorted([*ROOT.glob("vlsearch/**/*.py"), *ROOT.glob("indexing/**/*.py")])
    return [p for p in paths if not (p.name == "__init__.py" and _only_docstring(p))]


def _only_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return len(body) <= 1 and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def test_module_map_names_every_module():
    """Every module of the package is in the module map (and the map names no ghost)."""
    text = MODULE_MAP.read_text(encoding="utf-8")
    missing = [str(p.relative_to(ROOT)) for p in _modules() if f"`{p.relative_to(ROOT)}`" not in text]
    assert missing == []
    named = re.findall(r"`((?:vlsearch|indexing)/[\w/]+\.py)`", text)
    assert [n for n in named if not (ROOT / n).is_file()] == []


def test_every_public_name_resolves_from_where_it_is_defined():
    """``from vlsearch import X`` works for every public name, and the lazy map points at the module
    that defines X (not one that merely imports it)."""
    import vlsearch

    for name in vlsearch.__all__:
        value = getattr(vlsearch, name)
        if name != "__version__":
            assert getattr(value, "__module__", None) == vlsearch._LAZY[name], name
