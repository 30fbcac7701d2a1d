import numpy as np
import pytest

from qfrewrite.numerics.bias import expected_shift
from qfrewrite.numerics.kernels import (const_input_bias, in_absmax, out_absmax, out_channels_last, scale_in,
                                        scale_out, zero_in_channels, zero_out_channels)

SHAPES = {"conv": (3, 3, 4, 5), "depthwise": (3, 3, 4, 2), "dense": (4, 5)}


def _valid_conv(x, k, kind):
    """Brute-force VALID convolution of one (H, W, C) image, for checking channel bookkeeping."""
    if kind == "dense":
        return x @ k
    kh, kw = k.shape[:2]
    h, w = x.shape[0] - kh + 1, x.shape[1] - kw + 1
    out = []
    for i in range(h):
        for j in range(w):
            patch = x[i:i + kh, j:j + kw]
            if kind == "conv":
                out.append(np.einsum("hwc,hwco->o", patch, k))
            else:
                out.append(np.einsum("hwc,hwcm->cm", patch, k).reshape(-1))
    return np.array(out)


@pytest.mark.parametrize("kind", ["conv", "depthwise", "dense"])
def test_scaling_output_and_input_channels(rng, kind):
    k = rng.normal(size=SHAPES[kind])
    n_out = out_channels_last(k, kind).shape[1]
    n_in = k.shape[0] if kind == "dense" else k.shape[2]
    s_out, s_in = rng.uniform(0.5, 2.0, n_out), rng.uniform(0.5, 2.0, n_in)
    k2, b2 = scale_out(k, np.ones(n_out), s_out, kind)
    np.testing.assert_allclose(out_absmax(k2, kind), out_absmax(k, kind) / s_out)
    np.testing.assert_allclose(b2, 1 / s_out)
    assert k2.dtype == np.float64 and scale_out(k.astype(np.float32), None, s_out, kind)[0].dtype == np.float32
    np.testing.assert_allclose(in_absmax(scale_in(k, s_in, kind), kind), in_absmax(k, kind) * s_in)
    # scaling an input channel of the layer is the same as scaling that channel of its input
    x = rng.normal(size=(3, 3, n_in)) if kind != "dense" else rng.normal(size=(n_in,))
    np.testing.assert_allclose(_valid_conv(x, scale_in(k, s_in, kind), kind), _valid_conv(x * s_in, k, kind),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["conv", "depthwise", "dense"])
def test_constant_inputs_give_a_bias(rng, kind):
    k = rng.normal(size=SHAPES[kind])
    n_in = k.shape[0] if kind == "dense" else k.shape[2]
    v = rng.normal(size=n_in)
    x = np.broadcast_to(v, (3, 3, n_in)) if kind != "dense" else v
    np.testing.assert_allclose(_valid_conv(x, k, kind).reshape(-1), const_input_bias(k, v, kind), rtol=1e-12)
    np.testing.assert_allclose(expected_shift(k, v, kind), const_input_bias(k, v, kind))


@pytest.mark.parametrize("kind", ["conv", "depthwise", "dense"])
def test_zeroing_channels(rng, kind):
    k = rng.normal(size=SHAPES[kind])
    z = zero_in_channels(k, [1], kind)
    assert in_absmax(z, kind)[1] == 0 and np.all(in_absmax(z, kind)[[0, 2, 3]] > 0)
    z = zero_out_channels(k, [3], kind)
    assert out_absmax(z, kind)[3] == 0 and np.count_nonzero(out_absmax(z, kind) == 0) == 1
    with pytest.raises(ValueError):
        out_absmax(k, "pointwise")
