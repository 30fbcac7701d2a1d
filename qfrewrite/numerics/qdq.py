"""Integer storage of quantized values, equal to TensorFlow's fake quantization: ONNX QDQ parameters and codes,
and the integer containers TFLite and ONNX store weight grids in.

For a range ``[lo, hi]``, ``bits`` and ``narrow_range``, :func:`qfrewrite.numerics.quantize.nudge` gives the nudged
range and ``scale``; the zero point ``z = qmin - nudged_lo / scale`` is an integer in ``[qmin, qmax]``
(``qmin = 1 if narrow_range else 0``, ``qmax = 2**bits - 1``). A value ``x`` gets the code
``c = qmin + floor((clip(x, nlo, nhi) - nlo) / scale + 1/2)`` and dequantizes to ``(c - z) * scale``, which is
``fake_quant(x)``.

ONNX stores codes in a container (:data:`CONTAINERS`): uint8 holds ``c`` (zero point ``z``); a signed container
(int8, int4) holds ``c - 2**(bits-1)`` (zero point ``z - 2**(bits-1)``), so a symmetric narrow-range grid is stored
as the codes ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` with zero point 0 (``[-7, 7]`` for 4-bit weights, ``[-127,
127]`` for 8-bit ones, and a 3-bit grid's ``[-3, 3]`` in int4). int4 (ONNX opset 21) holds at most 4 bits, int8 and
uint8 at most 8. QuantizeLinear saturates to the container's range, not to ``[qmin, qmax]``:
:attr:`QParams.needs_clip` says when a clip to the nudged range must come first (narrow range, or fewer bits than the
container). Bias codes: int32 with scale ``s_x * s_w`` and zero point 0, ``round(b / (s_x * s_w))``.

Weight containers (:func:`weight_storage_bits`): a grid of at most 4 bits is stored in 4-bit integers, one of 5 to 8
bits in 8-bit integers, in both formats. TensorFlow's TFLite converter stores a symmetric narrow-range weight
FakeQuant of ``n <= 4`` bits as an INT4 tensor with codes in ``[-7, 7]`` and of ``n`` > 4 bits as INT8 in ``[-127,
127]``, with the scale of the storage grid: a grid of ``L = 2**(n-1) - 1`` levels each side that is not the storage
grid (``L`` = 3, 15, 31, 63) is rounded again onto it, which moves the weights. :func:`embedding_absmax` gives the
storage grid's range that holds every point of the ``n``-bit grid exactly, so the converter keeps it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import ml_dtypes  # a dependency of onnx: numpy's int4 for INT4 initializers
import numpy as np

from .quantize import nudge

__all__ = ["QParams", "Container", "qparams", "quantize_codes", "bias_codes", "CONTAINERS", "weight_storage_bits",
           "embedding_absmax", "symmetric_levels", "unpack_int4"]


@dataclass(frozen=True)
class Container:
    """An integer type quantized codes are stored in: the numpy dtype holding them, its width and signedness, and
    the ONNX ``TensorProto`` data type name."""

    numpy: type
    bits: int
    signed: bool
    onnx_type: str

    @property
    def lowest(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def highest(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    def offset(self, bits: int) -> int:
        """What is subtracted from a ``bits``-bit code ``c`` in ``[0, 2**bits - 1]`` to store it."""
        return 2 ** (bits - 1) if self.signed else 0


#: ONNX integer containers by name
CONTAINERS = {"int8": Container(np.int8, 8, True, "INT8"), "uint8": Container(np.uint8, 8, False, "UINT8"),
              "int4": Container(ml_dtypes.int4, 4, True, "INT4")}


def weight_storage_bits(bits: int) -> int:
    """The width of the integers a ``bits``-bit weight grid is stored in: 4 for 2..4 bits, 8 for 5..8."""
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"weights are stored with 2 to 8 bits, got {bits}")
    return 4 if bits <= 4 else 8


def symmetric_levels(bits: int) -> int:
    """``L = 2**(bits-1) - 1``: the codes of a symmetric narrow-range ``bits``-bit grid are ``-L..L``."""
    return 2 ** (int(bits) - 1) - 1


def embedding_absmax(absmax, bits: int, storage_bits: int) -> np.ndarray:
    """The magnitude ``A'`` of a symmetric narrow-range ``storage_bits`` grid holding every point of the ``bits``-bit
    grid of magnitude ``A`` (``absmax``, per channel or scalar).

    The ``bits`` grid is ``k * A / L`` for ``|k| <= L = 2**(bits-1) - 1``; the storage grid ``j * A' / S`` for
    ``|j| <= S = 2**(storage_bits-1) - 1``. With ``m = S // L`` and ``A' = S * A / (L * m)`` the storage step is the
    ``bits`` step over ``m``, so ``k * A / L`` is the storage point ``j = k * m`` and ``|k * m| <= S``. ``m = 1``
    (``A' = A``) when the two grids are the same.
    """
    levels, store = symmetric_levels(bits), symmetric_levels(storage_bits)
    if levels > store:
        raise ValueError(f"a {bits}-bit grid does not fit in {storage_bits}-bit storage")
    m = store // levels
    return np.asarray(absmax, np.float64) * (store / (levels * m))


@dataclass(frozen=True)
class QParams:
    """Scale and zero point (arrays: one entry, or one per channel) in an ONNX container ``dtype`` (a key of
    :data:`CONTAINERS`)."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # the container dtype
    nudged_lo: np.ndarray  # float32
    nudged_hi: np.ndarray  # float32
    qmin: int
    qmax: int
    dtype: str

    @property
    def container(self) -> Container:
        return CONTAINERS[self.dtype]

    @property
    def needs_clip(self) -> bool:
        """True when the stored codes ``[qmin, qmax] - offset`` are narrower than the container, so QuantizeLinear
        alone would not saturate to them."""
        c = self.container
        offset = c.offset(self.bits)
        return self.qmin - offset != c.lowest or self.qmax - offset != c.highest

    @property
    def bits(self) -> int:
        return int(self.qmax + 1).bit_length() - 1


def qparams(lo: Sequence[float], hi: Sequence[float], bits: int = 8, narrow_range: bool = False,
            dtype: str = "int8") -> QParams:
    """TensorFlow-nudged scale and zero point of ``[lo, hi]`` (per-tensor: length-1 sequences)."""
    if dtype not in CONTAINERS:
        raise ValueError(f"dtype must be one of {sorted(CONTAINERS)}, got {dtype!r}")
    container = CONTAINERS[dtype]
    if not 2 <= bits <= container.bits:
        raise ValueError(f"ONNX {dtype} stores 2 to {container.bits} bits, got {bits}")
    nlo, nhi, scale = nudge(np.asarray(lo, np.float64), np.asarray(hi, np.float64), bits, narrow_range)
    qmin = 1 if narrow_range else 0
    zero = np.round(qmin - nlo / scale).astype(np.int64)
    return QParams(scale=np.asarray(scale, np.float32),
                   zero_point=(zero - container.offset(bits)).astype(container.numpy),
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
    stored = np.clip(codes, q.qmin, q.qmax).astype(np.int64) - q.container.offset(q.bits)
    return stored.astype(q.container.numpy)


def bias_codes(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray):
    """int32 codes and float32 scale (one entry, or one per channel) of a bias: ``round(b / (s_x * s_w))``."""
    scale = (np.float64(input_scale) * np.asarray(weight_scale, np.float64)).reshape(-1)
    codes = np.round(np.asarray(bias, np.float64) / scale)
    limit = np.iinfo(np.int32)
    return np.clip(codes, limit.min, limit.max).astype(np.int32), scale.astype(np.float32)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` signed 4-bit codes of bytes holding two each, low nibble first (TFLite's INT4 buffers and
    ONNX's INT4 raw data), as int8 in ``[-8, 7]``."""
    b = np.asarray(packed, np.uint8).reshape(-1)
    nibbles = np.stack([b & 0x0F, b >> 4], axis=1).reshape(-1)[:count].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)
