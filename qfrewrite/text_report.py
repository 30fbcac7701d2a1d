"""Reports that print as rich tables in a terminal and as plain text everywhere else.

A subclass gives :meth:`TextReport.renderables` (the rich renderables of its first ``top`` rows); ``print(report)``,
``str(report)`` and ``report.render(top, width)`` then give plain text (no colour codes) and ``rich.print(report)``
the styled version.
"""
from __future__ import annotations

import io
from typing import Iterable

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
