"""Static analysis: which channels of which values are constant whatever the input.

A channel is constant when its producer cannot see the input: a layer output channel whose weights are all zero
(or below ``zero_tol`` times the layer's largest weight: dead channels trained to ``1e-13`` rather than 0) or read
only constant input channels. Constants pass through channel-wise ops:

* ``Relu``, ``Clip``, ``BatchNorm``, ``Minimum``/``Add``/``Mul`` with a constant operand: the value is mapped;
* ``Pad``: a channel stays constant only when it equals the pad value (a non-zero constant padded with zeros is
  not spatially constant at the borders);
* a layer reading a constant input channel: constant ``0`` contributes nothing; a non-zero constant contributes
  ``v * sum of taps`` only when the layer reads no padding (:func:`qfrewrite.ir.padding_free`), otherwise the
  output varies at the borders and the channel is not constant;
* pools, ``GlobalMean``, and reshapes that keep the channel axis: kept.

Everything else (``Add`` of two tensors, ``Concat``, ``FakeQuant`` ...) makes no constant claim.

Bounds: each channel also carries an interval ``[lo, hi]`` that holds for every input, started by clips (ReLU6
bounds its output to ``[0, 6]``) and carried through layers by interval arithmetic (zero padding read as a 0). A clip
whose input can never reach above its lower bound (a ReLU after a channel whose largest possible pre-activation is
below 0: weights of ``1e-8`` against a bias of ``-1.3``) outputs a constant, found without any tolerance on weights.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from ..ir import (WEIGHTED_OPS, Graph, Node, Op, bn_affine, const_operand, keeps_channel_axis, layer_kind,
                  padding_free, per_channel_constant)
from ..numerics.kernels import n_out, out_channels_last

__all__ = ["ConstChannels", "Bounds", "constant_channels", "value_bounds", "reads_mask", "propagate",
           "propagate_bounds", "constants_from_bounds", "merge", "dead_out_channels"]

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
    kind = layer_kind(node)
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


def propagate(node: Node, cin: Optional[ConstChannels], zero_tol: float = 0.0) -> Optional[ConstChannels]:
    """The constant channels of ``node``'s output given those of its first input (``None``: none constant)."""
    op = node.op
    if op in WEIGHTED_OPS:
        return _layer(node, cin, zero_tol)
    if cin is None:
        return None
    mask, vals = cin
    if op is Op.RELU:
        return mask, np.maximum(vals, 0.0)
    if op is Op.CLIP:
        return mask, _clip(vals, node.attrs.lo, node.attrs.hi)
    if op is Op.BATCH_NORM:
        scale, shift, _ = bn_affine(node)
        return mask, vals * scale + shift
    if op in (Op.MINIMUM, Op.ADD, Op.MUL):
        x, c = const_operand(node)
        if x is None or x is not node.inputs[0]:
            return None
        vec = per_channel_constant(c.const, len(mask))
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
    if keeps_channel_axis(node):
        return cin
    return None


def value_bounds(graph: Graph) -> Dict[str, "Bounds"]:
    """Per-channel interval bounds of every value that has some (see the module docstring), keyed by value name."""
    bounds: Dict[str, Bounds] = {}
    for node in graph.topological_order():
        if node.inputs:
            b = propagate_bounds(node, bounds.get(node.inputs[0].name))
            if b is not None:
                bounds[node.output.name] = b
    return bounds


def constant_channels(graph: Graph, zero_tol: float = 0.0) -> Dict[str, ConstChannels]:
    """Constant channels of every value that has some, keyed by value name."""
    out: Dict[str, ConstChannels] = {}
    bounds: Dict[str, Bounds] = {}
    for node in graph.topological_order():
        if not node.inputs:
            continue
        b = propagate_bounds(node, bounds.get(node.inputs[0].name))
        if b is not None:
            bounds[node.output.name] = b
        res = merge(propagate(node, out.get(node.inputs[0].name), zero_tol), constants_from_bounds(b))
        if res is not None:
            out[node.output.name] = res
    return out


#: ``(lo, hi)`` per channel, possibly infinite: every value of channel ``c`` lies in ``[lo[c], hi[c]]``.
Bounds = Tuple[np.ndarray, np.ndarray]

#: relative widening of a layer's output bounds, covering float32 accumulation error
_ROUNDING = 1e-5


def _unbounded(n: int) -> Bounds:
    return np.full(n, -np.inf), np.full(n, np.inf)


def _layer_bounds(node: Node, bin: Bounds) -> Optional[Bounds]:
    """Interval arithmetic through a layer: ``y = b + sum w x`` with each ``x`` in its channel's bounds."""
    kind = layer_kind(node)
    lo, hi = (np.asarray(a, np.float64) for a in bin)
    if not padding_free(node):  # zero padding is read as an input value
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    k = np.asarray(node.weight.const, np.float64)
    if kind == "dense":
        k = k[None, None]
    pos, neg = np.maximum(k, 0.0), np.minimum(k, 0.0)

    def dot(w, x):  # sum of w * x over taps and inputs, with 0 * inf = 0
        prod = np.where(w == 0, 0.0, w * x[None, None, :, None])
        return prod.sum(axis=(0, 1)) if kind == "depthwise" else prod.sum(axis=(0, 1, 2))

    with np.errstate(invalid="ignore"):
        top = dot(pos, hi) + dot(neg, lo)
        bot = dot(pos, lo) + dot(neg, hi)
        mag = dot(np.abs(k), np.maximum(np.abs(lo), np.abs(hi)))
    top, bot, mag = (a.reshape(-1) for a in (top, bot, mag))
    b = node.bias.const.astype(np.float64) if node.bias is not None else np.zeros_like(top)
    slack = _ROUNDING * (np.abs(b) + mag)
    return b + bot - slack, b + top + slack


def propagate_bounds(node: Node, bin: Optional[Bounds]) -> Optional[Bounds]:
    """Per-channel bounds of ``node``'s output from those of its first input (``None``: unknown everywhere)."""
    op = node.op
    n = node.output.shape[-1]
    if n is None:
        return None
    if op is Op.CLIP:
        lo, hi = bin if bin is not None else _unbounded(n)
        return _clip(lo, node.attrs.lo, node.attrs.hi), _clip(hi, node.attrs.lo, node.attrs.hi)
    if op is Op.RELU:
        lo, hi = bin if bin is not None else _unbounded(n)
        return np.maximum(lo, 0.0), np.maximum(hi, 0.0)
    if op is Op.MINIMUM:
        x, c = const_operand(node)
        vec = None if x is None or x is not node.inputs[0] else per_channel_constant(c.const, n)
        if vec is None:
            return None
        lo, hi = bin if bin is not None else _unbounded(n)
        return np.minimum(lo, vec), np.minimum(hi, vec)
    if bin is None:
        return None
    lo, hi = bin
    if op in WEIGHTED_OPS:
        return _layer_bounds(node, bin)
    if op in (Op.BATCH_NORM, Op.ADD, Op.MUL):
        if op is Op.BATCH_NORM:
            scale, shift, _ = bn_affine(node)
        else:
            x, c = const_operand(node)
            vec = None if x is None or x is not node.inputs[0] else per_channel_constant(c.const, n)
            if vec is None:
                return None
            scale, shift = (vec, np.zeros(n)) if op is Op.MUL else (np.ones(n), vec)
        with np.errstate(invalid="ignore"):
            a = np.where(scale == 0, 0.0, lo * scale) + shift
            b = np.where(scale == 0, 0.0, hi * scale) + shift
        return np.minimum(a, b), np.maximum(a, b)
    if op is Op.PAD:
        v = node.attrs.value
        return np.minimum(lo, v), np.maximum(hi, v)
    if op in (Op.AVG_POOL, Op.MAX_POOL, Op.GLOBAL_MEAN):
        if op is Op.AVG_POOL and node.attrs.padding not in ("SAME", "VALID"):
            return np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        return bin
    if keeps_channel_axis(node):
        return bin
    return None


def constants_from_bounds(bounds: Optional[Bounds]) -> Optional[ConstChannels]:
    """Channels whose bounds pin a single value (a clip that the input can never leave on one side)."""
    if bounds is None:
        return None
    lo, hi = bounds
    mask = np.isfinite(lo) & (lo == hi)
    return (mask, np.where(mask, lo, 0.0)) if mask.any() else None


def merge(a: Optional[ConstChannels], b: Optional[ConstChannels]) -> Optional[ConstChannels]:
    if a is None:
        return b
    if b is None:
        return a
    mask = a[0] | b[0]
    return mask, np.where(a[0], a[1], b[1])
