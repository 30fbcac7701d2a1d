"""Lower the IR to TensorFlow ops.

One lowering serves three jobs: the float reference executor, the calibration observers (which tap intermediate
values), and the TFLite emitter (which traces it into a ``tf.function`` built from constants only, so TensorFlow's
converter sees frozen weights). With ``quantize=True`` the kernels carrying ``node.weight_quant`` and the
``FakeQuant`` nodes are simulated with TensorFlow's ``fake_quant_*`` ops; with ``quantize=False`` FakeQuant nodes are
identities, which gives the float function of a quantized graph.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import EmitError
from ..ir import FakeQuantAttrs, Graph, Node, Op, bn_affine, resolve_pads, same_pads

__all__ = ["lower", "lower_node", "fake_quant_tf"]

log = logging.getLogger(__name__)


def _tf():
    import tensorflow as tf  # imported lazily: TensorFlow takes seconds to import

    return tf


def fake_quant_tf(x, fq: FakeQuantAttrs, axis_len: Optional[int] = None):
    """Fake-quantize ``x`` with TensorFlow's ops. Per-channel ranges apply to the last axis."""
    tf = _tf()
    if len(fq.lo) == 1 and fq.axis is None:
        return tf.quantization.fake_quant_with_min_max_vars(
            x, min=tf.constant(float(fq.lo[0])), max=tf.constant(float(fq.hi[0])), num_bits=fq.bits,
            narrow_range=fq.narrow_range)
    lo = tf.constant(np.asarray(fq.lo, np.float32))
    hi = tf.constant(np.asarray(fq.hi, np.float32))
    return tf.quantization.fake_quant_with_min_max_vars_per_channel(
        x, min=lo, max=hi, num_bits=fq.bits, narrow_range=fq.narrow_range)


def _kernel(node: Node, quantize: bool, kernel=None):
    """The node's kernel as a TF constant (``kernel`` in its place when given), fake-quantized per its
    ``weight_quant`` when asked."""
    tf = _tf()
    k = tf.constant(node.weight.const) if kernel is None else kernel
    fq = node.weight_quant
    if not quantize or fq is None:
        return k
    if node.op is Op.DEPTHWISE_CONV2D and (len(fq.lo) > 1 or fq.axis is not None):
        kh, kw, c, m = node.weight.const.shape
        flat = tf.reshape(k, (kh, kw, 1, c * m))
        return tf.reshape(fake_quant_tf(flat, fq), (kh, kw, c, m))
    return fake_quant_tf(k, fq)


def _explicit_or_same(padding, x_shape, kernel, strides, dilations=(1, 1)):
    """Return ("SAME"|"VALID", pads-or-None): explicit pads equal to TF's SAME pads are emitted as SAME."""
    if padding in ("SAME", "VALID"):
        return padding, None
    pads = resolve_pads(padding, x_shape[1:3], kernel, strides, dilations)
    if pads == ((0, 0), (0, 0)):
        return "VALID", None
    h, w = x_shape[1], x_shape[2]
    if h is not None and w is not None:
        same = (same_pads(h, kernel[0], strides[0], dilations[0]), same_pads(w, kernel[1], strides[1], dilations[1]))
        if same == pads:
            return "SAME", None
    return "VALID", pads


def _pad(x, pads, value=0.0):
    tf = _tf()
    (t, b), (l, r) = pads
    return tf.pad(x, [[0, 0], [t, b], [l, r], [0, 0]], constant_values=value)


def _batch(x):
    return x.shape[0] if x.shape[0] is not None else _tf().shape(x)[0]


def _lower_node(node: Node, args: List, quantize: bool, kernel=None, bias=None):
    tf = _tf()
    op, a = node.op, node.attrs
    x = args[0] if args else None
    if op in (Op.CONV2D, Op.DEPTHWISE_CONV2D):
        k = _kernel(node, quantize, kernel)
        kshape = node.weight.const.shape
        mode, pads = _explicit_or_same(a.padding, node.inputs[0].shape, kshape[:2], a.strides, a.dilations)
        if pads is not None:
            x = _pad(x, pads)
        if op is Op.CONV2D:
            y = tf.nn.conv2d(x, k, strides=[1, *a.strides, 1], padding=mode, dilations=list(a.dilations))
        else:
            y = tf.nn.depthwise_conv2d(x, k, strides=[1, *a.strides, 1], padding=mode, dilations=list(a.dilations))
        if bias is not None or node.bias is not None:
            y = tf.nn.bias_add(y, tf.constant(node.bias.const) if bias is None else bias)
        return y
    if op is Op.DENSE:
        k = _kernel(node, quantize, kernel)
        y = tf.matmul(x, k) if len(node.inputs[0].shape) == 2 else tf.tensordot(x, k, axes=1)
        if bias is not None or node.bias is not None:
            y = tf.nn.bias_add(y, tf.constant(node.bias.const) if bias is None else bias)
        return y
    if op is Op.BATCH_NORM:
        scale, shift, _ = bn_affine(node)
        return x * tf.constant(scale.astype(np.float32)) + tf.constant(shift.astype(np.float32))
    if op is Op.RELU:
        return tf.nn.relu(x)
    if op is Op.CLIP:
        if a.is_relu6:
            return tf.nn.relu6(x)
        if a.lo == 0.0 and a.hi is None:
            return tf.nn.relu(x)
        y = x
        if a.lo is not None:
            y = tf.maximum(y, float(a.lo))
        if a.hi is not None:
            y = tf.minimum(y, float(a.hi))
        return y
    if op is Op.HARD_SWISH:
        return x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0)
    if op is Op.HARD_SIGMOID:
        return tf.nn.relu6(x + 3.0) * (1.0 / 6.0)
    if op is Op.SIGMOID:
        return tf.sigmoid(x)
    if op is Op.ADD:
        return tf.add(args[0], args[1])
    if op is Op.MUL:
        return tf.multiply(args[0], args[1])
    if op is Op.MINIMUM:
        return tf.minimum(args[0], args[1])
    if op is Op.PAD:
        return _pad(x, a.pads, a.value)
    if op in (Op.AVG_POOL, Op.MAX_POOL):
        mode, pads = _explicit_or_same(a.padding, node.inputs[0].shape, a.kernel, a.strides)
        if pads is not None:
            x = _pad(x, pads, -np.inf if op is Op.MAX_POOL else 0.0)
        fn = tf.nn.avg_pool2d if op is Op.AVG_POOL else tf.nn.max_pool2d
        return fn(x, ksize=list(a.kernel), strides=list(a.strides), padding=mode)
    if op is Op.GLOBAL_MEAN:
        return tf.reduce_mean(x, axis=[1, 2], keepdims=a.keepdims)
    if op is Op.RESHAPE:
        return tf.reshape(x, [_batch(x), *a.shape])
    if op is Op.FLATTEN:
        return tf.reshape(x, [_batch(x), -1])
    if op is Op.SOFTMAX:
        return tf.nn.softmax(x, axis=a.axis)
    if op is Op.NORMALIZE:
        return x * tf.constant(np.asarray(a.scale, np.float32)) + tf.constant(np.asarray(a.offset, np.float32))
    if op is Op.CONCAT:
        return tf.concat(args, axis=a.axis)
    if op is Op.FAKE_QUANT:
        return fake_quant_tf(x, a) if quantize else tf.identity(x)
    raise EmitError(f"{node.name}: no TensorFlow lowering for {op.value}")


def lower_node(node: Node, args: Sequence, quantize: bool = False, kernel=None, bias=None):
    """One node's output from its (non-constant and constant) input tensors ``args``, in input order; ``kernel``
    and ``bias`` (tensors or arrays) replace a weighted node's kernel and bias (a bias is added even where the node
    has none). Runs eagerly or inside a ``tf.function``."""
    return _lower_node(node, list(args), quantize, kernel, bias)


def _scope_name(name: str) -> str:
    """A valid TF name scope from an IR node name (TF op and TFLite tensor names then carry the node name)."""
    s = re.sub(r"[^A-Za-z0-9_.\\/>-]", "_", name).strip("/") or "node"
    return s if re.match(r"[A-Za-z0-9.]", s) else "n" + s


def lower(graph: Graph, inputs: Sequence, quantize: bool = False, taps: Optional[Sequence[str]] = None):
    """Evaluate ``graph`` with TensorFlow ops on ``inputs`` (TF tensors, NHWC, one per graph input).

    Returns the list of graph outputs, and with ``taps`` (value names) also a dict of those intermediate tensors.
    """
    tf = _tf()
    env: Dict[str, object] = {}
    for v, t in zip(graph.inputs, inputs):
        env[v.name] = t
    for node in graph.topological_order():
        args = []
        for v in node.inputs:
            if v.is_const:
                # weights are read from .const by the lowering; other constant operands become TF constants
                args.append(tf.constant(v.const))
            else:
                args.append(env[v.name])
        with tf.name_scope(_scope_name(node.name)):
            env[node.output.name] = _lower_node(node, args, quantize)
    outs = [env[v.name] if not v.is_const else tf.constant(v.const) for v in graph.outputs]
    if taps is None:
        return outs
    return outs, {name: env[name] for name in taps}
