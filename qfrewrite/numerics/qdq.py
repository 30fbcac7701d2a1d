"""Integer quantization parameters (scale, zero point, codes) equal to TensorFlow's fake quantization.

For a range ``[lo, hi]``, ``bits`` and ``narrow_range``, :func:`qfrewrite.numerics.quantize.nudge` gives the nudged
range and ``scale``; the zero point ``z = qmin - nudged_lo / scale`` is an integer in ``[qmin, qmax]``
(``qmin = 1 if narrow_range else 0``, ``qmax = 2**bits - 1``). A value ``x`` gets the code
``c = qmin + floor((clip(x, nlo, nhi) - nlo) / scale + 1/2)`` and dequantizes to ``(c - z) * scale``, which is
``fake_quant(x)``.

ONNX stores codes in uint8 (``c``, zero point ``z``) or int8 (``c - 128``, zero point ``z - 128``). Its
QuantizeLinear saturates to the container's range, not to ``[qmin, qmax]``: :attr:`QParams.needs_clip` says when a
clip to the nudged range must come first (narrow range, fewer than 8 bits). Bias codes: int32 with scale
``s_x * s_w`` and zero point 0, ``round(b / (s_x * s_w))``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .quantize import nudge

__all__ = ["QParams", "qparams", "quantize_codes", "bias_codes", "CONTAINERS"]

#: ONNX integer containers: numpy dtype and the offset of code 0
CONTAINERS = {"int8": (np.int8, 128), "uint8": (np.uint8, 0)}


@dataclass(frozen=True)
class QParams:
    """Scale and zero point (arrays: one entry, or one per channel) in an ONNX container ``dtype``."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # the container dtype
    nudged_lo: np.ndarray  # float32
    nudged_hi: np.ndarray  # float32
    qmin: int
    qmax: int
    dtype: str

    @property
    def needs_clip(self) -> bool:
        """True when ``[qmin, qmax]`` is narrower than the container, so QuantizeLinear alone would not saturate."""
        return self.qmin != 0 or self.qmax != 255


def qparams(lo: Sequence[float], hi: Sequence[float], bits: int = 8, narrow_range: bool = False,
            dtype: str = "int8") -> QParams:
    """TensorFlow-nudged scale and zero point of ``[lo, hi]`` (per-tensor: length-1 sequences)."""
    if dtype not in CONTAINERS:
        raise ValueError(f"dtype must be one of {sorted(CONTAINERS)}, got {dtype!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"ONNX QuantizeLinear stores at most 8 bits, got {bits}")
    nlo, nhi, scale = nudge(np.asarray(lo, np.float64), np.asarray(hi, np.float64), bits, narrow_range)
    qmin = 1 if narrow_range else 0
    zero = np.round(qmin - nlo / scale).astype(np.int64)
    np_dtype, offset = CONTAINERS[dtype]
    return QParams(scale=np.asarray(scale, np.float32), zero_point=(zero - offset).astype(np_dtype),
                   nudged_lo=np.asarray(nlo, np.float32), nudged_hi=np.asarray(nhi, np.float32), qmin=qmin,
                   qmax=2 ** bits - 1, dtype=dtype)


def quantize_codes(x: np.ndarray, q: QParams, axis: int = -1) -> np.ndarray:
    """Codes of ``x`` in ``q``'s container, rounding as TensorFlow's fake quantization does (half up).

    Per-channel parameters apply along ``axis`` of ``x``.
    """
    x = np.asarray(x, np.float64)
    shape = [1] * x.ndim
    if q.scale.size > 1:
        shape[axis] = q.scale.size
    scale = q.scale.astype(np.float64).reshape(shape)
    nlo = q.nudged_lo.astype(np.float64).reshape(shape)
    nhi = q.nudged_hi.astype(np.float64).reshape(shape)
    codes = q.qmin + np.floor((np.clip(x, nlo, nhi) - nlo) / scale + 0.5)
    np_dtype, offset = CONTAINERS[q.dtype]
    return np.clip(codes, q.qmin, q.qmax).astype(np.int64).__sub__(offset).astype(np_dtype)


def bias_codes(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray):
    """int32 codes and float32 scale (one entry, or one per channel) of a bias: ``round(b / (s_x * s_w))``."""
    scale = (np.float64(input_scale) * np.asarray(weight_scale, np.float64)).reshape(-1)
    codes = np.round(np.asarray(bias, np.float64) / scale)
    limit = np.iinfo(np.int32)
    return np.clip(codes, limit.min, limit.max).astype(np.int32), scale.astype(np.float32)
