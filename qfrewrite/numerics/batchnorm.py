"""BatchNorm folding maths.

Inference BatchNorm per channel c: ``y_c = (x_c - m_c) * g_c / sqrt(v_c + eps) + beta_c``. Folded into the
preceding layer with kernel W (output channel c) and bias b:

    s_c  = g_c / sqrt(v_c + eps)
    W'_c = W_c * s_c
    b'_c = (b_c - m_c) * s_c + beta_c

A channel with ``v_c + eps == 0`` (a legal eps of 0 with zero variance) has no finite scale; the source computes
NaN or inf there. We fold it as ``s_c = 0`` (the output becomes the constant ``beta_c``) and report it.
Computation is done in float64 and rounded once to float32.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["bn_scale_shift", "fold_bn_into_kernel"]


def bn_scale_shift(gamma, beta, mean, var, eps: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(scale, shift, degenerate)`` with ``y = x * scale + shift``; ``degenerate`` marks v+eps <= 0."""
    var = np.asarray(var, np.float64)
    denom = var + float(eps)
    degenerate = denom <= 0
    safe = np.where(degenerate, 1.0, denom)
    scale = np.where(degenerate, 0.0, np.asarray(gamma, np.float64) / np.sqrt(safe))
    shift = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * scale
    return scale, shift, degenerate


def fold_bn_into_kernel(kernel: np.ndarray, bias, scale: np.ndarray, shift: np.ndarray, depthwise: bool):
    """Fold ``y = conv(x) * scale + shift`` into ``(kernel', bias')``.

    ``kernel`` is HWIO (conv), HWCM (depthwise: channel ``c*M + m`` on axes 2 and 3) or IO (dense).
    """
    k = np.asarray(kernel, np.float64)
    b = np.zeros(scale.shape, np.float64) if bias is None else np.asarray(bias, np.float64)
    if depthwise:
        c, m = k.shape[2], k.shape[3]
        k2 = k * scale.reshape(c, m)
    else:
        k2 = k * scale
    b2 = b * scale + shift
    return k2.astype(np.float32), b2.astype(np.float32)
