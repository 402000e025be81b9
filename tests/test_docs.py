"""Every ```python block of README.md and docs/**/*.md runs, on the backend under test.

A page is read as one script: its blocks run top to bottom in one namespace, in a fresh
temporary folder (examples may save files). Tracebacks point at the page's own line numbers.
Blocks fenced otherwise (```bash, ```text) are not run; a ```python fence indented inside a
list or an admonition would be missed by the extraction, so it is refused instead.
"""

from __future__ import annotations

import pathlib
import re

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
INDENTED = re.compile(r"^[ \t]+```python", re.MULTILINE)


def blocks(page: pathlib.Path) -> list[tuple[int, str]]:
    """``(first line, code)`` of each ```python block of ``page``, in order."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def _name(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=_name)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keras.backend.clear_session()
    namespace = {"__name__": "__docs__"}
    for line, code in blocks(page):
        # Pad with blank lines so that a traceback names the line in the page itself.
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)


def test_every_example_is_found():
    indented = [_name(p) for p in PAGES if INDENTED.search(p.read_text(encoding="utf-8"))]
    assert not indented, f"indented ```python blocks are not run; unindent them in {indented}"
    assert len(blocks(ROOT / "README.md")) >= 4, "the README's quick start lost its examples"
    counted = sum(len(blocks(p)) for p in PAGES)
    fences = sum(p.read_text(encoding="utf-8").count("```python") for p in PAGES)
    assert counted == fences, f"{fences - counted} ```python blocks are not closed properly"
