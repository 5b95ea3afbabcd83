"""The documentation holds together: every relative link in README.md and docs/ leads to a file (and,
for a markdown target, to a heading), every mention of a docs page or of a named README / RESULTS.md
section anywhere in the project still exists, and the README's install line pins what CI installs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport, a dependency there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Project text that may name a docs page or a section: code, docs, config, CI.
SOURCES = sorted({*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.md"), ROOT / "pyproject.toml",
                  ROOT / ".ci" / "run", *(p for d in ("vlsearch", "indexing", "benchmarks", "tests", "docs")
                                           for p in (ROOT / d).rglob("*.py"))} - {Path(__file__).resolve()})

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
SECTION_MENTION = re.compile(r"\b(README|RESULTS)(?:\.md)?`?,? (?:section )?\"([^\"\n]+)\"")
PAGE_MENTION = re.compile(r"\bdocs/[\w./-]+\.md\b")
MARKER = re.compile(r"<!--\s*([\w.-]+):start\s*-->")


def prose_lines(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def headings(path: Path) -> list[str]:
    return [m.group(1).strip() for line in prose_lines(path.read_text(encoding="utf-8"))
            if (m := re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line))]


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(path):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    found = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        found += LINK.findall(INLINE_CODE.sub("``", line))
    return found


def broken_link(page: Path, target: str) -> str | None:
    """Why ``target`` (a link in ``page``) leads nowhere, or None when it resolves."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:...: not ours to check offline
        return None
    path_part, _, anchor = target.partition("#")
    dest = (page.parent / path_part).resolve() if path_part else page
    if not dest.exists():
        return f"{target}: no such file"
    if ROOT not in dest.parents:
        return f"{target}: outside the repository"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    problems = [why for target in links(page) if (why := broken_link(page, target))]
    assert problems == []


def test_every_docs_page_is_linked_from_the_readme_or_another_page():
    reached = {(page.parent / t.partition("#")[0]).resolve() for page in PAGES for t in links(page)
               if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and t.partition("#")[0]}
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in reached]
    assert orphans == []


def test_mentioned_docs_pages_exist():
    """A page path such as docs/SCALING.md written in code or docs (not only as a link) names a real page."""
    missing = sorted({f"{src.relative_to(ROOT)}: {m}" for src in SOURCES
                      for m in PAGE_MENTION.findall(src.read_text(encoding="utf-8")) if not (ROOT / m).is_file()})
    assert missing == []


def _section_names(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [h.lower() for h in headings(path)] + [m.lower() for m in MARKER.findall(text)]


def test_named_sections_exist():
    """`README "Install"` or `RESULTS.md "Sync cost"` in any project file names a heading that still
    exists (a heading that starts with the quoted words, or a RESULTS.md section marker)."""
    files = {"README": ROOT / "README.md", "RESULTS": ROOT / "benchmarks" / "RESULTS.md"}
    names = {key: _section_names(path) for key, path in files.items()}
    stale = sorted({f"{src.relative_to(ROOT)}: {key} \"{name}\"" for src in SOURCES
                    for key, name in SECTION_MENTION.findall(src.read_text(encoding="utf-8"))
                    if not any(h.startswith(name.lower().rstrip(".")) for h in names[key])})
    assert stale == []


def test_readme_keeps_the_fresh_machine_commands_and_ci_pins():
    """CI runs the README's test command; the README's install line pins what CI installs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q tests" in ci
    assert re.search(r"pip install -e '\.\[test\]' && python -m pytest -q tests\n", readme)
    assert re.search(r"pip install -e \. && vlsearch demo", readme)
    assert _torch_pins(ci) and _torch_pins(readme) == _torch_pins(ci)


def _torch_pins(text: str) -> list[str]:
    return sorted(set(re.findall(r"\b(torch(?:vision)?==[\w.+]+)", text)))


def test_package_dependencies_have_floors_not_caps():
    """Exact versions live in .ci/run and the README only: the package never caps a dependency
    without a stated reason on the same line."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = [*project["dependencies"], *(s for group in project["optional-dependencies"].values() for s in group)]
    lines = (ROOT / "pyproject.toml").read_text(encoding="utf-8").splitlines()
    capped = [s for s in specs if re.search(r"(<|==|~=)", s.split(";")[0])
              and not any(s in line and "#" in line.split(s, 1)[1] for line in lines)]
    assert capped == []
