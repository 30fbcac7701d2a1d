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


# -- activation ranges ---------------------------------------------------------------------------------------------
from qfrewrite.numerics.ranges import (kl_range, minmax_range, mse_range, percentile_range,  # noqa: E402
                                       range_cost, snap_range)
from qfrewrite.quant.observers import TensorObserver  # noqa: E402
from qfrewrite.quant.ranges import activation_range  # noqa: E402


def _zero_point(lo, hi, bits=8):
    scale = (hi - lo) / (2 ** bits - 1)
    return -lo / scale, scale


@pytest.mark.parametrize("lo,hi", [(-1.0, 1.0), (0.0, 6.0), (-0.37, 5.1), (0.2, 3.0), (-4.0, -1.0)])
def test_snap_range_integer_zero_point_holds_zero(lo, hi):
    a, b = snap_range(lo, hi)
    z, scale = _zero_point(a, b)
    assert a <= 0.0 <= b
    assert abs(z - round(z)) < 1e-9
    assert scale == pytest.approx((max(hi, 0) - min(lo, 0)) / 255, rel=1e-12)
    # TensorFlow's nudging leaves a snapped range unchanged
    from qfrewrite.numerics.quantize import nudge

    nlo, nhi, _ = nudge(a, b)
    assert float(nlo) == pytest.approx(a, abs=1e-12) and float(nhi) == pytest.approx(b, abs=1e-12)


def _stats(x, bins=2048):
    o = TensorObserver("x", bins)
    o.update(np.asarray(x, np.float32).reshape(-1, 1))
    return o.result()


def _sample_mse(x, lo, hi):
    return float(np.mean((x - fake_quant_np(x, lo, hi)) ** 2))


def test_mse_range_clips_a_far_outlier_and_beats_minmax():
    rng = np.random.default_rng(5)
    x = rng.normal(size=1_000_000).astype(np.float32)
    x[0] = 40.0  # one far outlier: clipping part of it costs less than a coarser step for a million values
    s = _stats(x)
    lo, hi = activation_range(s, "mse")
    mlo, mhi = activation_range(s, "minmax")
    assert hi < 0.8 * mhi and lo <= -3.0
    assert _sample_mse(x, lo, hi) < 0.8 * _sample_mse(x, mlo, mhi)
    z, _ = _zero_point(lo, hi)
    assert abs(z - round(z)) < 1e-6
    # the search minimises its own cost over a grid that holds (about) the min/max range
    cost = range_cost(s.hist, s.hist_lo, s.hist_hi, np.array([lo, mlo]), np.array([(hi - lo) / 255,
                                                                                  (mhi - mlo) / 255]))
    assert cost[0] < cost[1]


def test_mse_range_keeps_a_heavy_tail_that_matters():
    # t(2.5): the saturation error of clipping its tail outweighs the finer step
    rng = np.random.default_rng(9)
    x = rng.standard_t(2.5, size=200_000).astype(np.float32)
    s = _stats(x)
    lo, hi = activation_range(s, "mse")
    assert hi - lo > 0.5 * (x.max() - x.min())
    # a heavier weight on saturation never gives a narrower range
    widths = [np.subtract(*activation_range(s, "mse", saturation_weight=w)[::-1]) for w in (0.3, 1.0, 3.0, 10.0)]
    assert all(a <= b + 1e-9 for a, b in zip(widths, widths[1:]))


def test_mse_range_keeps_uniform_data_and_relu_lower_bound():
    rng = np.random.default_rng(6)
    u = rng.uniform(-2, 3, 100_000)
    lo, hi = activation_range(_stats(u), "mse")
    assert lo <= -1.9 and hi >= 2.85
    relu = np.maximum(rng.normal(size=100_000), 0)  # half exact zeros
    lo, hi = activation_range(_stats(relu), "mse")
    assert lo == 0.0 and 2.0 < hi <= relu.max() * 17 / 16


def test_percentile_and_minmax_ranges():
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 10, 1_000_000)
    s = _stats(x)
    lo, hi = percentile_range(s.hist, s.hist_lo, s.hist_hi, 99.0)
    assert lo == 0.0 and hi == pytest.approx(9.9, abs=0.02)
    assert minmax_range(1.0, 5.0) == (0.0, 5.0)
    a, b = activation_range(s, "percentile", percentile=99.0)
    assert b == pytest.approx(9.9, abs=0.05) and a == 0.0


def test_kl_range_one_sided_and_symmetric():
    rng = np.random.default_rng(8)
    x = np.abs(rng.normal(size=200_000))
    x[:20] = 40.0
    s = _stats(x)
    lo, hi = kl_range(s.hist, s.hist_lo, s.hist_hi)
    assert lo == 0.0 and 2.0 < hi < 20.0
    y = rng.normal(size=200_000)
    y[:10] = -30.0
    s = _stats(y)
    lo, hi = kl_range(s.hist, s.hist_lo, s.hist_hi)
    assert lo == -hi and 2.0 < hi < 15.0


def test_range_method_unknown_raises():
    with pytest.raises(QfrewriteError, match="mse"):
        activation_range(_stats([0.0, 1.0]), "entropy")


def test_mse_range_degenerate():
    s = _stats(np.zeros(100))
    lo, hi = mse_range(s.hist, s.hist_lo, s.hist_hi, s.min, s.max, zeros=s.zeros)
    assert lo == 0.0 and hi == pytest.approx(1e-6)  # the narrowest range TFLite keeps


def test_weight_range_floor_matches_converter():
    from qfrewrite.quant.weights import MIN_ABSMAX

    k = np.ones((1, 1, 2, 3))
    k[..., 1] = 0.0
    k[..., 2] = 1e-9
    fq = weight_quant_attrs(_conv(k), "per_channel")
    assert fq.hi == pytest.approx((1.0, MIN_ABSMAX, MIN_ABSMAX))
