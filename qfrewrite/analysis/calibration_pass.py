"""One streaming calibration pass shared by every pass that reads activation statistics.

The data-driven passes ask for two analyses of the float graph on the calibration data:

* :class:`~qfrewrite.quant.observers.ActivationStats` (InsertFakeQuant's ranges, the channel statistics): every
  activation's per-channel min/max and histogram sample;
* :class:`~qfrewrite.analysis.moments.ChannelMoments` with ``min``/``max`` and the mean maps of the weighted layers'
  inputs (CrossLayerEqualization's bounds, CorrectBias's expected inputs).

Each would run the data through the graph once. :func:`calibration_statistics` runs it once for both: the per-channel
min/max of every activation the int8 model holds (:func:`observed_names`), the histograms of the quantization points
(:func:`~qfrewrite.quant.points.quantization_points`, what InsertFakeQuant calibrates), and the mean map of every
weighted layer's input (a per-position sum over the images, kept in float64). :func:`serve` caches the result in a
:class:`~qfrewrite.pass_infra.Context` as both analyses, for the graph it was computed on or for a copy of it (a pipeline that runs candidate pass lists on copies of one graph, such as
:class:`~qfrewrite.passes.SelectBest`, pays for one pass, not one per candidate). The per-channel min/max of
:class:`ChannelMoments` are then exactly the observers' ``channel_min``/``channel_max``; ``mean`` and ``std`` are not
served (a pass that needs them computes its own analysis).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from ..ir import WEIGHTED_OPS, Graph, Node, Op, copies_channel_values
from ..pass_infra import Context
from ..quant.observers import ActivationStats, Observation, TensorStats, activation_names
from ..quant.points import FUSING_OPS, feeds_fused_activation, quantization_points
from .moments import ChannelMoments, Moments

__all__ = ["calibration_statistics", "CalibrationPass", "serve", "map_names", "observed_names"]


def map_names(graph: Graph) -> List[str]:
    """The values whose mean map the calibration pass keeps: the data input of every weighted layer."""
    return list(dict.fromkeys(n.inputs[0].name for n in graph.find(*WEIGHTED_OPS)))


def observed_names(graph: Graph) -> List[str]:
    """Every activation but the values that only a fused activation reads (a layer's output before its ReLU/ReLU6:
    the int8 model never holds them, and a clip's output tells whether it binds), in topological order."""
    hidden = {node.output.name for node in graph.find(*FUSING_OPS) if feeds_fused_activation(node)}
    return [n for n in activation_names(graph) if n not in hidden]


def calibration_statistics(graph: Graph, data, channel_histograms: bool = True) -> Dict[str, TensorStats]:
    """Observe the :func:`observed_names` of ``graph`` on ``data`` (a calibration set) in one pass: histograms of the
    quantization points only, pooled and, with ``channel_histograms``, per channel (so that a pass that rescales
    channels, such as CrossLayerEqualization, hands on the statistics of its graph without another pass: they
    cost a third of the pass on Keras MobileNetV1 0.25, 1.0 of 3.3 s), and the mean maps of :func:`map_names`.

    A value that is not histogrammed and whose producer copies its input's channel values
    (:func:`~qfrewrite.ir.copies_channel_values`: a constant Pad, a channel-keeping reshape) is not observed: its
    per-channel extremes and mean map follow exactly from its input's (:func:`_follow`). On MobileNets these are the
    padded inputs of the strided depthwise convs, a quarter to a third of the values a pass would otherwise read.
    A :class:`CalibrationPass` fed ``data`` once."""
    return CalibrationPass(graph, len(data), channel_histograms).feed(data).statistics()


class CalibrationPass:
    """:func:`calibration_statistics` in feeds: :meth:`feed` observes more calibration images, :meth:`statistics`
    gives those of every image fed so far (exactly :func:`calibration_statistics` on them, up to the order in which
    a histogram's range grew). ``total``: the number of images of all the feeds together (it sets each image's
    share of the histograms, :func:`~qfrewrite.quant.observers.observe`)."""

    def __init__(self, graph: Graph, total: int, channel_histograms: bool = True):
        points = quantization_points(graph)
        self._observed, maps = observed_names(graph), map_names(graph)
        self._derived = _derived_values(graph, self._observed, set(points))
        # a derived value's mean map comes from its source's: keep the map of every source in a chain that needs one
        self._needed = needed = set(maps)
        for name in reversed(list(self._derived)):
            if name in needed:
                needed.add(self._derived[name].inputs[0].name)
        direct = [n for n in self._observed if n not in self._derived]
        self._observation = Observation(graph, direct, total=total, maps=[n for n in direct if n in needed],
                                        hist_names=points, channel_hist_names=points if channel_histograms else ())

    @property
    def images(self) -> int:
        """The number of images fed so far."""
        return self._observation.images

    def feed(self, data) -> "CalibrationPass":
        """Observe the images of ``data`` (an :class:`~qfrewrite.data.ImageSet` or anything with ``batches()`` and
        a length)."""
        self._observation.feed(data.batches(), count=len(data))
        return self

    def statistics(self) -> Dict[str, TensorStats]:
        """The statistics of every observed value over the images fed so far."""
        stats = self._observation.results()
        for name, node in self._derived.items():
            stats[name] = _follow(node, stats[node.inputs[0].name], self.images, keep_map=name in self._needed)
        return {n: stats[n] for n in self._observed}


def _derived_values(graph: Graph, observed: Sequence[str], histogrammed) -> Dict[str, Node]:
    """``{value: producer}`` for the observed values, in topological order, whose statistics :func:`_follow` derives
    from their producer's input (itself observed or derived)."""
    known, derived = set(), {}
    for name in observed:
        node = graph.value(name).producer
        if (node is not None and name not in histogrammed and copies_channel_values(node)
                and node.inputs[0].name in known):
            derived[name] = node
        known.add(name)
    return derived


def _follow(node: Node, source: TensorStats, images: int, keep_map: bool) -> TensorStats:
    """The statistics of ``node``'s output from those of its input: the same channel values, and for a Pad that pads
    its constant too (extremes widened to it, mean map padded with it)."""
    out = node.output
    cmin, cmax = source.channel_min.copy(), source.channel_max.copy()
    mean = None
    if node.op is Op.PAD:
        (top, bottom), (left, right) = node.attrs.pads
        value = float(node.attrs.value)
        if top or bottom or left or right:
            cmin, cmax = np.minimum(cmin, value), np.maximum(cmax, value)
        if keep_map and source.map_mean is not None:
            mean = np.pad(source.map_mean, ((top, bottom), (left, right), (0, 0)), constant_values=value)
    elif keep_map and source.map_mean is not None:
        mean = source.map_mean.reshape(tuple(out.shape[1:]))
    positions = int(np.prod(out.shape[1:-1])) if len(out.shape) > 2 else 1
    return TensorStats(out.name, images * positions, float(cmin.min()), float(cmax.max()), cmin, cmax, 0, None,
                       0.0, 0.0, mean)


def serve(ctx: Context, graph: Graph, stats: Dict[str, TensorStats]) -> None:
    """Cache ``stats`` (from :func:`calibration_statistics` on ``graph`` or on an identical graph) in ``ctx`` as
    ``graph``'s :class:`ActivationStats` (which serves the histogrammed values, and every observed value's per-channel
    min/max) and its :class:`ChannelMoments` (min, max, mean maps)."""
    maps = [n for n in map_names(graph) if stats[n].map_mean is not None]
    ctx.put(ActivationStats(None), graph, stats)
    moments = {n: Moments(s.channel_min, s.channel_max, None, None, s.count, s.map_mean) for n, s in stats.items()}
    ctx.put(ChannelMoments(list(stats), maps=maps, stats=("min", "max")), graph, moments)
