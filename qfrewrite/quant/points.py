"""Where an int8 model quantizes its activations: the values that get a FakeQuant.

A value gets one unless TFLite runs it inside another op: the output of a weighted layer or an ``Add`` read only by
a fusable activation (``Relu``, ``Clip(0, 6)`` / ``Clip(0, None)``: the converter fuses it, and only the
activation's output is quantized), and the outputs of ops that run at their input's scale (Pad, pools, reshapes:
:data:`SAME_SCALE_OPS`). The graph inputs are points. Read by InsertFakeQuant (which inserts them) and by the shared
calibration pass (which histograms only these values).
"""
from __future__ import annotations

from typing import List, Set

from ..ir import WEIGHTED_OPS, Graph, Node, Op, sole_reader

__all__ = ["quantization_points", "output_sources", "fusable_activation", "feeds_fused_activation",
           "SAME_SCALE_OPS", "FUSING_OPS"]

#: ops the converter fuses a following ReLU / ReLU6 into
FUSING_OPS = WEIGHTED_OPS | {Op.ADD}
#: ops that TFLite runs at their input's scale
SAME_SCALE_OPS = (Op.PAD, Op.MAX_POOL, Op.AVG_POOL, Op.RESHAPE, Op.FLATTEN)


def fusable_activation(node: Node) -> bool:
    """A ReLU or ReLU6 that the converter fuses into the op before it."""
    if node.op is Op.RELU:
        return True
    return node.op is Op.CLIP and node.attrs.lo == 0.0 and (node.attrs.hi is None or node.attrs.hi == 6.0)


def feeds_fused_activation(node: Node) -> bool:
    """The output of ``node`` (a weighted layer or an ``Add``) is read only by an activation the converter fuses into
    it: the int8 model never holds that value."""
    if node.op not in FUSING_OPS:
        return False
    reader = sole_reader(node.output)
    return reader is not None and fusable_activation(reader)


def quantization_points(graph: Graph) -> List[str]:
    """Names of the values that get a FakeQuant, in topological order."""
    points = [v.name for v in graph.inputs]
    for node in graph.topological_order():
        if node.op in SAME_SCALE_OPS or node.op is Op.FAKE_QUANT or feeds_fused_activation(node):
            continue
        points.append(node.output.name)
    return points


def output_sources(graph: Graph) -> Set[str]:
    """Names of the graph outputs and of the values they copy through same-scale ops (Reshape, Pad, ...)."""
    out = set()
    for v in graph.outputs:
        while True:
            out.add(v.name)
            if v.producer is None or v.producer.op not in SAME_SCALE_OPS:
                break
            v = v.producer.inputs[0]
    return out
