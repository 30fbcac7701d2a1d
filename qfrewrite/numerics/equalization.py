"""Cross-layer equalization scales (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", arXiv 1906.04721, section 4.1).

Two layers joined through a positively homogeneous activation ``f`` (``f(x / s) = f(x) / s`` for ``s > 0``: ReLU,
zero padding, identity; ReLU6 only with a per-channel clip at ``6 / s``):

    y = W2 f(W1 x + b1) + b2 = (W2 S) f(S^-1 W1 x + S^-1 b1) + b2,   S = diag(s)

With ``r1_i`` the range of output channel ``i`` of ``W1`` and ``r2_i`` the range of input channel ``i`` of ``W2``,
``s_i = sqrt(r1_i / r2_i)`` makes both ranges ``sqrt(r1_i * r2_i)``, which maximises the summed relative precision
of the two layers' per-tensor quantization. We use ``max |W|`` as the range (symmetric weight quantization).

Guards (a naive scale blew up a TF-slim MobileNetV1 whose constant channels got ``s`` near ``1e5``):

* a channel whose range is below ``min_range`` times the median range of its layer (dead, all but zero, or a
  constant channel fed only through a bias) keeps ``s_i = 1``;
* a channel named in ``frozen`` (constant outputs found by a static analysis) keeps ``s_i = 1``;
* every scale is clamped to ``[1 / max_scale, max_scale]`` so one step never moves a channel by more than that.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

__all__ = ["equalization_scales"]


def equalization_scales(r1: np.ndarray, r2: np.ndarray, min_range: float = 1e-3, max_scale: float = 1e3,
                        frozen: Optional[Iterable[int]] = None) -> np.ndarray:
    """Per-channel scales ``s`` (float64, 1 where guarded) for output ranges ``r1`` of layer 1 and input ranges
    ``r2`` of layer 2."""
    r1 = np.asarray(r1, np.float64)
    r2 = np.asarray(r2, np.float64)
    if r1.shape != r2.shape:
        raise ValueError(f"range vectors differ in length: {r1.shape} vs {r2.shape}")
    if max_scale < 1:
        raise ValueError(f"max_scale must be >= 1, got {max_scale}")
    ok = (r1 > min_range * np.median(r1)) & (r2 > min_range * np.median(r2)) & (r1 > 0) & (r2 > 0)
    if frozen is not None:
        idx = np.asarray(list(frozen), int)
        if idx.size:
            ok[idx] = False
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    return np.clip(s, 1.0 / max_scale, max_scale)
