"""TensorFlow op -> IR node converters for the GraphDef importer (NHWC in, NHWC out: no layout change).

Each converter reads one TF node through a :class:`Builder` and returns the IR value of the node's output 0.
Inputs listed in :data:`PARAM_INPUTS` are parameters (kernels, biases, axes, paddings, shapes) that must be
constant; they are folded, not traversed. Handled:

* ``Conv2D`` (NHWC; SAME/VALID/EXPLICIT padding, strides, dilations) and ``DepthwiseConv2dNative``;
* ``MatMul`` (``transpose_b`` allowed) -> Dense; ``BiasAdd`` and ``Add`` of a per-channel constant after a layer
  become that layer's bias in :func:`fuse_biases`;
* ``Relu``, ``Relu6`` -> ``Clip(0, 6)``, ``Sigmoid``, ``Softmax`` (last axis);
* ``Add``/``AddV2``/``Mul`` (tensor-tensor or with a constant), ``Sub`` (``x - c`` -> ``x + (-c)``, ``c - x`` and
  ``x - y`` through a ``Mul`` by -1: all exact in float);
* ``FusedBatchNorm``/``V2``/``V3`` in inference mode -> BatchNorm with the node's epsilon;
* ``AvgPool``, ``MaxPool`` (SAME/VALID), ``Mean`` over axes [1, 2] -> GlobalMean, ``Squeeze`` and ``Reshape``
  (as IR Reshapes that keep the batch dim open), ``ConcatV2`` (not on the batch axis), ``Pad``/``PadV2`` of H and W.

Left alone (:class:`UnsupportedOpError` naming node, op and the supported list): every other op on the path from
the inputs to the outputs, NCHW data formats, training-mode batch norms, reshapes and concatenations across the
batch dim, non-constant weights (an unfrozen graph).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import ModelLoadError, UnsupportedOpError
from ..ir import (WEIGHTED_OPS, BatchNormAttrs, ClipAttrs, ConcatAttrs, ConvAttrs, GlobalMeanAttrs, Graph, Op,
                  PadAttrs, PoolAttrs, ReshapeAttrs, SoftmaxAttrs, Value, sole_reader)
from ._tf_view import GraphDefView, Ref

__all__ = ["Builder", "CONVERTERS", "PARAM_INPUTS", "SUPPORTED_TF_OPS", "fuse_biases"]

log = logging.getLogger(__name__)


class Builder:
    """Import state shared by the converters: the view, the IR graph and the TF tensor -> IR value map."""

    def __init__(self, view: GraphDefView, graph: Graph, constant, source_batch: Optional[int]):
        self.view = view
        self.graph = graph
        self.constant = constant
        self.source_batch = source_batch
        self.env: Dict[Ref, Value] = {}

    # -- reading inputs -----------------------------------------------------------------------------------------
    def ref(self, name: str, i: int) -> Ref:
        return self.view.resolve(self.view.data_inputs(name)[i])

    def is_const(self, name: str, i: int) -> bool:
        return self.ref(name, i)[0] in self.constant

    def data(self, name: str, i: int) -> Value:
        """The IR value feeding data input ``i`` of node ``name``."""
        ref = self.ref(name, i)
        if ref in self.env:
            return self.env[ref]
        if ref[0] in self.constant:
            raise self.unsupported(name, f"input {i} is a constant where a tensor computed from the model input "
                                         "is expected")
        if ref[1] != 0:
            raise self.unsupported(name, f"reads output {ref[1]} of {ref[0]!r}; only the first output of an op "
                                         "is supported")
        raise ModelLoadError(f"{self.view.source}: node {name!r} reads {ref[0]!r}, which was not imported")

    def param(self, name: str, i: int, what: str) -> np.ndarray:
        """The value of constant input ``i`` of node ``name`` (``what`` names it in errors)."""
        ref = self.ref(name, i)
        if ref[0] not in self.constant:
            raise self.unsupported(name, f"its {what} ({ref[0]!r}) is not a constant; freeze the graph "
                                         "(variables to constants) before importing")
        return self.view.value(ref)

    def attr(self, name: str, key: str, default=None):
        return self.view.attr(name, key, default)

    def unsupported(self, name: str, detail: str) -> UnsupportedOpError:
        return UnsupportedOpError(name, self.view.nodes[name].op, SUPPORTED_TF_OPS, source=self.view.source,
                                  detail=detail)

    # -- building -----------------------------------------------------------------------------------------------
    def const(self, array, name: str) -> Value:
        arr = np.asarray(array)
        if arr.dtype.kind not in "fiub":
            raise ModelLoadError(f"{self.view.source}: constant {name!r} of dtype {arr.dtype} is not numeric")
        return self.graph.const(arr.astype(np.float32), name=name)

    def add(self, op: Op, inputs: Sequence[Value], attrs=None, name: str = "", source: str = "",
            **meta) -> Value:
        src = self.view.nodes[source] if source else None
        m = {"source_name": source, "source_op": src.op if src is not None else ""}
        m.update(meta)
        return self.graph.add_node(op, inputs, attrs, name=name or source, meta=m).output


# -- helpers ------------------------------------------------------------------------------------------------------
def _nhwc(b: Builder, name: str) -> None:
    fmt = b.attr(name, "data_format", "NHWC")
    if fmt not in ("NHWC", ""):
        raise b.unsupported(name, f"data_format {fmt}; only NHWC")


def _hw(b: Builder, name: str, key: str) -> tuple:
    v = b.attr(name, key, [1, 1, 1, 1])
    if len(v) != 4 or v[0] != 1 or v[3] != 1:
        raise b.unsupported(name, f"{key} {v}; only spatial {key} [1, h, w, 1]")
    return int(v[1]), int(v[2])


def _padding(b: Builder, name: str):
    mode = b.attr(name, "padding", "VALID")
    if mode in ("SAME", "VALID"):
        return mode
    if mode == "EXPLICIT":
        p = b.attr(name, "explicit_paddings", [])
        if len(p) != 8 or any(p[i] for i in (0, 1, 6, 7)):
            raise b.unsupported(name, f"explicit_paddings {p}; only H and W may be padded")
        return (int(p[2]), int(p[3])), (int(p[4]), int(p[5]))
    raise b.unsupported(name, f"padding {mode!r}")


def _axes(b: Builder, name: str, i: int, rank: int, what: str) -> List[int]:
    ax = np.asarray(b.param(name, i, what)).reshape(-1).astype(int)
    return sorted({int(a) % rank for a in ax}) if rank else []


# -- converters ---------------------------------------------------------------------------------------------------
def _conv(b: Builder, name: str) -> Value:
    _nhwc(b, name)
    x = b.data(name, 0)
    k = b.param(name, 1, "kernel")
    if k.ndim != 4:
        raise b.unsupported(name, f"kernel of rank {k.ndim}")
    op = Op.CONV2D if b.view.nodes[name].op == "Conv2D" else Op.DEPTHWISE_CONV2D
    if len(x.shape) != 4:
        raise b.unsupported(name, f"input of shape {x.shape}; a rank-4 NHWC tensor is needed")
    if op is Op.CONV2D and x.shape[-1] is not None and k.shape[2] != x.shape[-1]:
        raise b.unsupported(name, f"grouped convolution (kernel has {k.shape[2]} input channels, input has "
                                  f"{x.shape[-1]})")
    attrs = ConvAttrs(strides=_hw(b, name, "strides"), padding=_padding(b, name), dilations=_hw(b, name, "dilations"))
    kname = b.ref(name, 1)[0]
    return b.add(op, [x, b.const(k, kname)], attrs, source=name)


def _matmul(b: Builder, name: str) -> Value:
    if b.attr(name, "transpose_a", False):
        raise b.unsupported(name, "transpose_a=True")
    x = b.data(name, 0)
    w = b.param(name, 1, "weights")
    if w.ndim != 2 or len(x.shape) != 2:
        raise b.unsupported(name, f"shapes {x.shape} x {w.shape}; only (N, K) x constant (K, M)")
    if b.attr(name, "transpose_b", False):
        w = w.T
    return b.add(Op.DENSE, [x, b.const(w, b.ref(name, 1)[0])], source=name)


def _bias_add(b: Builder, name: str) -> Value:
    _nhwc(b, name)
    x = b.data(name, 0)
    bias = b.param(name, 1, "bias")
    return b.add(Op.ADD, [x, b.const(bias, b.ref(name, 1)[0])], source=name)


def _check_operand(b: Builder, name: str, x: Value, c: np.ndarray) -> None:
    if c.ndim > len(x.shape) or (c.ndim == len(x.shape) and c.ndim and c.shape[0] != 1):
        raise b.unsupported(name, f"constant operand of shape {c.shape} on a tensor of shape {x.shape} (it would "
                                  "fix the batch dim)")


def _binary(b: Builder, name: str) -> Value:
    tf_op = b.view.nodes[name].op
    ca, cb = b.is_const(name, 0), b.is_const(name, 1)
    if tf_op == "Sub":
        if cb:
            x = b.data(name, 0)
            c = b.param(name, 1, "subtrahend")
            _check_operand(b, name, x, c)
            return b.add(Op.ADD, [x, b.const(-np.asarray(c, np.float32), name + "/neg")], source=name)
        y = b.data(name, 1)
        neg = b.add(Op.MUL, [y, b.const(np.float32(-1.0), name + "/minus_one")], name=name + "/neg", source=name)
        if ca:
            c = b.param(name, 0, "minuend")
            _check_operand(b, name, neg, c)
            return b.add(Op.ADD, [neg, b.const(c, b.ref(name, 0)[0])], source=name)
        return b.add(Op.ADD, [b.data(name, 0), neg], source=name)
    op = Op.MUL if tf_op == "Mul" else Op.ADD
    if ca or cb:
        i = 1 if ca else 0
        x = b.data(name, i)
        c = b.param(name, 1 - i, "operand")
        _check_operand(b, name, x, c)
        return b.add(op, [x, b.const(c, b.ref(name, 1 - i)[0])], source=name)
    return b.add(op, [b.data(name, 0), b.data(name, 1)], source=name)


def _unary(op: Op, attrs_fn: Callable = lambda b, n: None):
    def convert(b: Builder, name: str) -> Value:
        return b.add(op, [b.data(name, 0)], attrs_fn(b, name), source=name)

    return convert


def _fused_bn(b: Builder, name: str) -> Value:
    _nhwc(b, name)
    if b.attr(name, "is_training", False):
        raise b.unsupported(name, "is_training=True (a training-mode batch norm); export the inference graph")
    x = b.data(name, 0)
    c = x.shape[-1]
    params = []
    for i, what in ((1, "scale"), (2, "offset"), (3, "mean"), (4, "variance")):
        v = np.asarray(b.param(name, i, what), np.float32).reshape(-1)
        if c is not None and v.size != c:
            raise b.unsupported(name, f"{what} has {v.size} entries for {c} channels")
        params.append(b.const(v, b.ref(name, i)[0]))
    eps = float(b.attr(name, "epsilon", 1e-4))
    return b.add(Op.BATCH_NORM, [x] + params, BatchNormAttrs(eps), source=name)


def _pool(b: Builder, name: str) -> Value:
    _nhwc(b, name)
    op = Op.AVG_POOL if b.view.nodes[name].op == "AvgPool" else Op.MAX_POOL
    pad = b.attr(name, "padding", "VALID")
    if pad not in ("SAME", "VALID"):
        raise b.unsupported(name, f"padding {pad!r}")
    attrs = PoolAttrs(kernel=_hw(b, name, "ksize"), strides=_hw(b, name, "strides"), padding=pad)
    return b.add(op, [b.data(name, 0)], attrs, source=name)


def _mean(b: Builder, name: str) -> Value:
    x = b.data(name, 0)
    axes = _axes(b, name, 1, len(x.shape), "axes")
    if len(x.shape) != 4 or axes != [1, 2]:
        raise b.unsupported(name, f"mean over axes {axes} of a tensor of shape {x.shape}; only over the spatial "
                                  "axes [1, 2] of an NHWC tensor")
    keep = bool(b.attr(name, "keep_dims", False))
    return b.add(Op.GLOBAL_MEAN, [x], GlobalMeanAttrs(keepdims=keep), source=name)


def _open_shape(b: Builder, name: str, dims: Sequence[Optional[int]]) -> tuple:
    """Non-batch dims for an IR Reshape: at most one unknown (written -1)."""
    dims = [-1 if d is None else int(d) for d in dims]
    if dims.count(-1) > 1:
        raise b.unsupported(name, f"result shape {dims} has more than one unknown non-batch dim")
    return tuple(dims)


def _squeeze(b: Builder, name: str) -> Value:
    x = b.data(name, 0)
    rank = len(x.shape)
    dims = b.attr(name, "squeeze_dims", []) or []
    dims = sorted({int(d) % rank for d in dims}) if dims else [i for i in range(1, rank) if x.shape[i] == 1]
    if 0 in dims:
        raise b.unsupported(name, "squeezes the batch dim; the imported graph keeps the batch open")
    for d in dims:
        if x.shape[d] not in (1, None):
            raise b.unsupported(name, f"squeezes dim {d} of size {x.shape[d]}")
    rest = [x.shape[i] for i in range(1, rank) if i not in dims]
    return b.add(Op.RESHAPE, [x], ReshapeAttrs(_open_shape(b, name, rest)), source=name)


def _reshape(b: Builder, name: str) -> Value:
    x = b.data(name, 0)
    if b.is_const(name, 1):
        target = [int(d) for d in np.asarray(b.param(name, 1, "shape")).reshape(-1)]
        if not target or (target[0] != -1 and (b.source_batch is None or target[0] != b.source_batch)):
            raise b.unsupported(name, f"target shape {target} does not keep the batch dim first (-1 or the "
                                      f"source batch {b.source_batch})")
        rest = target[1:]
        if target[0] == -1 and -1 in rest:
            raise b.unsupported(name, f"target shape {target} has two -1")
    else:  # a shape computed from the input's shape (Keras Reshape/Flatten): ask TensorFlow's shape inference
        inputs = {v.name: v.shape for v in b.graph.inputs}
        shape, = b.view.static_shapes([(name, 0)], inputs)
        if shape is None or len(shape) < 1:
            raise b.unsupported(name, "result shape unknown to TensorFlow's shape inference")
        rest = list(shape[1:])
    return b.add(Op.RESHAPE, [x], ReshapeAttrs(_open_shape(b, name, rest)), source=name)


def _concat(b: Builder, name: str) -> Value:
    n = len(b.view.data_inputs(name)) - 1
    xs = [b.data(name, i) for i in range(n)]
    rank = len(xs[0].shape)
    axis, = _axes(b, name, n, rank, "axis")
    if axis == 0:
        raise b.unsupported(name, "concatenation along the batch axis")
    return b.add(Op.CONCAT, xs, ConcatAttrs(axis=axis), source=name)


def _pad(b: Builder, name: str) -> Value:
    x = b.data(name, 0)
    p = np.asarray(b.param(name, 1, "paddings")).astype(int)
    if p.shape != (4, 2) or len(x.shape) != 4 or p[0].any() or p[3].any():
        raise b.unsupported(name, f"paddings {p.tolist()}; only H and W of an NHWC tensor may be padded")
    value = 0.0
    if b.view.nodes[name].op == "PadV2":
        v = np.asarray(b.param(name, 2, "constant_values")).reshape(-1)
        value = float(v[0]) if v.size else 0.0
    pads = ((int(p[1, 0]), int(p[1, 1])), (int(p[2, 0]), int(p[2, 1])))
    return b.add(Op.PAD, [x], PadAttrs(pads=pads, value=value), source=name)


CONVERTERS: Dict[str, Callable[[Builder, str], Value]] = {
    "Conv2D": _conv,
    "DepthwiseConv2dNative": _conv,
    "MatMul": _matmul,
    "BiasAdd": _bias_add,
    "Add": _binary,
    "AddV2": _binary,
    "Sub": _binary,
    "Mul": _binary,
    "Relu": _unary(Op.RELU),
    "Relu6": _unary(Op.CLIP, lambda b, n: ClipAttrs(0.0, 6.0)),
    "Sigmoid": _unary(Op.SIGMOID),
    "Softmax": _unary(Op.SOFTMAX, lambda b, n: SoftmaxAttrs(-1)),
    "FusedBatchNorm": _fused_bn,
    "FusedBatchNormV2": _fused_bn,
    "FusedBatchNormV3": _fused_bn,
    "AvgPool": _pool,
    "MaxPool": _pool,
    "Mean": _mean,
    "Squeeze": _squeeze,
    "Reshape": _reshape,
    "ConcatV2": _concat,
    "Pad": _pad,
    "PadV2": _pad,
}

#: the data inputs that are parameters (must be constant; folded, not traversed)
PARAM_INPUTS: Dict[str, Callable[[int], Sequence[int]]] = {
    "Conv2D": lambda n: (1,),
    "DepthwiseConv2dNative": lambda n: (1,),
    "MatMul": lambda n: (1,),
    "BiasAdd": lambda n: (1,),
    "FusedBatchNorm": lambda n: (1, 2, 3, 4),
    "FusedBatchNormV2": lambda n: (1, 2, 3, 4),
    "FusedBatchNormV3": lambda n: (1, 2, 3, 4),
    "Mean": lambda n: (1,),
    "Reshape": lambda n: (1,),
    "ConcatV2": lambda n: (n - 1,),
    "Pad": lambda n: (1,),
    "PadV2": lambda n: (1, 2),
}

SUPPORTED_TF_OPS = sorted(set(CONVERTERS) | {"Const", "Identity", "IdentityN", "StopGradient", "Snapshot",
                                             "Placeholder", "PlaceholderWithDefault",
                                             "constant subexpressions of any op"})


def fuse_biases(graph: Graph) -> int:
    """Turn ``Add(layer, c)`` into the bias of a Conv2D/DepthwiseConv2D/Dense ``layer`` without one, when ``c`` is
    a constant per-output-channel vector and the layer's output has no other reader. Exact (the same addition).
    Returns the number of biases fused."""
    fused = 0
    for add in graph.find(Op.ADD):
        x, c = add.inputs
        layer = x.producer
        if (layer is None or layer.op not in WEIGHTED_OPS or layer.bias is not None or not c.is_const
                or sole_reader(x) is not add):
            continue
        channels = layer.output.shape[-1]
        vec = c.const
        if vec.size != channels or (vec.ndim and vec.shape[-1] != channels):
            continue
        if vec.ndim > len(x.shape):
            continue
        layer.append_input(graph.const(vec.reshape(-1), name=c.name))
        layer.meta["bias_source"] = add.source_name
        graph.bypass(add, keep=x)
        fused += 1
    graph.remove_unused()
    return fused
