"""Per-channel activation statistics over the calibration data, for the data-driven passes.

Values are reduced per channel (last axis) to min, max, mean and standard deviation inside the traced float function
(:class:`~qfrewrite.backend.executor.ReducingExecutor`), ``chunk`` images a call so that memory stays bounded, and
accumulated in float64 across calls. For the values named in ``maps`` the per-position mean over the images
is kept as well (``map_mean``, ``(H, W, C)``): what bias correction needs, since the mean of a convolution over the
data is the convolution of that map. Results are cached in the :class:`~qfrewrite.pass_infra.Context` until a pass
modifies the graph.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from ..backend.executor import ReducingExecutor, Reduction
from ..ir import Graph
from ..pass_infra import Analysis, Context
from ..quant.observers import chunk_size

__all__ = ["ChannelMoments", "Moments", "channel_moments"]


_STATS = ("min", "max", "mean", "std")


@dataclass
class Moments:
    """Per-channel statistics of one value (those not asked for are ``None``); ``map_mean`` is the per-position mean
    over the images (when asked)."""

    min: Optional[np.ndarray]
    max: Optional[np.ndarray]
    mean: Optional[np.ndarray]
    std: Optional[np.ndarray]
    count: int
    map_mean: Optional[np.ndarray] = None

    def rescaled(self, factor: np.ndarray) -> "Moments":
        """The statistics of the value multiplied per channel by a positive ``factor``."""
        f = np.asarray(factor, np.float64)
        return Moments(*(None if a is None else a * f for a in (self.min, self.max, self.mean, self.std)),
                       self.count, None if self.map_mean is None else self.map_mean * f)


class _Accumulator:
    """Streaming per-channel min/max/sum/sum of squares (and the sum over images of each position)."""

    def __init__(self):
        self.acc: Dict[str, np.ndarray] = {}
        self.n = self.images = 0

    def update(self, r: Dict[str, np.ndarray], images: int) -> None:
        for k, v in r.items():
            if k == "count":
                continue
            v = np.asarray(v, np.float64)
            have = self.acc.get(k)
            if have is None:
                self.acc[k] = v.copy()
            elif k == "min":
                np.minimum(have, v, out=have)
            elif k == "max":
                np.maximum(have, v, out=have)
            else:
                have += v
        self.n += int(r.get("count", 0))
        self.images += images

    def result(self) -> Moments:
        a = self.acc
        mean = a["sum"] / self.n if "sum" in a else None
        std = np.sqrt(np.maximum(a["sumsq"] / self.n - mean ** 2, 0.0)) if "sumsq" in a else None
        maps = a["batch_sum"] / self.images if "batch_sum" in a else None
        return Moments(a.get("min"), a.get("max"), mean, std, self.n, maps)


class ChannelMoments(Analysis):
    """Per-channel statistics (``stats``: any of ``min``, ``max``, ``mean``, ``std``) of the named values over the
    calibration data, and the mean map of those in ``maps``. The reductions run inside the traced function
    (:class:`ReducingExecutor`), each only where asked."""

    def __init__(self, names: Sequence[str], chunk: Optional[int] = None, maps: Sequence[str] = (),
                 stats: Sequence[str] = _STATS):
        unknown = set(stats) - set(_STATS)
        if unknown:
            raise ValueError(f"channel statistics are {_STATS}, got {sorted(unknown)}")
        self.maps = frozenset(maps)
        self.names = frozenset(names) | self.maps
        self.stats = frozenset(stats)
        self.chunk = chunk
        key = "\n".join(sorted(self.names)) + "|" + "\n".join(sorted(self.maps)) + "|" + ",".join(sorted(self.stats))
        self.name = f"channel_moments:{hashlib.sha1(key.encode()).hexdigest()[:12]}"

    def covers(self, other: "ChannelMoments") -> bool:
        """True when this analysis computes everything ``other`` asks for."""
        return other.names <= self.names and other.maps <= self.maps and other.stats <= self.stats

    def _reduction(self, name: str) -> Reduction:
        st = self.stats
        return Reduction(min="min" in st, max="max" in st, sum=bool(st & {"mean", "std"}), sumsq="std" in st,
                         batch_sum=name in self.maps)

    def compute(self, graph: Graph, ctx: Context) -> Dict[str, Moments]:
        data = ctx.require_data("channel statistics")
        names = sorted(self.names)
        ex = ReducingExecutor(graph, {n: self._reduction(n) for n in names})
        acc = {n: _Accumulator() for n in names}
        chunk = self.chunk or chunk_size(graph, names)
        for batch in data.batches():
            for s in range(0, len(batch), chunk):
                x = batch[s:s + chunk]
                for name, r in ex(x).items():
                    acc[name].update(r, len(x))
        return {n: a.result() for n, a in acc.items()}


def channel_moments(graph: Graph, ctx: Context, names: Sequence[str], maps: Sequence[str] = (),
                    stats: Sequence[str] = _STATS) -> Dict[str, Moments]:
    """:class:`ChannelMoments` of ``names`` (and the mean maps of ``maps``): served from any cached result for this
    graph state that covers the request (one pass over the data can serve several passes), else computed and cached."""
    want = ChannelMoments(names, maps=maps, stats=stats)
    for analysis, value in ctx.cached_analyses(graph):
        if isinstance(analysis, ChannelMoments) and analysis.covers(want):
            return {n: value[n] for n in want.names}
    return ctx.analysis(want, graph)
