"""Per-op traits: what every pass, analysis and emitter needs to know about an op, defined once.

* **weighted**: Conv2D, DepthwiseConv2D and Dense hold a constant kernel as their second input and produce output
  channels on the last axis (:func:`is_weighted`, :func:`layer_kind`).
* **channel-wise**: output channel ``c`` depends on input channel ``c`` of the first input only (and on constants):
  element-wise unary ops, BatchNorm, Normalize, FakeQuant, an Add/Mul/Minimum whose other operand is a scalar or
  per-channel constant, Pad, pools, GlobalMean, and reshapes that keep the channel axis (:func:`is_channelwise`).
  A constant channel stays constant through these (its value mapped), and a channel that nobody reads past them is
  unused.
* **positively homogeneous**: ``f(x / s) = f(x) / s`` per channel for every ``s > 0``: ReLU, ``Clip(0, None)``,
  zero Pad, pools, GlobalMean, channel-keeping reshapes (:func:`is_positively_homogeneous`). ``Clip(0, hi)`` and a
  Minimum with a constant are homogeneous once their bound is divided by ``s`` too (``rescaling_bounds=True``):
  ``min(relu(x), hi) / s = min(relu(x / s), hi / s)``.
* **keeps the channel axis**: a Reshape/Flatten whose input and output hold the channels on the last axis with every
  other non-batch dimension 1 (:func:`keeps_channel_axis`), e.g. ``(N, 1, 1, C) -> (N, C)``.
* **copies channel values**: output channel ``c`` holds exactly the values of input channel ``c``, and for a Pad
  with padding its constant (:func:`copies_channel_values`): a channel-keeping reshape, a constant Pad. Its per-channel
  extremes and mean map follow from its input's without looking at the data.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .ops import WEIGHTED_OPS, Op
from .queries import const_operand

__all__ = ["WEIGHTED_OPS", "LAYER_KINDS", "is_weighted", "layer_kind", "keeps_channel_axis", "is_channelwise",
           "is_positively_homogeneous", "per_channel_constant", "copies_channel_values"]

#: The kernel layout of each weighted op, as the maths in :mod:`qfrewrite.numerics.kernels` names it.
LAYER_KINDS = {Op.CONV2D: "conv", Op.DEPTHWISE_CONV2D: "depthwise", Op.DENSE: "dense"}

_UNARY_CHANNELWISE = frozenset({Op.RELU, Op.CLIP, Op.HARD_SWISH, Op.HARD_SIGMOID, Op.SIGMOID, Op.BATCH_NORM,
                                Op.NORMALIZE, Op.FAKE_QUANT, Op.PAD, Op.AVG_POOL, Op.MAX_POOL, Op.GLOBAL_MEAN})
_BINARY_WITH_CONSTANT = frozenset({Op.ADD, Op.MUL, Op.MINIMUM})
_RESHAPES = frozenset({Op.RESHAPE, Op.FLATTEN})


def is_weighted(node_or_op) -> bool:
    """True for Conv2D, DepthwiseConv2D and Dense (a node or an :class:`Op`)."""
    return getattr(node_or_op, "op", node_or_op) in WEIGHTED_OPS


def layer_kind(node) -> str:
    """``"conv"``, ``"depthwise"`` or ``"dense"``: the kernel layout of a weighted node."""
    return LAYER_KINDS[node.op]


def keeps_channel_axis(node) -> bool:
    """A Reshape/Flatten that keeps the channels on the last axis (every other non-batch dim 1 on both sides)."""
    if node.op not in _RESHAPES:
        return False
    ins, outs = node.inputs[0].shape, node.output.shape
    return all(d == 1 for d in ins[1:-1]) and all(d == 1 for d in outs[1:-1]) and ins[-1] == outs[-1]


def per_channel_constant(const, channels: Optional[int]) -> Optional[np.ndarray]:
    """A constant operand as one value per channel (float64), or ``None`` when it is neither a scalar nor a vector
    along the last axis of ``channels`` entries."""
    c = np.asarray(const, np.float64)
    if c.size == 1:
        return np.full(int(channels or 1), float(c.reshape(-1)[0]))
    if channels is not None and c.size == channels and c.shape[-1] == channels:
        return c.reshape(-1)
    return None


def _constant_operand_is_per_channel(node) -> bool:
    x, c = const_operand(node)
    return x is node.inputs[0] and per_channel_constant(c.const, x.shape[-1]) is not None


def is_channelwise(node) -> bool:
    """Output channel ``c`` depends on channel ``c`` of the first input only (see the module docstring)."""
    op = node.op
    if op in _UNARY_CHANNELWISE:
        return True
    if op in _BINARY_WITH_CONSTANT:
        return len(node.inputs) == 2 and _constant_operand_is_per_channel(node)
    if op in _RESHAPES:
        return keeps_channel_axis(node)
    return False


def is_positively_homogeneous(node, rescaling_bounds: bool = False) -> bool:
    """``f(x / s) = f(x) / s`` per channel for ``s > 0``; with ``rescaling_bounds`` also ``Clip(0, hi)`` and a
    per-channel constant Minimum, whose bounds are then divided by ``s`` as well."""
    op, a = node.op, node.attrs
    if op in (Op.RELU, Op.AVG_POOL, Op.MAX_POOL, Op.GLOBAL_MEAN):
        return True
    if op is Op.PAD:
        return a.value == 0.0
    if op in _RESHAPES:
        return keeps_channel_axis(node)
    if op is Op.CLIP:
        return a.lo == 0.0 and (a.hi is None or rescaling_bounds)
    if op is Op.MINIMUM:
        return rescaling_bounds and len(node.inputs) == 2 and _constant_operand_is_per_channel(node)
    return False


def copies_channel_values(node) -> bool:
    """Output channel ``c`` holds the values of input channel ``c`` and nothing else, but for a Pad its constant
    where it pads: a channel-keeping Reshape/Flatten, a constant Pad of H and W (see the module docstring)."""
    return node.op is Op.PAD or keeps_channel_axis(node)
