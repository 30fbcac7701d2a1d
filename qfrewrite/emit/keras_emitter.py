"""Keras emission: IR graph -> a float Keras 3 functional model with the same function, ready for fine-tuning.

Every node becomes standard Keras layers (no custom classes, no Lambda), so the model saves as ``.keras`` and loads
back anywhere, also through :func:`qfrewrite.load`:

* Conv2D / DepthwiseConv2D / Dense -> the same layer with the IR's kernel and bias (layouts are Keras's own);
  explicit padding equal to TensorFlow's SAME -> ``padding="same"``, other explicit padding -> ``ZeroPadding2D``
  then ``"valid"``;
* BatchNorm -> ``BatchNormalization(epsilon)`` with the same gamma, beta, moving mean and variance;
* Relu / Clip -> ``ReLU(max_value)``; a clip with other bounds ``max(x, lo)`` / ``min(x, hi)`` is written with
  ``Rescaling`` (shift, sign flip) around a ``ReLU``: ``max(x, lo) = relu(x - lo) + lo`` and
  ``min(x, hi) = hi - relu(hi - x)``; Minimum with a constant (the per-channel clip) the same way;
* HardSigmoid / HardSwish / Sigmoid / Softmax -> ``Activation`` / ``Softmax`` (Keras 3's ``hard_sigmoid`` is
  ``relu6(x + 3) / 6`` and ``hard_silu`` is ``x * relu6(x + 3) / 6``, as in the IR);
* Add / Mul of two tensors -> ``Add`` / ``Multiply``; with a scalar or per-channel constant -> ``Rescaling``;
* Pad (zero) -> ``ZeroPadding2D``; AveragePool / MaxPool -> the Keras pooling layers (explicit padding on an
  average pool as ``ZeroPadding2D`` + ``"valid"``, which counts the padded zeros as the IR does);
* GlobalMean, Reshape, Flatten, Concat, Normalize (``Rescaling``) -> their Keras layers.

FakeQuant nodes and ``weight_quant`` annotations are dropped: the model is the float function of the graph.

For training (:mod:`qfrewrite.finetune`): ``logits=True`` emits each graph output that a Softmax produces as that
Softmax's input (the logits), so a distillation loss sees an unsaturated signal; ``batchnorm_after`` names layers
after which a ``BatchNormalization`` is inserted, initialised to the identity (gamma 1, beta 0, moving mean 0,
moving variance ``1 - eps``: ``(x - 0) / sqrt(1 - eps + eps) * 1 + 0 = x``), so the emitted model still computes the
graph's function until its statistics are set or trained; the layer is named ``<layer>_bn`` (``<layer>_bn1`` ... when
the graph has a node of that name, which keeps its own).
Layer names are the node names with ``/`` replaced by ``__`` (Keras forbids ``/``).
Not emitted (``EmitError`` naming the node): non-zero Pad values, MaxPool with explicit non-SAME padding, constants
that are neither scalars nor per-channel vectors, constant graph outputs.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, Iterable, Optional

import numpy as np

from ..errors import EmitError
from ..ir import Graph, Node, Op, Value, resolve_pads, same_pads

__all__ = ["emit_keras", "keras_layer_name"]

log = logging.getLogger(__name__)


def keras_layer_name(node_name: str) -> str:
    """The Keras layer name of an IR node (``/`` -> ``__``, other characters Keras refuses -> ``_``), before
    de-duplication."""
    return re.sub(r"[^0-9A-Za-z_.\-]", "_", node_name.replace("/", "__")) or "layer"


class _Names:
    def __init__(self):
        self.used = set()

    def __call__(self, base: str) -> str:
        name = keras_layer_name(base)
        out, i = name, 1
        while out in self.used:
            out = f"{name}_{i}"
            i += 1
        self.used.add(out)
        return out


def _conv_padding(node: Node, padding, kernel, strides, dilations=(1, 1)):
    """("same"|"valid", explicit pads to apply first or None)."""
    if padding in ("SAME", "VALID"):
        return padding.lower(), None
    x_shape = node.inputs[0].shape
    pads = resolve_pads(padding, x_shape[1:3], kernel, strides, dilations)
    if pads == ((0, 0), (0, 0)):
        return "valid", None
    h, w = x_shape[1], x_shape[2]
    if h is not None and w is not None:
        same = (same_pads(h, kernel[0], strides[0], dilations[0]), same_pads(w, kernel[1], strides[1], dilations[1]))
        if tuple(map(tuple, same)) == tuple(map(tuple, pads)):
            return "same", None
    return "valid", tuple(tuple(int(p) for p in pair) for pair in pads)


def _channel_const(node: Node, v: Value, channels: Optional[int]):
    """A constant operand as a float (scalar) or a list over the last axis; EmitError for anything else."""
    c = np.asarray(v.const, np.float32)
    if c.size == 1:
        return float(c.reshape(-1)[0])
    if c.ndim >= 1 and all(d == 1 for d in c.shape[:-1]) and (channels is None or c.shape[-1] == channels):
        return [float(t) for t in c.reshape(-1)]
    raise EmitError(f"{node.name}: {node.op.value} with a constant of shape {c.shape} cannot be emitted as a Keras "
                    "layer (supported: scalars and per-channel vectors)")


def _neg(c):
    return [-t for t in c] if isinstance(c, list) else -c


class _Emitter:
    def __init__(self, graph: Graph, logits: bool = False, batchnorm_after: Iterable[str] = ()):
        import keras

        self.keras = keras
        self.L = keras.layers
        self.graph = graph
        self.names = _Names()
        self.dropped = 0
        self.logits = logits
        self.batchnorm_after = set(batchnorm_after)
        unknown = self.batchnorm_after - {n.name for n in graph.nodes}
        if unknown:
            raise EmitError(f"batchnorm_after names no layer of graph {graph.name!r}: {sorted(unknown)}")

    def apply(self, cls, node: Node, x, suffix: str = "", weights=None, **kw):
        layer = cls(name=self.names(node.name + suffix), **kw)
        y = layer(x)
        if weights is not None:
            layer.set_weights([np.asarray(w, np.float32) for w in weights])
        return y

    # clip helpers: max(x, lo) = relu(x - lo) + lo ; min(x, hi) = hi - relu(hi - x)
    def clip(self, node: Node, x, lo, hi):
        L = self.L
        if lo is None and hi is None:
            return x
        if isinstance(lo, (int, float)) and lo == 0.0:
            return self.apply(L.ReLU, node, x, max_value=None if hi is None else float(hi))
        if lo is None:
            y = self.apply(L.Rescaling, node, x, "/flip", scale=-1.0, offset=hi)
            y = self.apply(L.ReLU, node, y, "/relu")
            return self.apply(L.Rescaling, node, y, scale=-1.0, offset=hi)
        y = self.apply(L.Rescaling, node, x, "/shift", scale=1.0, offset=_neg(lo))
        y = self.apply(L.ReLU, node, y, "/relu", max_value=None if hi is None else float(hi - lo))
        return self.apply(L.Rescaling, node, y, scale=1.0, offset=lo)

    def min_const(self, node: Node, x, c):
        L = self.L
        y = self.apply(L.Rescaling, node, x, "/flip", scale=-1.0, offset=c)
        y = self.apply(L.ReLU, node, y, "/relu")
        return self.apply(L.Rescaling, node, y, scale=-1.0, offset=c)

    def binary(self, node: Node, env: Dict[str, object]):
        L = self.L
        a, b = node.inputs
        if not a.is_const and not b.is_const:
            cls = {Op.ADD: L.Add, Op.MUL: L.Multiply, Op.MINIMUM: L.Minimum}[node.op]
            return self.apply(cls, node, [env[a.name], env[b.name]])
        if a.is_const and b.is_const:
            raise EmitError(f"{node.name}: {node.op.value} of two constants (fold it before emitting)")
        x, c = (a, b) if b.is_const else (b, a)
        c = _channel_const(node, c, node.output.shape[-1])
        if node.op is Op.ADD:
            return self.apply(L.Rescaling, node, env[x.name], scale=1.0, offset=c)
        if node.op is Op.MUL:
            return self.apply(L.Rescaling, node, env[x.name], scale=c, offset=0.0)
        return self.min_const(node, env[x.name], c)

    def node(self, node: Node, env: Dict[str, object]):
        L, op, a = self.L, node.op, node.attrs
        x = env.get(node.inputs[0].name) if node.inputs and not node.inputs[0].is_const else None
        if op in (Op.CONV2D, Op.DEPTHWISE_CONV2D):
            k = node.weight.const
            mode, pads = _conv_padding(node, a.padding, k.shape[:2], a.strides, a.dilations)
            if pads is not None:
                x = self.apply(L.ZeroPadding2D, node, x, "/pad", padding=pads)
            weights = [k] + ([node.bias.const] if node.bias is not None else [])
            common = dict(kernel_size=tuple(k.shape[:2]), strides=tuple(a.strides), padding=mode,
                          dilation_rate=tuple(a.dilations), use_bias=node.bias is not None)
            if op is Op.CONV2D:
                return self.apply(L.Conv2D, node, x, weights=weights, filters=int(k.shape[3]), **common)
            return self.apply(L.DepthwiseConv2D, node, x, weights=weights, depth_multiplier=int(k.shape[3]),
                              **common)
        if op is Op.DENSE:
            k = node.weight.const
            weights = [k] + ([node.bias.const] if node.bias is not None else [])
            return self.apply(L.Dense, node, x, weights=weights, units=int(k.shape[1]),
                              use_bias=node.bias is not None)
        if op is Op.BATCH_NORM:
            weights = [v.const for v in node.inputs[1:5]]
            return self.apply(L.BatchNormalization, node, x, weights=weights, axis=-1, epsilon=float(a.epsilon))
        if op is Op.RELU:
            return self.apply(L.ReLU, node, x)
        if op is Op.CLIP:
            return self.clip(node, x, a.lo, a.hi)
        if op is Op.HARD_SWISH:
            return self.apply(L.Activation, node, x, activation="hard_silu")
        if op is Op.HARD_SIGMOID:
            return self.apply(L.Activation, node, x, activation="hard_sigmoid")
        if op is Op.SIGMOID:
            return self.apply(L.Activation, node, x, activation="sigmoid")
        if op in (Op.ADD, Op.MUL, Op.MINIMUM):
            return self.binary(node, env)
        if op is Op.PAD:
            if a.value != 0.0:
                raise EmitError(f"{node.name}: Pad with value {a.value} has no Keras layer (only zero padding)")
            return self.apply(L.ZeroPadding2D, node, x, padding=tuple(tuple(p) for p in a.pads))
        if op in (Op.AVG_POOL, Op.MAX_POOL):
            mode, pads = _conv_padding(node, a.padding, a.kernel, a.strides)
            if pads is not None:
                if op is Op.MAX_POOL:
                    raise EmitError(f"{node.name}: MaxPool with explicit padding {a.padding} has no Keras layer")
                x = self.apply(L.ZeroPadding2D, node, x, "/pad", padding=pads)
            cls = L.AveragePooling2D if op is Op.AVG_POOL else L.MaxPooling2D
            return self.apply(cls, node, x, pool_size=tuple(a.kernel), strides=tuple(a.strides), padding=mode)
        if op is Op.GLOBAL_MEAN:
            return self.apply(L.GlobalAveragePooling2D, node, x, keepdims=bool(a.keepdims))
        if op is Op.RESHAPE:
            return self.apply(L.Reshape, node, x, target_shape=tuple(int(d) for d in a.shape))
        if op is Op.FLATTEN:
            return self.apply(L.Flatten, node, x)
        if op is Op.SOFTMAX:
            return self.apply(L.Softmax, node, x, axis=int(a.axis))
        if op is Op.NORMALIZE:
            scale = [float(s) for s in a.scale] if len(a.scale) > 1 else float(a.scale[0])
            offset = [float(s) for s in a.offset] if len(a.offset) > 1 else float(a.offset[0])
            return self.apply(L.Rescaling, node, x, scale=scale, offset=offset)
        if op is Op.CONCAT:
            return self.apply(L.Concatenate, node, [env[v.name] for v in node.inputs], axis=int(a.axis))
        if op is Op.FAKE_QUANT:
            self.dropped += 1
            return x
        raise EmitError(f"{node.name}: no Keras layer for {op.value}")

    def identity_batchnorm(self, node: Node, x):
        eps = 1e-3
        channels = int(node.output.shape[-1])
        ones, zeros = np.ones(channels, np.float32), np.zeros(channels, np.float32)
        taken = {keras_layer_name(n.name) for n in self.graph.nodes}  # the graph's own layers keep their names
        suffix, i = "_bn", 1
        while keras_layer_name(node.name + suffix) in taken:
            suffix, i = f"_bn{i}", i + 1
        return self.apply(self.L.BatchNormalization, node, x, suffix, axis=-1, epsilon=eps,
                          weights=[ones, zeros, zeros, ones - np.float32(eps)])

    def run(self):
        keras = self.keras
        env: Dict[str, object] = {}
        inputs = []
        for v in self.graph.inputs:
            t = keras.Input(shape=tuple(v.shape[1:]), name=self.names(v.name))
            env[v.name] = t
            inputs.append(t)
        for node in self.graph.topological_order():
            if node.weight_quant is not None:
                self.dropped += 1
            try:
                env[node.output.name] = self.node(node, env)
                if node.name in self.batchnorm_after:
                    env[node.output.name] = self.identity_batchnorm(node, env[node.output.name])
            except EmitError:
                raise
            except (ValueError, TypeError) as exc:  # Keras refuses a layer configuration
                raise EmitError(f"{node.name}: Keras refused the {node.op.value} layer ({exc})") from None
        outs = []
        for v in self.graph.outputs:
            if v.is_const:
                raise EmitError(f"graph output {v.name} is a constant; a Keras model needs computed outputs")
            if self.logits and v.producer is not None and v.producer.op is Op.SOFTMAX:
                v = v.producer.inputs[0]
            outs.append(env[v.name])
        model = keras.Model(inputs if len(inputs) > 1 else inputs[0], outs if len(outs) > 1 else outs[0],
                            name=self.names(self.graph.name))
        if self.dropped:
            log.info("emit_keras: dropped %d fake-quantization annotations (the Keras model is float)", self.dropped)
        return model


def emit_keras(graph: Graph, logits: bool = False, batchnorm_after: Iterable[str] = ()):
    """A float Keras 3 functional model computing the same function as ``graph`` (FakeQuant dropped).

    ``logits``: outputs produced by a Softmax are emitted as its input; ``batchnorm_after``: layer names after which
    an identity ``BatchNormalization`` is inserted (see the module docstring). The graph is not modified. Raises
    :class:`EmitError` naming the node that has no Keras equivalent.
    """
    if not graph.inputs:
        raise EmitError(f"graph {graph.name!r} has no inputs")
    return _Emitter(graph, logits, batchnorm_after).run()
