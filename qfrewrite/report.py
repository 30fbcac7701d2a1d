"""The pass manager's report: one :class:`PassReport` per pass, as a terminal table, JSON and a PNG figure.

Each entry holds the pass's own ``stats``, what it left alone and why (``skipped``), its run time, for a non-exact pass the float output drift (SQNR in dB of
the outputs against those before the pass, max abs difference, top-1 agreement), and the per-channel statistics
before and after it (a :class:`~qfrewrite.analysis.channel_stats.GraphChannelStats` from the default hook, in the
"as quantized" view with BatchNorm folded; a custom hook's dict is kept as it is).

* ``str(report)`` / ``rich.print(report)``: a table of the passes (drift, worst depthwise spread, zero and outlier
  channels, the worst layer's per-tensor weight SQNR, before -> after), each pass's own scalar statistics, and a
  table of the layers that per-tensor 8-bit weights hurt most, first state -> last state.
* :meth:`Report.to_json`: ``{"source", "passes": [...], "layers_first", "layers_last"}``; each pass carries the
  per-layer summaries (scalars and channel indices) before and after, keyed by node name; the per-channel arrays
  (weight min/max, BN scale, activation min/max) are written once for the first and the last graph state.
* :meth:`Report.plot`: per-channel weight ranges of the worst layers, first state against last state.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["PassReport", "Report", "jsonable"]


@dataclass
class PassReport:
    name: str
    exact: bool
    modified: bool
    stats: Dict[str, Any] = field(default_factory=dict)
    skipped: List[Any] = field(default_factory=list)
    seconds: float = 0.0
    drift: Optional[Dict[str, Any]] = None
    stats_before: Optional[Any] = None
    stats_after: Optional[Any] = None
    #: a pass run inside another one (the kept pipeline of a choice): reported, but not a state of the outer list
    inner: bool = False


def _is_channel_stats(x) -> bool:
    from .analysis.channel_stats import GraphChannelStats

    return isinstance(x, GraphChannelStats)


def jsonable(x):
    """``x`` with numpy values as Python numbers/lists, non-finite floats as strings ("inf", "nan") and channel
    statistics as their summaries, ready for :func:`json.dumps`."""
    if _is_channel_stats(x):
        return {"totals": jsonable(x.totals()), "layers": jsonable(x.summary())}
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist") and callable(x.tolist):  # numpy arrays and scalars
        return jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def _fmt(x, spec: str = ".3g") -> str:
    if x is None:
        return ""
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return format(x, spec)


def _arrow(a, b, spec: str = ".3g") -> str:
    if a is None and b is None:
        return ""
    if b is None or a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        return _fmt(a, spec)
    return f"{_fmt(a, spec)} -> {_fmt(b, spec)}"


class Report:
    """The ordered list of pass reports of one pipeline run."""

    def __init__(self, source: Optional[str] = None):
        self.source = source
        self.passes: List[PassReport] = []

    def add(self, entry: PassReport) -> None:
        self.passes.append(entry)

    def __getitem__(self, name_or_index):
        """An entry by position, by name, or by the name of a pass run inside another (``"Outer > Inner"``)."""
        if isinstance(name_or_index, int):
            return self.passes[name_or_index]
        for p in self.passes:
            if p.name == name_or_index:
                return p
        for p in self.passes:
            if p.name.rsplit(" > ", 1)[-1] == name_or_index:
                return p
        raise KeyError(name_or_index)

    @property
    def outer(self) -> List[PassReport]:
        """The entries of the passes of the list itself (not those run inside another pass)."""
        return [p for p in self.passes if not p.inner]

    def __len__(self) -> int:
        return len(self.passes)

    # -- graph states ----------------------------------------------------------------------------------------------
    @property
    def first_stats(self):
        """The statistics of the graph before the first pass (``None`` without statistics)."""
        return self.outer[0].stats_before if self.outer else None

    @property
    def last_stats(self):
        """The statistics of the graph after the last pass."""
        return self.outer[-1].stats_after if self.outer else None

    # -- JSON ------------------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        passes = []
        for p in self.passes:
            passes.append({"name": p.name, "exact": p.exact, "modified": p.modified, "stats": p.stats,
                           "skipped": [{"node": s.node, "reason": s.reason} for s in p.skipped],
                           "seconds": p.seconds, "inner": p.inner, "drift": p.drift, "stats_before": p.stats_before,
                           "stats_after": p.stats_after})
        out: Dict[str, Any] = {"source": self.source, "passes": passes}
        for key, st in (("layers_first", self.first_stats), ("layers_last", self.last_stats)):
            if _is_channel_stats(st):
                out[key] = {name: ls.to_dict(per_channel=True) for name, ls in st.items()}
        return jsonable(out)

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    # -- text --------------------------------------------------------------------------------------------------------
    def _pass_table(self):
        from rich import box
        from rich.table import Table

        with_stats = all(_is_channel_stats(p.stats_before) for p in self.outer) and self.outer
        t = Table(title=f"passes{' on ' + str(self.source) if self.source else ''}", title_justify="left",
                  box=box.SIMPLE_HEAD)
        for col, just in (("#", "right"), ("pass", "left"), ("change", "left"), ("drift dB", "right"),
                          ("top-1", "right"), ("s", "right")):
            t.add_column(col, justify=just, no_wrap=True)
        if with_stats:
            for col in ("dw spread", "zero", "outl", "min dB/T"):
                t.add_column(col, justify="right", no_wrap=True)
        for i, p in enumerate(self.passes):
            drift = p.drift or {}
            change = "none" if not p.modified else "exact" if p.exact else "approx"
            row = [str(i + 1), p.name, change, _fmt(drift.get("sqnr_db"), ".1f"),
                   _fmt(drift.get("top1_agreement"), ".3f"), f"{p.seconds:.1f}"]
            if with_stats and p.inner:
                row += [""] * 4
            elif with_stats:
                a, b = p.stats_before.totals(), p.stats_after.totals()
                row += [_arrow(a["max_depthwise_spread"], b["max_depthwise_spread"]),
                        _arrow(a["zero_channels"], b["zero_channels"], "d"),
                        _arrow(a["outlier_channels"], b["outlier_channels"], "d"),
                        _arrow(a["min_sqnr_per_tensor_db"], b["min_sqnr_per_tensor_db"], ".1f")]
            t.add_row(*row)
        return t

    def _pass_stats(self) -> str:
        """One line per pass with its own scalar statistics (lists and dicts are in the JSON)."""
        lines = []
        for i, p in enumerate(self.passes):
            items = [f"{k}={_fmt(v, '.4g') if isinstance(v, float) else v}" for k, v in p.stats.items()
                     if not isinstance(v, (list, dict, tuple))]
            whole = [s.reason for s in p.skipped if s.node is None]
            nodes = [s for s in p.skipped if s.node is not None]
            if whole:
                items.append(f"nothing to do: {whole[0]}")
            if nodes:
                items.append(f"left alone: {len(nodes)} node(s), e.g. {nodes[0]}")
            if items:
                lines.append(f"  {i + 1} {p.name}: {', '.join(items)}")
        return "pass statistics:\n" + "\n".join(lines) if lines else ""

    def _layer_table(self, top: int = 10):
        from rich import box
        from rich.table import Table

        first, last = self.first_stats, self.last_stats
        if not (_is_channel_stats(first) and _is_channel_stats(last)) or not len(first):
            return None
        from .analysis.plot import worst_pairs

        t = Table(title=f"layers most hurt by per-tensor 8-bit weights, first -> last state (top {top}; dB/T, dB/C: "
                        f"weight SQNR of the median channel per tensor / per channel)",
                  title_justify="left", box=box.SIMPLE_HEAD)
        for col, just in (("layer", "left"), ("op", "left"), ("ch", "right"), ("spread", "right"),
                          ("outl", "right"), ("zero", "right"), ("dB/T", "right"), ("dB/C", "right")):
            t.add_column(col, justify=just, no_wrap=col != "layer", overflow="fold")
        for a, b in worst_pairs(first, last, top):
            if b is None:
                t.add_row(a.source_name, a.op, str(a.channels), _fmt(a.spread), str(len(a.outlier_channels)),
                          str(len(a.zero_channels)), _fmt(a.sqnr_db["per_tensor"], ".1f"),
                          _fmt(a.sqnr_db["per_channel"], ".1f"))
                continue
            t.add_row(a.source_name, a.op, str(a.channels), _arrow(a.spread, b.spread),
                      _arrow(len(a.outlier_channels), len(b.outlier_channels), "d"),
                      _arrow(len(a.zero_channels), len(b.zero_channels), "d"),
                      _arrow(a.sqnr_db["per_tensor"], b.sqnr_db["per_tensor"], ".1f"),
                      _arrow(a.sqnr_db["per_channel"], b.sqnr_db["per_channel"], ".1f"))
        return t

    def __rich_console__(self, console, options):
        if not self.passes:
            yield "(no pass ran)"
            return
        yield self._pass_table()
        if all(_is_channel_stats(p.stats_before) for p in self.outer):
            from rich.text import Text

            yield Text("change: none, exact (the float function is kept) or approx; drift: SQNR of the outputs "
                       "against those before the pass, top-1: agreement (approximate passes); dw spread: the largest depthwise spread; zero, outl: all-zero and outlier channels; "
                       "min dB/T: the worst layer's per-tensor weight SQNR (median channel); before -> after")
        stats = self._pass_stats()
        if stats:
            from rich.text import Text

            yield Text(stats)
        layers = self._layer_table()
        if layers is not None:
            yield layers

    def render(self, width: int = 160) -> str:
        """The report as plain text (no colour codes), ``width`` columns wide."""
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False).print(self)
        return buf.getvalue().rstrip("\n")

    def __str__(self) -> str:
        return self.render()

    # -- figure ------------------------------------------------------------------------------------------------------
    def plot(self, path, top: int = 6):
        """PNG of the per-channel weight ranges of the ``top`` layers hurt most by per-tensor weights in the first
        state, first state (grey) against last state (blue). Needs the default statistics hook."""
        from .analysis.plot import plot_channel_ranges, worst_pairs
        from .errors import QfrewriteError

        first, last = self.first_stats, self.last_stats
        if not _is_channel_stats(first):
            raise QfrewriteError("report.plot needs per-channel statistics: run the passes with stats enabled "
                                 "(rewrite(..., stats=True), the default)")
        names = " + ".join(p.name for p in self.passes)
        return plot_channel_ranges(path, worst_pairs(first, last, top),
                                   title=f"per-channel weight ranges before / after {names}",
                                   labels=("before", "after"))
