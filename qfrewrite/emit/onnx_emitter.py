"""ONNX emission: the IR (NHWC) -> an NCHW ONNX model, float or QDQ.

Layout: every rank-4 IR value ``(N, H, W, C)`` becomes an ONNX tensor ``(N, C, H, W)``; other ranks keep their
shape. Kernels: HWIO -> OIHW; depthwise ``(kh, kw, C, M)`` -> ``(C*M, 1, kh, kw)`` with ``group = C``; Dense
``(in, out)`` -> Gemm ``B``. Axes of Softmax/Concat and per-channel constants of Add/Mul/Minimum/Normalize are
moved to NCHW. A reshape or flatten whose element order differs between NHWC and NCHW (a rank-4 side with
``C > 1`` and ``H*W > 1``) is wrapped in Transposes to NHWC and back, so the emitted model computes exactly the IR's
function. Padding ``"SAME"`` becomes explicit pads (TensorFlow's rule, odd pixel at the end); an AveragePool counts
padded pixels exactly as the TensorFlow lowering does (not for ``"SAME"``, yes for other explicit pads).

QDQ (``quantized=True``, or ``None`` with FakeQuant in the graph): a ``FakeQuant`` node becomes
QuantizeLinear -> DequantizeLinear with the scale and zero point of its TensorFlow-nudged range
(:mod:`qfrewrite.numerics.qdq`), per tensor or per channel (``axis`` 1); a kernel with ``node.weight_quant`` is
stored as integer codes (per output channel: ``axis`` 0 for Conv, 1 for Gemm) followed by DequantizeLinear: a grid of
at most 4 bits as INT4 (opset 21, the default for such a graph: a 4-bit symmetric grid is the codes ``[-7, 7]``), a
grid of 5 to 8 bits as int8 (``[-15, 15]`` for 5 bits: the fewer levels, no size saving), zero point 0; its bias,
when the layer reads a quantized activation, as int32 codes with scale ``s_x * s_w`` (ONNX Runtime's QDQ fusions
want this form, and TFLite quantizes biases the same way). Dequantized weights equal TensorFlow's fake-quantized ones;
the int32 bias differs from the float one by at most half a step of ``s_x * s_w``. A Clip/Relu read only by a
FakeQuant whose range lies inside the clip's bounds is dropped (exact: the fake quantization clamps first), so the
Q/DQ pair follows the layer directly, the pattern ONNX Runtime fuses into QLinearConv/QGemm.

ONNX Runtime 1.32's CPU provider runs INT4 DequantizeLinear, per tensor and per axis, and equals the simulation; it
does not fuse an INT4 weight into QLinearConv (the Conv runs in float on the dequantized kernel).
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import EmitError
from ..io_utils import atomic_write_bytes
from ..ir import FakeQuantAttrs, Graph, Node, Op, Value, resolve_pads, same_pads, sole_reader
from ..numerics.qdq import QParams, bias_codes, qparams, quantize_codes, weight_storage_bits

__all__ = ["emit_onnx", "ONNX_OPSETS", "INT4_OPSET", "ACTIVATION_DTYPES", "default_opset"]

log = logging.getLogger(__name__)

#: opsets the emitter writes (13: per-axis QuantizeLinear; HardSwish from 14; ReduceMean axes as input from 18)
ONNX_OPSETS = range(13, 22)
#: the first opset whose DequantizeLinear reads INT4
INT4_OPSET = 21
ACTIVATION_DTYPES = ("uint8", "int8")
_NHWC_TO_NCHW = (0, 3, 1, 2)
_NCHW_TO_NHWC = (0, 2, 3, 1)
_IR_AXIS_TO_NCHW = (0, 2, 3, 1)  # IR (N, H, W, C) axis j is ONNX (N, C, H, W) axis _IR_AXIS_TO_NCHW[j]


def _is_quantized(graph: Graph) -> bool:
    return any(n.op is Op.FAKE_QUANT or n.weight_quant is not None for n in graph)


def _int4_kernels(graph: Graph) -> list:
    """The kernels whose weight grid has at most 4 bits (stored as INT4 from opset 21)."""
    return [n for n in graph if n.weight_quant is not None and weight_storage_bits(n.weight_quant.bits) == 4]


def default_opset(graph: Graph, quantized: bool) -> int:
    """13, or :data:`INT4_OPSET` when a quantized graph has a kernel of at most 4 bits (INT4 storage)."""
    return INT4_OPSET if quantized and _int4_kernels(graph) else ONNX_OPSETS.start


def _known(*dims) -> bool:
    return all(d is not None for d in dims)


def _same_order(shape) -> bool:
    """NHWC and NCHW store this shape's elements in the same order (rank != 4, ``C == 1`` or ``H*W == 1``)."""
    if len(shape) != 4:
        return True
    _, h, w, c = shape
    return c == 1 or (_known(h, w) and h * w == 1)


class _Emitter:
    def __init__(self, graph: Graph, quantized: bool, activation_dtype: str, opset: int, int32_bias: bool = True):
        self.graph = graph
        self.quantized = quantized
        self.act_dtype = activation_dtype
        self.opset = opset
        self.int32_bias = int32_bias
        self.nodes: List = []
        self.inits: List = []
        self.names: Dict[str, str] = {}  # IR value name -> ONNX tensor name
        self.used: set = set()
        self.act_q: Dict[str, QParams] = {}  # ONNX tensor name -> its activation quantization (per tensor)
        self.absorbed = self._absorbed_clips() if quantized else set()

    def _absorbed_clips(self) -> set:
        """Names of Clip/Relu nodes read only by a FakeQuant whose nudged range lies inside the clip's bounds.

        ``fq(clip(x)) == fq(x)`` there (fake quantization clamps to its nudged range first), so the clip is dropped
        and the Q/DQ pair sits right after the layer, the pattern ONNX Runtime fuses into integer kernels.
        """
        out = set()
        for fq in self.graph.find(Op.FAKE_QUANT):
            act = fq.inputs[0].producer
            if act is None or act.op not in (Op.CLIP, Op.RELU):
                continue
            if sole_reader(act.output) is None:
                continue
            lo, hi = (act.attrs.lo, act.attrs.hi) if act.op is Op.CLIP else (0.0, None)
            try:
                q = qparams(fq.attrs.lo, fq.attrs.hi, fq.attrs.bits, fq.attrs.narrow_range, self.act_dtype)
            except ValueError:
                continue
            if (lo is None or float(q.nudged_lo.min()) >= lo) and (hi is None or float(q.nudged_hi.max()) <= hi):
                out.add(act.name)
        return out

    # -- naming and building ----------------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def init(self, array: np.ndarray, base: str) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))  # keeps 0-d scalars
        return name

    def node(self, op: str, inputs: Sequence[str], base: str, n_out: int = 1, out: Optional[str] = None,
             **attrs) -> str:
        from onnx import helper

        outs = [out] if out is not None else [self.fresh(f"{base}:{i}" if n_out > 1 else base) for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.fresh("node/" + base), **attrs))
        return outs[0]

    def name_of(self, v: Value, like: Optional[Value] = None) -> str:
        """The ONNX tensor of IR value ``v``; constants become initializers arranged to broadcast like ``like``."""
        if v.is_const:
            c = v.const
            rank = len(like.shape) if like is not None else c.ndim
            if rank == 4 and c.ndim <= 4:
                c = c.reshape((1,) * (4 - c.ndim) + c.shape).transpose(_NHWC_TO_NCHW)
            return self.init(c.astype(np.float32), v.name)
        try:
            return self.names[v.name]
        except KeyError:
            raise EmitError(f"value {v.name} is read before it is computed") from None

    # -- quantization ---------------------------------------------------------------------------------------------
    def fake_quant(self, x: str, fq: FakeQuantAttrs, rank: int, base: str) -> str:
        q = self._qparams(fq, self.act_dtype, base)
        if q.needs_clip:
            if q.scale.size > 1:
                raise EmitError(f"{base}: per-channel narrow-range or sub-8-bit activations are not expressible in "
                                "ONNX QDQ")
            x = self.clip(x, float(q.nudged_lo.reshape(-1)[0]), float(q.nudged_hi.reshape(-1)[0]), base + "/saturate")
        axis = {} if q.scale.size == 1 else {"axis": 1 if rank >= 2 else 0}
        scale = self.init(q.scale.reshape(()) if q.scale.size == 1 else q.scale, base + "/scale")
        zp = self.init(q.zero_point.reshape(()) if q.zero_point.size == 1 else q.zero_point, base + "/zero_point")
        qx = self.node("QuantizeLinear", [x, scale, zp], base + "/quantized", **axis)
        out = self.node("DequantizeLinear", [qx, scale, zp], base + "/dequantized", **axis)
        if q.scale.size == 1:
            self.act_q[out] = q
        return out

    @staticmethod
    def _qparams(fq: FakeQuantAttrs, dtype: str, where: str) -> QParams:
        try:
            return qparams(fq.lo, fq.hi, fq.bits, fq.narrow_range, dtype)
        except ValueError as exc:
            raise EmitError(f"{where}: {exc}") from None

    def weight_container(self, bits: int) -> str:
        """int4 for a grid of at most 4 bits (from opset 21), else int8."""
        return "int4" if weight_storage_bits(bits) == 4 and self.opset >= INT4_OPSET else "int8"

    def weight(self, node: Node, w_onnx: np.ndarray, channel_axis: int, base: str):
        """The kernel as a float initializer, or integer codes + DequantizeLinear; returns (name, weight scale)."""
        fq = node.weight_quant
        if not (self.quantized and fq is not None):
            return self.init(w_onnx.astype(np.float32), base), None
        q = self._qparams(fq, self.weight_container(fq.bits), node.name)
        codes = quantize_codes(w_onnx, q, axis=channel_axis)
        per_channel = q.scale.size > 1
        if per_channel and q.scale.size != w_onnx.shape[channel_axis]:
            raise EmitError(f"{node.name}: {q.scale.size} weight ranges for {w_onnx.shape[channel_axis]} channels")
        axis = {"axis": channel_axis} if per_channel else {}
        scale = self.init(q.scale if per_channel else q.scale.reshape(()), base + "/scale")
        zp = self.init(q.zero_point if per_channel else q.zero_point.reshape(()), base + "/zero_point")
        name = self.node("DequantizeLinear", [self.init(codes, base + "/quantized"), scale, zp], base, **axis)
        return name, q.scale

    def bias(self, node: Node, x_name: str, w_scale, base: str) -> str:
        b = node.bias.const.astype(np.float32)
        xq = self.act_q.get(x_name)
        if w_scale is None or xq is None or not self.int32_bias:
            return self.init(b, base)
        codes, scale = bias_codes(b, float(xq.scale.reshape(-1)[0]), w_scale)
        axis = {"axis": 0} if scale.size > 1 else {}
        zp = np.zeros(scale.shape if scale.size > 1 else (), np.int32)
        return self.node("DequantizeLinear", [self.init(codes, base + "/quantized"),
                                              self.init(scale if scale.size > 1 else scale.reshape(()),
                                                        base + "/scale"),
                                              self.init(zp, base + "/zero_point")], base, **axis)

    # -- ops ------------------------------------------------------------------------------------------------------
    def pads(self, node: Node, padding, kernel, strides, dilations=(1, 1)):
        """ONNX ``pads`` [t, l, b, r] (or ``None`` with auto_pad SAME_UPPER for unknown sizes)."""
        x = node.inputs[0].shape
        if padding == "SAME" and not _known(x[1], x[2]):
            return None
        (t, b), (l, r) = resolve_pads(padding, x[1:3], kernel, strides, dilations)
        return [t, l, b, r]

    def conv(self, node: Node, x: str) -> str:
        k = node.weight.const
        a = node.attrs
        if node.op is Op.CONV2D:
            w, group = k.transpose(3, 2, 0, 1), 1
        else:
            kh, kw, c, m = k.shape
            w, group = k.reshape(kh, kw, c * m).transpose(2, 0, 1)[:, None], c
        wname, wscale = self.weight(node, w, 0, node.name + "/W")
        ins = [x, wname]
        if node.bias is not None:
            ins.append(self.bias(node, x, wscale, node.name + "/B"))
        pads = self.pads(node, a.padding, k.shape[:2], a.strides, a.dilations)
        extra = {"pads": pads} if pads is not None else {"auto_pad": "SAME_UPPER"}
        return self.node("Conv", ins, node.name, kernel_shape=list(k.shape[:2]), strides=list(a.strides),
                         dilations=list(a.dilations), group=group, **extra)

    def dense(self, node: Node, x: str) -> str:
        rank = len(node.inputs[0].shape)
        k = node.weight.const
        wname, wscale = self.weight(node, k, 1, node.name + "/W")
        b = self.bias(node, x, wscale, node.name + "/B") if node.bias is not None else None
        if rank == 2:
            return self.node("Gemm", [x, wname] + ([b] if b else []), node.name)
        if rank == 4:
            x = self.node("Transpose", [x], node.name + "/to_nhwc", perm=list(_NCHW_TO_NHWC))
        y = self.node("MatMul", [x, wname], node.name + "/matmul")
        if b:
            y = self.node("Add", [y, b], node.name + "/bias")
        if rank == 4:
            y = self.node("Transpose", [y], node.name + "/to_nchw", perm=list(_NHWC_TO_NCHW))
        return y

    def pool(self, node: Node, x: str) -> str:
        a = node.attrs
        extra = {}
        if node.op is Op.AVG_POOL:
            include = 0
            if a.padding not in ("SAME", "VALID"):
                xs = node.inputs[0].shape
                pads = resolve_pads(a.padding, xs[1:3], a.kernel, a.strides)
                same = (_known(xs[1], xs[2]) and pads == tuple(same_pads(xs[1 + i], a.kernel[i], a.strides[i])
                                                                 for i in range(2)))
                include = 0 if same else 1
            extra["count_include_pad"] = include
        pads = self.pads(node, a.padding, a.kernel, a.strides)
        extra.update({"pads": pads} if pads is not None else {"auto_pad": "SAME_UPPER"})
        return self.node("AveragePool" if node.op is Op.AVG_POOL else "MaxPool", [x], node.name,
                         kernel_shape=list(a.kernel), strides=list(a.strides), **extra)

    def reshape(self, node: Node, x: str, target) -> str:
        """IR reshape semantics (NHWC element order) on NCHW ONNX tensors."""
        src, dst = node.inputs[0].shape, node.output.shape
        dst_same = _same_order(dst) and (len(dst) != 4 or _known(*dst[1:]))
        if not _same_order(src):
            x = self.node("Transpose", [x], node.name + "/to_nhwc", perm=list(_NCHW_TO_NHWC))
        if len(dst) == 4 and dst_same:
            target = [dst[3], dst[1], dst[2]]
        shape = self.init(np.asarray([0, *target], np.int64), node.name + "/shape")
        y = self.node("Reshape", [x, shape], node.name + ("" if dst_same else "/reshape"))
        if not dst_same:
            y = self.node("Transpose", [y], node.name, perm=list(_NHWC_TO_NCHW))
        return y

    def axis(self, node: Node, axis: int) -> int:
        rank = len(node.inputs[0].shape)
        axis %= rank
        return _IR_AXIS_TO_NCHW[axis] if rank == 4 else axis

    def clip(self, x: str, lo, hi, base: str) -> str:
        ins = [x, self.init(np.float32(lo), base + "/min") if lo is not None else ""]
        if hi is not None:
            ins.append(self.init(np.float32(hi), base + "/max"))
        return self.node("Clip", ins, base)

    def emit_node(self, node: Node) -> str:
        op, a = node.op, node.attrs
        x = self.name_of(node.inputs[0]) if node.inputs and not node.inputs[0].is_const else None
        if op in (Op.CONV2D, Op.DEPTHWISE_CONV2D):
            return self.conv(node, x)
        if op is Op.DENSE:
            return self.dense(node, x)
        if op is Op.BATCH_NORM:
            params = [self.init(v.const.astype(np.float32), f"{node.name}/{what}")
                      for v, what in zip(node.inputs[1:5], ("scale", "B", "mean", "var"))]
            return self.node("BatchNormalization", [x, *params], node.name, epsilon=float(a.epsilon))
        if node.name in self.absorbed:
            return x
        if op is Op.RELU:
            return self.node("Relu", [x], node.name)
        if op is Op.CLIP:
            if a.lo is None and a.hi is None:
                return self.node("Identity", [x], node.name)
            return self.clip(x, a.lo, a.hi, node.name)
        if op is Op.HARD_SIGMOID:
            return self.node("HardSigmoid", [x], node.name, alpha=1.0 / 6.0, beta=0.5)
        if op is Op.HARD_SWISH:
            if self.opset >= 14:
                return self.node("HardSwish", [x], node.name)
            hs = self.node("HardSigmoid", [x], node.name + "/hard_sigmoid", alpha=1.0 / 6.0, beta=0.5)
            return self.node("Mul", [x, hs], node.name)
        if op is Op.SIGMOID:
            return self.node("Sigmoid", [x], node.name)
        if op in (Op.ADD, Op.MUL, Op.MINIMUM):
            a0, a1 = node.inputs
            live = [v for v in (a0, a1) if not v.is_const]
            if len(live) == 2 and len(a0.shape) != len(a1.shape) and 4 in (len(a0.shape), len(a1.shape)):
                raise EmitError(f"{node.name}: {op.value} of a rank-4 and a rank-{min(len(a0.shape), len(a1.shape))} "
                                "tensor has no NCHW equivalent")
            like = live[0] if live else a0
            return self.node({Op.ADD: "Add", Op.MUL: "Mul", Op.MINIMUM: "Min"}[op],
                             [self.name_of(a0, like), self.name_of(a1, like)], node.name)
        if op is Op.PAD:
            (t, b), (l, r) = a.pads
            pads = self.init(np.asarray([0, 0, t, l, 0, 0, b, r], np.int64), node.name + "/pads")
            value = self.init(np.float32(a.value), node.name + "/value")
            return self.node("Pad", [x, pads, value], node.name, mode="constant")
        if op in (Op.AVG_POOL, Op.MAX_POOL):
            return self.pool(node, x)
        if op is Op.GLOBAL_MEAN:
            if a.keepdims:
                return self.node("GlobalAveragePool", [x], node.name)
            if self.opset >= 18:
                return self.node("ReduceMean", [x, self.init(np.asarray([2, 3], np.int64), node.name + "/axes")],
                                 node.name, keepdims=0)
            return self.node("ReduceMean", [x], node.name, axes=[2, 3], keepdims=0)
        if op is Op.RESHAPE:
            return self.reshape(node, x, list(a.shape))
        if op is Op.FLATTEN:
            if _same_order(node.inputs[0].shape):
                return self.node("Flatten", [x], node.name, axis=1)
            return self.reshape(node, x, [-1])
        if op is Op.SOFTMAX:
            return self.node("Softmax", [x], node.name, axis=self.axis(node, a.axis))
        if op is Op.NORMALIZE:
            c = node.inputs[0].shape[-1]
            shape = (1, -1, 1, 1) if len(node.inputs[0].shape) == 4 else (1, -1)
            scale = np.broadcast_to(np.asarray(a.scale, np.float32), (c,)).reshape(shape)
            offset = np.broadcast_to(np.asarray(a.offset, np.float32), (c,)).reshape(shape)
            y = self.node("Mul", [x, self.init(scale, node.name + "/scale")], node.name + "/scale")
            return self.node("Add", [y, self.init(offset, node.name + "/offset")], node.name)
        if op is Op.CONCAT:
            ins = [self.name_of(v, node.inputs[0]) for v in node.inputs]
            return self.node("Concat", ins, node.name, axis=self.axis(node, a.axis))
        if op is Op.FAKE_QUANT:
            if not self.quantized:
                return x
            return self.fake_quant(x, a, len(node.inputs[0].shape), node.name)
        raise EmitError(f"{node.name}: no ONNX form for {op.value}")

    # -- the model ------------------------------------------------------------------------------------------------
    @staticmethod
    def _onnx_shape(shape) -> List:
        dims = [shape[i] for i in _NHWC_TO_NCHW] if len(shape) == 4 else list(shape)
        return [("batch" if i == 0 else f"d{i}") if d is None else int(d) for i, d in enumerate(dims)]

    def build(self):
        from onnx import TensorProto, helper

        g = self.graph
        inputs = []
        for v in g.inputs:
            name = self.fresh(v.name)
            self.names[v.name] = name
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, self._onnx_shape(v.shape)))
        for node in g.topological_order():
            self.names[node.output.name] = self.emit_node(node)
        out_names = list(g.meta.get("output_names") or [])
        if len(out_names) != len(g.outputs) or len(set(out_names)) != len(out_names):
            out_names = [v.name for v in g.outputs]
        outputs, renamed = [], set()
        graph_inputs = {vi.name for vi in inputs}
        for v, want in zip(g.outputs, out_names):
            src = self.name_of(v)
            if src not in graph_inputs and src not in renamed and (want == src or want not in self.used):
                self._rename(src, want)
            else:
                want = self.fresh(want)
                self.node("Identity", [src], want, out=want)
            renamed.add(want)
            outputs.append(helper.make_tensor_value_info(want, TensorProto.FLOAT, self._onnx_shape(v.shape)))
        graph = helper.make_graph(self.nodes, g.name or "qfrewrite", inputs, outputs, self.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qfrewrite",
                                  ir_version=helper.find_min_ir_version_for(opsets))
        return model

    def _rename(self, old: str, new: str) -> None:
        """Give the tensor ``old`` the name ``new`` everywhere (graph outputs keep their source names)."""
        self.used.add(new)
        for n in self.nodes:
            for seq in (n.input, n.output):
                for i, name in enumerate(seq):
                    if name == old:
                        seq[i] = new


def emit_onnx(graph: Graph, path: Optional[Union[str, os.PathLike]] = None, quantized: Optional[bool] = None,
              *, activation_dtype: str = "uint8", opset: Optional[int] = None, int32_bias: bool = True):
    """Write ``graph`` as an NCHW ONNX model and return the ``onnx.ModelProto``.

    ``quantized=None``: QDQ when the graph carries FakeQuant (nodes or ``weight_quant``), else float;
    ``quantized=False`` writes the float function of a quantized graph. ``activation_dtype``: "uint8" (default) or
    "int8" codes for activations, the same values either way (weights are int8, or INT4 for grids of at most 4
    bits). ONNX Runtime's CPU provider fuses uint8-activation QDQ into integer kernels throughout (torchvision
    MobileNetV2: 52 QLinearConv and 10 QLinearAdd), but with int8 activations it left 15 Convs and the 10 Adds in
    float. ``int32_bias``: store the bias of a layer that reads a quantized activation as int32 codes (ONNX Runtime
    then runs integer kernels; outputs may differ from the float-bias simulation by one quantization step where a
    value sits near a rounding boundary); ``False`` keeps float biases, which reproduces the simulation exactly but
    leaves ONNX Runtime's layers in float. ``opset``: 13..21; by default 13, or 21 when a kernel's weight grid has at
    most 4 bits (INT4 weights; below 21 they are stored as int8 codes, with a warning). ``path``: written
    atomically; the model is checked with ``onnx.checker`` first.
    """
    import onnx

    if activation_dtype not in ACTIVATION_DTYPES:
        raise EmitError(f"activation_dtype must be one of {', '.join(ACTIVATION_DTYPES)}, got {activation_dtype!r}")
    has_q = _is_quantized(graph)
    if quantized is None:
        quantized = has_q
    if quantized and not has_q:
        raise EmitError("a QDQ model needs FakeQuant ranges: run InsertFakeQuant (with calibration data) first")
    if opset is None:
        opset = default_opset(graph, bool(quantized))
    if opset not in ONNX_OPSETS:
        raise EmitError(f"opset must be in {ONNX_OPSETS.start}..{ONNX_OPSETS.stop - 1}, got {opset}")
    narrow = _int4_kernels(graph) if quantized and opset < INT4_OPSET else []
    if narrow:
        log.warning("opset %d has no INT4: the %d-bit weights of %d layer(s) (%s ...) are stored as int8 codes, "
                    "with no size saving; opset %d stores them as INT4", opset, narrow[0].weight_quant.bits,
                    len(narrow), narrow[0].name, INT4_OPSET)
    model = _Emitter(graph, bool(quantized), activation_dtype, opset, int32_bias).build()
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        raise EmitError(f"the ONNX model emitted from graph {graph.name!r} is invalid: "
                        f"{lines[0] if lines else type(exc).__name__}") from exc
    if path is not None:
        atomic_write_bytes(path, model.SerializeToString())
        log.info("wrote %s (%s, %d nodes)", path, "QDQ" if quantized else "float", len(model.graph.node))
    return model
