"""Weight quantization ranges: symmetric, narrow-range int8 (codes ``[-127, 127]``), per tensor or per output channel.

For a kernel with output channels on the last axis (see :func:`qfrewrite.numerics.quantize.kernel_channels_last`),
the range of channel ``c`` is ``[-a_c, a_c]`` with step ``a_c / 127`` (for 8 bits) and zero point 0. The clipping
magnitude ``a`` is chosen by

* ``"minmax"``: ``a = max |w|`` (no weight saturates);
* ``"mse"``: ``a = f * max |w|`` with ``f`` from a grid on ``[0.3, 1]`` minimising the mean squared error between the
  kernel and its fake-quantized copy (rounding plus clipping), independently per channel when per-channel.

Every magnitude is at least ``MIN_ABSMAX`` (5e-7): TensorFlow's TFLite converter widens any narrower weight range
to ``[-5e-7, 5e-7]`` (range width 1e-6), so a smaller one would make the simulation differ from the file.

This is the one function every pass uses to decide weight quantization, so bias correction and
:class:`InsertFakeQuant` apply exactly the same ``W_q``.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from ..errors import QfrewriteError
from ..ir import WEIGHTED_OPS, FakeQuantAttrs, Node, Op
from ..numerics.quantize import fake_quant_np, kernel_channels_last, nudge, symmetric_weight_attrs

__all__ = ["weight_quant_attrs", "planned_weight_quant", "quantized_kernel", "kernel_grid", "mse_weight_absmax",
           "GRANULARITIES", "WEIGHT_METHODS", "MIN_ABSMAX"]

GRANULARITIES = ("per_channel", "per_tensor")
WEIGHT_METHODS = ("minmax", "mse")

#: the smallest weight clipping magnitude TFLite's converter keeps
MIN_ABSMAX = 5e-7
#: Candidate clipping fractions of the largest magnitude for the MSE search.
_MSE_FRACTIONS = np.linspace(0.3, 1.0, 71)


def mse_weight_absmax(flat: np.ndarray, per_channel: bool, bits: int = 8,
                      fractions: np.ndarray = _MSE_FRACTIONS) -> np.ndarray:
    """Clipping magnitudes minimising ``mean((w - fq(w))**2)`` for symmetric narrow-range quantization.

    ``flat`` is ``(K, C)`` with output channels last. Returns ``(C,)`` when ``per_channel`` else ``(1,)``.
    Each candidate is evaluated for all channels at once (vectorised); ``f = 1`` (min/max) is always a candidate,
    so the result is never worse than min/max on this error.
    """
    w = np.asarray(flat, np.float64)
    if not per_channel:
        w = w.reshape(-1, 1)
    amax = np.abs(w).max(axis=0)
    amax = np.where(amax > 0, amax, 1e-8)
    levels = float(2 ** (bits - 1) - 1)
    best_err = np.full(amax.shape, np.inf)
    best = amax.copy()
    for f in np.unique(np.append(np.asarray(fractions, np.float64), 1.0)):
        a = amax * f
        step = a / levels
        q = np.clip(np.round(w / step), -levels, levels) * step
        err = np.mean((w - q) ** 2, axis=0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, a, best)
    return best


def weight_quant_attrs(node: Node, granularity: str = "per_channel", method: str = "minmax",
                       bits: int = 8) -> FakeQuantAttrs:
    """The weight :class:`FakeQuantAttrs` of a Conv2D / DepthwiseConv2D / Dense ``node``.

    ``granularity`` is ``"per_channel"`` (one range per output channel, ``axis=-1``; depthwise channel ``c*M+m``) or
    ``"per_tensor"``; ``method`` is ``"minmax"`` or ``"mse"``. The kernel itself is not changed.
    """
    if granularity not in GRANULARITIES:
        raise QfrewriteError(f"weight granularity must be one of {GRANULARITIES}, got {granularity!r} "
                             f"(node {node.name!r})")
    if method not in WEIGHT_METHODS:
        raise QfrewriteError(f"weight range method must be one of {WEIGHT_METHODS}, got {method!r} "
                             f"(node {node.name!r})")
    if node.op not in WEIGHTED_OPS or node.weight is None or node.weight.const is None:
        raise QfrewriteError(f"node {node.name!r} ({node.op}) has no constant kernel; weight quantization applies "
                             f"to {', '.join(sorted(o.value for o in WEIGHTED_OPS))} with a constant kernel")
    if not 2 <= int(bits) <= 16:
        raise QfrewriteError(f"weight bits must be in [2, 16], got {bits} (node {node.name!r})")
    per_channel = granularity == "per_channel"
    flat = kernel_channels_last(node)
    if method == "mse":
        absmax = mse_weight_absmax(flat, per_channel, int(bits))
    else:
        absmax = np.abs(flat).max(axis=0) if per_channel else np.array([np.abs(flat).max()])
    absmax = np.maximum(np.asarray(absmax, np.float64), MIN_ABSMAX)
    return symmetric_weight_attrs(node, per_channel=per_channel, bits=int(bits), absmax=absmax)


def planned_weight_quant(node: Node, granularity: str, method: str = "minmax", bits: int = 8) -> FakeQuantAttrs:
    """The weight quantization ``node`` will get: its ``weight_quant`` when one is set, else
    :func:`weight_quant_attrs` with these options (what InsertFakeQuant applies)."""
    if node.weight_quant is not None:
        return node.weight_quant
    return weight_quant_attrs(node, granularity, method, bits)


def quantized_kernel(node: Node, fq: FakeQuantAttrs) -> np.ndarray:
    """``node``'s kernel after fake quantization with ``fq`` (per-channel ranges on the output channels, depthwise
    channel ``c * M + m``), as float32."""
    k = node.weight.const
    if len(fq.lo) == 1 and fq.axis is None:
        return fake_quant_np(k, fq.lo[0], fq.hi[0], fq.bits, fq.narrow_range)
    lo, hi = np.asarray(fq.lo), np.asarray(fq.hi)
    if node.op is Op.DEPTHWISE_CONV2D:
        kh, kw, c, m = k.shape
        return fake_quant_np(k.reshape(kh, kw, c * m), lo, hi, fq.bits, fq.narrow_range).reshape(k.shape)
    return fake_quant_np(k, lo, hi, fq.bits, fq.narrow_range)


def kernel_grid(node: Node, fq: FakeQuantAttrs) -> Tuple[np.ndarray, np.ndarray, int]:
    """The grid ``fq`` puts ``node``'s kernel on, in the kernel's own layout: ``(nlo, step, n)`` such that the
    kernel may take the values ``nlo + k * step``, integer ``k`` in ``[0, n]``; ``nlo`` and ``step`` (float64)
    broadcast against the kernel (per-channel: along the output channels, depthwise channel ``c * M + m``), with
    TensorFlow's range nudging (:func:`~qfrewrite.numerics.quantize.nudge`)."""
    nlo, _, step = nudge(np.asarray(fq.lo), np.asarray(fq.hi), fq.bits, fq.narrow_range)
    n = 2 ** fq.bits - 1 - (1 if fq.narrow_range else 0)
    shape = node.weight.const.shape
    if len(fq.lo) == 1 and fq.axis is None:
        bshape = (1,) * len(shape)
    elif node.op is Op.DEPTHWISE_CONV2D:
        bshape = (1,) * (len(shape) - 2) + tuple(shape[-2:])
    else:
        bshape = (1,) * (len(shape) - 1) + (shape[-1],)
    return nlo.reshape(bshape), step.reshape(bshape), n
