"""Small structural helpers shared by the per-channel passes: layer kinds, padding, single-reader chains.

A *chain* joins layer 1 to layer 2 through nodes that act channel by channel and are each read only by the next:
``Relu``, ``Clip``, ``Minimum`` with a constant operand, ``Pad`` (and, where a caller allows them, pools,
``GlobalMean`` and reshapes that keep the channel axis last with every other dimension 1). Anything else (an
``Add`` of a residual, a second reader, a graph output) ends the search with a reason.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from qfrewrite.ir import Graph, Node, Op, Value, resolve_pads

__all__ = ["LAYER_OPS", "kind_of", "padding_free", "only_reader", "const_operand", "walk_chain", "set_bias",
           "set_kernel"]

LAYER_OPS = (Op.CONV2D, Op.DEPTHWISE_CONV2D, Op.DENSE)
_KIND = {Op.CONV2D: "conv", Op.DEPTHWISE_CONV2D: "depthwise", Op.DENSE: "dense"}


def kind_of(node: Node) -> str:
    """``"conv"``, ``"depthwise"`` or ``"dense"`` (the layout names of :mod:`qfrewrite.numerics.kernels`)."""
    return _KIND[node.op]


def padding_free(node: Node) -> bool:
    """True when every output position of the layer sees a full receptive field (no zero padding is read):
    Dense, 1x1 kernels, VALID or explicit all-zero pads."""
    if node.op is Op.DENSE:
        return True
    k = node.weight.const
    if k.shape[0] == 1 and k.shape[1] == 1:
        return True
    a = node.attrs
    if a.padding == "VALID":
        return True
    try:
        pads = resolve_pads(a.padding, node.inputs[0].shape[1:3], k.shape[:2], a.strides, a.dilations)
    except Exception:  # SAME with unknown spatial size: assume padding is read
        return False
    return pads == ((0, 0), (0, 0))


def only_reader(value: Value) -> Union[Node, str]:
    """The single node reading ``value`` once, or a reason string."""
    g = value.graph
    if g is not None and any(value is o for o in g.outputs):
        return "is a graph output"
    uses = value.uses()
    if len(uses) != 1:
        return f"has {len(uses)} readers"
    return uses[0][0]


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


def _per_channel_ok(const: Value, channels: Optional[int]) -> bool:
    c = const.const
    return c.size == 1 or (c.ndim >= 1 and c.shape[-1] == channels and c.size == channels)


def walk_chain(layer: Node, allowed: Sequence[Op] = (Op.RELU, Op.CLIP, Op.MINIMUM, Op.PAD),
               targets: Sequence[Op] = (Op.CONV2D, Op.DEPTHWISE_CONV2D)) -> Union[Tuple[List[Node], Node], str]:
    """Follow the single-reader path from ``layer``'s output to the next layer.

    Returns ``(chain nodes, next layer)`` or a reason string. ``Clip`` must have ``lo == 0`` (so the chain stays
    positively homogeneous up to its upper bound), ``Pad`` must pad with 0 and ``Minimum`` must take a scalar or
    per-channel constant.
    """
    chain: List[Node] = []
    value = layer.output
    channels = value.shape[-1]
    for _ in range(64):  # chains are short; the bound keeps a malformed graph from looping
        nxt = only_reader(value)
        if isinstance(nxt, str):
            return f"{value.name} {nxt}"
        if nxt.op in targets:
            if nxt.inputs[0] is not value:
                return f"{nxt.name} reads {value.name} as a weight"
            return chain, nxt
        if nxt.op not in allowed:
            return f"{nxt.name} is a {nxt.op.value}"
        if nxt.op is Op.CLIP and nxt.attrs.lo != 0.0:
            return f"{nxt.name} clips below at {nxt.attrs.lo} (not positively homogeneous)"
        if nxt.op is Op.PAD and nxt.attrs.value != 0.0:
            return f"{nxt.name} pads with {nxt.attrs.value}"
        if nxt.op in (Op.RESHAPE, Op.FLATTEN):
            ins, outs = nxt.inputs[0].shape, nxt.output.shape
            if not (all(d == 1 for d in ins[1:-1]) and all(d == 1 for d in outs[1:-1]) and ins[-1] == outs[-1]):
                return f"{nxt.name} moves the channel axis"
        if nxt.op is Op.MINIMUM:
            x, c = const_operand(nxt)
            if x is not value or not _per_channel_ok(c, channels):
                return f"{nxt.name} is not a scalar or per-channel constant minimum"
        chain.append(nxt)
        value = nxt.output
    return "chain too long"


def set_kernel(graph: Graph, layer: Node, kernel: np.ndarray, tag: str) -> None:
    """Give ``layer`` a new constant kernel (never edits an array another node may share)."""
    layer.set_input(1, graph.const(np.asarray(kernel, np.float32), name=f"{layer.name}/kernel_{tag}"))


def set_bias(graph: Graph, layer: Node, bias: np.ndarray, tag: str) -> None:
    """Give ``layer`` a new constant bias, adding the input when the layer had none."""
    b = graph.const(np.asarray(bias, np.float32), name=f"{layer.name}/bias_{tag}")
    if layer.bias is not None:
        layer.set_input(2, b)
    else:
        layer.append_input(b)
