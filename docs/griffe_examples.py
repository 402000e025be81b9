"""A griffe extension for the API pages: read the docstrings' ``Example:`` sections as examples.

multidrop's docstrings head their doctest-style examples ``Example:``; griffe's Google parser
knows only ``Examples:`` and would render the singular as prose, where ``>>> a[b][0]`` reads as
a markdown link. Renaming the heading before parsing renders every example as code.
"""

from __future__ import annotations

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headings to ``Examples:`` in every loaded docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
