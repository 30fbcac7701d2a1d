"""Graph questions asked by every pass, analysis, importer and emitter, answered once.

* :func:`is_graph_output`: the value is one of the graph's outputs (a reader outside the graph);
* :func:`sole_reader` / :func:`sole_reader_or_reason`: the one node that reads a value, exactly once, when the value
  is no graph output (the condition under which a producer may be rewritten for that reader alone);
* :func:`const_operand`: the non-constant and the constant operand of a binary node;
* :func:`bn_affine`: a BatchNorm node as ``y = x * scale + shift`` (:mod:`qfrewrite.numerics.batchnorm`);
* :func:`batchnorm_fold_target`: the layer a BatchNorm can be folded into, or why none;
* :func:`padding_free`: a layer whose every output position sees a full receptive field (reads no zero padding);
* :func:`single_input_segments`: the graph cut, in topological order, where a single value carries everything that
  follows (a residual block cannot be cut inside).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import numpy as np

from ..numerics.batchnorm import bn_scale_shift
from .graph import Graph, Node, Value
from .ops import WEIGHTED_OPS, Op
from .shapes import resolve_pads

__all__ = ["is_graph_output", "sole_reader", "sole_reader_or_reason", "const_operand", "bn_affine",
           "batchnorm_fold_target", "padding_free", "single_input_segments"]


def is_graph_output(value: Value) -> bool:
    """True when ``value`` is an output of its graph."""
    return value.graph is not None and value.graph.is_output(value)


def sole_reader_or_reason(value: Value) -> Union[Node, str]:
    """The single node that reads ``value`` (once), or why there is none: a graph output, or several readers."""
    if is_graph_output(value):
        return "is a graph output"
    uses = value.uses()
    if len(uses) != 1:
        return f"has {len(uses)} readers"
    return uses[0][0]


def sole_reader(value: Value) -> Optional[Node]:
    """The single node that reads ``value`` (once) when it is no graph output, else ``None``."""
    r = sole_reader_or_reason(value)
    return None if isinstance(r, str) else r


def const_operand(node: Node) -> Tuple[Optional[Value], Optional[Value]]:
    """For a binary node: ``(the non-constant operand, the constant operand)``, or ``(None, None)``."""
    if len(node.inputs) != 2:
        return None, None
    a, b = node.inputs
    if b.is_const and not a.is_const:
        return a, b
    if a.is_const and not b.is_const:
        return b, a
    return None, None


def bn_affine(node: Node) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A BatchNorm node as ``(scale, shift, degenerate)`` per channel, ``y = x * scale + shift`` (float64);
    ``degenerate`` marks channels with ``variance + eps <= 0`` (folded as the constant ``beta``)."""
    if node.op is not Op.BATCH_NORM:
        raise ValueError(f"{node.name} is a {node.op.value}, not a BatchNorm")
    gamma, beta, mean, var = (v.const for v in node.inputs[1:5])
    return bn_scale_shift(gamma, beta, mean, var, node.attrs.epsilon)


def batchnorm_fold_target(bn: Node) -> Union[Node, str]:
    """The layer ``bn`` folds into, or why it cannot be folded.

    Foldable: the BatchNorm reads the output of a Conv2D / DepthwiseConv2D / Dense that nothing else reads (and that
    is no graph output), whose kernel is still float (no ``weight_quant``).
    """
    layer = bn.inputs[0].producer
    if layer is None or layer.op not in WEIGHTED_OPS:
        return f"input is {'a graph input' if layer is None else layer.op.value}"
    if sole_reader(layer.output) is not bn:
        return "layer output has other readers"
    if layer.weight_quant is not None:
        return "layer kernel is already quantized"
    return layer


def padding_free(node: Node) -> bool:
    """True when every output position of the layer sees a full receptive field (no zero padding is read):
    Dense, 1x1 kernels, VALID or explicit all-zero pads. SAME padding of an unknown spatial size counts as padded."""
    if node.op is Op.DENSE:
        return True
    k = node.weight.const
    if k.shape[0] == 1 and k.shape[1] == 1:
        return True
    a = node.attrs
    if a.padding == "VALID":
        return True
    if a.padding == "SAME" and any(d is None for d in node.inputs[0].shape[1:3]):
        return False
    pads = resolve_pads(a.padding, node.inputs[0].shape[1:3], k.shape[:2], a.strides, a.dilations)
    return pads == ((0, 0), (0, 0))


def single_input_segments(graph: Graph, min_weighted: int = 1) -> Optional[List[Tuple[Value, List[Node]]]]:
    """The graph's nodes in topological order, cut into segments ``(input, nodes)`` that each read one value only,
    the one the segment before produced (the first: the graph's input).

    A cut may follow a node when the only non-constant value still to be read (by a later node or as a graph
    output) is that node's output, and the segment before it holds at least ``min_weighted`` weighted layers; of
    those places, the cut is made at the last one before the next weighted layer, so a layer's activation (and
    whatever else follows it up to the next layer) stays with it. Branches (residual blocks, squeeze-excite) are
    therefore never cut inside, and what follows the last weighted layer joins the last segment. ``None`` when the
    graph does not start from a single input value or ends in more than one output."""
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        return None
    order = graph.topological_order()
    last_read = {}
    for i, node in enumerate(order):
        for v in node.inputs:
            if not v.is_const:
                last_read[v.name] = i
    for v in graph.outputs:
        last_read[v.name] = len(order)
    cuts, live, weighted, candidate = [], {graph.inputs[0].name}, 0, None
    for i, node in enumerate(order):
        if node.op in WEIGHTED_OPS:
            if candidate is not None:
                cuts.append(candidate)
                weighted, candidate = 0, None
            weighted += 1
        live.add(node.output.name)
        live = {v for v in live if last_read.get(v, -1) > i}
        if live == {node.output.name} and weighted >= min_weighted:
            candidate = i
    segments: List[Tuple[Value, List[Node]]] = []
    start, begin = graph.inputs[0], 0
    for cut in cuts + [len(order) - 1]:
        segments.append((start, order[begin:cut + 1]))
        start, begin = order[cut].output, cut + 1
    return segments
