"""Per-channel range maths in framework-free numpy: spread, zero / near-zero / outlier channels, weight SQNR.

All functions take per-output-channel arrays (``ranges[c] = max W[..., c] - min W[..., c]``) or a kernel flattened
to ``(K, C)`` with output channels last.

**Live channels.** A channel is *zero* when every weight is exactly 0 and *near-zero* when its range is non-zero but
below one 8-bit step of the layer's median live channel, ``range_c < median / (2**bits - 1)``: at any per-tensor scale
that serves a typical channel, such a channel rounds to at most one code, so it carries no usable signal (TF-slim
MobileNetV1's dead stem/pointwise channels have weights around 1e-13). The median here is taken over the non-zero
channels, so a layer with many zero channels still has a meaningful median. The remaining channels are *live*.

**Spread** is ``max_c range_c / median_c range_c`` over the non-zero channels (1 for a single channel, inf when every
channel is zero): how many times wider the per-tensor range is than a typical channel needs.

**Outliers** (a robust rule, not tuned to any model): among live channels, with ``l_c = log(range_c)``,
``med = median(l)`` and ``MAD = median|l - med|``, channel ``c`` is an outlier when both

* its modified z-score ``0.6745 (l_c - med) / MAD`` exceeds 3.5 (Iglewicz and Hoaglin's cutoff for the median
  absolute deviation; on the log scale because ranges are positive and spread multiplicatively; ``MAD == 0`` makes
  every channel above the median pass this test), and
* ``range_c >= 4 * exp(med)``: the channel alone widens the per-tensor range to at least 4x what the median channel
  needs, i.e. costs the median channel two bits (about 12 dB) of its 8-bit resolution. A channel that costs less is
  not worth naming even when the layer's ranges happen to be very uniform.

Fewer than 3 live channels never yield an outlier (no robust centre). Only large ranges are outliers: a small range
does not hurt the other channels' quantization.

**SQNR.** Weights are quantized as :class:`~qfrewrite.passes.InsertFakeQuant` does by default: symmetric, narrow range
(codes ``[-(2**(b-1) - 1), 2**(b-1) - 1]``), absolute maximum per tensor or per output channel
(:func:`qfrewrite.numerics.quantize.fake_quant_np`). A channel's SQNR is ``10 log10(sum w^2 / sum (w - q)^2)``
(inf when exact); a layer's figure is the median over its live channels: the typical channel's resolution, which an
outlier channel destroys while barely moving the SQNR of the whole tensor (also reported).
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from ..numerics.quantize import fake_quant_np

__all__ = ["ZSCORE_CUTOFF", "MIN_OUTLIER_RATIO", "zero_channels", "near_zero_channels", "live_mask",
           "median_range", "spread", "outlier_channels", "quantize_symmetric", "channel_sqnr_db", "tensor_sqnr_db",
           "weight_sqnr", "ratios"]

#: Iglewicz and Hoaglin's modified z-score cutoff.
ZSCORE_CUTOFF = 3.5
#: An outlier's range is at least this many times the median live range (2 bits of the median channel's codes).
MIN_OUTLIER_RATIO = 4.0
_MAD_NORMAL = 0.6745  # the 0.75 quantile of the standard normal: MAD / 0.6745 estimates sigma


def _nonzero_median(ranges: np.ndarray) -> float:
    nz = ranges[ranges > 0]
    return float(np.median(nz)) if nz.size else 0.0


def zero_channels(w_min: np.ndarray, w_max: np.ndarray) -> np.ndarray:
    """Indices of channels whose weights are all exactly 0."""
    return np.flatnonzero((np.asarray(w_min) == 0) & (np.asarray(w_max) == 0))


def near_zero_channels(ranges: np.ndarray, bits: int = 8) -> np.ndarray:
    """Indices of channels with ``0 < range < median / (2**bits - 1)`` (median over non-zero channels)."""
    ranges = np.asarray(ranges, np.float64)
    med = _nonzero_median(ranges)
    return np.flatnonzero((ranges > 0) & (ranges < med / (2 ** bits - 1)))


def live_mask(ranges: np.ndarray, bits: int = 8) -> np.ndarray:
    """Boolean mask of channels that are neither zero nor near-zero."""
    ranges = np.asarray(ranges, np.float64)
    mask = ranges > 0
    mask[near_zero_channels(ranges, bits)] = False
    return mask


def median_range(ranges: np.ndarray) -> float:
    """Median range over the non-zero channels (0 when all are zero)."""
    return _nonzero_median(np.asarray(ranges, np.float64))


def spread(ranges: np.ndarray) -> float:
    """``max range / median non-zero range``; inf when every channel is zero."""
    ranges = np.asarray(ranges, np.float64)
    med = _nonzero_median(ranges)
    return float(ranges.max() / med) if med > 0 else float("inf")


def outlier_channels(ranges: np.ndarray, bits: int = 8, zscore: float = ZSCORE_CUTOFF,
                     min_ratio: float = MIN_OUTLIER_RATIO) -> np.ndarray:
    """Indices of outlier channels by the module's rule (sorted by channel index)."""
    ranges = np.asarray(ranges, np.float64)
    live = live_mask(ranges, bits)
    if live.sum() < 3:
        return np.zeros(0, np.int64)
    logs = np.log(ranges[live])
    med = float(np.median(logs))
    mad = float(np.median(np.abs(logs - med)))
    idx = np.flatnonzero(live)
    excess = logs - med
    robust = excess > 0 if mad == 0 else _MAD_NORMAL * excess / mad > zscore
    big = ranges[live] >= min_ratio * np.exp(med)
    return idx[robust & big]


def quantize_symmetric(flat: np.ndarray, per_channel: bool, bits: int = 8) -> np.ndarray:
    """Symmetric narrow-range fake quantization of a ``(K, C)`` kernel by its absolute maximum."""
    flat = np.asarray(flat, np.float64)
    absmax = np.abs(flat).max(axis=0) if per_channel else np.full(flat.shape[1], np.abs(flat).max())
    absmax = np.maximum(absmax, 1e-30)
    return fake_quant_np(flat, -absmax, absmax, bits=bits, narrow_range=True).astype(np.float64)


def channel_sqnr_db(flat: np.ndarray, quantized: np.ndarray) -> np.ndarray:
    """Per-output-channel SQNR in dB (inf where the channel is exact, nan where it is all zero)."""
    flat = np.asarray(flat, np.float64)
    signal = np.sum(flat ** 2, axis=0)
    noise = np.sum((flat - np.asarray(quantized, np.float64)) ** 2, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 10.0 * np.log10(signal / noise)
    out[signal == 0] = np.nan
    out[(signal > 0) & (noise == 0)] = np.inf
    return out


def tensor_sqnr_db(flat: np.ndarray, quantized: np.ndarray) -> float:
    """SQNR in dB of the whole kernel (inf when exact, nan when all zero)."""
    flat = np.asarray(flat, np.float64)
    signal = float(np.sum(flat ** 2))
    noise = float(np.sum((flat - np.asarray(quantized, np.float64)) ** 2))
    if signal == 0:
        return float("nan")
    return float("inf") if noise == 0 else float(10.0 * np.log10(signal / noise))


def weight_sqnr(flat: np.ndarray, live: np.ndarray, bits: int = 8) -> Dict[str, Dict[str, float]]:
    """``{"median_channel": {"per_tensor": dB, "per_channel": dB}, "tensor": {...}}`` for a ``(K, C)`` kernel;
    the median is over the ``live`` channels (nan when none)."""
    out: Dict[str, Dict[str, float]] = {"median_channel": {}, "tensor": {}}
    for mode, per_channel in (("per_tensor", False), ("per_channel", True)):
        q = quantize_symmetric(flat, per_channel, bits)
        ch = channel_sqnr_db(flat, q)[np.asarray(live, bool)]
        out["median_channel"][mode] = float(np.median(ch)) if ch.size else float("nan")
        out["tensor"][mode] = tensor_sqnr_db(flat, q)
    return out


def ratios(values: np.ndarray, channels: List[int]) -> List[float]:
    """``|values[c]| / median|values|`` for the given channels (median over non-zero magnitudes)."""
    mags = np.abs(np.asarray(values, np.float64))
    med = _nonzero_median(mags)
    return [float(mags[c] / med) if med > 0 else float("inf") for c in channels]
