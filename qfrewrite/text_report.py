"""Reports that print as rich tables in a terminal, as plain text everywhere else, and as JSON.

A subclass gives :meth:`TextReport.renderables` (the rich renderables of its first ``top`` rows), ``to_dict()`` and
``source`` (the file it reports on); ``print(report)``, ``str(report)`` and ``report.render(top, width)`` then give
plain text (no colour codes), ``rich.print(report)`` the styled version, and ``to_json(path)`` the JSON text, written
atomically and never over the source.
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable, Optional, Union

__all__ = ["TextReport"]


class TextReport:
    """Mixin: plain-text and rich rendering from :meth:`renderables`."""

    def renderables(self, top: int = 10) -> Iterable:
        raise NotImplementedError

    def __rich_console__(self, console, options):
        yield from self.renderables()

    def render(self, top: int = 10, width: int = 160) -> str:
        """Plain text (no colour codes)."""
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False)
        for r in self.renderables(top):
            console.print(r)
        return buf.getvalue().rstrip("\n")

    def __str__(self) -> str:
        return self.render()

    def to_json(self, path: Union[str, os.PathLike, None] = None, indent: Optional[int] = 2) -> str:
        """The JSON text; written atomically to ``path`` when given."""
        from .io_utils import one_output

        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with one_output(path, "the diagnosis", [("the model", self.source)]) as tmp:
                tmp.write_bytes((text + "\n").encode())
        return text
