"""Every table multidrop prints, made the same way: ``rich`` tables rendered to plain text.

Modules build their rows; this module owns the look (title on the left, caption
under the table, numbers right-aligned) and the rendering to text, so ``str()``
of a plan, a report or a search result reads the same in a terminal, a log or a
doctest.

Example:
    >>> from multidrop import render
    >>> t = render.table("results", ["model", "#ms"], caption="medians")
    >>> t.add_row("mlp", "1.2")
    >>> print(render.text(t))
"""

from __future__ import annotations

import io

import rich.console
import rich.table

WIDTH = 140


def table(title: str, columns, *, caption: str | None = None) -> rich.table.Table:
    """A table with ``columns``; a column named ``#name`` is right-aligned and shown as ``name``
    (``#`` alone stays ``#``)."""
    result = rich.table.Table(
        title=title, title_justify="left", caption=caption or None, caption_justify="left"
    )
    for column in columns:
        right = column.startswith("#")
        result.add_column(
            column[1:] or "#" if right else column, justify="right" if right else "left"
        )
    return result


def text(*renderables) -> str:
    """Render tables (or any rich renderable, or strings) to plain text, one after another."""
    buffer = io.StringIO()
    console = rich.console.Console(file=buffer, width=WIDTH, color_system=None)
    for renderable in renderables:
        console.print(renderable)
    return buffer.getvalue()
