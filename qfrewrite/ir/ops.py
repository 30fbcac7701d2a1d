"""Op kinds and their typed attributes.

The IR's canonical layout is NHWC. Weight layouts (as TensorFlow stores them):

* ``Conv2D``: kernel ``(kh, kw, c_in, c_out)``, optional bias ``(c_out,)``;
* ``DepthwiseConv2D``: kernel ``(kh, kw, c_in, multiplier)``; output channel ``c * multiplier + m``;
* ``Dense``: kernel ``(c_in, c_out)``.

Padding is ``"SAME"``, ``"VALID"`` or explicit ``((top, bottom), (left, right))``. ReLU6 is ``Clip(0, 6)`` whatever the
source spelled it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

__all__ = [
    "Op",
    "Padding",
    "ConvAttrs",
    "BatchNormAttrs",
    "ClipAttrs",
    "PadAttrs",
    "PoolAttrs",
    "GlobalMeanAttrs",
    "ReshapeAttrs",
    "SoftmaxAttrs",
    "ConcatAttrs",
    "NormalizeAttrs",
    "FakeQuantAttrs",
    "NoAttrs",
    "ATTRS_FOR",
    "WEIGHTED_OPS",
]

Padding = Union[str, Tuple[Tuple[int, int], Tuple[int, int]]]


class Op(str, enum.Enum):
    """Every op the IR can hold. Inputs named in brackets are constant values."""

    CONV2D = "Conv2D"  # x, [kernel], [bias]?
    DEPTHWISE_CONV2D = "DepthwiseConv2D"  # x, [kernel], [bias]?
    DENSE = "Dense"  # x, [kernel], [bias]?
    BATCH_NORM = "BatchNorm"  # x, [gamma], [beta], [mean], [variance]
    RELU = "Relu"
    CLIP = "Clip"
    HARD_SWISH = "HardSwish"  # x * relu6(x + 3) / 6
    HARD_SIGMOID = "HardSigmoid"  # relu6(x + 3) / 6
    SIGMOID = "Sigmoid"
    ADD = "Add"  # a, b (numpy broadcasting, NHWC)
    MUL = "Mul"  # a, b
    MINIMUM = "Minimum"  # a, b: element-wise min (a per-channel clip when b is a constant vector)
    PAD = "Pad"
    AVG_POOL = "AveragePool"
    MAX_POOL = "MaxPool"
    GLOBAL_MEAN = "GlobalMean"  # mean over H and W
    RESHAPE = "Reshape"
    FLATTEN = "Flatten"
    SOFTMAX = "Softmax"
    NORMALIZE = "Normalize"  # x * scale + offset, per channel (input preprocessing)
    CONCAT = "Concat"
    FAKE_QUANT = "FakeQuant"

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


@dataclass(frozen=True)
class NoAttrs:
    """Ops without attributes."""


@dataclass(frozen=True)
class ConvAttrs:
    """Conv2D / DepthwiseConv2D attributes; ``strides`` and ``dilations`` are (h, w)."""

    strides: Tuple[int, int] = (1, 1)
    padding: Padding = "VALID"
    dilations: Tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class BatchNormAttrs:
    """Inference BatchNorm over the last axis: ``(x - mean) / sqrt(var + epsilon) * gamma + beta``."""

    epsilon: float = 1e-3


@dataclass(frozen=True)
class ClipAttrs:
    """``min(max(x, lo), hi)``; a missing bound is ``None``."""

    lo: Optional[float] = 0.0
    hi: Optional[float] = 6.0

    @property
    def is_relu6(self) -> bool:
        return self.lo == 0.0 and self.hi == 6.0


@dataclass(frozen=True)
class PadAttrs:
    """Constant padding of H and W: ``((top, bottom), (left, right))``."""

    pads: Tuple[Tuple[int, int], Tuple[int, int]] = ((0, 0), (0, 0))
    value: float = 0.0


@dataclass(frozen=True)
class PoolAttrs:
    """AveragePool / MaxPool; ``count_include_pad`` matters only for explicit padding of AveragePool."""

    kernel: Tuple[int, int] = (2, 2)
    strides: Tuple[int, int] = (2, 2)
    padding: Padding = "VALID"


@dataclass(frozen=True)
class GlobalMeanAttrs:
    """Mean over H and W; ``keepdims`` keeps a ``(N, 1, 1, C)`` shape, else ``(N, C)``."""

    keepdims: bool = False


@dataclass(frozen=True)
class ReshapeAttrs:
    """Reshape of the non-batch dims to ``shape`` (one entry may be -1); the batch dim is kept."""

    shape: Tuple[int, ...] = ()


@dataclass(frozen=True)
class SoftmaxAttrs:
    axis: int = -1


@dataclass(frozen=True)
class ConcatAttrs:
    axis: int = -1


@dataclass(frozen=True)
class NormalizeAttrs:
    """``x * scale + offset`` with per-channel (or scalar) tuples."""

    scale: Tuple[float, ...] = (1.0,)
    offset: Tuple[float, ...] = (0.0,)


@dataclass(frozen=True)
class FakeQuantAttrs:
    """Fake quantization to ``bits`` with range ``[lo, hi]`` (tuples: one entry per-tensor, else per channel on
    ``axis``). ``narrow_range`` drops the lowest code (symmetric int8 weights)."""

    lo: Tuple[float, ...] = (0.0,)
    hi: Tuple[float, ...] = (6.0,)
    bits: int = 8
    narrow_range: bool = False
    axis: Optional[int] = None

    @property
    def per_channel(self) -> bool:
        return len(self.lo) > 1 or self.axis is not None


ATTRS_FOR = {
    Op.CONV2D: ConvAttrs,
    Op.DEPTHWISE_CONV2D: ConvAttrs,
    Op.DENSE: NoAttrs,
    Op.BATCH_NORM: BatchNormAttrs,
    Op.RELU: NoAttrs,
    Op.CLIP: ClipAttrs,
    Op.HARD_SWISH: NoAttrs,
    Op.HARD_SIGMOID: NoAttrs,
    Op.SIGMOID: NoAttrs,
    Op.ADD: NoAttrs,
    Op.MUL: NoAttrs,
    Op.MINIMUM: NoAttrs,
    Op.PAD: PadAttrs,
    Op.AVG_POOL: PoolAttrs,
    Op.MAX_POOL: PoolAttrs,
    Op.GLOBAL_MEAN: GlobalMeanAttrs,
    Op.RESHAPE: ReshapeAttrs,
    Op.FLATTEN: NoAttrs,
    Op.SOFTMAX: SoftmaxAttrs,
    Op.NORMALIZE: NormalizeAttrs,
    Op.CONCAT: ConcatAttrs,
    Op.FAKE_QUANT: FakeQuantAttrs,
}

#: Ops whose weights are a constant second input and whose output channels are the last axis (the traits built on
#: it are in :mod:`qfrewrite.ir.traits`).
WEIGHTED_OPS = frozenset({Op.CONV2D, Op.DEPTHWISE_CONV2D, Op.DENSE})
