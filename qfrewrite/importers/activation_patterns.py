"""Recognise hard-sigmoid and hard-swish spelled as elementary ops, and replace them by the IR's own ops.

Keras MobileNetV3 writes ``hard_sigmoid(x) = ReLU(6)(x + 3) * (1/6)`` with separate layers or ops, and Keras 2
``hard_swish(x) = x * hard_sigmoid(x)``. The IR has ``HardSigmoid`` = ``relu6(x + 3) / 6`` and ``HardSwish`` =
``x * relu6(x + 3) / 6``; finding them keeps one node per activation, which quantizers and passes understand.

Rules (each intermediate value must have one reader and not be a graph output; constants must be scalars, compared
at float32 precision):

* ``Mul(Clip(0, 6)(Add(x, 3)), 1/6)`` (either operand order of Add and Mul) -> ``HardSigmoid(x)``;
* ``Mul(x, HardSigmoid(x))`` (either order) -> ``HardSwish(x)``.

The function is identical up to float rounding (the ops are evaluated in a different order).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple


from ..ir import Graph, Node, Op, Value, sole_reader

__all__ = ["fuse_hard_activations"]

log = logging.getLogger(__name__)


def _scalar(v: Value) -> Optional[float]:
    if v.is_const and v.const.size == 1:
        return float(v.const.reshape(-1)[0])
    return None


def _const_operand(node: Node) -> Tuple[Optional[Value], Optional[float]]:
    """For a binary node with one scalar-constant operand: (the other operand, the constant)."""
    a, b = node.inputs
    if _scalar(b) is not None and not a.is_const:
        return a, _scalar(b)
    if _scalar(a) is not None and not b.is_const:
        return b, _scalar(a)
    return None, None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(b), 1.0)


def _match_hard_sigmoid(add: Node) -> Optional[Tuple[Value, Node]]:
    """``add`` = Add(x, 3): return (x, the final Mul) when the chain is a hard sigmoid."""
    x, c = _const_operand(add)
    if x is None or not _close(c, 3.0):
        return None
    clip = sole_reader(add.output)
    if clip is None or clip.op is not Op.CLIP or not (clip.attrs.lo == 0.0 and clip.attrs.hi == 6.0):
        return None
    mul = sole_reader(clip.output)
    if mul is None or mul.op is not Op.MUL:
        return None
    _, k = _const_operand(mul)
    if k is None or not _close(k, 1.0 / 6.0):
        return None
    return x, mul


def fuse_hard_activations(graph: Graph) -> Dict[str, int]:
    """Replace hard-sigmoid / hard-swish op chains in place; returns how many of each were found."""
    counts = {"HardSigmoid": 0, "HardSwish": 0}
    for add in graph.find(Op.ADD):
        if add.graph is not graph:
            continue
        m = _match_hard_sigmoid(add)
        if m is None:
            continue
        x, mul = m
        hs = graph.add_node(Op.HARD_SIGMOID, [x], name=mul.name + "/hard_sigmoid", meta=dict(mul.meta))
        mul.output.replace_all_uses_with(hs.output)
        counts["HardSigmoid"] += 1
    if counts["HardSigmoid"]:
        graph.remove_unused()
    for hs in graph.find(Op.HARD_SIGMOID):
        mul = sole_reader(hs.output)
        if mul is None or mul.op is not Op.MUL:
            continue
        other = mul.inputs[0] if mul.inputs[1] is hs.output else mul.inputs[1]
        if other is not hs.inputs[0]:
            continue
        sw = graph.add_node(Op.HARD_SWISH, [other], name=mul.name + "/hard_swish", meta=dict(mul.meta))
        mul.output.replace_all_uses_with(sw.output)
        counts["HardSwish"] += 1
    if counts["HardSwish"]:
        graph.remove_unused()
    if any(counts.values()):
        log.info("recognised %d hard-sigmoid and %d hard-swish activations", counts["HardSigmoid"],
                 counts["HardSwish"])
    return counts
