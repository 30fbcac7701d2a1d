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

from typing import Dict, List

from ..ir import WEIGHTED_OPS, Graph
from ..pass_infra import Context
from ..quant.observers import ActivationStats, TensorStats, activation_names, observe
from ..quant.points import FUSING_OPS, feeds_fused_activation, quantization_points
from .moments import ChannelMoments, Moments

__all__ = ["calibration_statistics", "serve", "map_names", "observed_names"]


def map_names(graph: Graph) -> List[str]:
    """The values whose mean map the calibration pass keeps: the data input of every weighted layer."""
    return list(dict.fromkeys(n.inputs[0].name for n in graph.find(*WEIGHTED_OPS)))


def observed_names(graph: Graph) -> List[str]:
    """Every activation but the values that only a fused activation reads (a layer's output before its ReLU/ReLU6:
    the int8 model never holds them, and a clip's output tells whether it binds), in topological order."""
    hidden = {node.output.name for node in graph.find(*FUSING_OPS) if feeds_fused_activation(node)}
    return [n for n in activation_names(graph) if n not in hidden]


def calibration_statistics(graph: Graph, data) -> Dict[str, TensorStats]:
    """Observe the :func:`observed_names` of ``graph`` on ``data`` (a calibration set) in one pass: histograms of the
    quantization points only, pooled and per channel (so that a pass that rescales channels, such as
    CrossLayerEqualization, hands on the statistics of its graph without another pass), and the mean maps of
    :func:`map_names`."""
    points = quantization_points(graph)
    return observe(graph, data.batches(), observed_names(graph), total=len(data), maps=map_names(graph),
                   hist_names=points, channel_hist_names=points)


def serve(ctx: Context, graph: Graph, stats: Dict[str, TensorStats]) -> None:
    """Cache ``stats`` (from :func:`calibration_statistics` on ``graph`` or on an identical graph) in ``ctx`` as
    ``graph``'s :class:`ActivationStats` (which serves the histogrammed values, and every observed value's per-channel
    min/max) and its :class:`ChannelMoments` (min, max, mean maps)."""
    maps = [n for n in map_names(graph) if stats[n].map_mean is not None]
    ctx.put(ActivationStats(None), graph, stats)
    moments = {n: Moments(s.channel_min, s.channel_max, None, None, s.count, s.map_mean) for n, s in stats.items()}
    ctx.put(ChannelMoments(list(stats), maps=maps, stats=("min", "max")), graph, moments)
