import numpy as np
import pytest

from qfrewrite.backend.executor import Executor
from qfrewrite.data import CalibrationSet
from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import ConvAttrs, Graph, Op, verify
from qfrewrite.numerics.quantize import symmetric_weight_attrs
from qfrewrite.pass_infra import Context
from qfrewrite.passes import CorrectBias


def _layer_graph(rng, op, outlier=30.0):
    g = Graph()
    x = g.add_input("x", (None, 8, 8, 4))
    if op is Op.DEPTHWISE_CONV2D:
        k = rng.normal(size=(3, 3, 4, 1))
        k[0, 0, 0, 0] = outlier
    else:
        k = rng.normal(size=(3, 3, 4, 5))
        k[0, 0, 0, 0] = outlier
    n = g.add_node(op, [x, g.const(k), g.const(rng.normal(size=k.shape[2] * k.shape[3] if op is
                                                                   Op.DEPTHWISE_CONV2D else 5))],
                   ConvAttrs(padding="SAME"))
    g.outputs = [n.output]
    return g


def _channel_means(g, x, quantize):
    return Executor(g, quantize=quantize)(x)[0].mean(axis=(0, 1, 2))


@pytest.mark.parametrize("op", [Op.CONV2D, Op.DEPTHWISE_CONV2D])
@pytest.mark.parametrize("weights", ["per_tensor", "per_channel"])
def test_corrected_layer_is_unbiased_on_the_data(rng, op, weights):
    g = _layer_graph(rng, op)
    x = (rng.normal(size=(16, 8, 8, 4)) + 2.0).astype(np.float32)  # non-zero input means
    float_mean = _channel_means(g, x, quantize=False)
    layer = g.find(op)[0]
    layer.weight_quant = symmetric_weight_attrs(layer, per_channel=(weights == "per_channel"))
    err_before = np.abs(_channel_means(g, x, quantize=True) - float_mean).max()
    res = CorrectBias(weights=weights)(g, Context(CalibrationSet([x[:8], x[8:]])))
    verify(g)
    assert res.modified and res.stats["corrected"] == 1 and res.stats["images"] == 16
    err_after = np.abs(_channel_means(g, x, quantize=True) - float_mean).max()
    assert err_before > 1e-3
    assert err_after < 1e-4 * max(1.0, np.abs(float_mean).max())


def test_follows_the_insert_fakequant_options(rng):
    x = (rng.normal(size=(8, 8, 8, 4)) + 1.0).astype(np.float32)
    shifts = {}
    for w in ("per_tensor", "per_channel"):
        g = _layer_graph(rng if False else np.random.default_rng(1), Op.CONV2D)
        b0 = g.find(Op.CONV2D)[0].bias.const.copy()
        CorrectBias(weights=w)(g, Context(CalibrationSet([x])))
        shifts[w] = g.find(Op.CONV2D)[0].bias.const - b0
    assert not np.allclose(shifts["per_tensor"], shifts["per_channel"])
    # the outlier makes per-tensor steps coarse: its correction is the larger
    assert np.abs(shifts["per_tensor"]).max() > np.abs(shifts["per_channel"]).max()


def test_kernel_on_the_grid_is_a_no_op(rng):
    g = Graph()
    x = g.add_input("x", (None, 4, 4, 2))
    k = rng.integers(-127, 128, size=(1, 1, 2, 3)).astype(np.float32)
    k[0, 0, 0, 0] = 127.0
    g.add_node(Op.CONV2D, [x, g.const(k)], ConvAttrs())
    g.outputs = [g.find(Op.CONV2D)[0].output]
    res = CorrectBias(weights="per_tensor")(g, Context(CalibrationSet([np.ones((2, 4, 4, 2), np.float32)])))
    assert not res.modified and res.reason
    assert g.find(Op.CONV2D)[0].bias is None


def test_bad_option():
    with pytest.raises(QfrewriteError, match="weights"):
        CorrectBias(weights="per_pixel")



def test_sequential_mode_matches_every_layer_mean(rng):
    from tests.quant_graphs import dead_channel_mobilenet

    g = dead_channel_mobilenet(rng, tiny=0.0)
    x = rng.normal(scale=2.0, size=(16, 12, 12, 3)).astype(np.float32)
    names = [n.output.name for n in g.find(Op.CONV2D, Op.DEPTHWISE_CONV2D, Op.DENSE)]
    float_means = [v.reshape(-1, v.shape[-1]).mean(0) for v in Executor(g, taps=names)(x)[1].values()]
    res = CorrectBias(weights="per_tensor", mode="sequential")(g, Context(CalibrationSet([x[:8], x[8:]])))
    assert res.modified and res.stats["mode"] == "sequential" and res.stats["corrected"] == len(names)
    for n in g.find(Op.CONV2D, Op.DEPTHWISE_CONV2D, Op.DENSE):
        n.weight_quant = symmetric_weight_attrs(n, per_channel=False)
    quant_means = [v.reshape(-1, v.shape[-1]).mean(0) for v in Executor(g, taps=names, quantize=True)(x)[1].values()]
    for q, f in zip(quant_means, float_means):
        np.testing.assert_allclose(q, f, atol=1e-4 * max(1.0, np.abs(f).max()))


@pytest.mark.parametrize("op,kshape,attrs,x_shape", [
    (Op.CONV2D, (3, 3, 4, 5), ConvAttrs((2, 2), "SAME"), (6, 9, 7, 4)),
    (Op.CONV2D, (3, 2, 4, 5), ConvAttrs((1, 2), ((2, 0), (1, 1)), (2, 1)), (6, 9, 8, 4)),
    (Op.DEPTHWISE_CONV2D, (3, 3, 4, 2), ConvAttrs((2, 2), "SAME"), (6, 9, 9, 4)),
    (Op.DEPTHWISE_CONV2D, (5, 5, 4, 1), ConvAttrs((1, 1), ((1, 3), (2, 2)), (2, 2)), (6, 12, 12, 4)),
    (Op.DENSE, (4, 3), None, (6, 4)),
    (Op.DENSE, (4, 3), None, (6, 5, 5, 4)),
])
def test_the_mean_map_shift_equals_the_mean_of_the_layer_error(rng, op, kshape, attrs, x_shape):
    """mean(conv(E[x], dW)) is the mean over images and positions of conv(x, dW), borders, strides, dilations and
    asymmetric pads included."""
    from qfrewrite.ir import layer_kind, resolve_pads
    from qfrewrite.numerics.bias import mean_output_shift

    g = Graph()
    x = g.add_input("x", (None, *x_shape[1:]))
    delta = rng.normal(size=kshape)
    n = g.add_node(op, [x, g.const(delta)], attrs)
    g.outputs = [n.output]
    data = (rng.normal(size=x_shape) + rng.normal(size=x_shape[1:])).astype(np.float32)
    y = Executor(g)(data)[0]
    want = y.reshape(-1, y.shape[-1]).mean(axis=0)
    if op is Op.DENSE:
        got = mean_output_shift(delta, data.mean(axis=0), "dense")
    else:
        pads = resolve_pads(attrs.padding, x_shape[1:3], kshape[:2], attrs.strides, attrs.dilations)
        got = mean_output_shift(delta, data.mean(axis=0), layer_kind(n), attrs.strides, attrs.dilations, pads)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
