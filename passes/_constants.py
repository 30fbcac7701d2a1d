"""Static analysis: which channels of which values are constant whatever the input.

A channel is constant when its producer cannot see the input: a layer output channel whose weights are all zero
(or below ``zero_tol`` times the layer's largest weight: dead channels trained to ``1e-13`` rather than 0) or read
only constant input channels. Constants pass through channel-wise ops:

* ``Relu``, ``Clip``, ``BatchNorm``, ``Minimum``/``Add``/``Mul`` with a constant operand: the value is mapped;
* ``Pad``: a channel stays constant only when it equals the pad value (a non-zero constant padded with zeros is
  not spatially constant at the borders);
* a layer reading a constant input channel: constant ``0`` contributes nothing; a non-zero constant contributes
  ``v * sum of taps`` only when the layer reads no padding (:func:`passes._layers.padding_free`), otherwise the
  output varies at the borders and the channel is not constant;
* pools, ``GlobalMean``, and reshapes that keep the channel axis: kept.

Everything else (``Add`` of two tensors, ``Concat``, ``FakeQuant`` ...) makes no constant claim.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from qfrewrite.ir import Graph, Node, Op
from qfrewrite.numerics.batchnorm import bn_scale_shift
from qfrewrite.numerics.kernels import n_out, out_channels_last

from ._layers import LAYER_OPS, const_operand, kind_of, padding_free

__all__ = ["ConstChannels", "constant_channels", "reads_mask", "propagate", "dead_out_channels"]

#: ``(mask, values)``: ``mask[c]`` is True where channel ``c`` is constant, with value ``values[c]``.
ConstChannels = Tuple[np.ndarray, np.ndarray]


def dead_out_channels(kernel: np.ndarray, kind: str, zero_tol: float) -> np.ndarray:
    """Output channels whose weights are all (nearly) zero."""
    mag = np.abs(out_channels_last(kernel, kind)).max(axis=0)
    top = mag.max() if mag.size else 0.0
    return mag <= zero_tol * top


def reads_mask(kernel: np.ndarray, kind: str, zero_tol: float) -> np.ndarray:
    """``(I, O)`` (conv, dense) or ``(C, M)`` (depthwise): where a weight is above the zero tolerance."""
    k = np.abs(np.asarray(kernel))
    thr = zero_tol * (k.max() if k.size else 0.0)
    if kind == "dense":
        return k > thr
    return (k > thr).any(axis=(0, 1))


def _layer(node: Node, cin: Optional[ConstChannels], zero_tol: float) -> Optional[ConstChannels]:
    kind = kind_of(node)
    k = node.weight.const
    b = node.bias.const.astype(np.float64) if node.bias is not None else np.zeros(n_out(k, kind))
    reads = reads_mask(k, kind, zero_tol)
    c_in = reads.shape[0]
    if cin is None:
        usable = np.zeros(c_in, bool)
        vals = np.zeros(c_in)
    else:
        usable = cin[0] & ((cin[1] == 0) | padding_free(node))
        vals = np.where(usable, cin[1], 0.0)
    if kind == "depthwise":
        sums = np.asarray(k, np.float64).sum(axis=(0, 1))
        const = (~reads) | usable[:, None]
        value = b + (sums * vals[:, None]).reshape(-1)
        mask = const.reshape(-1)
    else:
        sums = np.asarray(k, np.float64) if kind == "dense" else np.asarray(k, np.float64).sum(axis=(0, 1))
        mask = ~(reads & ~usable[:, None]).any(axis=0)
        value = b + vals @ sums
    if not mask.any():
        return None
    return mask, np.where(mask, value, 0.0)


def _clip(v, lo, hi):
    if lo is not None:
        v = np.maximum(v, lo)
    if hi is not None:
        v = np.minimum(v, hi)
    return v


def _channel_vec(const: np.ndarray, channels: int) -> Optional[np.ndarray]:
    c = np.asarray(const, np.float64)
    if c.size == 1:
        return np.full(channels, float(c.reshape(-1)[0]))
    if c.size == channels and c.shape[-1] == channels:
        return c.reshape(-1)
    return None


def propagate(node: Node, cin: Optional[ConstChannels], zero_tol: float = 0.0) -> Optional[ConstChannels]:
    """The constant channels of ``node``'s output given those of its first input (``None``: none constant)."""
    op = node.op
    if op in LAYER_OPS:
        return _layer(node, cin, zero_tol)
    if cin is None:
        return None
    mask, vals = cin
    if op is Op.RELU:
        return mask, np.maximum(vals, 0.0)
    if op is Op.CLIP:
        return mask, _clip(vals, node.attrs.lo, node.attrs.hi)
    if op is Op.BATCH_NORM:
        gamma, beta, mean, var = (v.const for v in node.inputs[1:5])
        scale, shift, _ = bn_scale_shift(gamma, beta, mean, var, node.attrs.epsilon)
        return mask, vals * scale + shift
    if op in (Op.MINIMUM, Op.ADD, Op.MUL):
        x, c = const_operand(node)
        if x is None or x is not node.inputs[0]:
            return None
        vec = _channel_vec(c.const, len(mask))
        if vec is None:
            return None
        f = {Op.MINIMUM: np.minimum, Op.ADD: np.add, Op.MUL: np.multiply}[op]
        return mask, f(vals, vec)
    if op is Op.PAD:
        keep = mask & (vals == node.attrs.value)
        return (keep, np.where(keep, vals, 0.0)) if keep.any() else None
    if op in (Op.AVG_POOL, Op.MAX_POOL):
        if node.attrs.padding in ("SAME", "VALID") or op is Op.MAX_POOL:
            return cin
        keep = mask & (vals == 0)
        return (keep, np.zeros_like(vals)) if keep.any() else None
    if op is Op.GLOBAL_MEAN:
        return cin
    if op in (Op.RESHAPE, Op.FLATTEN):
        ins, outs = node.inputs[0].shape, node.output.shape
        if all(d == 1 for d in ins[1:-1]) and all(d == 1 for d in outs[1:-1]) and ins[-1] == outs[-1]:
            return cin
        return None
    return None


def constant_channels(graph: Graph, zero_tol: float = 0.0) -> Dict[str, ConstChannels]:
    """Constant channels of every value that has some, keyed by value name."""
    out: Dict[str, ConstChannels] = {}
    for node in graph.topological_order():
        if not node.inputs:
            continue
        res = propagate(node, out.get(node.inputs[0].name), zero_tol)
        if res is not None:
            out[node.output.name] = res
    return out
