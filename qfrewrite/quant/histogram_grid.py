"""The grid arithmetic of a streaming histogram of ``bins`` equal bins, shared by the pooled histogram
(:class:`~qfrewrite.quant.observers.StreamingHistogram`) and the per-channel ones
(:class:`~qfrewrite.quant.channel_histograms.ChannelHistograms`).

* :func:`bin_indices`: the bin of each value, in float32 (the same arithmetic for a scalar grid and a per-channel
  one broadcast over the last axis), clipped into ``[0, bins)``.
* :func:`regrown`: exact growth. The new grid starts on an edge ``i`` of the current one (``i < 0``: extended to
  the left) and its bins are ``k`` current bins wide, the smallest integer ``k`` that holds the new extremes, the
  values already counted and 0; old bin ``m`` then lies wholly inside new bin ``(m - i) // k``, so counts merge
  exactly (no interpolation). The grid is fitted to what it holds, not to its old extent: the empty bins at either
  end are given up. Keeping the old extent doubled the span at every growth to the left (a two-sided tensor whose
  minimum fell a little in each of a few chunks); on torchvision MobileNetV2 the observed range of some outputs then
  spread over 6 to 40 of the 2048 bins.
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
    module docstring) to hold ``[vmin, vmax]``, every value already counted and 0."""
    bins = len(counts)
    occupied = np.flatnonzero(counts)
    need_lo, need_hi = min(float(vmin), 0.0), max(float(vmax), 0.0)
    if len(occupied):
        need_lo = min(need_lo, lo + occupied[0] * width)
        need_hi = max(need_hi, lo + (occupied[-1] + 1) * width)
    i = int(np.floor((need_lo - lo) / width))
    if len(occupied):
        i = min(i, int(occupied[0]))  # float safety: never past the first counted bin
    new_lo = lo + i * width
    k = max(1, int(np.ceil((need_hi - new_lo) / (bins * width) * (1 + 1e-12))))
    while new_lo + bins * k * width < need_hi:  # float safety
        k += 1
    if len(occupied):
        k = max(k, -(-(int(occupied[-1]) - i + 1) // bins))  # every counted bin inside the new grid
    idx = (occupied - i) // k
    grown = np.bincount(idx, weights=counts[occupied], minlength=bins)[:bins] if len(occupied) \
        else np.zeros(bins)
    return grown.astype(np.int64), new_lo, width * k
