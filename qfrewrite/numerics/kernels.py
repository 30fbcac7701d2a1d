"""Per-channel views of layer kernels, shared by the equalization, dead-channel and bias maths.

Kernel layouts (see :mod:`qfrewrite.ir.ops`): ``"conv"`` HWIO ``(kh, kw, I, O)``; ``"depthwise"`` ``(kh, kw, C, M)``
with output channel ``c * M + m`` fed by input channel ``c`` only; ``"dense"`` ``(I, O)``.

* output channel ``o`` of a kernel: every weight that produces ``o``;
* input channel ``i``: every weight that reads ``i`` (for a depthwise kernel, the ``M`` outputs ``i*M .. i*M+M-1``).

All functions are pure numpy and return new arrays; scaling keeps a float64 kernel in float64 (so repeated scaling
does not round) and returns float32 otherwise.
"""
from __future__ import annotations

import numpy as np

__all__ = ["KINDS", "out_channels_last", "out_absmax", "in_absmax", "scale_out", "scale_in", "tap_sums",
           "const_input_bias", "zero_in_channels", "zero_out_channels", "n_in", "n_out", "as_rows", "from_rows"]

KINDS = ("conv", "depthwise", "dense")


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kernel kind must be one of {KINDS}, got {kind!r}")


def n_in(kernel: np.ndarray, kind: str) -> int:
    _check(kind)
    return kernel.shape[0] if kind == "dense" else kernel.shape[2]


def n_out(kernel: np.ndarray, kind: str) -> int:
    _check(kind)
    if kind == "depthwise":
        return kernel.shape[2] * kernel.shape[3]
    return kernel.shape[-1]


def out_channels_last(kernel: np.ndarray, kind: str) -> np.ndarray:
    """The kernel as ``(taps_and_inputs, O)``: one column per output channel."""
    _check(kind)
    k = np.asarray(kernel)
    if kind == "depthwise":
        kh, kw, c, m = k.shape
        return k.reshape(kh * kw, c * m)
    return k.reshape(-1, k.shape[-1])


def as_rows(kernel: np.ndarray, kind: str) -> np.ndarray:
    """The kernel as the rows a layer multiplies its input patches by: ``(O, K)`` with ``K`` in the patch order
    ``(kh, kw, I)`` (dense: ``I``); depthwise ``(C, M, kh * kw)``, row ``(c, m)`` being output channel ``c*M + m``."""
    _check(kind)
    k = np.asarray(kernel)
    if kind == "depthwise":
        kh, kw, c, m = k.shape
        return k.reshape(kh * kw, c, m).transpose(1, 2, 0)
    return k.reshape(-1, k.shape[-1]).T


def from_rows(rows: np.ndarray, shape, kind: str) -> np.ndarray:
    """The inverse of :func:`as_rows` for a kernel of ``shape``."""
    _check(kind)
    if kind == "depthwise":
        return np.asarray(rows).transpose(2, 0, 1).reshape(shape)
    return np.asarray(rows).T.reshape(shape)


def out_absmax(kernel: np.ndarray, kind: str) -> np.ndarray:
    """``max |W|`` per output channel."""
    return np.abs(out_channels_last(kernel, kind)).max(axis=0).astype(np.float64)


def in_absmax(kernel: np.ndarray, kind: str) -> np.ndarray:
    """``max |W|`` per input channel."""
    _check(kind)
    k = np.abs(np.asarray(kernel, np.float64))
    if kind == "dense":
        return k.max(axis=1)
    return k.max(axis=(0, 1, 3))


def _dtype(kernel) -> type:
    return np.float64 if np.asarray(kernel).dtype == np.float64 else np.float32


def _out_shape_vec(s: np.ndarray, kernel: np.ndarray, kind: str) -> np.ndarray:
    s = np.asarray(s, np.float64)
    if kind == "depthwise":
        return s.reshape(kernel.shape[2], kernel.shape[3])
    return s


def scale_out(kernel: np.ndarray, bias, s: np.ndarray, kind: str):
    """Divide output channel ``o`` (weights and bias) by ``s[o]``: the layer's output channel becomes ``y_o / s_o``."""
    _check(kind)
    dt = _dtype(kernel)
    k = np.asarray(kernel, np.float64) / _out_shape_vec(s, kernel, kind)
    b = None if bias is None else np.asarray(bias, np.float64) / np.asarray(s, np.float64)
    return k.astype(dt), (None if b is None else b.astype(dt))


def scale_in(kernel: np.ndarray, s: np.ndarray, kind: str) -> np.ndarray:
    """Multiply the weights reading input channel ``i`` by ``s[i]`` (compensates an input divided by ``s``)."""
    _check(kind)
    k = np.asarray(kernel, np.float64)
    s = np.asarray(s, np.float64)
    if kind == "dense":
        k = k * s[:, None]
    else:
        k = k * s[None, None, :, None]
    return k.astype(_dtype(kernel))


def tap_sums(kernel: np.ndarray, kind: str) -> np.ndarray:
    """Sum of the weights over spatial taps: ``(I, O)`` for conv/dense, ``(C, M)`` for depthwise."""
    _check(kind)
    k = np.asarray(kernel, np.float64)
    return k if kind == "dense" else k.sum(axis=(0, 1))


def const_input_bias(kernel: np.ndarray, values: np.ndarray, kind: str) -> np.ndarray:
    """Per output channel ``sum_i v_i * sum_taps W[.., i, o]``: what constant inputs ``v`` add to each output where
    the whole receptive field lies inside the input (no padding)."""
    v = np.asarray(values, np.float64)
    sums = tap_sums(kernel, kind)
    if kind == "depthwise":
        return (sums * v[:, None]).reshape(-1)
    return v @ sums


def zero_in_channels(kernel: np.ndarray, channels, kind: str) -> np.ndarray:
    """A copy of ``kernel`` with every weight reading the given input channels set to 0."""
    _check(kind)
    k = np.array(kernel, np.float32, copy=True)
    idx = np.asarray(list(channels), int)
    if idx.size:
        if kind == "dense":
            k[idx, :] = 0.0
        else:
            k[:, :, idx, :] = 0.0
    return k


def zero_out_channels(kernel: np.ndarray, channels, kind: str) -> np.ndarray:
    """A copy of ``kernel`` with every weight producing the given output channels set to 0."""
    _check(kind)
    k = np.array(kernel, np.float32, copy=True)
    idx = np.asarray(list(channels), int)
    if idx.size:
        if kind == "depthwise":
            m = k.shape[3]
            k[:, :, idx // m, idx % m] = 0.0
        else:
            k[..., idx] = 0.0
    return k
