"""Fold constant (dead) channels into the next layer's bias (exact).

A channel is *constant* when its producer cannot see the input (:mod:`qfrewrite.analysis.constant_channels`):
typically a layer output
channel trained to all-zero weights whose bias the following ReLU6 maps to a constant (TF-slim MobileNetV1 has about
20 such stem/pointwise channels, weights ``~1e-13``). The depthwise channel fed by one reads a constant, so it is
constant too, and its folded BatchNorm weights, trained on a channel of zero variance, are the outliers that wreck
per-tensor weight quantization. For a layer reading constant input channel ``i`` with value ``v_i``:

    y_o = sum_i W[.., i, o] * v_i + (rest) + b_o  ->  W[.., i, o] := 0,  b_o += v_i * sum_taps W[.., i, o]

This holds at every output position when ``v_i == 0`` (always) or when the layer reads no zero padding (1x1, VALID,
Dense). A non-zero constant read through zero padding differs at the borders: it is left alone (a skip with the
reason). A depthwise channel whose input was folded becomes a constant (its bias) and is folded on into
the next layer the same way. When every layer reading a channel has zeroed its weights for it, the producing
channel is set to output 0 (weights and bias 0), so it widens no weight or activation range either.

Constants are also found from bounds (:mod:`qfrewrite.analysis.constant_channels`): a channel after ReLU6 lies in ``[0, 6]``, so a
next-layer channel whose largest possible pre-activation stays below 0 (TF-slim MobileNetV1 has channels with
weights of ``1e-8`` and a bias of ``-1.3``) is a constant 0 after its ReLU, with no tolerance on weights.

Weights of a dead output channel below ``zero_tol`` times the layer's largest weight are set to exactly 0 first; with
the default ``1e-8`` that changes the output by less than float32 resolution.

Handled: Conv2D, DepthwiseConv2D (any multiplier), Dense; constants carried through Relu, Clip, BatchNorm, Pad,
Minimum/Add/Mul with a constant, pools, GlobalMean. Left alone: constants that reach an ``Add`` of two tensors, a
``Concat`` or a graph output (their producer keeps its value).

Contract: requires ``BN_FOLDED`` (the dead channels it removes are those of the weights as they will be quantized);
ensures ``DEAD_CHANNELS_FOLDED``; cannot run after equalization (CrossLayerEqualization leaves the constant channels
it guards at their range while it shrinks the others: folding them afterwards measured worse, 82-83 against 89.5
top-1 on TF-slim MobileNetV1 per-tensor), nor once the weights are final or quantized.
"""
from __future__ import annotations

import logging
from typing import Dict, List

import numpy as np

from qfrewrite.analysis.constant_channels import (Bounds, ConstChannels, constants_from_bounds, dead_out_channels,
                                                  merge, propagate, propagate_bounds)
from qfrewrite.contracts import Property
from qfrewrite.ir import (WEIGHTED_OPS, Graph, Node, is_channelwise, is_graph_output, layer_kind, padding_free,
                          set_bias, set_kernel)
from qfrewrite.numerics.kernels import (const_input_bias, in_absmax, out_channels_last, zero_in_channels,
                                       zero_out_channels)
from qfrewrite.pass_infra import Context, Pass, PassResult, Skip

__all__ = ["FoldDeadChannels"]

log = logging.getLogger(__name__)

def _readers(layer: Node):
    """The layers that read ``layer``'s output through channel-wise ops, or ``None`` when something else does."""
    out, stack, seen = [], [layer.output], set()
    while stack:
        v = stack.pop()
        if is_graph_output(v):
            return None
        for node, idx in v.uses():
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op in WEIGHTED_OPS and idx == 0:
                out.append(node)
            elif is_channelwise(node) and idx == 0:
                stack.append(node.output)
            else:
                return None
    return out


class FoldDeadChannels(Pass):
    """Fold constant channels into the bias of the layers that read them and zero their weights."""

    exact = True
    requires = frozenset({Property.BN_FOLDED})
    ensures = frozenset({Property.DEAD_CHANNELS_FOLDED})
    forbids = frozenset({Property.EQUALIZED, Property.WEIGHTS_FINAL, Property.QUANTIZED})

    def __init__(self, zero_tol: float = 1e-8):
        if not 0 <= zero_tol < 1e-4:
            raise ValueError(f"zero_tol must be in [0, 1e-4) (a relative weight magnitude), got {zero_tol}")
        self.zero_tol = zero_tol

    def __repr__(self) -> str:
        return f"FoldDeadChannels(zero_tol={self.zero_tol})"

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        consts: Dict[str, ConstChannels] = {}
        bounds: Dict[str, Bounds] = {}
        zeroed: Dict[str, List[int]] = {}
        constant: Dict[str, Dict[int, float]] = {}
        folded: Dict[str, List[int]] = {}
        skipped: List[Skip] = []
        modified = False
        for node in graph.topological_order():
            if not node.inputs:
                continue
            cin = consts.get(node.inputs[0].name)
            bout = propagate_bounds(node, bounds.get(node.inputs[0].name))
            if bout is not None:
                bounds[node.output.name] = bout
            if node.op in WEIGHTED_OPS:
                kind = layer_kind(node)
                k = node.weight.const
                dead = dead_out_channels(k, kind, self.zero_tol)
                idx = np.flatnonzero(dead)
                if idx.size and np.any(zero_out_channels(k, idx, kind) != k):
                    k = zero_out_channels(k, idx, kind)
                    set_kernel(graph, node, k, "dead_zeroed")
                    zeroed[node.name] = idx.tolist()
                    modified = True
                if cin is not None:
                    mask, vals = cin
                    todo = mask & (in_absmax(k, kind) > 0)
                    ok = todo & ((vals == 0) | padding_free(node))
                    bad = np.flatnonzero(todo & ~ok)
                    if bad.size:
                        skipped.append(Skip(node.name, f"input channels {bad.tolist()} are non-zero constants read "
                                                       f"through zero padding (not constant at the borders)"))
                    if ok.any():
                        add = const_input_bias(k, np.where(ok, vals, 0.0), kind)
                        set_kernel(graph, node, zero_in_channels(k, np.flatnonzero(ok), kind), "dead_folded")
                        if np.any(add != 0):
                            base = node.bias.const.astype(np.float64) if node.bias is not None else 0.0
                            set_bias(graph, node, base + add, "dead_folded")
                        folded[node.name] = np.flatnonzero(ok).tolist()
                        modified = True
                res = propagate(node, cin, 0.0)
                if res is not None:
                    constant[node.name] = {int(c): float(res[1][c]) for c in np.flatnonzero(res[0])}
            else:
                res = merge(propagate(node, cin, 0.0), constants_from_bounds(bout))
                new = np.zeros(0, int) if res is None else np.flatnonzero(res[0] & ~(cin[0] if cin else False))
                if new.size:  # a clip the input never leaves: constant from the bounds alone
                    constant[node.name] = {int(c): float(res[1][c]) for c in new}
            if res is not None:
                consts[node.output.name] = res
        cleared = self._clear_producers(graph)
        modified |= bool(cleared)
        if modified:
            graph.remove_unused()
        stats = {"constant_channels": {k: sorted(v) for k, v in constant.items()},
                 "num_constant_channels": sum(len(v) for v in constant.values()),
                 "folded_into": folded, "dead_weights_zeroed": zeroed, "producers_cleared": cleared}
        if not modified:
            skipped.append(Skip(None, "no constant channel is read by a layer"))
        elif constant:
            log.info("FoldDeadChannels: %d constant channels in %d layers", stats["num_constant_channels"],
                     len(constant))
        return PassResult(graph, modified, stats, skipped)

    def _clear_producers(self, graph: Graph) -> Dict[str, List[int]]:
        """Set every output channel that all reading layers ignore to 0 (weights and bias): nothing reads it."""
        cleared: Dict[str, List[int]] = {}
        for layer in graph.find(*WEIGHTED_OPS):
            readers = _readers(layer)
            if not readers:
                continue
            kind = layer_kind(layer)
            k = layer.weight.const
            ignored = np.ones(layer.output.shape[-1], bool)
            for r in readers:
                ignored &= in_absmax(r.weight.const, layer_kind(r)) == 0
            b = layer.bias.const if layer.bias is not None else np.zeros(len(ignored), np.float32)
            live = np.abs(out_channels_last(k, kind)).max(axis=0) > 0
            todo = np.flatnonzero(ignored & (live | (b != 0)))
            if todo.size:
                set_kernel(graph, layer, zero_out_channels(k, todo, kind), "dead_cleared")
                if layer.bias is not None:
                    nb = b.copy()
                    nb[todo] = 0.0
                    set_bias(graph, layer, nb, "dead_cleared")
                cleared[layer.name] = todo.tolist()
        return cleared
