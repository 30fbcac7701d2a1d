"""Activation observers: one streaming pass over the calibration data collecting, for every observed tensor,

* per-tensor min/max and per-channel (last axis) min/max over every value;
* a histogram of ``bins`` equal bins over a range that always holds 0 and every value seen, with the number of exact
  zeros among its values. To bound the cost the histogram takes about ``hist_values`` values of a tensor per image
  (``hist_values // C`` positions, evenly strided; 16384 by default: every position of a 7x7 or 14x14 map of up to
  80 channels, every 49th of a 112x112x64 one), and at most ``hist_total`` values per tensor over the whole pass
  (2**21 by default: 4660 per image at 450 images): when the number of images is known, each image gives
  ``min(hist_values, hist_total // images)``. Millions of values per tensor fill the 2048 bins densely; on the
  ../shared models 16384 values per image chose the same ranges' top-1 as histogramming everything (V2, TF-slim V1,
  EfficientNet-Lite0), and the total bound cuts a quarter of a 450-image pass (Keras MobileNetV1 0.25 with
  per-channel histograms: 3.0-3.3 s unbounded, 2.2-2.4 s bounded). ``hist_values=None`` histograms everything.

**Histogram design: one pass, fixed bin count, exact re-binning when the range grows.** The first chunk sets the
range ``[min(x, 0), max(x, 0)]``. When a later chunk falls outside, the range grows exactly
(:func:`~qfrewrite.quant.histogram_grid.regrown`: the new grid starts on an edge of the old one and its bins are a
whole number of old bins wide, old bins merged whole, fitted to the values counted so far and the new ones). The
price is resolution: after growth the values can span as few as half the bins, which the default 2048 bins absorb
(the range search needs a few hundred).

The data run through the float graph ``chunk`` images at a time (by default as many as keep one call's values near
256 MB) in a :class:`~qfrewrite.backend.executor.ReducingExecutor`: the per-channel min/max and the histogram's
sample are taken inside the traced function, so only those leave TensorFlow; the histogram is a vectorised
``bincount`` over computed bin indices. Memory holds one chunk's activations, never all images.

The result is cached as an :class:`ActivationStats` analysis in the :class:`~qfrewrite.pass_infra.Context`
(invalidated when a pass modifies the graph).
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..ir import Graph
from ..pass_infra import Analysis, Context
from .channel_histograms import CHANNEL_BINS, ChannelHistograms
from .histogram_grid import bin_indices, regrown

__all__ = ["TensorStats", "StreamingHistogram", "TensorObserver", "ActivationStats", "activation_stats",
           "cached_activation_stats",
           "observe", "Observation", "activation_names", "chunk_size"]

log = logging.getLogger(__name__)

DEFAULT_BINS = 2048
#: values of each tensor histogrammed per image (``hist_values // C`` positions, evenly strided)
DEFAULT_HIST_VALUES = 2 ** 14
#: values of each tensor histogrammed over the whole pass, at most (when the number of images is known)
DEFAULT_HIST_TOTAL = 2 ** 21
#: tapped activations held per executor call
DEFAULT_CHUNK_BYTES = 256 * 2 ** 20


class StreamingHistogram:
    """A histogram with ``bins`` equal bins whose range grows (exactly re-binned) to cover every value seen."""

    def __init__(self, bins: int = DEFAULT_BINS):
        self.bins = int(bins)
        self.counts: Optional[np.ndarray] = None
        self.lo = 0.0
        self.width = 0.0

    @property
    def hi(self) -> float:
        return self.lo + self.bins * self.width

    @property
    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(self.bins + 1)

    def cover(self, vmin: float, vmax: float, headroom: float = 0.0) -> None:
        """Make the range hold ``[vmin, vmax]``: set it (widened by ``headroom``) or grow it exactly."""
        if self.counts is None:
            lo, hi = min(vmin, 0.0) * (1.0 + headroom), max(vmax, 0.0) * (1.0 + headroom)
            if hi - lo <= 0:
                hi = lo + 1e-6
            self.lo, self.width = lo, (hi - lo) / self.bins
            self.counts = np.zeros(self.bins, np.int64)
        elif vmin < self.lo or vmax > self.hi:
            self.counts, self.lo, self.width = regrown(self.counts, self.lo, self.width, vmin, vmax)

    def update(self, x: np.ndarray, vmin: Optional[float] = None, vmax: Optional[float] = None) -> None:
        """Add the values of ``x`` (any shape, float). ``vmin``/``vmax`` may be passed when already known."""
        x = np.asarray(x, np.float32)
        if x.size == 0:
            return
        vmin = float(x.min()) if vmin is None else float(vmin)
        vmax = float(x.max()) if vmax is None else float(vmax)
        self.cover(vmin, vmax)
        idx = bin_indices(x, np.float32(self.lo), np.float32(1.0 / self.width), self.bins)
        self.counts += np.bincount(idx.ravel(), minlength=self.bins)


@dataclass
class TensorStats:
    """What the observers saw of one tensor (channels = last axis)."""

    name: str
    count: int  # number of positions per channel (N*H*W for NHWC)
    min: float
    max: float
    channel_min: np.ndarray
    channel_max: np.ndarray
    zeros: int  # exact zeros among the histogrammed values
    hist: Optional[np.ndarray]  # counts, int64 (of the histogrammed values: every value, or an even stride of rows);
    # None where the observation kept no histogram (min/max only)
    hist_lo: float
    hist_hi: float
    map_mean: Optional[np.ndarray] = None  # per-position mean over the images, (H, W, C), when asked
    #: the same histogram values binned per channel, when asked (:mod:`qfrewrite.quant.channel_histograms`): what
    #: lets :meth:`rescaled` follow a per-channel rescaling
    channel_hist: Optional[ChannelHistograms] = None

    def rescaled(self, factor: np.ndarray) -> "TensorStats":
        """The statistics of the value with channel ``c`` multiplied by ``factor[c] > 0``: min/max, mean map and
        the per-channel histograms exactly; the pooled histogram re-made from the per-channel ones on as many bins
        (:meth:`ChannelHistograms.pooled`). A histogram kept without its per-channel histograms cannot follow:
        ``ValueError``."""
        f = np.broadcast_to(np.asarray(factor, np.float64), self.channel_min.shape)
        if not np.all(f > 0):
            raise ValueError(f"{self.name}: statistics follow only positive per-channel factors")
        if self.hist is not None and self.channel_hist is None:
            raise ValueError(f"{self.name}: a pooled histogram without per-channel histograms cannot be rescaled")
        cmin, cmax = self.channel_min * f, self.channel_max * f
        hist, lo, hi, channel_hist = None, self.hist_lo, self.hist_hi, None
        if self.channel_hist is not None:
            channel_hist = self.channel_hist.rescaled(f)
            if self.hist is not None:
                hist, lo, hi = channel_hist.pooled(len(self.hist))
        return TensorStats(self.name, self.count, float(cmin.min()), float(cmax.max()), cmin, cmax, self.zeros,
                           hist, lo, hi, None if self.map_mean is None else self.map_mean * f, channel_hist)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.hist_lo, self.hist_hi, len(self.hist) + 1)

    @property
    def size(self) -> int:
        return int(self.count * len(self.channel_min))


class TensorObserver:
    """Accumulates :class:`TensorStats` of one tensor over chunks (numpy, vectorised).

    :meth:`update_reduced` takes what :class:`~qfrewrite.backend.executor.ReducingExecutor` computed in-graph
    (per-channel min/max/sum and count, and a row sample for the histogram); :meth:`update` computes the same from an
    array. ``hist_rows``: the histogram (and its zero count) takes at most this many rows of each update, evenly
    strided (``None``: every row); min/max/mean always see every value. ``channel_bins > 0``: the histogrammed values
    are also binned per channel (:class:`~qfrewrite.quant.channel_histograms.ChannelHistograms`).
    """

    def __init__(self, name: str, bins: int = DEFAULT_BINS, hist_rows: Optional[int] = None,
                 channel_bins: int = 0):
        self.name = name
        self.hist = StreamingHistogram(bins)
        self.hist_rows = hist_rows
        self.channel_bins = int(channel_bins)
        self.channel_hist: Optional[ChannelHistograms] = None
        self.count = 0
        self.hist_count = 0
        self.zeros = 0
        self.cmin = self.cmax = None
        self.map_sum: Optional[np.ndarray] = None
        self.images = 0
        self._handed_out = False  # the channel histograms belong to a result: copy them before the next update

    def update_map(self, batch_sum: np.ndarray, images: int) -> None:
        """Add the sum over ``images`` images of each position (for the mean map)."""
        s = np.asarray(batch_sum, np.float64)
        if self.map_sum is None:
            self.map_sum = s.copy()
        else:
            self.map_sum += s
        self.images += int(images)

    def update(self, t: np.ndarray) -> None:
        """Observe one chunk given as an array (channels on the last axis)."""
        t = np.asarray(t, np.float32)
        if t.ndim < 2:
            t = t.reshape(-1, 1)
        c = t.shape[-1]
        flat = t.reshape(-1, c)
        if flat.size == 0:
            return
        # per-channel reductions over (N*H, W*C) rows: long inner loops also when C is small
        wide = t.reshape(-1, t.shape[-2] * c) if t.ndim >= 3 else flat
        step = 1 if not self.hist_rows or len(flat) <= self.hist_rows else -(-len(flat) // int(self.hist_rows))
        self.update_reduced(wide.min(axis=0).reshape(-1, c).min(axis=0), wide.max(axis=0).reshape(-1, c).max(axis=0),
                            flat.shape[0], flat[::step] if step > 1 else flat)

    def update_reduced(self, cmin: np.ndarray, cmax: np.ndarray, count: int, sample: Optional[np.ndarray],
                       sample_zeros: Optional[np.ndarray] = None) -> None:
        """Observe one chunk from its per-channel min/max over ``count`` positions and a sample of its values (any
        shape, channels last) for the histogram; ``sample_zeros``: the sample's exact zeros per channel, when
        already counted."""
        cmin, cmax = np.asarray(cmin, np.float32), np.asarray(cmax, np.float32)
        if self.cmin is None:
            self.cmin, self.cmax = cmin.copy(), cmax.copy()
        else:
            np.minimum(self.cmin, cmin, out=self.cmin)
            np.maximum(self.cmax, cmax, out=self.cmax)
        self.count += int(count)
        vmin, vmax = float(cmin.min()), float(cmax.max())
        self.hist.cover(vmin, vmax)  # the range covers every value seen, sampled or not
        if sample is not None and np.size(sample):
            sample = np.asarray(sample, np.float32)
            self.zeros += (int(np.sum(sample_zeros)) if sample_zeros is not None
                           else sample.size - int(np.count_nonzero(sample)))
            self.hist_count += sample.size
            self.hist.update(sample, vmin, vmax)
            if self.channel_bins:
                if self.channel_hist is None:
                    self.channel_hist = ChannelHistograms(sample.shape[-1], self.channel_bins)
                elif self._handed_out:
                    self.channel_hist = self.channel_hist.copy()
                self._handed_out = False
                self.channel_hist.update(sample, cmin, cmax, sample_zeros)

    def result(self) -> TensorStats:
        """The statistics so far; a later update leaves them as they are."""
        if self.cmin is None:
            raise ValueError(f"observer of {self.name} saw no data")
        return TensorStats(self.name, self.count, float(self.cmin.min()), float(self.cmax.max()),
                           self.cmin.astype(np.float64), self.cmax.astype(np.float64), self.zeros,
                           self.hist.counts.copy() if self.hist_count else None, float(self.hist.lo),
                           float(self.hist.hi),
                           None if self.map_sum is None else self.map_sum / self.images,
                           self._hand_out_channel_hist() if self.hist_count else None)

    def _hand_out_channel_hist(self) -> Optional[ChannelHistograms]:
        self._handed_out = self.channel_hist is not None
        return self.channel_hist


def activation_names(graph: Graph) -> List[str]:
    """Every non-constant value: the graph inputs and every node output, in topological order."""
    names = [v.name for v in graph.inputs]
    for node in graph.topological_order():
        names.extend(o.name for o in node.outputs if not o.is_const)
    return names


def chunk_size(graph: Graph, names: Sequence[str], budget_bytes: int = DEFAULT_CHUNK_BYTES,
               limits=(1, 64)) -> int:
    """Images per executor call so that the tapped float32 values of one call take about ``budget_bytes``."""
    per_image = 0
    for n in names:
        dims = graph.value(n).shape[1:]
        if any(d is None for d in dims):
            return 8
        per_image += 4 * int(np.prod(dims)) if dims else 4
    return int(np.clip(budget_bytes // max(per_image, 1), *limits))


def observe(graph: Graph, batches: Iterable[np.ndarray], names: Optional[Sequence[str]] = None,
            chunk: Optional[int] = None, bins: int = DEFAULT_BINS, progress: Optional[bool] = None,
            total: Optional[int] = None, hist_rows: Optional[int] = None,
            hist_values: Optional[int] = DEFAULT_HIST_VALUES, maps: Sequence[str] = (),
            hist_total: Optional[int] = DEFAULT_HIST_TOTAL,
            hist_names: Optional[Sequence[str]] = None, channel_hist_names: Sequence[str] = (),
            channel_bins: int = CHANNEL_BINS) -> Dict[str, TensorStats]:
    """Run the float graph over ``batches`` (NHWC) once, ``chunk`` images at a time, and observe ``names`` (and keep
    the per-position mean over the images of those in ``maps``: :attr:`TensorStats.map_mean`). Only the values in
    ``hist_names`` (default: all) get a histogram; the others' :attr:`TensorStats.hist` is ``None``. The histogrammed
    values among ``channel_hist_names`` also keep ``channel_bins`` bins per channel (:attr:`TensorStats.channel_hist`,
    what :meth:`TensorStats.rescaled` needs).

    The per-channel reductions and the histogram's row sample are computed inside the traced function
    (:class:`~qfrewrite.backend.executor.ReducingExecutor`), so no whole activation leaves TensorFlow.
    ``chunk=None`` sizes the chunks so that one call's values take about 256 MB (:func:`chunk_size`).
    The histogram of a tensor with ``C`` channels takes ``hist_rows`` positions per image, evenly strided, or when
    that is ``None`` ``max(1, v // C)`` with ``v = hist_values``, or ``min(hist_values, hist_total // total)``
    when ``total`` (the number of images) and ``hist_total`` are given (``hist_values=None``: every position);
    min/max/mean always use every value. One :class:`Observation` fed once.
    """
    obs = Observation(graph, names, chunk=chunk, bins=bins, total=total, hist_rows=hist_rows,
                      hist_values=hist_values, maps=maps, hist_total=hist_total, hist_names=hist_names,
                      channel_hist_names=channel_hist_names, channel_bins=channel_bins)
    obs.feed(batches, progress=progress, count=total)
    return obs.results()


class Observation:
    """The observers of :func:`observe` (same options) kept between feeds: :meth:`feed` runs more data through the
    graph into the same observers, :meth:`results` gives the statistics of everything fed so far, as often as
    asked (a result is never changed by a later feed). Feeding ``a`` then ``b`` gives the statistics of one pass
    over ``a`` followed by ``b``; ``total`` is the number of images of all the feeds together (what the
    histogram's per-image share of ``hist_total`` is computed from), so that the result is that of one pass over
    them all. What lets a pipeline score candidates calibrated on part of the data and then recalibrate the one it
    keeps on all of it, paying only for the rest (:class:`~qfrewrite.passes.SelectBest`)."""

    def __init__(self, graph: Graph, names: Optional[Sequence[str]] = None, chunk: Optional[int] = None,
                 bins: int = DEFAULT_BINS, total: Optional[int] = None, hist_rows: Optional[int] = None,
                 hist_values: Optional[int] = DEFAULT_HIST_VALUES, maps: Sequence[str] = (),
                 hist_total: Optional[int] = DEFAULT_HIST_TOTAL, hist_names: Optional[Sequence[str]] = None,
                 channel_hist_names: Sequence[str] = (), channel_bins: int = CHANNEL_BINS):
        from ..backend.executor import ReducingExecutor, Reduction

        if len(graph.inputs) != 1:
            raise DataError(f"the observers run single-input graphs; {graph.name!r} has {len(graph.inputs)} inputs")
        names = list(dict.fromkeys(list(names if names is not None else activation_names(graph)) + list(maps)))
        maps = frozenset(maps)
        for n in names:
            graph.value(n)  # GraphError on an unknown name
        self.chunk = int(chunk) if chunk else chunk_size(graph, names)

        histogrammed = None if hist_names is None else frozenset(hist_names)
        per_image = hist_values
        if hist_values is not None and hist_total is not None and total:
            per_image = max(1, min(int(hist_values), int(hist_total) // int(total)))

        def rows(name: str) -> int:
            if histogrammed is not None and name not in histogrammed:
                return 0
            if hist_rows is not None:
                return int(hist_rows)
            c = graph.value(name).shape[-1]
            return -1 if per_image is None or c is None else max(1, int(per_image) // int(c))

        self._executor = ReducingExecutor(graph, {n: Reduction(min=True, max=True, sample_rows=rows(n),
                                                               sample_zeros=rows(n) != 0, batch_sum=n in maps)
                                                  for n in names})
        per_channel = frozenset(channel_hist_names)
        self._observers = {n: TensorObserver(n, bins, channel_bins=channel_bins if n in per_channel else 0)
                           for n in names}
        self.images = 0

    def _absorb(self, reduced: Dict[str, Dict[str, np.ndarray]], images: int) -> None:
        for n, r in reduced.items():
            observer = self._observers[n]
            observer.update_reduced(r["min"], r["max"], r["count"], r.get("sample"), r.get("sample_zeros"))
            if "batch_sum" in r:
                observer.update_map(r["batch_sum"], images)

    def feed(self, batches: Iterable[np.ndarray], progress: Optional[bool] = None,
             count: Optional[int] = None) -> "Observation":
        """Run ``batches`` (NHWC) through the graph into the observers; ``count``: their number of images, for the
        progress bar."""
        from tqdm.auto import tqdm

        disable = None if progress is None else not progress
        # the observers take in chunk k on a worker thread while TensorFlow runs chunk k + 1 (numpy and TensorFlow
        # both release the GIL); one worker, so the chunks are taken in order and the statistics are those of a
        # serial loop
        with tqdm(total=count, desc="calibrating", unit="img", disable=disable, leave=False) as bar, \
                ThreadPoolExecutor(max_workers=1) as worker:
            pending = None
            for batch in batches:
                for s in range(0, len(batch), self.chunk):
                    x = batch[s:s + self.chunk]
                    if len(x) == 0:
                        continue
                    reduced = self._executor(x)
                    if pending is not None:
                        pending.result()
                    pending = worker.submit(self._absorb, reduced, len(x))
                    self.images += len(x)
                    bar.update(len(x))
            if pending is not None:
                pending.result()
        return self

    def results(self) -> Dict[str, TensorStats]:
        """The statistics of every observed value over all the data fed so far."""
        return {n: o.result() for n, o in self._observers.items()}


class ActivationStats(Analysis):
    """:class:`TensorStats` of ``names`` (default: every activation) over the context's calibration data."""

    def __init__(self, names: Optional[Sequence[str]] = None, chunk: Optional[int] = None, bins: int = DEFAULT_BINS):
        self.names = None if names is None else tuple(dict.fromkeys(names))
        self.chunk, self.bins = chunk, int(bins)
        key = "*" if self.names is None else "\n".join(sorted(self.names))
        self.name = f"activation_stats:{bins}:{hashlib.sha1(key.encode()).hexdigest()[:12]}"

    def compute(self, graph: Graph, ctx: Context) -> Dict[str, TensorStats]:
        data = ctx.require_data("activation observers")
        return observe(graph, data.batches(), self.names, self.chunk, self.bins, total=len(data))


def cached_activation_stats(graph: Graph, ctx: Context) -> Optional[Dict[str, TensorStats]]:
    """The cached :class:`ActivationStats` of every activation of ``graph`` (a shared calibration pass or a pass
    that handed them on left them), or ``None``; never computes them."""
    every = ActivationStats(None)
    return ctx.analysis(every, graph) if ctx.cached(every.name, graph) else None


def activation_stats(graph: Graph, ctx: Context, names: Optional[Sequence[str]] = None,
                     bins: int = DEFAULT_BINS, histograms: bool = True) -> Dict[str, TensorStats]:
    """Cached :class:`ActivationStats`; a cached analysis of every activation serves any subset of names that it
    histogrammed (any subset, with ``histograms=False``: per-channel min/max only)."""
    every = ActivationStats(None, bins=bins)
    if ctx.cached(every.name, graph):
        stats = ctx.analysis(every, graph)
        want = list(stats) if names is None else list(names)
        if all(n in stats and (stats[n].hist is not None or not histograms) for n in want):
            return {n: stats[n] for n in want}
    return ctx.analysis(ActivationStats(names, bins=bins), graph)
