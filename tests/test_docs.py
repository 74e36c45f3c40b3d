"""The docs site and the README hold to the rules of the docs.

- every public name (``fmaml.__all__``) has an API entry (a ``::: path`` line) in docs/;
- every ```` ```python ```` block in docs/*.md is a doctest (run by pytest: ``--doctest-glob``);
- every ``--8<--`` snippet names a file in examples/;
- the README is under 150 lines and links only to files that exist.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import fmaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
ENTRY = re.compile(r"^::: ([\w.]+)\s*$", re.MULTILINE)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SNIPPET = re.compile(r"""--8<--\s+["']([^"']+)["']""")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def resolve(path: str):
    """The object a ``::: path`` entry documents, found as mkdocstrings finds it: a submodule
    before an attribute of the same name (``fmaml.adapt`` is the module, not the function)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attribute in parts[i:]:
            value = getattr(value, attribute)
        return value
    raise ImportError(path)


def test_every_public_name_has_an_api_entry():
    entries = [path for page in PAGES for path in ENTRY.findall(page.read_text())]
    documented = {id(resolve(path)) for path in entries}
    missing = [name for name in fmaml.__all__ if id(getattr(fmaml, name)) not in documented]
    assert not missing, f"add a '::: fmaml.NAME' entry to a page of docs/api/ for {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_are_doctests(page):
    for language, body in FENCE.findall(page.read_text()):
        if language in ("python", "py", "pycon"):
            assert ">>>" in body, f"{page.name}: a python block without '>>>':\n{body[:200]}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_snippets_name_example_scripts(page):
    for name in SNIPPET.findall(page.read_text()):
        path = ROOT / name
        assert path.parent == ROOT / "examples", f"{page.name}: snippet {name} not in examples/"
        assert path.is_file(), f"{page.name}: snippet {name} does not exist"


def test_the_readme_is_short_and_its_links_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 150
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        assert (ROOT / target.split("#")[0]).exists(), f"README links to missing {target}"
    assert "shared/" not in text
