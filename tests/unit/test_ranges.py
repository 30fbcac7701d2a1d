"""Weight and activation range selection (pure numpy)."""
from __future__ import annotations

import numpy as np
import pytest

from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import ConvAttrs, Graph, Op
from qfrewrite.numerics.quantize import fake_quant_np, kernel_channels_last
from qfrewrite.quant.weights import mse_weight_absmax, weight_quant_attrs


def _conv(kernel, op=Op.CONV2D):
    g = Graph("w")
    x = g.add_input("x", (None, 8, 8, kernel.shape[2]))
    n = g.add_node(op, [x, g.const(kernel.astype(np.float32))], ConvAttrs())
    g.outputs = [n.output]
    return n


def test_weight_minmax_per_channel_is_symmetric_absmax():
    rng = np.random.default_rng(0)
    k = rng.normal(size=(3, 3, 4, 6))
    k[..., 2] *= 10
    fq = weight_quant_attrs(_conv(k), "per_channel", "minmax")
    amax = np.abs(k.reshape(-1, 6)).max(axis=0)
    np.testing.assert_allclose(fq.hi, amax, rtol=1e-6)
    np.testing.assert_allclose(fq.lo, -amax, rtol=1e-6)
    assert fq.narrow_range and fq.axis == -1 and fq.bits == 8


def test_weight_minmax_per_tensor_single_range():
    rng = np.random.default_rng(1)
    k = rng.normal(size=(1, 1, 4, 5))
    fq = weight_quant_attrs(_conv(k), "per_tensor", "minmax")
    assert len(fq.lo) == 1 and fq.axis is None
    assert fq.hi[0] == pytest.approx(np.abs(k).max(), rel=1e-6)


def test_weight_depthwise_channels_are_c_times_m():
    rng = np.random.default_rng(2)
    k = rng.normal(size=(3, 3, 4, 2))
    n = _conv(k, Op.DEPTHWISE_CONV2D)
    fq = weight_quant_attrs(n, "per_channel")
    np.testing.assert_allclose(fq.hi, np.abs(k.reshape(9, 8)).max(axis=0), rtol=1e-6)


def test_weight_mse_beats_minmax_with_outlier_and_never_worse():
    rng = np.random.default_rng(3)
    w = rng.uniform(-1, 1, size=(100_000, 3))
    w[0, 0] = 3.0  # one outlier in channel 0: clipping it costs less than the coarser step
    a = mse_weight_absmax(w, per_channel=True)
    amax = np.abs(w).max(axis=0)
    assert a[0] < 0.8 * amax[0]
    assert a[1] > 0.95 * amax[1]
    for c in range(3):
        e_mse = np.mean((w[:, c] - fake_quant_np(w[:, c], -a[c], a[c], 8, True)) ** 2)
        e_mm = np.mean((w[:, c] - fake_quant_np(w[:, c], -amax[c], amax[c], 8, True)) ** 2)
        assert e_mse <= e_mm * (1 + 1e-9)


def test_weight_mse_attrs_match_search():
    rng = np.random.default_rng(4)
    k = rng.standard_t(3, size=(3, 3, 8, 4))
    n = _conv(k)
    fq = weight_quant_attrs(n, "per_channel", "mse")
    np.testing.assert_allclose(fq.hi, mse_weight_absmax(kernel_channels_last(n), True), rtol=1e-6)


def test_weight_bad_options_raise():
    n = _conv(np.ones((1, 1, 2, 2)))
    with pytest.raises(QfrewriteError, match="granularity"):
        weight_quant_attrs(n, "per_row")
    with pytest.raises(QfrewriteError, match="method"):
        weight_quant_attrs(n, "per_tensor", "kl")
