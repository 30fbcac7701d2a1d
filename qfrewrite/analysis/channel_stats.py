"""Per-channel range statistics of every Conv2D, DepthwiseConv2D and Dense layer, as a cached analysis.

For output channel ``c`` of a kernel ``W`` (depthwise: channel ``c * M + m``): ``lo_c = min W[..., c]``,
``hi_c = max W[..., c]``, ``range_c = hi_c - lo_c``. Per layer (rules and their justification in
:mod:`qfrewrite.analysis.channel_math`): the *spread* ``max range / median non-zero range``, the all-zero, near-zero
and outlier channels, and the 8-bit SQNR of the weights quantized per tensor and per output channel.

**Two views of the weights.**

* ``fold_bn=True`` (the default: ``qfrewrite diagnose`` and the pass manager's report): the weights as they will be
  quantized. A layer whose only reader is a ``BatchNorm`` still in the graph is evaluated with that BatchNorm folded
  in (the same legality and maths as :class:`FoldBatchNorm`: :mod:`qfrewrite.numerics.batchnorm`); the graph itself
  is not changed. So the report's first "before" already shows the outliers that folding will create, and
  ``FoldBatchNorm`` itself leaves the figures unchanged (it is exact).
* ``fold_bn=False``: the kernels exactly as they are in the graph.

**BN scale** ``s_c = gamma_c / sqrt(var_c + eps)``: from the ``BatchNorm`` that reads the layer, or from the layer's
:class:`~qfrewrite.ir.FoldedBatchNorm` record where :class:`FoldBatchNorm` folded one (kept true by every pass that
rescales output channels, so after equalization it is the scale that relates the kernel to its pre-BN values). A
folded channel's range is ``|s_c|`` times its raw range, so a large ``|s_c|``
(a near-zero variance) makes an outlier out of an ordinary kernel. An outlier channel counts as *caused by the BN
scale* when the scale accounts for at least half of its excess on the log scale:
``|s_c| / median|s| >= sqrt(range_c / median range)``.

**Dead inputs.** A depthwise channel ``c * M + m`` reads input channel ``c`` only; when that input comes (through
channel-wise ops: :func:`qfrewrite.ir.is_channelwise`) from a layer whose channel ``c`` is zero or
near-zero, the depthwise channel reads a constant and its weights do nothing but widen the range
(``dead_inputs``: ``{channel: producing layer}``).

**Activations** (per output channel min/max of the tensor the int8 model will quantize: the layer output after a
sole-reader BatchNorm and a sole-reader ``Relu``/``Clip``) come from the streaming observers
(:mod:`qfrewrite.quant.observers`): ``activations="always"`` runs them over the context's calibration data,
``"auto"`` uses them only when the context already holds them for this graph state (so the pass manager's report never
runs calibration itself), ``"never"`` leaves them out.

The result, a :class:`GraphChannelStats` (a mapping from node name to :class:`LayerStats`), is cached in the
:class:`~qfrewrite.pass_infra.Context` and recomputed only after a pass modifies the graph.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from ..ir import (WEIGHTED_OPS, Graph, Node, Op, batchnorm_fold_target, bn_affine, is_channelwise, layer_kind,
                  sole_reader)
from ..numerics.batchnorm import fold_bn_into_kernel
from ..numerics.kernels import out_channels_last
from ..pass_infra import Analysis, Context
from ..quant.observers import ActivationStats, activation_stats
from . import channel_math as cm

__all__ = ["LayerStats", "GraphChannelStats", "ChannelStats", "layer_stats", "compute_channel_stats",
           "weight_channel_ranges", "graph_stats_summary", "activation_tensor"]

log = logging.getLogger(__name__)

_ACTIVATION_MODES = ("auto", "always", "never")
#: the longest walk back from a depthwise input to the layer that produces its channels
_MAX_WALK = 16


def _flat(kernel: np.ndarray, node: Node) -> np.ndarray:
    """The kernel as ``(K, C_out)`` (depthwise: ``C_out = C * M`` in ``c * M + m`` order)."""
    return out_channels_last(kernel, layer_kind(node))


def weight_channel_ranges(node: Node) -> np.ndarray:
    """``(C_out, 2)`` array of per-output-channel (min, max) of the node's kernel as it is in the graph."""
    flat = _flat(node.weight.const, node)
    return np.stack([flat.min(axis=0), flat.max(axis=0)], axis=1)


def _to_list(a: Optional[np.ndarray]) -> Optional[List[float]]:
    """Per-channel values for JSON, at float32 resolution (7 significant digits)."""
    return None if a is None else [float(f"{x:.7g}") for x in np.asarray(a, np.float64)]


@dataclass
class LayerStats:
    """Per-channel statistics of one layer (arrays have one entry per output channel)."""

    name: str
    source_name: str
    op: str
    w_min: np.ndarray
    w_max: np.ndarray
    zero_channels: List[int]
    near_zero_channels: List[int]
    outlier_channels: List[int]
    spread: float
    median_range: float
    #: SQNR (dB) of the median live channel, ``{"per_tensor": x, "per_channel": y}``
    sqnr_db: Dict[str, float]
    #: SQNR (dB) of the whole kernel, same keys
    tensor_sqnr_db: Dict[str, float]
    bn_scale: Optional[np.ndarray] = None
    #: the BatchNorm the scale comes from (source name), and whether this view folded it (it is still in the graph)
    bn_name: Optional[str] = None
    bn_folded_here: bool = False
    act_min: Optional[np.ndarray] = None
    act_max: Optional[np.ndarray] = None
    act_tensor: Optional[str] = None
    #: depthwise channels reading a zero/near-zero input channel: ``{channel: producing layer's source name}``
    dead_inputs: Dict[int, str] = field(default_factory=dict)

    @property
    def ranges(self) -> np.ndarray:
        return np.asarray(self.w_max, np.float64) - np.asarray(self.w_min, np.float64)

    @property
    def channels(self) -> int:
        return int(len(self.w_min))

    @property
    def max_range(self) -> float:
        return float(self.ranges.max())

    @property
    def per_tensor_loss_db(self) -> float:
        """How many dB the median channel loses with per-tensor instead of per-channel weights."""
        return float(self.sqnr_db["per_channel"] - self.sqnr_db["per_tensor"])

    @property
    def act_spread(self) -> Optional[float]:
        if self.act_min is None:
            return None
        return cm.spread(np.asarray(self.act_max) - np.asarray(self.act_min))

    def outlier_details(self) -> List[Dict[str, Any]]:
        """One dict per outlier channel: its min/max/range, range over the median, and the BN scale and how many times
        the layer's median BN scale it is. ``caused_by_bn``: the BN scale accounts for at least half of the channel's
        excess on the log scale, ``|s_c| / median|s| >= sqrt(range_c / median range)``."""
        out = []
        rng = self.ranges
        ratios = cm.ratios(rng, self.outlier_channels)
        bn_ratios = cm.ratios(self.bn_scale, self.outlier_channels) if self.bn_scale is not None else None
        for i, c in enumerate(self.outlier_channels):
            d: Dict[str, Any] = {"channel": int(c), "min": float(self.w_min[c]), "max": float(self.w_max[c]),
                                 "range": float(rng[c]), "range_over_median": ratios[i]}
            if bn_ratios is not None:
                d["bn_scale"] = float(self.bn_scale[c])
                d["bn_scale_over_median"] = bn_ratios[i]
                d["caused_by_bn"] = bool(bn_ratios[i] >= np.sqrt(ratios[i]))
            if c in self.dead_inputs:
                d["reads_dead_input_of"] = self.dead_inputs[c]
            out.append(d)
        return out

    def summary(self) -> Dict[str, Any]:
        """Scalars and channel index lists (no per-channel value arrays)."""
        return {
            "name": self.source_name, "node": self.name, "op": self.op, "channels": self.channels,
            "spread": self.spread, "median_range": self.median_range, "max_range": self.max_range,
            "zero_channels": list(self.zero_channels), "near_zero_channels": list(self.near_zero_channels),
            "outlier_channels": list(self.outlier_channels),
            "sqnr_db": dict(self.sqnr_db), "tensor_sqnr_db": dict(self.tensor_sqnr_db),
            "per_tensor_loss_db": self.per_tensor_loss_db,
            "bn": self.bn_name, "act_tensor": self.act_tensor, "act_spread": self.act_spread,
        }

    def to_dict(self, per_channel: bool = True) -> Dict[str, Any]:
        """:meth:`summary`, the outlier details, and (``per_channel``) every per-channel array as a list."""
        d = self.summary()
        d["outliers"] = self.outlier_details()
        d["dead_inputs"] = {str(k): v for k, v in self.dead_inputs.items()}
        if per_channel:
            d["per_channel"] = {"w_min": _to_list(self.w_min), "w_max": _to_list(self.w_max),
                                "bn_scale": _to_list(self.bn_scale), "act_min": _to_list(self.act_min),
                                "act_max": _to_list(self.act_max)}
        return d


class GraphChannelStats(Mapping):
    """:class:`LayerStats` of every weighted layer, keyed by node name, in topological order."""

    def __init__(self, layers: List[LayerStats], folded: bool, with_activations: bool, bits: int = 8):
        self._layers: Dict[str, LayerStats] = {ls.name: ls for ls in layers}
        self.folded = folded
        self.with_activations = with_activations
        self.bits = bits

    def __getitem__(self, name: str) -> LayerStats:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def by_source_name(self, name: str) -> LayerStats:
        for ls in self._layers.values():
            if ls.source_name == name:
                return ls
        raise KeyError(name)

    def ranked(self) -> List[LayerStats]:
        """Layers from the one per-tensor 8-bit weights hurt most: lowest median-channel per-tensor SQNR first
        (ties: larger spread first)."""
        def key(ls: LayerStats):
            s = ls.sqnr_db["per_tensor"]
            return (np.inf if np.isnan(s) else s, -ls.spread if np.isfinite(ls.spread) else -np.inf)

        return sorted(self._layers.values(), key=key)

    def summary(self) -> Dict[str, Dict[str, Any]]:
        return {name: ls.summary() for name, ls in self._layers.items()}

    def totals(self) -> Dict[str, Any]:
        """Whole-graph figures: worst spread (overall and depthwise), channel counts, worst per-tensor SQNR."""
        layers = list(self._layers.values())
        dw = [ls for ls in layers if ls.op == Op.DEPTHWISE_CONV2D.value]

        def worst(ls_list):
            return max((ls.spread for ls in ls_list), default=float("nan"))

        return {
            "layers": len(layers),
            "max_spread": worst(layers),
            "max_depthwise_spread": worst(dw),
            "median_depthwise_spread": float(np.median([ls.spread for ls in dw])) if dw else float("nan"),
            "zero_channels": sum(len(ls.zero_channels) for ls in layers),
            "near_zero_channels": sum(len(ls.near_zero_channels) for ls in layers),
            "outlier_channels": sum(len(ls.outlier_channels) for ls in layers),
            "min_sqnr_per_tensor_db": min((ls.sqnr_db["per_tensor"] for ls in layers
                                           if not np.isnan(ls.sqnr_db["per_tensor"])), default=float("nan")),
        }

    def __repr__(self) -> str:
        return f"<GraphChannelStats {len(self)} layers, folded={self.folded}>"


def _following_bn(node: Node) -> Optional[Node]:
    """The BatchNorm that reads ``node`` and can be folded into it, else ``None``."""
    r = sole_reader(node.output)
    return r if r is not None and r.op is Op.BATCH_NORM and batchnorm_fold_target(r) is node else None


def activation_tensor(node: Node) -> str:
    """The value the int8 model quantizes after layer ``node``: its output after a sole-reader BatchNorm and a
    sole-reader ``Relu``/``Clip``."""
    v = node
    nxt = sole_reader(v.output)
    if nxt is not None and nxt.op is Op.BATCH_NORM:
        v, nxt = nxt, sole_reader(nxt.output)
    if nxt is not None and nxt.op in (Op.RELU, Op.CLIP):
        v = nxt
    return v.output.name


def _channel_source(node: Node) -> Optional[Node]:
    """The weighted layer whose output channels reach ``node``'s input channel by channel, or ``None``."""
    v = node.inputs[0]
    for _ in range(_MAX_WALK):
        p = v.producer
        if p is None:
            return None
        if p.op in WEIGHTED_OPS:
            return p
        if not is_channelwise(p):
            return None
        v = p.inputs[0]  # a channel-wise op reads its channels from its first input
    return None


def layer_stats(node: Node, fold_bn: bool = False, bits: int = 8) -> LayerStats:
    """Weight statistics of one Conv2D / DepthwiseConv2D / Dense node (see the module docstring for the views)."""
    kernel = node.weight.const
    bn = _following_bn(node)
    bn_scale, bn_name, folded_here = None, None, False
    if bn is not None:
        scale, shift, _ = bn_affine(bn)
        bn_scale, bn_name = scale, bn.source_name
        if fold_bn:
            kernel, _ = fold_bn_into_kernel(kernel, None, scale, shift, depthwise=node.op is Op.DEPTHWISE_CONV2D)
            folded_here = True
    elif node.folded_bn is not None:
        bn_scale = np.asarray(node.folded_bn.scale, np.float64)
        bn_name = node.folded_bn.name
    flat = _flat(np.asarray(kernel), node)
    w_min, w_max = flat.min(axis=0).astype(np.float64), flat.max(axis=0).astype(np.float64)
    ranges = w_max - w_min
    live = cm.live_mask(ranges, bits)
    sq = cm.weight_sqnr(flat, live, bits)
    return LayerStats(
        name=node.name, source_name=node.source_name, op=node.op.value, w_min=w_min, w_max=w_max,
        zero_channels=cm.zero_channels(w_min, w_max).tolist(),
        near_zero_channels=cm.near_zero_channels(ranges, bits).tolist(),
        outlier_channels=cm.outlier_channels(ranges, bits).tolist(),
        spread=cm.spread(ranges), median_range=cm.median_range(ranges),
        sqnr_db=sq["median_channel"], tensor_sqnr_db=sq["tensor"],
        bn_scale=None if bn_scale is None else np.asarray(bn_scale, np.float64).copy(),
        bn_name=bn_name, bn_folded_here=folded_here)


def _mark_dead_inputs(node: Node, ls: LayerStats, done: Dict[str, LayerStats]) -> None:
    if node.op is not Op.DEPTHWISE_CONV2D:
        return
    src = _channel_source(node)
    if src is None or src.name not in done:
        return
    prev = done[src.name]
    dead = set(prev.zero_channels) | set(prev.near_zero_channels)
    m = node.weight.const.shape[3]
    for c in sorted(dead):
        if c * m >= ls.channels:
            continue
        for j in range(m):
            ls.dead_inputs[c * m + j] = prev.source_name


def compute_channel_stats(graph: Graph, ctx: Optional[Context] = None, fold_bn: bool = True,
                          activations: str = "auto", bits: int = 8) -> GraphChannelStats:
    """:class:`GraphChannelStats` of ``graph`` (uncached; use :class:`ChannelStats` through a Context to cache)."""
    if activations not in _ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {_ACTIVATION_MODES}, got {activations!r}")
    done: Dict[str, LayerStats] = {}
    nodes = graph.find(*WEIGHTED_OPS)
    for node in nodes:
        ls = layer_stats(node, fold_bn=fold_bn, bits=bits)
        _mark_dead_inputs(node, ls, done)
        ls.act_tensor = activation_tensor(node)
        done[node.name] = ls
    with_act = False
    if activations != "never" and ctx is not None and done:
        tensors = _activation_ranges(graph, ctx, [ls.act_tensor for ls in done.values()], activations)
        if tensors is not None:
            for ls in done.values():
                t = tensors[ls.act_tensor]
                ls.act_min = np.asarray(t.channel_min, np.float64)
                ls.act_max = np.asarray(t.channel_max, np.float64)
            with_act = True
    return GraphChannelStats(list(done.values()), folded=fold_bn, with_activations=with_act, bits=bits)


def _activation_ranges(graph: Graph, ctx: Context, names: List[str], mode: str):
    if mode == "always":
        ctx.require_data("activation statistics")
        return activation_stats(graph, ctx, names)
    if ctx.cached(ActivationStats(None).name, graph) or ctx.cached(ActivationStats(names).name, graph):
        return activation_stats(graph, ctx, names, histograms=False)
    return None


class ChannelStats(Analysis):
    """The cached analysis: ``ctx.analysis(ChannelStats(fold_bn=True), graph)`` -> :class:`GraphChannelStats`."""

    def __init__(self, fold_bn: bool = True, activations: str = "auto", bits: int = 8):
        if activations not in _ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {_ACTIVATION_MODES}, got {activations!r}")
        self.fold_bn, self.activations, self.bits = bool(fold_bn), activations, int(bits)
        self.name = f"channel_stats:fold_bn={self.fold_bn}:act={activations}:bits={self.bits}"

    def compute(self, graph: Graph, ctx: Context) -> GraphChannelStats:
        return compute_channel_stats(graph, ctx, self.fold_bn, self.activations, self.bits)

    def __call__(self, graph: Graph) -> GraphChannelStats:
        """Uncached use as a plain statistics hook ``(graph) -> stats``."""
        return compute_channel_stats(graph, None, self.fold_bn, "never", self.bits)

    def __repr__(self) -> str:
        return f"ChannelStats(fold_bn={self.fold_bn}, activations={self.activations!r})"


def graph_stats_summary(graph: Graph) -> Dict[str, Any]:
    """A compact per-layer summary of the weights as they are in the graph:
    ``{layer: {"spread", "max_range", "median_range", "zero_channels" (a count), "near_zero_channels",
    "outlier_channels" (counts), "sqnr_per_tensor_db", "sqnr_per_channel_db"}}``."""
    out: Dict[str, Any] = {}
    for node in graph.find(*WEIGHTED_OPS):
        ls = layer_stats(node)
        out[node.name] = {
            "spread": ls.spread, "max_range": ls.max_range, "median_range": ls.median_range,
            "zero_channels": len(ls.zero_channels), "near_zero_channels": len(ls.near_zero_channels),
            "outlier_channels": len(ls.outlier_channels),
            "sqnr_per_tensor_db": ls.sqnr_db["per_tensor"], "sqnr_per_channel_db": ls.sqnr_db["per_channel"],
        }
    return out
