"""One converter per Keras layer class (and per Keras 3 op / Keras 2 ``TFOpLambda`` function) into IR nodes.

Every converter gets a :class:`LayerCall` (the layer's config, its input values, its weights on demand) and returns
the IR value of the layer's output. Conventions (NHWC, as Keras stores them):

* ``Conv2D`` kernel ``(kh, kw, c_in, c_out)``; ``DepthwiseConv2D`` kernel ``(kh, kw, C, M)`` (named ``kernel`` in
  Keras 3, ``depthwise_kernel`` in Keras 2); ``SeparableConv2D`` = depthwise (no bias) then a 1x1 conv with the bias,
  which is how TensorFlow computes it; ``Dense`` kernel ``(in, out)``. Padding ``same`` -> ``SAME``, ``valid`` ->
  ``VALID``. A fused ``activation=`` becomes its own node after the layer.
* ``BatchNormalization`` over the last axis with the source epsilon; ``center=False``/``scale=False`` give
  beta 0 / gamma 1.
* ``ReLU(max_value, negative_slope=0, threshold=0)`` -> ``Relu`` or ``Clip(0, max_value)``; other ReLU forms are
  refused.
* ``Rescaling(scale, offset)`` -> ``Normalize(scale, offset)``; ``Normalization(mean, variance)`` ->
  ``Normalize(1/max(sqrt(var), 1e-7), -mean/max(sqrt(var), 1e-7))`` (Keras divides by ``max(sqrt(var), epsilon)``);
  both only per channel on the last axis or scalar.
* Activations: ``linear``, ``relu``, ``relu6``, ``sigmoid``, ``softmax``, ``hard_sigmoid``, ``hard_silu`` /
  ``hard_swish``, ``silu`` / ``swish``. ``hard_sigmoid`` is ``relu6(x + 3) / 6`` in Keras 3 (-> ``HardSigmoid``) but
  ``clip(0.2 x + 0.5, 0, 1)`` in Keras 2 (-> ``Mul``, ``Add``, ``Clip(0, 1)``). ``silu`` = ``x * sigmoid(x)``.
* ``Dropout``-like layers are identities and make no node.
* Keras 3 ops on tensors (``x + 3.0`` in MobileNetV3) and Keras 2 ``TFOpLambda`` arithmetic become ``Add``/``Mul``
  with a constant (subtraction and division by a constant as adding the negation / multiplying by the reciprocal).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import ModelLoadError, UnsupportedOpError
from ..ir import (BatchNormAttrs, ClipAttrs, ConcatAttrs, ConvAttrs, GlobalMeanAttrs, Graph, NormalizeAttrs, Op,
                  PadAttrs, PoolAttrs, ReshapeAttrs, SoftmaxAttrs, Value)
from .keras_config import LayerSpec

__all__ = ["LayerCall", "convert_layer", "SUPPORTED_LAYERS", "SUPPORTED_ACTIVATIONS", "IDENTITY_LAYERS"]

log = logging.getLogger(__name__)

#: layers that are identities at inference
IDENTITY_LAYERS = frozenset({"Dropout", "SpatialDropout2D", "GaussianDropout", "GaussianNoise", "AlphaDropout",
                             "ActivityRegularization", "Identity"})
SUPPORTED_ACTIVATIONS = ("linear", "relu", "relu6", "sigmoid", "softmax", "hard_sigmoid", "hard_silu", "hard_swish",
                         "silu", "swish")


@dataclass
class LayerCall:
    """One call of one layer, as a converter sees it."""

    graph: Graph
    layer: LayerSpec
    name: str  # base name of the IR nodes (the layer name, prefixed by enclosing models)
    inputs: List[Value]
    args: List[Any]  # the call's positional args with input tensors replaced by IR values
    kwargs: Dict[str, Any]
    weights_fn: Callable[[], Dict[str, np.ndarray]]
    keras_major: int
    source: str
    meta: Dict[str, Any]

    @property
    def cfg(self) -> Dict[str, Any]:
        return self.layer.config

    def weights(self) -> Dict[str, np.ndarray]:
        if not hasattr(self, "_w"):
            self._w = self.weights_fn()
        return self._w

    def weight(self, *names: str, required: bool = True) -> Optional[np.ndarray]:
        w = self.weights()
        for n in names:
            if n in w:
                return w[n]
        if required:
            raise ModelLoadError(f"{self.source}: layer {self.name!r} ({self.layer.class_name}) has no weight "
                                 f"{' or '.join(repr(n) for n in names)} (found: {', '.join(sorted(w)) or 'none'})")
        return None

    def node(self, op: Op, inputs: Sequence[Value], attrs=None, suffix: str = "") -> Value:
        return self.graph.add_node(op, list(inputs), attrs, name=self.name + suffix, meta=dict(self.meta)).output

    def const(self, array, suffix: str) -> Value:
        return self.graph.const(np.asarray(array, np.float32), name=self.name + suffix)

    def unsupported(self, detail: str, op: Optional[str] = None):
        raise UnsupportedOpError(self.name, op or self.layer.class_name, supported_names(), source=self.source,
                                 detail=detail)

    def x(self) -> Value:
        if len(self.inputs) != 1:
            self.unsupported(f"expected one input tensor, got {len(self.inputs)}")
        return self.inputs[0]


# -- config helpers -----------------------------------------------------------------------------------------------
def _pair(v, what="value") -> tuple:
    if isinstance(v, (int, float)):
        return (int(v), int(v))
    v = tuple(int(i) for i in v)
    return v if len(v) == 2 else (v[0], v[0])


def _channels_last(c: LayerCall) -> None:
    fmt = c.cfg.get("data_format") or "channels_last"
    if fmt != "channels_last":
        c.unsupported(f"data_format={fmt!r}; only channels_last (NHWC) is supported")


def _padding(c: LayerCall) -> str:
    p = str(c.cfg.get("padding", "valid")).lower()
    if p not in ("same", "valid"):
        c.unsupported(f"padding={p!r}; supported: 'same', 'valid'")
    return p.upper()


def as_array(v) -> np.ndarray:
    """A config number, list, or serialized numpy/tensor value as a float32 array."""
    if isinstance(v, dict):
        cfg = v.get("config", {})
        if "value" in cfg:
            return np.asarray(cfg["value"], np.float32)
        raise ValueError(f"unreadable constant {v!r}")
    return np.asarray(v, np.float32)


def _per_channel(c: LayerCall, arr: np.ndarray, what: str) -> tuple:
    """A scalar or a vector over the last axis (any leading size-1 dims) as a tuple."""
    arr = np.asarray(arr, np.float32)
    if arr.ndim > 1 and any(d != 1 for d in arr.shape[:-1]):
        c.unsupported(f"{what} of shape {arr.shape}: only a scalar or one value per channel (last axis)")
    return tuple(float(v) for v in arr.reshape(-1))


# -- activations ---------------------------------------------------------------------------------------------------
def _activation_name(act) -> str:
    if act is None:
        return "linear"
    if isinstance(act, dict):  # a serialized activation function
        act = act.get("config", {}).get("name") or act.get("class_name")
    return str(act).lower()


def apply_activation(c: LayerCall, x: Value, act, suffix: str = "") -> Value:
    """Append the nodes of a named activation after ``x``."""
    name = _activation_name(act)
    if name == "linear":
        return x
    if name == "relu":
        return c.node(Op.RELU, [x], suffix=suffix)
    if name == "relu6":
        return c.node(Op.CLIP, [x], ClipAttrs(0.0, 6.0), suffix=suffix)
    if name == "sigmoid":
        return c.node(Op.SIGMOID, [x], suffix=suffix)
    if name == "softmax":
        return c.node(Op.SOFTMAX, [x], SoftmaxAttrs(-1), suffix=suffix)
    if name == "hard_sigmoid":
        if c.keras_major >= 3:
            return c.node(Op.HARD_SIGMOID, [x], suffix=suffix)
        # Keras 2: clip(0.2 x + 0.5, 0, 1)
        y = c.node(Op.MUL, [x, c.const(0.2, suffix + "/slope")], suffix=suffix + "/mul")
        y = c.node(Op.ADD, [y, c.const(0.5, suffix + "/offset")], suffix=suffix + "/add")
        return c.node(Op.CLIP, [y], ClipAttrs(0.0, 1.0), suffix=suffix)
    if name in ("hard_silu", "hard_swish"):
        return c.node(Op.HARD_SWISH, [x], suffix=suffix)
    if name in ("silu", "swish"):
        s = c.node(Op.SIGMOID, [x], suffix=suffix + "/sigmoid")
        return c.node(Op.MUL, [x, s], suffix=suffix)
    c.unsupported(f"activation {name!r}; supported activations: {', '.join(SUPPORTED_ACTIVATIONS)}",
                  op=f"{c.layer.class_name}(activation={name!r})")


def _fused_activation(c: LayerCall, y: Value) -> Value:
    return apply_activation(c, y, c.cfg.get("activation"), suffix="/activation")


# -- layers --------------------------------------------------------------------------------------------------------
def _conv_common(c: LayerCall):
    _channels_last(c)
    strides = _pair(c.cfg.get("strides", 1))
    dil = _pair(c.cfg.get("dilation_rate", 1))
    return ConvAttrs(strides=strides, padding=_padding(c), dilations=dil)


def _conv2d(c: LayerCall) -> Value:
    attrs = _conv_common(c)
    groups = int(c.cfg.get("groups", 1) or 1)
    if groups != 1:
        c.unsupported(f"groups={groups}; only groups=1 (use DepthwiseConv2D for depthwise convolutions)")
    k = c.weight("kernel")
    ins = [c.x(), c.const(k, "/kernel")]
    if c.cfg.get("use_bias", True):
        ins.append(c.const(c.weight("bias"), "/bias"))
    return _fused_activation(c, c.node(Op.CONV2D, ins, attrs))


def _depthwise(c: LayerCall) -> Value:
    attrs = _conv_common(c)
    k = c.weight("kernel", "depthwise_kernel")
    ins = [c.x(), c.const(k, "/kernel")]
    if c.cfg.get("use_bias", True):
        ins.append(c.const(c.weight("bias"), "/bias"))
    return _fused_activation(c, c.node(Op.DEPTHWISE_CONV2D, ins, attrs))


def _separable(c: LayerCall) -> Value:
    attrs = _conv_common(c)
    dk = c.weight("depthwise_kernel")
    pk = c.weight("pointwise_kernel")
    y = c.node(Op.DEPTHWISE_CONV2D, [c.x(), c.const(dk, "/depthwise_kernel")], attrs, suffix="/depthwise")
    ins = [y, c.const(pk, "/pointwise_kernel")]
    if c.cfg.get("use_bias", True):
        ins.append(c.const(c.weight("bias"), "/bias"))
    return _fused_activation(c, c.node(Op.CONV2D, ins, ConvAttrs()))


def _dense(c: LayerCall) -> Value:
    ins = [c.x(), c.const(c.weight("kernel"), "/kernel")]
    if c.cfg.get("use_bias", True):
        ins.append(c.const(c.weight("bias"), "/bias"))
    return _fused_activation(c, c.node(Op.DENSE, ins))


def _last_axis(c: LayerCall, axis, rank: int) -> None:
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    if len(axes) != 1 or int(axes[0]) % rank != rank - 1:
        c.unsupported(f"axis={axis!r}; only the last (channel) axis is supported")


def _batchnorm(c: LayerCall) -> Value:
    x = c.x()
    _last_axis(c, c.cfg.get("axis", -1), len(x.shape))
    ch = x.shape[-1]
    mean = c.weight("moving_mean")
    var = c.weight("moving_variance")
    n = mean.shape[0] if ch is None else ch
    gamma = c.weight("gamma") if c.cfg.get("scale", True) else np.ones(n, np.float32)
    beta = c.weight("beta") if c.cfg.get("center", True) else np.zeros(n, np.float32)
    ins = [x, c.const(gamma, "/gamma"), c.const(beta, "/beta"), c.const(mean, "/moving_mean"),
           c.const(var, "/moving_variance")]
    return c.node(Op.BATCH_NORM, ins, BatchNormAttrs(float(c.cfg.get("epsilon", 1e-3))))


def _relu(c: LayerCall) -> Value:
    slope = float(c.cfg.get("negative_slope", 0.0) or 0.0)
    thr = float(c.cfg.get("threshold", 0.0) or 0.0)
    mx = c.cfg.get("max_value")
    if slope != 0.0 or thr != 0.0:
        c.unsupported(f"negative_slope={slope}, threshold={thr}; only ReLU(max_value) with both 0 is supported",
                      op="ReLU")
    if mx is None:
        return c.node(Op.RELU, [c.x()])
    return c.node(Op.CLIP, [c.x()], ClipAttrs(0.0, float(as_array(mx))))


def _activation(c: LayerCall) -> Value:
    return apply_activation(c, c.x(), c.cfg.get("activation"))


def _softmax(c: LayerCall) -> Value:
    axis = c.cfg.get("axis", -1)
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            c.unsupported(f"axis={axis!r}; one axis only")
        axis = axis[0]
    return c.node(Op.SOFTMAX, [c.x()], SoftmaxAttrs(int(axis)))


def _zero_padding(c: LayerCall) -> Value:
    _channels_last(c)
    p = c.cfg.get("padding", 1)
    if isinstance(p, int):
        pads = ((p, p), (p, p))
    else:
        p = list(p)
        pads = tuple(_pair(q) if not isinstance(q, int) else (int(q), int(q)) for q in p)
        if len(pads) != 2:
            c.unsupported(f"padding={p!r}")
    return c.node(Op.PAD, [c.x()], PadAttrs(pads=tuple(tuple(q) for q in pads)))


def _global_avg(c: LayerCall) -> Value:
    _channels_last(c)
    return c.node(Op.GLOBAL_MEAN, [c.x()], GlobalMeanAttrs(keepdims=bool(c.cfg.get("keepdims", False))))


def _pool(op: Op):
    def convert(c: LayerCall) -> Value:
        _channels_last(c)
        size = _pair(c.cfg.get("pool_size", 2))
        strides = c.cfg.get("strides")
        strides = size if strides is None else _pair(strides)
        return c.node(op, [c.x()], PoolAttrs(kernel=size, strides=strides, padding=_padding(c)))
    return convert


def _reshape(c: LayerCall) -> Value:
    return c.node(Op.RESHAPE, [c.x()], ReshapeAttrs(tuple(int(d) for d in c.cfg["target_shape"])))


def _flatten(c: LayerCall) -> Value:
    _channels_last(c)
    return c.node(Op.FLATTEN, [c.x()])


def _chain(c: LayerCall, op: Op) -> Value:
    if len(c.inputs) < 2:
        c.unsupported(f"needs at least two inputs, got {len(c.inputs)}")
    y = c.inputs[0]
    for i, v in enumerate(c.inputs[1:]):
        last = i == len(c.inputs) - 2
        y = c.node(op, [y, v], suffix="" if last else f"/{op.value.lower()}_{i}")
    return y


def _subtract(c: LayerCall) -> Value:
    if len(c.inputs) != 2:
        c.unsupported(f"needs two inputs, got {len(c.inputs)}")
    neg = c.node(Op.MUL, [c.inputs[1], c.const(-1.0, "/minus_one")], suffix="/negate")
    return c.node(Op.ADD, [c.inputs[0], neg])


def _minimum(c: LayerCall) -> Value:
    return _chain(c, Op.MINIMUM)


def _concat(c: LayerCall) -> Value:
    if len(c.inputs) < 2:
        c.unsupported(f"needs at least two inputs, got {len(c.inputs)}")
    return c.node(Op.CONCAT, list(c.inputs), ConcatAttrs(int(c.cfg.get("axis", -1))))


def _rescaling(c: LayerCall) -> Value:
    scale = _per_channel(c, as_array(c.cfg.get("scale", 1.0)), "scale")
    offset = _per_channel(c, as_array(c.cfg.get("offset", 0.0)), "offset")
    return c.node(Op.NORMALIZE, [c.x()], NormalizeAttrs(scale, offset))


def _normalization(c: LayerCall) -> Value:
    x = c.x()
    axis = c.cfg.get("axis", -1)
    if axis is not None:
        _last_axis(c, axis, len(x.shape))
    if c.cfg.get("mean") is not None and c.cfg.get("variance") is not None:
        mean, var = as_array(c.cfg["mean"]), as_array(c.cfg["variance"])
    else:
        mean, var = c.weight("mean"), c.weight("variance")
    mean = np.asarray(_per_channel(c, mean, "mean"), np.float64)
    var = np.asarray(_per_channel(c, var, "variance"), np.float64)
    std = np.maximum(np.sqrt(var), 1e-7)
    if c.cfg.get("invert", False):
        scale, offset = std, mean
    else:
        scale, offset = 1.0 / std, -mean / std
    return c.node(Op.NORMALIZE, [x], NormalizeAttrs(tuple(float(v) for v in scale), tuple(float(v) for v in offset)))


def _identity(c: LayerCall) -> Value:
    return c.x()


# -- arithmetic with constants (Keras 3 ops, Keras 2 TFOpLambda) --------------------------------------------------
def _operands(c: LayerCall, fn: str) -> List[Any]:
    """The two operands of a binary op: IR values or numbers, from the args (and Keras 2's ``y=`` kwarg)."""
    ops: List[Any] = []

    def walk(a):
        if isinstance(a, Value):
            ops.append(a)
        elif isinstance(a, (int, float, np.number)) or (isinstance(a, dict) and "config" in a):
            ops.append(as_array(a))
        elif isinstance(a, (list, tuple)) and a and all(isinstance(e, (int, float)) for e in a):
            ops.append(as_array(a))
        elif isinstance(a, (list, tuple)):
            for e in a:
                walk(e)
        elif a is None:
            return
        else:
            c.unsupported(f"operand {a!r} of {fn}", op=fn)

    walk(c.args)
    for key in ("y", "x2", "b"):
        if key in c.kwargs:
            walk([c.kwargs[key]])
    if len(ops) != 2:
        c.unsupported(f"{fn} with {len(ops)} operands; two expected", op=fn)
    return ops


def _binary(kind: str):
    def convert(c: LayerCall) -> Value:
        fn = f"{c.layer.class_name}" if c.layer.is_op else f"TFOpLambda({c.cfg.get('function')})"
        a, b = _operands(c, fn)
        if not isinstance(a, Value) and not isinstance(b, Value):
            c.unsupported("both operands are constants", op=fn)
        if kind in ("sub", "div") and not isinstance(b, Value):
            b = -b if kind == "sub" else 1.0 / b
            op = Op.ADD if kind == "sub" else Op.MUL
        elif kind == "sub" and isinstance(b, Value):
            neg = c.node(Op.MUL, [b, c.const(-1.0, "/minus_one")], suffix="/negate")
            a, b, op = a, neg, Op.ADD
        elif kind == "div":
            c.unsupported("division by a tensor", op=fn)
        else:
            op = Op.ADD if kind == "add" else Op.MUL
        a = a if isinstance(a, Value) else c.const(a, "/const")
        b = b if isinstance(b, Value) else c.const(b, "/const")
        return c.node(op, [a, b])
    return convert


def _unary_activation(name: str):
    def convert(c: LayerCall) -> Value:
        return apply_activation(c, c.x(), name)
    return convert


CONVERTERS: Dict[str, Callable[[LayerCall], Value]] = {
    "Conv2D": _conv2d,
    "Convolution2D": _conv2d,
    "DepthwiseConv2D": _depthwise,
    "SeparableConv2D": _separable,
    "SeparableConvolution2D": _separable,
    "Dense": _dense,
    "BatchNormalization": _batchnorm,
    "ReLU": _relu,
    "Activation": _activation,
    "Softmax": _softmax,
    "ZeroPadding2D": _zero_padding,
    "GlobalAveragePooling2D": _global_avg,
    "AveragePooling2D": _pool(Op.AVG_POOL),
    "MaxPooling2D": _pool(Op.MAX_POOL),
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Add": lambda c: _chain(c, Op.ADD),
    "Multiply": lambda c: _chain(c, Op.MUL),
    "Subtract": _subtract,
    "Minimum": _minimum,
    "Concatenate": _concat,
    "Rescaling": _rescaling,
    "Normalization": _normalization,
    **{name: _identity for name in IDENTITY_LAYERS},
}

#: Keras 3 operations recorded in functional graphs (``keras.src.ops.numpy`` / ``keras.src.ops.nn``)
OP_CONVERTERS: Dict[str, Callable[[LayerCall], Value]] = {
    "Add": _binary("add"),
    "Subtract": _binary("sub"),
    "Multiply": _binary("mul"),
    "Divide": _binary("div"),
    "TrueDivide": _binary("div"),
    "Relu": _unary_activation("relu"),
    "Relu6": _unary_activation("relu6"),
    "Sigmoid": _unary_activation("sigmoid"),
    "HardSigmoid": _unary_activation("hard_sigmoid"),
    "HardSilu": _unary_activation("hard_silu"),
    "Silu": _unary_activation("silu"),
}

#: Keras 2 ``TFOpLambda`` functions
TFOP_CONVERTERS: Dict[str, Callable[[LayerCall], Value]] = {
    "__operators__.add": _binary("add"),
    "math.add": _binary("add"),
    "math.subtract": _binary("sub"),
    "__operators__.sub": _binary("sub"),
    "math.multiply": _binary("mul"),
    "__operators__.mul": _binary("mul"),
    "math.truediv": _binary("div"),
    "__operators__.truediv": _binary("div"),
    "nn.relu": _unary_activation("relu"),
    "nn.relu6": _unary_activation("relu6"),
    "math.sigmoid": _unary_activation("sigmoid"),
    "nn.silu": _unary_activation("silu"),
}

SUPPORTED_LAYERS = tuple(sorted(set(CONVERTERS) | {"InputLayer", "Functional", "Sequential", "Model"}))


def supported_names() -> List[str]:
    return list(SUPPORTED_LAYERS) + [f"keras.ops.{k}" for k in sorted(OP_CONVERTERS)] + \
        [f"TFOpLambda({k})" for k in sorted(TFOP_CONVERTERS)]


def convert_layer(c: LayerCall) -> Value:
    """The IR value of one layer call (raises :class:`UnsupportedOpError` for anything not listed above)."""
    layer = c.layer
    # Keras 3's legacy .h5 configs drop the "module" that tells ops from layers; an op such as ``x + 3.0`` is
    # called on a lone tensor, a merge layer (Add, Multiply ...) on a list of tensors.
    as_op = layer.is_op or (not layer.module and layer.class_name in OP_CONVERTERS
                            and (layer.class_name not in CONVERTERS or (c.args and isinstance(c.args[0], Value))))
    if as_op:
        fn = OP_CONVERTERS.get(layer.class_name)
        label = f"keras.ops.{layer.class_name}"
    elif layer.class_name in ("TFOpLambda", "SlicingOpLambda"):
        fn = TFOP_CONVERTERS.get(str(layer.config.get("function")))
        label = f"TFOpLambda({layer.config.get('function')})"
    else:
        fn = CONVERTERS.get(layer.class_name)
        label = layer.class_name
    if fn is None:
        raise UnsupportedOpError(c.name, label, supported_names(), source=c.source)
    return fn(c)
