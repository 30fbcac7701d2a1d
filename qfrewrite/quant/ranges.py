"""Choose an activation quantization range from observed :class:`~qfrewrite.quant.observers.TensorStats`.

The maths lives in :mod:`qfrewrite.numerics.ranges`; this module picks the method and returns a range with an
integer zero point (:func:`~qfrewrite.numerics.ranges.snap_range`), ready for a ``FakeQuantAttrs``.
"""
from __future__ import annotations

from typing import Tuple

from ..errors import QfrewriteError
from ..ir import FakeQuantAttrs
from ..numerics.ranges import (ACTIVATION_METHODS, kl_range, minmax_range, mse_range, percentile_range,
                               snap_range)
from .observers import TensorStats

__all__ = ["activation_range", "activation_attrs", "ACTIVATION_METHODS"]


def activation_range(stats: TensorStats, method: str = "mse", bits: int = 8, percentile: float = 99.99,
                     saturation_weight: float = 1.0) -> Tuple[float, float]:
    """The snapped ``(lo, hi)`` of one tensor by ``method`` (``mse``, ``minmax``, ``percentile``, ``kl``).

    ``percentile`` applies to ``percentile``; ``saturation_weight`` (the weight of the clipping error against the
    rounding error) to ``mse``."""
    if method == "minmax":
        lo, hi = minmax_range(stats.min, stats.max)
    elif method == "percentile":
        lo, hi = percentile_range(stats.hist, stats.hist_lo, stats.hist_hi, percentile)
    elif method == "mse":
        # already on an integer zero point, chosen by cost: keep it exactly
        return mse_range(stats.hist, stats.hist_lo, stats.hist_hi, stats.min, stats.max, bits, zeros=stats.zeros,
                         saturation_weight=saturation_weight)
    elif method == "kl":
        lo, hi = kl_range(stats.hist, stats.hist_lo, stats.hist_hi, bits, zeros=stats.zeros)
    else:
        raise QfrewriteError(f"activation range method must be one of {ACTIVATION_METHODS}, got {method!r}")
    # never wider than what was observed (a histogram edge can overshoot the data)
    lo, hi = max(lo, min(stats.min, 0.0)), min(hi, max(stats.max, 0.0))
    return snap_range(lo, hi, bits)


def activation_attrs(stats: TensorStats, method: str = "mse", bits: int = 8, **options) -> FakeQuantAttrs:
    lo, hi = activation_range(stats, method, bits, **options)
    return FakeQuantAttrs(lo=(float(lo),), hi=(float(hi),), bits=int(bits), narrow_range=False, axis=None)
