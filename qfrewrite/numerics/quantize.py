"""Uniform affine fake quantization in numpy, matching TensorFlow's ``fake_quant_with_min_max_vars``.

For a range ``[lo, hi]`` and ``bits``: ``qmin = 1 if narrow_range else 0``,
``qmax = 2**bits - 1``, ``scale = (hi - lo) / (qmax - qmin)``, zero point ``z = round(qmin - lo / scale)`` clamped to
``[qmin, qmax]``, and the nudged range ``[(qmin - z) * scale, (qmax - z) * scale]``.
``fq(x) = scale * round((clip(x, lo', hi') - lo') / scale) + lo'``; the nudged range always holds 0 exactly.

Weights: symmetric, narrow range (``[-127, 127]`` codes) per tensor or per output channel.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..ir import FakeQuantAttrs, Node, layer_kind
from .kernels import out_channels_last

__all__ = ["nudge", "fake_quant_np", "symmetric_weight_attrs", "kernel_channels_last"]


def nudge(lo, hi, bits: int = 8, narrow_range: bool = False):
    """TensorFlow's range nudging: returns ``(nudged_lo, nudged_hi, scale)`` (arrays broadcast like lo/hi)."""
    lo = np.asarray(lo, np.float64)
    hi = np.asarray(hi, np.float64)
    qmin = 1.0 if narrow_range else 0.0
    qmax = float(2 ** bits - 1)
    scale = (hi - lo) / (qmax - qmin)
    scale = np.where(scale > 0, scale, 1.0)
    zero = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    return (qmin - zero) * scale, (qmax - zero) * scale, scale


def fake_quant_np(x: np.ndarray, lo, hi, bits: int = 8, narrow_range: bool = False) -> np.ndarray:
    """Fake-quantize ``x``; per-channel ``lo``/``hi`` broadcast against the last axis."""
    nlo, nhi, scale = nudge(lo, hi, bits, narrow_range)
    x = np.asarray(x, np.float64)
    q = np.round((np.clip(x, nlo, nhi) - nlo) / scale)
    return (q * scale + nlo).astype(np.float32)


def kernel_channels_last(node: Node) -> np.ndarray:
    """The kernel reshaped to ``(-1, C_out)``: output channels on the last axis (depthwise: ``c*M + m``)."""
    return out_channels_last(node.weight.const, layer_kind(node))


def symmetric_weight_attrs(node: Node, per_channel: bool, bits: int = 8,
                           absmax: Optional[np.ndarray] = None) -> FakeQuantAttrs:
    """Symmetric narrow-range weight quantization of ``node``'s kernel, per tensor or per output channel.

    ``absmax`` overrides the (per-channel or scalar) clipping magnitude, e.g. from an MSE search.
    An all-zero channel gets a tiny non-zero range so its scale stays finite.
    """
    flat = kernel_channels_last(node)
    if absmax is None:
        absmax = np.abs(flat).max(axis=0) if per_channel else np.array([np.abs(flat).max()])
    absmax = np.maximum(np.asarray(absmax, np.float64).reshape(-1), 1e-8)
    return FakeQuantAttrs(lo=tuple(float(-a) for a in absmax), hi=tuple(float(a) for a in absmax), bits=bits,
                          narrow_range=True, axis=(-1 if per_channel else None))
