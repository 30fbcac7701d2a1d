"""The grid arithmetic of a streaming histogram of ``bins`` equal bins, shared by the pooled histogram
(:class:`~qfrewrite.quant.observers.StreamingHistogram`) and the per-channel ones
(:class:`~qfrewrite.quant.channel_histograms.ChannelHistograms`).

* :func:`bin_indices`: the bin of each value, in float32 (the same arithmetic for a scalar grid and a per-channel
  one broadcast over the last axis), clipped into ``[0, bins)``.
* :func:`regrown`: exact growth. The range is extended to the left by a whole number ``j`` of current bins and the
  bin width multiplied by the smallest integer ``k`` that covers the new extremes; old bin ``m`` then lies wholly
  inside new bin ``(j + m) // k``, so counts merge exactly (no interpolation).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["bin_indices", "regrown"]


def bin_indices(x: np.ndarray, lo, inv_width, bins: int) -> np.ndarray:
    """The bin of each value of ``x`` on the grid ``lo + width * [0, bins]`` (``lo``, ``inv_width = 1 / width``
    float32 scalars or per-channel vectors), values outside it in the outer bins; as ``intp``, the index type that
    ``np.bincount`` takes without a converting copy (int32 indices cost the per-channel histograms half their
    time)."""
    pos = np.subtract(x, lo, dtype=np.float32)  # also gathers a strided view once
    pos *= inv_width
    idx = pos.astype(np.intp)
    np.clip(idx, 0, bins - 1, out=idx)
    return idx


def regrown(counts: np.ndarray, lo: float, width: float, vmin: float, vmax: float) -> Tuple[np.ndarray, float, float]:
    """``(counts, lo, width)`` of the histogram ``counts`` on ``lo + width * [0, len(counts)]`` grown exactly (see the
    module docstring) to hold ``[vmin, vmax]``."""
    bins = len(counts)
    j = int(np.ceil((lo - vmin) / width)) if vmin < lo else 0
    new_lo = lo - j * width
    top = max(float(vmax), lo + bins * width)
    k = max(1, int(np.ceil((top - new_lo) / (bins * width) * (1 + 1e-12))))
    while new_lo + bins * k * width < top:  # float safety
        k += 1
    idx = (j + np.arange(bins)) // k
    return np.bincount(idx, weights=counts, minlength=bins)[:bins].astype(np.int64), new_lo, width * k
