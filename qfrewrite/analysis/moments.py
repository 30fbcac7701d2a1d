"""Per-channel activation statistics over the calibration data, for the data-driven passes.

Values are tapped with the reference :class:`~qfrewrite.backend.executor.Executor` (float, no fake quantization) in
chunks of ``chunk`` images so that memory stays bounded, and reduced per channel (last axis) to min, max, mean and
standard deviation, accumulated in float64. Results are cached in the :class:`~qfrewrite.pass_infra.Context` until a
pass modifies the graph.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Iterator, Sequence

import numpy as np

from ..backend.executor import Executor
from ..ir import Graph
from ..pass_infra import Analysis, Context

__all__ = ["ChannelMoments", "Moments", "iterate_taps", "channel_moments"]


@dataclass
class Moments:
    min: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    count: int


def iterate_taps(graph: Graph, ctx: Context, names: Sequence[str], who: str, chunk: int = 8) -> Iterator[Dict]:
    """Yield ``{value name: array}`` for every chunk of the calibration data."""
    data = ctx.require_data(who)
    ex = Executor(graph, taps=list(names))
    for batch in data.batches():
        for s in range(0, len(batch), chunk):
            _, taps = ex(batch[s:s + chunk])
            yield taps


class ChannelMoments(Analysis):
    """Per-channel min/max/mean/std of the named values over the calibration data."""

    def __init__(self, names: Sequence[str], chunk: int = 8):
        self.names = tuple(sorted(set(names)))
        self.chunk = chunk
        digest = hashlib.sha1("\n".join(self.names).encode()).hexdigest()[:12]
        self.name = f"channel_moments:{digest}"

    def compute(self, graph: Graph, ctx: Context) -> Dict[str, Moments]:
        acc = {}
        for taps in iterate_taps(graph, ctx, self.names, "channel statistics", self.chunk):
            for name, t in taps.items():
                flat = np.asarray(t, np.float64).reshape(-1, t.shape[-1])
                a = acc.get(name)
                if a is None:
                    acc[name] = [flat.min(0), flat.max(0), flat.sum(0), (flat ** 2).sum(0), len(flat)]
                else:
                    a[0] = np.minimum(a[0], flat.min(0))
                    a[1] = np.maximum(a[1], flat.max(0))
                    a[2] += flat.sum(0)
                    a[3] += (flat ** 2).sum(0)
                    a[4] += len(flat)
        out = {}
        for name, (lo, hi, s, s2, n) in acc.items():
            mean = s / n
            out[name] = Moments(lo, hi, mean, np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0)), n)
        return out


def channel_moments(graph: Graph, ctx: Context, names: Sequence[str]) -> Dict[str, Moments]:
    """Cached :class:`ChannelMoments` of ``names``."""
    return ctx.analysis(ChannelMoments(names), graph)
