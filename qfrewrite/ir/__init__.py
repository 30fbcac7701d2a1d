"""The qfrewrite intermediate representation (NHWC, typed ops, constants as numpy arrays), with the graph questions,
op traits and constant edits that every pass, analysis, importer and emitter shares."""
from .chains import walk_chain
from .edit import record_output_scaling, set_bias, set_kernel
from .graph import FoldedBatchNorm, Graph, Node, Value
from .ops import (ATTRS_FOR, WEIGHTED_OPS, BatchNormAttrs, ClipAttrs, ConcatAttrs, ConvAttrs, FakeQuantAttrs,
                  GlobalMeanAttrs, NoAttrs, NormalizeAttrs, Op, PadAttrs, PoolAttrs, ReshapeAttrs, SoftmaxAttrs)
from .queries import (batchnorm_fold_target, bn_affine, const_operand, is_graph_output, padding_free,
                      single_input_segments, sole_reader, sole_reader_or_reason)
from .shapes import infer_output_shape, resolve_pads, same_pads
from .traits import (LAYER_KINDS, copies_channel_values, is_channelwise, is_positively_homogeneous, is_weighted,
                     keeps_channel_axis, layer_kind, per_channel_constant)
from .verify import verify

__all__ = [
    "Graph", "Node", "Value", "FoldedBatchNorm", "Op", "ATTRS_FOR", "WEIGHTED_OPS", "LAYER_KINDS", "BatchNormAttrs",
    "ClipAttrs", "ConcatAttrs", "ConvAttrs", "FakeQuantAttrs", "GlobalMeanAttrs", "NoAttrs", "NormalizeAttrs",
    "PadAttrs", "PoolAttrs", "ReshapeAttrs", "SoftmaxAttrs", "infer_output_shape", "resolve_pads", "same_pads",
    "verify", "is_graph_output", "sole_reader", "sole_reader_or_reason", "const_operand", "bn_affine", "batchnorm_fold_target",
    "padding_free", "single_input_segments", "is_weighted", "layer_kind", "is_channelwise", "is_positively_homogeneous",
    "keeps_channel_axis", "per_channel_constant", "copies_channel_values", "walk_chain", "set_kernel", "set_bias", "record_output_scaling",
]
