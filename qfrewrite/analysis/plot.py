"""Figures of per-channel weight ranges (matplotlib, Agg canvas: no window, no global backend change).

One panel per layer: the range ``max - min`` of every output channel on a log scale, "before" in grey and "after" in
blue when both are given, the median live range as a dashed line, outlier channels circled in red and all-zero
channels marked at the bottom edge (a zero range has no place on a log axis), near-zero channels crossed in orange.
Ranges more than five decades below the median are drawn at the bottom edge too.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..io_utils import atomic_path
from .channel_stats import LayerStats

__all__ = ["plot_channel_ranges", "worst_pairs"]

log = logging.getLogger(__name__)

Panel = Tuple[Optional[LayerStats], Optional[LayerStats]]


def _floor(pair: Panel) -> float:
    """Where zero (and very small) ranges are drawn: a third of the smallest positive range, but never more than
    five decades below the median, so one 1e-13 channel does not squash the panel."""
    pos = np.concatenate([ls.ranges[ls.ranges > 0] for ls in pair if ls is not None] or [np.zeros(0)])
    if not pos.size:
        return 1e-8
    return max(float(pos.min()), float(np.median(pos)) * 1e-5) / 3


def _draw(ax, ls: LayerStats, color: str, label: str, floor: float, marker_size: float) -> None:
    r = ls.ranges
    x = np.arange(len(r))
    shown = np.maximum(r, floor)
    prefix = f"{label}: " if label else ""

    def plural(n: int, what: str) -> str:
        return f"{prefix}{n} {what} channel{'s' if n != 1 else ''}"

    ax.plot(x, shown, ".", color=color, ms=marker_size, label=f"{prefix}spread {ls.spread:.3g}x")
    if ls.median_range > 0:
        ax.axhline(ls.median_range, color=color, ls="--", lw=0.8)
    if ls.outlier_channels:
        o = np.asarray(ls.outlier_channels)
        ax.plot(o, shown[o], "o", mfc="none", mec="red", ms=marker_size + 4, label=plural(len(o), "outlier"))
    if ls.near_zero_channels:
        n = np.asarray(ls.near_zero_channels)
        ax.plot(n, shown[n], "x", color="tab:orange", ms=marker_size + 2, label=plural(len(n), "near-zero"))
    if ls.zero_channels:
        z = np.asarray(ls.zero_channels)
        ax.plot(z, np.full(len(z), floor), "v", color=color, ms=marker_size + 2, label=plural(len(z), "all-zero"))


def plot_channel_ranges(path: Union[str, os.PathLike], panels: Sequence[Panel], title: str = "",
                        labels: Tuple[str, str] = ("before", "after"), columns: int = 2) -> Path:
    """Write a PNG with one panel per ``(before, after)`` pair of :class:`LayerStats` (either may be ``None``).

    The file is written atomically; returns its path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [p for p in panels if p[0] is not None or p[1] is not None]
    n = max(1, len(panels))
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(6.5 * cols, 3.2 * rows + (0.6 if title else 0)), dpi=110)
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=11)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no Conv2D / DepthwiseConv2D / Dense layer", ha="center", va="center")
        ax.set_axis_off()
    for i, (before, after) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ref = before if before is not None else after
        floor = _floor((before, after))
        size = 5.0 if ref.channels <= 128 else 2.5
        if before is not None:
            _draw(ax, before, "0.55" if after is not None else "tab:blue", labels[0] if after is not None else "",
                  floor, size)
        if after is not None:
            _draw(ax, after, "tab:blue", labels[1] if before is not None else "", floor, size)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("output channel")
        ax.set_ylabel("weight range (max - min)")
        ax.set_title(f"{ref.source_name} ({ref.op}, {ref.channels} ch)", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    log.info("wrote %s", path)
    return Path(path)


def worst_pairs(before, after, top: int) -> List[Panel]:
    """The ``top`` layers of ``before`` (a GraphChannelStats) hurt most by per-tensor weights, each with its
    counterpart in ``after`` (matched by node name, else by source name; ``None`` when gone)."""
    pairs: List[Panel] = []
    for ls in before.ranked()[:top]:
        match = None
        if after is not None:
            match = after.get(ls.name)
            if match is None:
                try:
                    match = after.by_source_name(ls.source_name)
                except KeyError:
                    match = None
        pairs.append((ls, match))
    return pairs
