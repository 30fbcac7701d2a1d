"""TFLite operator -> IR node converters for the TFLite importer (NHWC in, NHWC out: no layout change).

Each converter reads one operator through a :class:`Builder` and returns the IR value of its output. Inputs listed
in :data:`PARAM_INPUTS` are parameters (kernels, biases, axes, paddings, shapes) that must be constant (stored, or a
``DEQUANTIZE`` of a float16 constant); they are never traversed, so the ``SHAPE``/``STRIDED_SLICE``/``PACK`` that
compute a reshape target for an open batch are not imported. Weight layouts:

* ``CONV_2D`` filter ``(O, kh, kw, I)`` -> HWIO; a filter with fewer input channels than the input (grouped) is
  refused;
* ``DEPTHWISE_CONV_2D`` filter ``(1, kh, kw, C*M)`` -> ``(kh, kw, C, M)``, output channel ``c*M + m`` in both;
* ``FULLY_CONNECTED`` weights ``(O, I)`` -> Dense ``(I, O)``; an input of rank > 2 is first reshaped to ``(I,)``
  unless ``keep_num_dims`` (then the Dense reads the last axis).

Cases handled and their maths:

* fused activations (``NONE``, ``RELU`` -> Relu, ``RELU6`` -> ``Clip(0, 6)``, ``RELU_N1_TO_1`` -> ``Clip(-1, 1)``)
  become a node after the op; ``TANH``/``SIGN_BIT`` are refused;
* ``SUB``: ``x - c`` -> ``Add(x, -c)``, ``c - x`` -> ``Add(Mul(x, -1), c)``, ``x - y`` -> ``Add(x, Mul(y, -1))``
  (exact in float); a constant operand may not fix the batch dim;
* ``MINIMUM``/``MAXIMUM`` with a scalar constant -> ``Clip(None, c)`` / ``Clip(c, None)`` (``MAXIMUM(x, 0)`` is
  Relu), merged afterwards into one Clip (:func:`merge_clips`: ``MINIMUM(MAXIMUM(x, 0), 6)`` is ReLU6);
  ``MINIMUM`` with a per-channel constant or a tensor -> Minimum; ``MAXIMUM`` with anything but a scalar is refused;
* ``AVERAGE_POOL_2D``/``MAX_POOL_2D`` (SAME averages over the valid pixels, as TensorFlow does), ``MEAN`` over
  axes ``[1, 2]`` -> GlobalMean, ``PAD``/``PADV2`` of H and W, ``CONCATENATION`` (not on the batch axis);
* a zero ``PAD`` read only by a convolution with VALID padding becomes the convolution's explicit padding
  (:func:`fold_pads`): the converter splits every convolution padding that is not SAME into the two, and the source
  model held one layer (exact);
* ``RESHAPE``/``SQUEEZE`` -> an IR Reshape to the output tensor's stored shape, which must keep the batch dim first;
* ``SOFTMAX`` (``beta`` other than 1 becomes a Mul first), ``LOGISTIC`` -> Sigmoid, ``HARD_SWISH``, ``RELU``,
  ``RELU6``, ``RELU_N1_TO_1``.

Left alone (:class:`UnsupportedOpError` naming the op, its output tensor, the file and the supported list): every
other operator on the path from the input to the outputs.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import ModelLoadError, UnsupportedOpError
from ..ir import (ClipAttrs, ConcatAttrs, ConvAttrs, GlobalMeanAttrs, Graph, Op, PadAttrs, PoolAttrs, ReshapeAttrs,
                  SoftmaxAttrs, Value, resolve_pads, sole_reader)
from .tflite_reader import TFLiteFile

__all__ = ["Builder", "CONVERTERS", "PARAM_INPUTS", "SUPPORTED_TFLITE_OPS", "merge_clips", "fold_pads", "layer_name"]

log = logging.getLogger(__name__)

_PADDING = {0: "SAME", 1: "VALID"}
#: fused activation code -> (op, attrs) of the node that follows the op
_ACTIVATIONS = {1: (Op.RELU, None), 2: (Op.CLIP, ClipAttrs(-1.0, 1.0)), 3: (Op.CLIP, ClipAttrs(0.0, 6.0))}
_ACTIVATION_NAMES = {4: "TANH", 5: "SIGN_BIT"}


def layer_name(tensor_name: str) -> str:
    """A readable layer name from a TFLite tensor name.

    The converter joins the names of the ops it fuses with ``;``, the last op first, and may append the constants it
    folded in: ``"model/conv1_relu/Relu6;model/conv1_bn/add;model/conv1/Conv2D;model/conv1_bn/Const_1"``. The last
    part that is no constant names the op the chain started from (the layer); its final ``/OpType`` component is
    dropped: ``"model/conv1"``.
    """
    parts = [p for p in tensor_name.split(";") if p]
    ops = [p for p in parts if not p.rsplit("/", 1)[-1].startswith("Const")] or parts or [tensor_name]
    last = ops[-1]
    return last.rsplit("/", 1)[0] if "/" in last else last


class Builder:
    """Import state shared by the converters: the file, the IR graph, and the tensor index -> IR value map."""

    def __init__(self, f: TFLiteFile, graph: Graph):
        self.f = f
        self.graph = graph
        self.env: Dict[int, Value] = {}

    # -- errors -----------------------------------------------------------------------------------------------
    def unsupported(self, index: int, detail: Optional[str] = None) -> UnsupportedOpError:
        op = self.f.operators[index]
        out = self.f.op_outputs(op)
        where = self.f.name(out[0]) if out else f"operator {index}"
        return UnsupportedOpError(where, self.f.op_name(op), SUPPORTED_TFLITE_OPS, source=self.f.source,
                                  detail=f"operator {index}" + (f": {detail}" if detail else ""))

    # -- reading inputs ---------------------------------------------------------------------------------------
    def inputs(self, index: int) -> List[int]:
        return self.f.op_inputs(self.f.operators[index])

    def output(self, index: int) -> int:
        return self.f.op_outputs(self.f.operators[index])[0]

    def options(self, index: int):
        return self.f.operators[index].builtinOptions

    def option(self, index: int, name: str, default=None):
        opts = self.options(index)
        return getattr(opts, name, default) if opts is not None else default

    def is_const(self, index: int, i: int) -> bool:
        t = self.inputs(index)[i]
        return t >= 0 and self.f.is_const(t)

    def data(self, index: int, i: int) -> Value:
        """The IR value of data input ``i`` of operator ``index``."""
        t = self.inputs(index)[i]
        if t in self.env:
            return self.env[t]
        if t >= 0 and self.f.is_const(t):
            raise self.unsupported(index, f"input {i} ({self.f.name(t)!r}) is a constant where a tensor computed "
                                          "from the model input is expected")
        raise ModelLoadError(f"{self.f.source}: operator {index} ({self.f.op_name(self.f.operators[index])}) reads "
                             f"tensor {self.f.name(t) if t >= 0 else t!r}, which no imported operator writes")

    def param(self, index: int, i: int, what: str) -> Optional[np.ndarray]:
        """The value of constant input ``i`` (``None`` for an absent optional input)."""
        ins = self.inputs(index)
        if i >= len(ins) or ins[i] < 0:
            return None
        value = self.f.const(ins[i])
        if value is None:
            raise self.unsupported(index, f"its {what} ({self.f.name(ins[i])!r}) is not a constant")
        return value

    # -- building ---------------------------------------------------------------------------------------------
    def const(self, array, name: str) -> Value:
        return self.graph.const(np.asarray(array, np.float32), name=name)

    def add(self, index: int, op: Op, inputs: Sequence[Value], attrs=None, suffix: str = "") -> Value:
        out = self.output(index)
        tensor = self.f.name(out)
        meta = {"source_name": layer_name(tensor), "source_op": self.f.op_name(self.f.operators[index]),
                "tensor": tensor}
        return self.graph.add_node(op, list(inputs), attrs, name=layer_name(tensor) + suffix, meta=meta).output

    def activation(self, index: int, y: Value) -> Value:
        """``y`` followed by the op's fused activation, if any."""
        code = int(self.option(index, "fusedActivationFunction", 0) or 0)
        if code == 0:
            return y
        if code not in _ACTIVATIONS:
            raise self.unsupported(index, f"fused activation {_ACTIVATION_NAMES.get(code, code)}")
        op, attrs = _ACTIVATIONS[code]
        return self.add(index, op, [y], attrs, suffix="/" + ("relu" if op is Op.RELU else "clip"))

    def file_batch(self, tensor: int) -> Optional[int]:
        s = self.f.shape(tensor)
        return s[0] if s else None


# -- converters ----------------------------------------------------------------------------------------------------
def _conv(b: Builder, i: int) -> Value:
    x = b.data(i, 0)
    w = b.param(i, 1, "filter")
    bias = b.param(i, 2, "bias")
    if len(x.shape) != 4 or w.ndim != 4:
        raise b.unsupported(i, f"input {x.shape} and filter {w.shape}; a rank-4 NHWC input and filter are needed")
    strides = (int(b.option(i, "strideH", 1)), int(b.option(i, "strideW", 1)))
    dilations = (int(b.option(i, "dilationHFactor", 1) or 1), int(b.option(i, "dilationWFactor", 1) or 1))
    attrs = ConvAttrs(strides=strides, padding=_PADDING[int(b.option(i, "padding", 0))], dilations=dilations)
    name = b.f.name(b.inputs(i)[1])
    if b.f.op_name(b.f.operators[i]) == "CONV_2D":
        if x.shape[-1] is not None and w.shape[3] != x.shape[-1]:
            raise b.unsupported(i, f"grouped convolution (filter has {w.shape[3]} input channels, input has "
                                   f"{x.shape[-1]})")
        op, kernel = Op.CONV2D, np.transpose(w, (1, 2, 3, 0))
    else:
        c = x.shape[-1]
        if c is None or w.shape[0] != 1 or w.shape[3] % c:
            raise b.unsupported(i, f"depthwise filter {w.shape} for {c} input channels")
        op, kernel = Op.DEPTHWISE_CONV2D, w.reshape(w.shape[1], w.shape[2], c, w.shape[3] // c)
    ins = [x, b.const(kernel, name)]
    if bias is not None:
        ins.append(b.const(bias.reshape(-1), b.f.name(b.inputs(i)[2])))
    return b.activation(i, b.add(i, op, ins, attrs))


def _fully_connected(b: Builder, i: int) -> Value:
    x = b.data(i, 0)
    w = b.param(i, 1, "weights")
    bias = b.param(i, 2, "bias")
    if w.ndim != 2 or int(b.option(i, "weightsFormat", 0) or 0) != 0:
        raise b.unsupported(i, f"weights of shape {w.shape} in format {b.option(i, 'weightsFormat', 0)}; only "
                               "(out, in) in the default format")
    n_in = w.shape[1]
    if len(x.shape) > 2 and not b.option(i, "keepNumDims", False):
        rest = x.shape[1:]
        if any(d is None for d in rest) or int(np.prod(rest)) != n_in:
            raise b.unsupported(i, f"input of shape {x.shape} for {n_in} weights per output")
        x = b.add(i, Op.RESHAPE, [x], ReshapeAttrs((n_in,)), suffix="/flatten")
    ins = [x, b.const(w.T, b.f.name(b.inputs(i)[1]))]
    if bias is not None:
        ins.append(b.const(bias.reshape(-1), b.f.name(b.inputs(i)[2])))
    return b.activation(i, b.add(i, Op.DENSE, ins))


def _check_operand(b: Builder, i: int, x: Value, c: np.ndarray) -> None:
    if c.ndim > len(x.shape) or (c.ndim == len(x.shape) and c.ndim and c.shape[0] != 1):
        raise b.unsupported(i, f"constant operand of shape {c.shape} on a tensor of shape {x.shape} (it would fix "
                               "the batch dim)")


def _binary(b: Builder, i: int) -> Value:
    name = b.f.op_name(b.f.operators[i])
    ca, cb = b.is_const(i, 0), b.is_const(i, 1)
    if ca and cb:
        raise b.unsupported(i, "both operands are constants")
    if name == "SUB":
        if cb:
            x, c = b.data(i, 0), b.param(i, 1, "subtrahend")
            _check_operand(b, i, x, c)
            return b.activation(i, b.add(i, Op.ADD, [x, b.const(-c.astype(np.float32), "neg")]))
        neg = b.add(i, Op.MUL, [b.data(i, 1), b.const(np.float32(-1.0), "minus_one")], suffix="/neg")
        if ca:
            c = b.param(i, 0, "minuend")
            _check_operand(b, i, neg, c)
            return b.activation(i, b.add(i, Op.ADD, [neg, b.const(c, b.f.name(b.inputs(i)[0]))]))
        return b.activation(i, b.add(i, Op.ADD, [b.data(i, 0), neg]))
    op = Op.MUL if name == "MUL" else Op.ADD
    if ca or cb:
        k = 0 if ca else 1
        x, c = b.data(i, 1 - k), b.param(i, k, "operand")
        _check_operand(b, i, x, c)
        return b.activation(i, b.add(i, op, [x, b.const(c, b.f.name(b.inputs(i)[k]))]))
    return b.activation(i, b.add(i, op, [b.data(i, 0), b.data(i, 1)]))


def _min_max(b: Builder, i: int) -> Value:
    is_min = b.f.op_name(b.f.operators[i]) == "MINIMUM"
    ca, cb = b.is_const(i, 0), b.is_const(i, 1)
    if not (ca or cb):
        if is_min:
            return b.add(i, Op.MINIMUM, [b.data(i, 0), b.data(i, 1)])
        raise b.unsupported(i, "MAXIMUM of two tensors")
    k = 0 if ca else 1
    x, c = b.data(i, 1 - k), b.param(i, k, "bound")
    _check_operand(b, i, x, c)
    if c.size == 1:
        bound = float(c.reshape(-1)[0])
        if not is_min and bound == 0.0:
            return b.add(i, Op.RELU, [x])
        return b.add(i, Op.CLIP, [x], ClipAttrs(None, bound) if is_min else ClipAttrs(bound, None))
    if is_min:
        return b.add(i, Op.MINIMUM, [x, b.const(c, b.f.name(b.inputs(i)[k]))])
    raise b.unsupported(i, f"MAXIMUM with a constant of shape {c.shape}; only a scalar bound")


def _unary(op: Op, attrs=None):
    def convert(b: Builder, i: int) -> Value:
        return b.add(i, op, [b.data(i, 0)], attrs)

    return convert


def _softmax(b: Builder, i: int) -> Value:
    x = b.data(i, 0)
    beta = float(b.option(i, "beta", 1.0))
    if beta != 1.0:
        x = b.add(i, Op.MUL, [x, b.const(np.float32(beta), "beta")], suffix="/beta")
    return b.add(i, Op.SOFTMAX, [x], SoftmaxAttrs(-1))


def _pool(b: Builder, i: int) -> Value:
    x = b.data(i, 0)
    if len(x.shape) != 4:
        raise b.unsupported(i, f"input of shape {x.shape}; a rank-4 NHWC input is needed")
    op = Op.AVG_POOL if b.f.op_name(b.f.operators[i]) == "AVERAGE_POOL_2D" else Op.MAX_POOL
    attrs = PoolAttrs(kernel=(int(b.option(i, "filterHeight", 1)), int(b.option(i, "filterWidth", 1))),
                      strides=(int(b.option(i, "strideH", 1)), int(b.option(i, "strideW", 1))),
                      padding=_PADDING[int(b.option(i, "padding", 0))])
    return b.activation(i, b.add(i, op, [x], attrs))


def _mean(b: Builder, i: int) -> Value:
    x = b.data(i, 0)
    axes = sorted({int(a) % len(x.shape) for a in np.asarray(b.param(i, 1, "axes")).reshape(-1)})
    if len(x.shape) != 4 or axes != [1, 2]:
        raise b.unsupported(i, f"mean over axes {axes} of a tensor of shape {x.shape}; only over the spatial axes "
                               "[1, 2] of an NHWC tensor")
    return b.add(i, Op.GLOBAL_MEAN, [x], GlobalMeanAttrs(keepdims=bool(b.option(i, "keepDims", False))))


def _pad(b: Builder, i: int) -> Value:
    x = b.data(i, 0)
    p = np.asarray(b.param(i, 1, "paddings")).astype(int)
    if p.shape != (4, 2) or len(x.shape) != 4 or p[0].any() or p[3].any():
        raise b.unsupported(i, f"paddings {p.tolist()}; only H and W of an NHWC tensor may be padded")
    value = b.param(i, 2, "constant value") if b.f.op_name(b.f.operators[i]) == "PADV2" else None
    pads = ((int(p[1, 0]), int(p[1, 1])), (int(p[2, 0]), int(p[2, 1])))
    return b.add(i, Op.PAD, [x], PadAttrs(pads=pads, value=float(value.reshape(-1)[0]) if value is not None
                                          else 0.0))


def _reshape(b: Builder, i: int) -> Value:
    x = b.data(i, 0)
    src, out = b.inputs(i)[0], b.output(i)
    shape_in, shape_out = b.f.shape(src), b.f.shape(out)
    if not shape_out or not shape_in or shape_out[0] != shape_in[0]:
        raise b.unsupported(i, f"reshape of {shape_in} to {shape_out} does not keep the batch dim first")
    if int(np.prod(shape_in)) != int(np.prod(shape_out)):
        raise ModelLoadError(f"{b.f.source}: operator {i} ({b.f.op_name(b.f.operators[i])}) reshapes {shape_in} "
                             f"to {shape_out}: the sizes differ, the file is corrupt")
    return b.add(i, Op.RESHAPE, [x], ReshapeAttrs(tuple(shape_out[1:])))


def _concat(b: Builder, i: int) -> Value:
    n = len(b.inputs(i))
    xs = [b.data(i, k) for k in range(n)]
    axis = int(b.option(i, "axis", -1)) % len(xs[0].shape)
    if axis == 0:
        raise b.unsupported(i, "concatenation along the batch axis")
    return b.activation(i, b.add(i, Op.CONCAT, xs, ConcatAttrs(axis=axis)))


CONVERTERS: Dict[str, Callable[[Builder, int], Value]] = {
    "CONV_2D": _conv,
    "DEPTHWISE_CONV_2D": _conv,
    "FULLY_CONNECTED": _fully_connected,
    "ADD": _binary,
    "MUL": _binary,
    "SUB": _binary,
    "MINIMUM": _min_max,
    "MAXIMUM": _min_max,
    "AVERAGE_POOL_2D": _pool,
    "MAX_POOL_2D": _pool,
    "MEAN": _mean,
    "PAD": _pad,
    "PADV2": _pad,
    "RESHAPE": _reshape,
    "SQUEEZE": _reshape,
    "SOFTMAX": _softmax,
    "LOGISTIC": _unary(Op.SIGMOID),
    "HARD_SWISH": _unary(Op.HARD_SWISH),
    "RELU": _unary(Op.RELU),
    "RELU6": _unary(Op.CLIP, ClipAttrs(0.0, 6.0)),
    "RELU_N1_TO_1": _unary(Op.CLIP, ClipAttrs(-1.0, 1.0)),
    "CONCATENATION": _concat,
}

#: input indices that are parameters (constant; never traversed as data)
PARAM_INPUTS: Dict[str, Callable[[int], Sequence[int]]] = {
    "CONV_2D": lambda n: (1, 2),
    "DEPTHWISE_CONV_2D": lambda n: (1, 2),
    "FULLY_CONNECTED": lambda n: (1, 2),
    "MEAN": lambda n: (1,),
    "PAD": lambda n: (1,),
    "PADV2": lambda n: (1, 2),
    "RESHAPE": lambda n: tuple(range(1, n)),
}

SUPPORTED_TFLITE_OPS = sorted(set(CONVERTERS) | {"DEQUANTIZE (of float16 constants)"})


def merge_clips(graph: Graph) -> int:
    """Merge a Clip/Relu read only by another Clip/Relu into one ``Clip(max(lo), min(hi))`` (exact where the two
    ranges overlap: clamping to one interval and then to another is clamping to their intersection); a result
    ``Clip(0, None)`` is a Relu. Returns the number of merges."""
    def bounds(node):
        return (0.0, None) if node.op is Op.RELU else (node.attrs.lo, node.attrs.hi)

    merged = 0
    for node in graph.find(Op.CLIP, Op.RELU):
        if node.graph is not graph:
            continue
        first = node.inputs[0].producer
        if first is None or first.op not in (Op.CLIP, Op.RELU) or sole_reader(first.output) is not node:
            continue
        (lo1, hi1), (lo2, hi2) = bounds(first), bounds(node)
        los, his = [v for v in (lo1, lo2) if v is not None], [v for v in (hi1, hi2) if v is not None]
        lo, hi = (max(los) if los else None), (min(his) if his else None)
        if lo is not None and hi is not None and lo > hi:
            continue
        meta = dict(first.meta, source_name=first.source_name)
        op, attrs = (Op.RELU, None) if (lo == 0.0 and hi is None) else (Op.CLIP, ClipAttrs(lo, hi))
        new = graph.add_node(op, [first.inputs[0]], attrs, name=node.name, meta=meta)
        node.output.replace_all_uses_with(new.output)
        graph.remove_node(node)
        graph.remove_node(first)
        merged += 1
    return merged


def fold_pads(graph: Graph) -> int:
    """A zero ``Pad`` whose only reader is a Conv2D/DepthwiseConv2D (as its data input) with ``"VALID"`` or explicit
    padding becomes that layer's explicit padding ``((t + t', b + b'), (l + l', r + r'))`` (exact: the layer pads
    with zeros too). Returns the number of pads folded."""
    folded = 0
    for pad in graph.find(Op.PAD):
        layer = sole_reader(pad.output)
        if (pad.attrs.value != 0.0 or layer is None or layer.op not in (Op.CONV2D, Op.DEPTHWISE_CONV2D)
                or layer.inputs[0] is not pad.output or layer.attrs.padding == "SAME"):
            continue
        own = resolve_pads(layer.attrs.padding, pad.output.shape[1:3], layer.weight.const.shape[:2],
                           layer.attrs.strides, layer.attrs.dilations)
        pads = tuple((a + c, b + d) for (a, b), (c, d) in zip(pad.attrs.pads, own))
        layer.attrs = ConvAttrs(strides=layer.attrs.strides, padding=pads, dilations=layer.attrs.dilations)
        layer.set_input(0, pad.inputs[0])
        graph.remove_node(pad)
        folded += 1
    return folded
