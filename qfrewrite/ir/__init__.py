"""The qfrewrite intermediate representation (NHWC, typed ops, constants as numpy arrays)."""
from .graph import Graph, Node, Value
from .ops import (ATTRS_FOR, BatchNormAttrs, ClipAttrs, ConcatAttrs, ConvAttrs, FakeQuantAttrs, GlobalMeanAttrs,
                  NoAttrs, NormalizeAttrs, Op, PadAttrs, PoolAttrs, ReshapeAttrs, SoftmaxAttrs)
from .shapes import infer_output_shape, resolve_pads, same_pads
from .verify import verify

__all__ = [
    "Graph", "Node", "Value", "Op", "ATTRS_FOR", "BatchNormAttrs", "ClipAttrs", "ConcatAttrs", "ConvAttrs",
    "FakeQuantAttrs", "GlobalMeanAttrs", "NoAttrs", "NormalizeAttrs", "PadAttrs", "PoolAttrs", "ReshapeAttrs",
    "SoftmaxAttrs", "infer_output_shape", "resolve_pads", "same_pads", "verify",
]
