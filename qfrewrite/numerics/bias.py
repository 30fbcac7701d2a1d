"""Bias absorption and bias correction maths (Nagel et al., arXiv 1906.04721, sections 4.2 and 4.3).

**Absorption.** Layer 1 output ``z = W1 x + b1`` goes through ``ReLU`` (possibly clipped at ``hi``) into layer 2.
If ``z_i >= c_i >= 0`` for every input, then ``relu(z_i) = relu(z_i - c_i) + c_i`` and
``min(relu(z_i), hi) = min(relu(z_i - c_i), hi - c_i) + c_i``, so

    b1_i -= c_i,   b2 += W2[.., i, ..] * c_i summed over taps (exact where layer 2 sees no padding),

moves ``c`` out of the activation's range. ``c`` comes from calibration data, so exactness holds only where the
data bound holds: ``c_i = max(0, min over data of z_i)`` ("min"), or Nagel's Gaussian rule
``c_i = max(0, mean_i - 3 std_i)`` ("3sigma", not exact for the ``0.13%`` tail below).

**Bias correction.** Quantizing the weights ``W -> W_q`` shifts each output channel's expectation by
``E[(W_q - W) x]``, which for inputs of per-channel mean ``E[x]`` and no padding is ``(W_q - W) E[x]`` summed over
taps. Subtracting it from the bias makes the quantized layer unbiased on the data's mean; with zero padding the
border positions see fewer non-zero inputs, which the empirical version (mean of ``conv(x, W_q - W)`` on the data)
captures exactly. Because convolution (zero padding included) is linear, that mean is also the mean over output
positions of ``conv(E[x], W_q - W)``, ``E[x]`` the per-position mean input map over the images: :func:`mean_output_shift`
computes it from the map alone (each tap's mean over the positions it visits, :func:`tap_means`), so the cost does not
grow with the number of images.
"""
from __future__ import annotations

import numpy as np

__all__ = ["absorption_amount", "expected_shift", "tap_means", "mean_output_shift"]

_METHODS = ("min", "3sigma")


def absorption_amount(minimum: np.ndarray, mean: np.ndarray, std: np.ndarray, method: str = "min",
                      hi=None) -> np.ndarray:
    """Per channel ``c >= 0`` to move out of the activation. ``hi`` (the clip, if any) caps ``c`` so that the new
    clip ``hi - c`` stays positive (``c <= hi / 2``)."""
    if method not in _METHODS:
        raise ValueError(f"absorption method must be one of {_METHODS}, got {method!r}")
    minimum = np.asarray(minimum, np.float64)
    if method == "min":
        c = np.maximum(minimum, 0.0)
    else:
        c = np.maximum(np.asarray(mean, np.float64) - 3.0 * np.asarray(std, np.float64), 0.0)
    if hi is not None:
        c = np.minimum(c, 0.5 * np.asarray(hi, np.float64))
    return c


def expected_shift(delta_kernel: np.ndarray, input_mean: np.ndarray, kind: str) -> np.ndarray:
    """``(W_q - W) E[x]`` per output channel, summed over taps (no-padding approximation)."""
    from .kernels import const_input_bias

    return const_input_bias(delta_kernel, input_mean, kind)


def tap_means(mean_map: np.ndarray, kernel_hw, strides, dilations, pads) -> np.ndarray:
    """``(kh, kw, C)``: for each kernel tap, the mean of the zero-padded input map ``(H, W, C)`` over the positions
    that tap reads across all output positions (stride, dilation and explicit ``((t, b), (l, r))`` pads)."""
    (t, b), (l, r) = pads
    x = np.pad(np.asarray(mean_map, np.float64), ((t, b), (l, r), (0, 0)))
    kh, kw = kernel_hw
    sh, sw = strides
    dh, dw = dilations
    oh = (x.shape[0] - (kh - 1) * dh - 1) // sh + 1
    ow = (x.shape[1] - (kw - 1) * dw - 1) // sw + 1
    out = np.empty((kh, kw, x.shape[2]))
    for i in range(kh):
        for j in range(kw):
            win = x[i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            out[i, j] = win.mean(axis=(0, 1))
    return out


def mean_output_shift(delta_kernel: np.ndarray, mean_map: np.ndarray, kind: str, strides=(1, 1),
                      dilations=(1, 1), pads=((0, 0), (0, 0))) -> np.ndarray:
    """The mean over images and output positions of ``conv(x, delta_kernel)`` (no bias), per output channel, from
    the mean input map ``E[x]``: ``(H, W, C)`` for convs and a Dense on NHWC, ``(C,)`` for a Dense on vectors.

    Exact (linearity), borders included: ``sum_taps delta[tap] . tap_means[tap]``; depthwise output ``c*M + m`` reads
    input channel ``c`` only.
    """
    d = np.asarray(delta_kernel, np.float64)
    m = np.asarray(mean_map, np.float64)
    if kind == "dense":
        return (m.reshape(-1, m.shape[-1]).mean(axis=0) if m.ndim > 1 else m) @ d
    xt = tap_means(m, d.shape[:2], strides, dilations, pads)
    if kind == "depthwise":
        return np.einsum("ijcm,ijc->cm", d, xt).reshape(-1)
    return np.einsum("ijco,ijc->o", d, xt)
