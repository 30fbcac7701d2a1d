"""ONNX node -> IR nodes, one converter per ONNX op (after constant folding, see :mod:`.onnx_reader`).

Layouts: :mod:`.onnx_layout`. Weights: Conv ``(O, I/g, kh, kw)`` -> HWIO; a Conv with ``group == C_in`` and one input
channel per group -> DepthwiseConv2D ``(kh, kw, C, M)`` with output channel ``c*M + m`` (ONNX's grouping order);
``1 < group < C_in`` -> one Conv2D with a block-diagonal kernel (exact, ``group`` times the multiply-adds; recorded in
``node.meta["groups"]``). Gemm ``alpha*A*op(B) + beta*C`` and MatMul (+ a following Add of a constant vector) ->
Dense ``(in, out)``.

Cases handled and their maths:

* Conv/pool ``pads`` ``[t, l, b, r]`` -> ``((t, b), (l, r))``; ``auto_pad`` SAME_UPPER -> ``"SAME"`` (TensorFlow's
  rule), SAME_LOWER -> explicit pads with the odd pixel first, VALID.
* Clip: bounds from attributes (opset < 11) or inputs (opset >= 11), either may be missing; ``Clip(0, inf)`` is ReLU.
* HardSigmoid ``clip(alpha*x + beta, 0, 1)``: alpha = 1/6, beta = 1/2 (PyTorch) -> HardSigmoid; other values ->
  Mul, Add, Clip(0, 1).
* Min with a scalar constant -> Clip; with a per-channel constant or a tensor -> Minimum.
* Sub/Div by a constant -> Add/Mul with ``-c`` / ``1/c``; ``c - x`` -> ``Add(Mul(x, -1), c)``; ``a - b`` of two
  tensors -> ``Add(a, Mul(b, -1))``. Division by a tensor is refused.
* AveragePool: ``count_include_pad`` = 1 -> zero Pad + VALID pool; = 0 with TensorFlow's SAME pads -> ``"SAME"``
  (which averages over valid pixels only); = 0 with other pads -> Pad + VALID pool + Mul by the constant map
  ``kh*kw / valid count``. ``ceil_mode`` for MaxPool -> extra end padding; for AveragePool only where it does not
  change the output size.
* GlobalMaxPool -> MaxPool with the whole image as its window.
* Reshape/Flatten/Squeeze/Unsqueeze: see :func:`Builder.reshape`. Transpose: only the NCHW <-> NHWC views of one
  tensor (tf2onnx's input transposes), which are layout changes and cost nothing in the IR.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import ModelLoadError, UnsupportedOpError
from ..ir import (ClipAttrs, ConcatAttrs, ConvAttrs, GlobalMeanAttrs, Graph, Node, Op, PadAttrs, PoolAttrs,
                  ReshapeAttrs, SoftmaxAttrs, BatchNormAttrs, same_pads)
from .onnx_layout import (FLAT_CHW, NCHW, NCHW_TO_NHWC, NHWC_TO_NCHW, SAME, Held, chw_flat_perm, const_to_ir,
                          ir_axis, onnx_shape, same_memory_order)
from .onnx_reader import FoldedModel

__all__ = ["Builder", "CONVERTERS", "SUPPORTED_ONNX_OPS", "PARAM_INPUTS"]

log = logging.getLogger(__name__)

#: input indices that are parameters (constants after folding), not data: they are not converted as tensors
PARAM_INPUTS: Dict[str, Tuple[int, ...]] = {
    "Conv": (1, 2), "BatchNormalization": (1, 2, 3, 4), "Gemm": (1, 2), "Clip": (1, 2), "Pad": (1, 2, 3),
    "Reshape": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "ReduceMean": (1,), "Dropout": (1, 2),
}

_FLOAT_MAX = 3.0e38  # |bound| beyond this (float32 max, infinity) means "no bound"


class Builder:
    """Converts a folded ONNX graph node by node into an IR :class:`Graph`."""

    def __init__(self, folded: FoldedModel, graph: Graph):
        self.folded = folded
        self.graph = graph
        self.opset = folded.opset
        self.source = str(folded.path)
        self.env: Dict[str, Held] = {}

    # -- errors -------------------------------------------------------------------------------------------------
    def unsupported(self, node, detail: str) -> UnsupportedOpError:
        return UnsupportedOpError(node.name or node.op, node.op, SUPPORTED_ONNX_OPS, source=self.source,
                                  detail=detail)

    def malformed(self, node, detail: str) -> ModelLoadError:
        """A node that breaks the ONNX operator's own rules (e.g. a bias longer than the output channels)."""
        return ModelLoadError(f"{self.source}: node {node.name or node.op!r} ({node.op}) is malformed: {detail}")

    def vector(self, node, values, n: int, what: str) -> np.ndarray:
        """``values`` as a float32 vector of ``n`` entries (one value is repeated); other sizes are malformed."""
        v = np.asarray(values, np.float32).reshape(-1)
        if v.size not in (1, n):
            raise self.malformed(node, f"its {what} has {v.size} values for {n} channels")
        return np.ascontiguousarray(np.broadcast_to(v, (n,)))

    # -- reading inputs -------------------------------------------------------------------------------------------
    @staticmethod
    def _present(node, i: int) -> bool:
        return i < len(node.inputs) and node.inputs[i].name != ""

    def const(self, node, i: int, what: str, batch_free: bool = True) -> Optional[np.ndarray]:
        """Input ``i`` of ``node`` as a folded constant (``None`` if the optional input is absent)."""
        if not self._present(node, i):
            return None
        p = self.folded.param(node.inputs[i])
        if p is None:
            raise self.unsupported(node, f"its {what} (input {i}, {node.inputs[i].name!r}) is not a constant "
                                         "after constant folding")
        values, follows = p
        if batch_free and follows.any():
            raise self.unsupported(node, f"its {what} depends on the batch size")
        return values

    def param_with_batch(self, node, i: int, what: str):
        """A folded parameter and its mask of entries that follow the batch size."""
        p = self.folded.param(node.inputs[i]) if self._present(node, i) else None
        if p is None:
            raise self.unsupported(node, f"its {what} is not a constant after constant folding")
        return p

    def act(self, node, i: int = 0) -> Held:
        """Input ``i`` of ``node`` as a tensor computed from the graph inputs."""
        t = node.inputs[i]
        held = self.env.get(t.name)
        if held is None:
            if self.folded.param(t) is not None:
                raise self.unsupported(node, f"input {i} ({t.name!r}) is a constant where a tensor computed from "
                                             "the graph inputs is expected")
            raise ModelLoadError(f"{self.source}: node {node.name!r} reads {t.name!r}, which no node produces")
        return held

    def is_const(self, node, i: int) -> bool:
        return node.inputs[i].name not in self.env and self.folded.param(node.inputs[i]) is not None

    # -- writing ------------------------------------------------------------------------------------------------
    def add(self, op: Op, inputs: Sequence, attrs=None, node=None, suffix: str = "", shape=None) -> Node:
        name = (node.name or node.op) + suffix if node is not None else None
        meta = {"source_name": node.name, "source_op": node.op} if node is not None else None
        return self.graph.add_node(op, list(inputs), attrs, name=name, meta=meta, shape=shape)

    def const_value(self, array, name: str):
        return self.graph.const(array, name=name)

    def put(self, node, held: Held, index: int = 0) -> None:
        self.env[node.outputs[index].name] = held

    def alias(self, node, held: Held) -> None:
        self.put(node, held)

    # -- attributes ---------------------------------------------------------------------------------------------
    @staticmethod
    def attr(node, name: str, default=None):
        v = node.attrs.get(name, default)
        if isinstance(v, bytes):
            v = v.decode()
        return v

    def spatial_pads(self, node, x: Held, kernel: Tuple[int, int], strides, dilations, what: str):
        """IR padding from ``auto_pad`` / ``pads``: ``"SAME"``, ``"VALID"`` or ``((t, b), (l, r))``."""
        auto = self.attr(node, "auto_pad", "NOTSET")
        _, h, w, _ = x.value.shape
        if auto == "VALID":
            return "VALID"
        if auto == "SAME_UPPER":
            return "SAME"
        if auto == "SAME_LOWER":
            if h is None or w is None:
                raise self.unsupported(node, "auto_pad SAME_LOWER needs a static input size")
            pads = [same_pads(s, k, st, d) for s, k, st, d in zip((h, w), kernel, strides, dilations)]
            return tuple((b, a) for a, b in pads)
        if auto != "NOTSET":
            raise self.unsupported(node, f"auto_pad {auto!r}")
        p = [int(v) for v in self.attr(node, "pads", [0, 0, 0, 0])]
        if len(p) != 4:
            raise self.unsupported(node, f"{what} pads {p}: only 2-D (4 values) are supported")
        if min(p) < 0:
            raise self.unsupported(node, f"negative {what} pads {p}")
        if not any(p):
            return "VALID"
        return (p[0], p[2]), (p[1], p[3])

    def require_nchw(self, node, x: Held) -> None:
        if x.layout != NCHW:
            raise self.unsupported(node, f"needs a rank-4 NCHW tensor, got shape {onnx_shape(x)}")

    # -- shared conversions -------------------------------------------------------------------------------------
    def operand(self, node, i: int, other: Held, name: str):
        """Input ``i`` as an IR value: the tensor itself, or a constant rearranged to ``other``'s layout."""
        if not self.is_const(node, i):
            return self.act(node, i).value
        c = self.const(node, i, "constant operand")
        ir = const_to_ir(other, c)
        if ir is None:
            raise self.unsupported(node, f"constant operand of shape {tuple(np.shape(c))} does not broadcast "
                                         f"against {onnx_shape(other)} without changing the batch axis")
        return self.const_value(ir, name)

    def reshape(self, node, x: Held, out_shape: Sequence[Optional[int]]) -> None:
        """Reshape ``x`` to the ONNX shape ``out_shape`` (batch first, kept).

        A plain IR reshape where both sides keep their ONNX element order (see
        :func:`~.onnx_layout.same_memory_order`); a rank-4 result read only by Transposes to NCHW is NHWC data (kept
        as is, the Transposes become free views); an NCHW tensor flattened to ``(N, C*H*W)`` becomes an IR Flatten
        marked FLAT_CHW. Any other reshape of an NCHW tensor mixes channels and positions and is refused.
        """
        in_shape = onnx_shape(x)
        out_shape = tuple(out_shape)
        if out_shape == in_shape:
            self.alias(node, x)
            return
        rest = out_shape[1:]
        if any(d is None for d in rest):
            raise self.unsupported(node, f"reshape to {out_shape} leaves non-batch dimensions open")
        readers = node.outputs[0].outputs
        nhwc_out = bool(readers) and all(r.op == "Transpose" and tuple(r.attrs.get("perm", ())) == NHWC_TO_NCHW
                                         for r in readers)
        if len(out_shape) == 4 and not nhwc_out:
            layout, target = NCHW, (rest[1], rest[2], rest[0])
            out_ok = rest[0] == 1 or rest[1] * rest[2] == 1
        else:
            layout, target, out_ok = SAME, tuple(rest), True
        if same_memory_order(x) and out_ok:
            if tuple(x.value.shape[1:]) == target:
                self.alias(node, Held(x.value, layout))
                return
            n = self.add(Op.RESHAPE, [x.value], ReshapeAttrs(tuple(int(d) for d in target)), node)
            self.put(node, Held(n.output, layout))
            return
        if x.layout == NCHW and len(out_shape) == 2:
            _, h, w, c = x.value.shape
            n = self.add(Op.FLATTEN, [x.value], node=node)
            self.put(node, Held(n.output, FLAT_CHW, chw_flat_perm(h, w, c)))
            return
        raise self.unsupported(node, f"reshape of {in_shape} to {out_shape} moves channels across spatial "
                                     "positions, which needs a transpose the IR does not have")


Converter = Callable[[Builder, object], None]
CONVERTERS: Dict[str, Converter] = {}


def converts(*ops: str):
    def deco(fn: Converter) -> Converter:
        for op in ops:
            CONVERTERS[op] = fn
        return fn

    return deco


# -- convolution and dense ----------------------------------------------------------------------------------------
@converts("Conv")
def _conv(b: Builder, node) -> None:
    x = b.act(node, 0)
    b.require_nchw(node, x)
    w = b.const(node, 1, "weight")
    if w is None or w.ndim != 4:
        raise b.unsupported(node, "only 2-D convolutions with a rank-4 weight are supported")
    bias = b.const(node, 2, "bias")
    w = w.astype(np.float32)
    o, ig, kh, kw = w.shape
    c_in = x.value.shape[3]
    group = int(b.attr(node, "group", 1))
    if ig * group != c_in or o % group:
        raise b.unsupported(node, f"weight {w.shape} with group={group} does not fit {c_in} input channels")
    ks = b.attr(node, "kernel_shape")
    if ks is not None and tuple(ks) != (kh, kw):
        raise b.unsupported(node, f"kernel_shape {ks} differs from the weight's {(kh, kw)}")
    strides = tuple(int(s) for s in b.attr(node, "strides", [1, 1]))
    dilations = tuple(int(d) for d in b.attr(node, "dilations", [1, 1]))
    padding = b.spatial_pads(node, x, (kh, kw), strides, dilations, "Conv")
    attrs = ConvAttrs(strides=strides, padding=padding, dilations=dilations)
    meta_groups = None
    if group == 1:
        op, k = Op.CONV2D, w.transpose(2, 3, 1, 0)
    elif ig == 1 and group == c_in:
        op, k = Op.DEPTHWISE_CONV2D, w.reshape(c_in, o // c_in, kh, kw).transpose(2, 3, 0, 1)
    else:
        op, k = Op.CONV2D, np.zeros((kh, kw, c_in, o), np.float32)
        og = o // group
        for gi in range(group):
            k[:, :, gi * ig:(gi + 1) * ig, gi * og:(gi + 1) * og] = w[gi * og:(gi + 1) * og].transpose(2, 3, 1, 0)
        meta_groups = group
        log.info("%s: grouped convolution (group=%d) imported as one Conv2D with a block-diagonal kernel",
                 node.name, group)
    ins = [x.value, b.const_value(k, (node.name or "conv") + "/kernel")]
    if bias is not None:
        ins.append(b.const_value(b.vector(node, bias, o, f"bias (weight {tuple(w.shape)})"),
                                 (node.name or "conv") + "/bias"))
    n = b.add(op, ins, attrs, node)
    if meta_groups:
        n.meta["groups"] = meta_groups
    b.put(node, Held(n.output, NCHW))


def _dense(b: Builder, node, x: Held, k: np.ndarray, bias: Optional[np.ndarray]) -> None:
    if x.layout == NCHW:
        raise b.unsupported(node, f"a matrix product over the last axis of the NCHW tensor {onnx_shape(x)} "
                                  "(only (N, features) inputs are supported)")
    if x.layout == FLAT_CHW:
        rows = np.empty_like(k)
        rows[list(x.perm)] = k
        k = rows
    ins = [x.value, b.const_value(k, (node.name or "dense") + "/kernel")]
    if bias is not None:
        ins.append(b.const_value(bias, (node.name or "dense") + "/bias"))
    n = b.add(Op.DENSE, ins, node=node)
    b.put(node, Held(n.output, SAME))


@converts("Gemm")
def _gemm(b: Builder, node) -> None:
    if int(b.attr(node, "transA", 0)):
        raise b.unsupported(node, "transA=1")
    x = b.act(node, 0)
    w = b.const(node, 1, "B")
    if w is None or w.ndim != 2:
        raise b.unsupported(node, "B must be a constant matrix")
    k = (w.T if int(b.attr(node, "transB", 0)) else w).astype(np.float32) * np.float32(b.attr(node, "alpha", 1.0))
    c = b.const(node, 2, "C")
    bias = None
    if c is not None:
        c = np.asarray(c, np.float32) * np.float32(b.attr(node, "beta", 1.0))
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
            raise b.unsupported(node, f"C of shape {c.shape} depends on the row (batch)")
        bias = b.vector(node, c, k.shape[1], f"C (B {tuple(w.shape)})")
    _dense(b, node, x, np.ascontiguousarray(k), bias)


@converts("MatMul")
def _matmul(b: Builder, node) -> None:
    if b.is_const(node, 0) or not b.is_const(node, 1):
        raise b.unsupported(node, "only tensor x constant-matrix products are supported")
    x = b.act(node, 0)
    w = b.const(node, 1, "weight")
    if w.ndim != 2:
        raise b.unsupported(node, f"weight of rank {w.ndim}; only matrices are supported")
    _dense(b, node, x, np.ascontiguousarray(w.astype(np.float32)), None)


def _fuse_dense_bias(b: Builder, node, ci: int) -> bool:
    """``Add(MatMul(x, W), c)`` with a vector ``c`` and no other reader of the product -> Dense bias."""
    t = node.inputs[1 - ci]
    held = b.env.get(t.name)
    dense = held.value.producer if held is not None else None
    if dense is None or dense.op is not Op.DENSE or dense.bias is not None or held.layout != SAME:
        return False
    if len(t.outputs) != 1 or any(t is o for o in b.folded.graph.outputs):
        return False
    c = np.asarray(b.const(node, ci, "bias"), np.float32)
    n_out = dense.output.shape[-1]
    if c.size == 1:
        vec = np.full((n_out,), c.reshape(-1)[0], np.float32)
    elif c.ndim >= 1 and c.shape[-1] == n_out and c.size == n_out:
        vec = c.reshape(-1)
    else:
        return False
    dense.append_input(b.const_value(vec, dense.name + "/bias"))
    dense.meta["bias_source"] = node.name
    b.put(node, held)
    return True


# -- normalisation and activations --------------------------------------------------------------------------------
@converts("BatchNormalization")
def _batchnorm(b: Builder, node) -> None:
    if int(b.attr(node, "training_mode", 0)):
        raise b.unsupported(node, "training_mode=1 (export the model in eval mode)")
    if any(o.outputs for o in node.outputs[1:]):
        raise b.unsupported(node, "its running mean/variance outputs are used (a training graph)")
    x = b.act(node, 0)
    if x.layout not in (NCHW, SAME) or (x.layout == SAME and x.rank != 2):
        raise b.unsupported(node, f"input of shape {onnx_shape(x)}; NCHW or (N, C) are supported")
    params = [b.const(node, i, what) for i, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "variance"))]
    c = x.value.shape[-1]
    ins = [x.value]
    for p, what in zip(params, ("gamma", "beta", "mean", "variance")):
        ins.append(b.const_value(b.vector(node, p, c, what), f"{node.name or 'bn'}/{what}"))
    n = b.add(Op.BATCH_NORM, ins, BatchNormAttrs(float(b.attr(node, "epsilon", 1e-5))), node)
    b.put(node, Held(n.output, x.layout))


def _unary(op: Op):
    def convert(b: Builder, node) -> None:
        x = b.act(node, 0)
        b.put(node, Held(b.add(op, [x.value], node=node).output, x.layout, x.perm))

    return convert


CONVERTERS["Relu"] = _unary(Op.RELU)
CONVERTERS["Sigmoid"] = _unary(Op.SIGMOID)
CONVERTERS["HardSwish"] = _unary(Op.HARD_SWISH)


def _bound(v) -> Optional[float]:
    if v is None:
        return None
    v = float(np.asarray(v).reshape(-1)[0]) if np.size(v) == 1 else None
    if v is None or not math.isfinite(v) or abs(v) >= _FLOAT_MAX:
        return None
    return v


def _clip(b: Builder, node, x: Held, lo: Optional[float], hi: Optional[float], suffix: str = "") -> Held:
    if lo is None and hi is None:
        return x
    if lo == 0.0 and hi is None:
        return Held(b.add(Op.RELU, [x.value], node=node, suffix=suffix).output, x.layout, x.perm)
    return Held(b.add(Op.CLIP, [x.value], ClipAttrs(lo, hi), node, suffix=suffix).output, x.layout, x.perm)


@converts("Clip")
def _clip_node(b: Builder, node) -> None:
    x = b.act(node, 0)
    if b.opset < 11:
        lo, hi = b.attr(node, "min"), b.attr(node, "max")
    else:
        lo, hi = b.const(node, 1, "min"), b.const(node, 2, "max")
        for v, what in ((lo, "min"), (hi, "max")):
            if v is not None and np.size(v) != 1:
                raise b.unsupported(node, f"{what} must be a scalar")
    b.put(node, _clip(b, node, x, _bound(lo), _bound(hi)))


@converts("HardSigmoid")
def _hard_sigmoid(b: Builder, node) -> None:
    x = b.act(node, 0)
    alpha, beta = float(b.attr(node, "alpha", 0.2)), float(b.attr(node, "beta", 0.5))
    if abs(alpha - 1.0 / 6.0) <= 1e-6 / 6.0 and abs(beta - 0.5) <= 1e-7:
        b.put(node, Held(b.add(Op.HARD_SIGMOID, [x.value], node=node).output, x.layout, x.perm))
        return
    name = node.name or "hard_sigmoid"
    y = b.add(Op.MUL, [x.value, b.const_value(np.float32(alpha), name + "/alpha")], node=node, suffix="/scale")
    y = b.add(Op.ADD, [y.output, b.const_value(np.float32(beta), name + "/beta")], node=node, suffix="/shift")
    b.put(node, _clip(b, node, Held(y.output, x.layout, x.perm), 0.0, 1.0))


# -- element-wise binary ------------------------------------------------------------------------------------------
def _check_pair(b: Builder, node, x: Held, y: Held) -> None:
    if x.layout != y.layout or x.perm != y.perm or x.rank != y.rank:
        raise b.unsupported(node, f"operands of shapes {onnx_shape(x)} and {onnx_shape(y)} in different layouts "
                                  "or ranks")


@converts("Add", "Sub", "Mul", "Div")
def _binary(b: Builder, node) -> None:
    kind = node.op
    consts = [b.is_const(node, i) for i in (0, 1)]
    if all(consts):
        raise b.unsupported(node, "both operands are constants but were not folded")
    name = node.name or kind.lower()
    if any(consts):
        ci = consts.index(True)
        x = b.act(node, 1 - ci)
        if kind == "Add" and _fuse_dense_bias(b, node, ci):
            return
        c = b.const(node, ci, "constant operand")
        if kind == "Div" and ci == 0:
            raise b.unsupported(node, "division of a constant by a tensor")
        if kind == "Sub":
            c = -np.asarray(c, np.float32) if ci == 1 else np.asarray(c, np.float32)
        if kind == "Div":
            c = np.float32(1.0) / np.asarray(c, np.float32)
        ir_c = const_to_ir(x, c)
        if ir_c is None:
            raise b.unsupported(node, f"constant operand of shape {tuple(np.shape(c))} does not broadcast "
                                      f"against {onnx_shape(x)} without changing the batch axis")
        xv = x.value
        if kind == "Sub" and ci == 0:  # c - x
            xv = b.add(Op.MUL, [xv, b.const_value(np.float32(-1.0), name + "/minus_one")], node=node,
                       suffix="/negate").output
        op = Op.ADD if kind in ("Add", "Sub") else Op.MUL
        n = b.add(op, [xv, b.const_value(ir_c, name + "/const")], node=node)
        b.put(node, Held(n.output, x.layout, x.perm))
        return
    x, y = b.act(node, 0), b.act(node, 1)
    _check_pair(b, node, x, y)
    if kind == "Div":
        raise b.unsupported(node, "division by a tensor (the IR has no division)")
    yv = y.value
    if kind == "Sub":
        yv = b.add(Op.MUL, [yv, b.const_value(np.float32(-1.0), name + "/minus_one")], node=node,
                   suffix="/negate").output
    n = b.add(Op.MUL if kind == "Mul" else Op.ADD, [x.value, yv], node=node)
    b.put(node, Held(n.output, x.layout, x.perm))


@converts("Min")
def _min(b: Builder, node) -> None:
    """``Min(x, c)``: a scalar ``c`` is ``Clip(hi=c)``; a per-channel ``c`` (an exact per-channel clip) Minimum."""
    if len(node.inputs) != 2:
        raise b.unsupported(node, f"{len(node.inputs)} operands; two are supported")
    consts = [b.is_const(node, i) for i in (0, 1)]
    if all(consts):
        raise b.unsupported(node, "both operands are constants but were not folded")
    if any(consts):
        ci = consts.index(True)
        x = b.act(node, 1 - ci)
        c = np.asarray(b.const(node, ci, "constant operand"), np.float32)
        if c.size == 1:
            b.put(node, _clip(b, node, x, None, float(c.reshape(-1)[0])))
            return
        other = b.operand(node, ci, x, (node.name or "min") + "/const")
    else:
        x, y = b.act(node, 0), b.act(node, 1)
        _check_pair(b, node, x, y)
        other = y.value
    n = b.add(Op.MINIMUM, [x.value, other], node=node)
    b.put(node, Held(n.output, x.layout, x.perm))


@converts("Concat")
def _concat(b: Builder, node) -> None:
    xs = [b.act(node, i) for i in range(len(node.inputs))]
    for y in xs[1:]:
        _check_pair(b, node, xs[0], y)
    if xs[0].layout == FLAT_CHW:
        raise b.unsupported(node, "concatenation of flattened NCHW tensors")
    axis = ir_axis(xs[0], int(b.attr(node, "axis")))
    if axis is None or axis == 0:
        raise b.unsupported(node, f"axis {b.attr(node, 'axis')} (the batch axis or out of range)")
    n = b.add(Op.CONCAT, [x.value for x in xs], ConcatAttrs(axis - xs[0].rank), node)
    b.put(node, Held(n.output, xs[0].layout))


# -- padding and pooling ------------------------------------------------------------------------------------------
@converts("Pad")
def _pad(b: Builder, node) -> None:
    x = b.act(node, 0)
    mode = b.attr(node, "mode", "constant")
    if mode != "constant":
        raise b.unsupported(node, f"mode {mode!r}; only constant padding is supported")
    if b.opset < 11:
        pads, value = b.attr(node, "pads"), float(b.attr(node, "value", 0.0))
    else:
        pads = b.const(node, 1, "pads")
        v = b.const(node, 2, "constant_value")
        value = 0.0 if v is None else float(np.asarray(v).reshape(-1)[0])
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    rank = len(onnx_shape(x))
    axes = b.const(node, 3, "axes")
    if axes is not None:
        full = [0] * (2 * rank)
        axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
        for j, a in enumerate(axes):
            full[a], full[a + rank] = pads[j], pads[j + len(axes)]
        pads = full
    if len(pads) != 2 * rank:
        raise b.unsupported(node, f"pads {pads} for a rank-{rank} tensor")
    if not any(pads):
        b.alias(node, x)
        return
    if x.layout != NCHW or pads[0] or pads[1] or pads[4] or pads[5]:
        raise b.unsupported(node, f"pads {pads} of shape {onnx_shape(x)}: only H and W of an NCHW tensor")
    if min(pads) < 0:
        raise b.unsupported(node, f"negative pads {pads} (cropping)")
    n = b.add(Op.PAD, [x.value], PadAttrs(((pads[2], pads[6]), (pads[3], pads[7])), value), node)
    b.put(node, Held(n.output, NCHW))


def _pool_geometry(b: Builder, node, x: Held):
    ks = tuple(int(k) for k in b.attr(node, "kernel_shape"))
    if len(ks) != 2:
        raise b.unsupported(node, f"kernel_shape {ks}: only 2-D pooling is supported")
    strides = tuple(int(s) for s in b.attr(node, "strides", [1, 1]))
    dil = tuple(int(d) for d in b.attr(node, "dilations", [1, 1]))
    if dil != (1, 1):
        raise b.unsupported(node, f"dilations {dil}")
    padding = b.spatial_pads(node, x, ks, strides, (1, 1), "pool")
    return ks, strides, padding


def _ceil_extra(b: Builder, node, x: Held, ks, strides, padding) -> Tuple[int, int]:
    """Extra end padding that makes the floor output size equal ONNX's ceil_mode size."""
    if not int(b.attr(node, "ceil_mode", 0)) or padding == "SAME":
        return 0, 0
    pads = ((0, 0), (0, 0)) if padding == "VALID" else padding
    extra = []
    for size, k, s, (p0, p1) in zip(x.value.shape[1:3], ks, strides, pads):
        span = size + p0 + p1 - k
        out = -(-span // s) + 1
        if (out - 1) * s >= size + p0:  # the last window would start in the end padding
            out -= 1
        extra.append(max((out - 1) * s + k - (size + p0 + p1), 0))
    return tuple(extra)


@converts("MaxPool")
def _maxpool(b: Builder, node) -> None:
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        raise b.unsupported(node, "its Indices output is used")
    x = b.act(node, 0)
    b.require_nchw(node, x)
    ks, strides, padding = _pool_geometry(b, node, x)
    eh, ew = _ceil_extra(b, node, x, ks, strides, padding)
    if eh or ew:
        (t, bo), (l, r) = ((0, 0), (0, 0)) if padding == "VALID" else padding
        padding = ((t, bo + eh), (l, r + ew))
    n = b.add(Op.MAX_POOL, [x.value], PoolAttrs(ks, strides, padding), node)
    b.put(node, Held(n.output, NCHW))


@converts("AveragePool")
def _avgpool(b: Builder, node) -> None:
    x = b.act(node, 0)
    b.require_nchw(node, x)
    ks, strides, padding = _pool_geometry(b, node, x)
    if any(_ceil_extra(b, node, x, ks, strides, padding)):
        raise b.unsupported(node, "ceil_mode=1 changes the output size of an average pool")
    include = int(b.attr(node, "count_include_pad", 0))
    if padding in ("VALID", "SAME") and not (padding == "SAME" and include):
        n = b.add(Op.AVG_POOL, [x.value], PoolAttrs(ks, strides, padding), node)
        b.put(node, Held(n.output, NCHW))
        return
    _, h, w, _ = x.value.shape
    pads = tuple(tuple(p) for p in (padding if padding != "SAME" else
                                    [same_pads(h, ks[0], strides[0]), same_pads(w, ks[1], strides[1])]))
    same = (same_pads(h, ks[0], strides[0]), same_pads(w, ks[1], strides[1]))
    if not include and pads == same:
        n = b.add(Op.AVG_POOL, [x.value], PoolAttrs(ks, strides, "SAME"), node)
        b.put(node, Held(n.output, NCHW))
        return
    padded = b.add(Op.PAD, [x.value], PadAttrs(pads, 0.0), node, suffix="/pad")
    n = b.add(Op.AVG_POOL, [padded.output], PoolAttrs(ks, strides, "VALID"), node)
    y = n.output
    if not include:
        ones = np.zeros((h + pads[0][0] + pads[0][1], w + pads[1][0] + pads[1][1]), np.float64)
        ones[pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + w] = 1.0
        ho, wo = y.shape[1], y.shape[2]
        count = np.array([[ones[i * strides[0]:i * strides[0] + ks[0], j * strides[1]:j * strides[1] + ks[1]].sum()
                           for j in range(wo)] for i in range(ho)])
        ratio = (ks[0] * ks[1] / np.maximum(count, 1.0)).astype(np.float32).reshape(1, ho, wo, 1)
        y = b.add(Op.MUL, [y, b.const_value(ratio, (node.name or "avgpool") + "/valid_count")], node=node,
                  suffix="/exclude_pad").output
    b.put(node, Held(y, NCHW))


@converts("GlobalAveragePool")
def _gap(b: Builder, node) -> None:
    x = b.act(node, 0)
    b.require_nchw(node, x)
    n = b.add(Op.GLOBAL_MEAN, [x.value], GlobalMeanAttrs(keepdims=True), node)
    b.put(node, Held(n.output, NCHW))


@converts("GlobalMaxPool")
def _gmp(b: Builder, node) -> None:
    x = b.act(node, 0)
    b.require_nchw(node, x)
    _, h, w, _ = x.value.shape
    n = b.add(Op.MAX_POOL, [x.value], PoolAttrs((h, w), (1, 1), "VALID"), node)
    b.put(node, Held(n.output, NCHW))


def _axes(b: Builder, node, input_index: int, what: str = "axes"):
    """``axes`` from the attribute (older opsets) or input ``input_index``; ``None`` when absent."""
    if "axes" in node.attrs:
        return [int(a) for a in b.attr(node, "axes")]
    v = b.const(node, input_index, what)
    return None if v is None else [int(a) for a in np.asarray(v).reshape(-1)]


@converts("ReduceMean")
def _reduce_mean(b: Builder, node) -> None:
    x = b.act(node, 0)
    axes = _axes(b, node, 1)
    keep = bool(int(b.attr(node, "keepdims", 1)))
    if axes is None or x.layout != NCHW or sorted(a % 4 for a in axes) != [2, 3]:
        raise b.unsupported(node, f"axes {axes} of shape {onnx_shape(x)}: only the mean over H and W of an NCHW "
                                  "tensor is supported")
    n = b.add(Op.GLOBAL_MEAN, [x.value], GlobalMeanAttrs(keepdims=keep), node)
    b.put(node, Held(n.output, NCHW if keep else SAME))


@converts("Softmax")
def _softmax(b: Builder, node) -> None:
    x = b.act(node, 0)
    axis = int(b.attr(node, "axis", 1 if b.opset < 13 else -1))
    if b.opset < 13 and axis % x.rank != x.rank - 1 and x.rank > 2:
        raise b.unsupported(node, f"opset-{b.opset} Softmax with axis {axis} flattens the trailing dimensions")
    if x.layout == FLAT_CHW and axis % x.rank == 1:
        ax = -1  # a softmax over all features does not depend on their order
    else:
        ax = ir_axis(x, axis)
        if ax is None or ax == 0:
            raise b.unsupported(node, f"axis {axis} of shape {onnx_shape(x)}")
        ax -= x.rank
    n = b.add(Op.SOFTMAX, [x.value], SoftmaxAttrs(ax), node)
    b.put(node, Held(n.output, x.layout, x.perm))


# -- layout-only ops ----------------------------------------------------------------------------------------------
@converts("Identity")
def _identity(b: Builder, node) -> None:
    b.alias(node, b.act(node, 0))


@converts("Dropout")
def _dropout(b: Builder, node) -> None:
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        raise b.unsupported(node, "its mask output is used")
    training = b.const(node, 2, "training_mode")
    if training is not None and bool(np.asarray(training).reshape(-1)[0]):
        raise b.unsupported(node, "training_mode=True")
    b.alias(node, b.act(node, 0))


@converts("Cast")
def _cast(b: Builder, node) -> None:
    if int(b.attr(node, "to")) != 1:  # FLOAT
        raise b.unsupported(node, f"cast of a tensor to ONNX type {b.attr(node, 'to')}; only float32 is supported")
    b.alias(node, b.act(node, 0))


@converts("Transpose")
def _transpose(b: Builder, node) -> None:
    x = b.act(node, 0)
    perm = tuple(int(p) for p in b.attr(node, "perm", list(reversed(range(x.rank)))))
    if perm == tuple(range(x.rank)):
        b.alias(node, x)
    elif x.rank == 4 and x.layout == SAME and perm == NHWC_TO_NCHW:
        b.alias(node, Held(x.value, NCHW))
    elif x.layout == NCHW and perm == NCHW_TO_NHWC:
        b.alias(node, Held(x.value, SAME))
    else:
        raise b.unsupported(node, f"perm {perm} of shape {onnx_shape(x)}; only the NCHW <-> NHWC views are "
                                  "supported")


@converts("Flatten")
def _flatten(b: Builder, node) -> None:
    x = b.act(node, 0)
    shape = onnx_shape(x)
    axis = int(b.attr(node, "axis", 1)) % max(len(shape), 1)
    if axis != 1:
        raise b.unsupported(node, f"axis {axis}; only flattening after the batch axis is supported")
    rest = shape[1:]
    if any(d is None for d in rest):
        raise b.unsupported(node, f"flatten of {shape} with open dimensions")
    b.reshape(node, x, (shape[0], int(np.prod(rest))))


@converts("Reshape")
def _reshape_node(b: Builder, node) -> None:
    x = b.act(node, 0)
    values, follows = b.param_with_batch(node, 1, "shape")
    target = [int(v) for v in np.asarray(values).reshape(-1)]
    follows = list(np.asarray(follows).reshape(-1))
    in_shape = onnx_shape(x)
    allowzero = int(b.attr(node, "allowzero", 0))
    if any(follows[1:]):
        raise b.unsupported(node, f"target {target} moves the batch axis")
    static = b.folded.static_batch
    if not target:
        raise b.unsupported(node, "reshape to a scalar")
    first = target[0]
    batch_kept = follows[0] or (first == 0 and not allowzero) or (static is not None and first == static)
    rest = [in_shape[i + 1] if (d == 0 and not allowzero and i + 1 < len(in_shape)) else d
            for i, d in enumerate(target[1:])]
    total = int(np.prod(in_shape[1:]))
    if not batch_kept and first == -1 and -1 not in rest and int(np.prod(rest)) == total:
        batch_kept = True
    if not batch_kept:
        raise b.unsupported(node, f"target {target} does not keep the batch axis first")
    if rest.count(-1) > 1:
        raise b.unsupported(node, f"target {target} has more than one -1")
    if -1 in rest:
        known = int(np.prod([d for d in rest if d != -1])) if len(rest) > 1 else 1
        if known == 0 or total % known:
            raise b.unsupported(node, f"target {target} does not fit {in_shape}")
        rest[rest.index(-1)] = total // known
    if int(np.prod(rest)) != total:
        raise b.unsupported(node, f"target {target} does not fit {in_shape}")
    b.reshape(node, x, (in_shape[0], *rest))


@converts("Squeeze")
def _squeeze(b: Builder, node) -> None:
    x = b.act(node, 0)
    shape = onnx_shape(x)
    axes = _axes(b, node, 1)
    if axes is None:
        axes = [i for i, d in enumerate(shape) if i > 0 and d == 1]
    axes = sorted({a % len(shape) for a in axes})
    if 0 in axes or any(shape[a] != 1 for a in axes):
        raise b.unsupported(node, f"axes {axes} of shape {shape}: only non-batch axes of size 1")
    b.reshape(node, x, tuple(d for i, d in enumerate(shape) if i not in axes))


@converts("Unsqueeze")
def _unsqueeze(b: Builder, node) -> None:
    x = b.act(node, 0)
    shape = list(onnx_shape(x))
    axes = _axes(b, node, 1)
    if axes is None:
        raise b.unsupported(node, "no axes")
    rank = len(shape) + len(axes)
    axes = sorted(a % rank for a in axes)
    if 0 in axes:
        raise b.unsupported(node, "a new leading axis would move the batch axis")
    for a in axes:
        shape.insert(a, 1)
    b.reshape(node, x, tuple(shape))


SUPPORTED_ONNX_OPS = tuple(sorted(CONVERTERS))
