import numpy as np
import pytest

from qfrewrite.backend.executor import run_graph
from qfrewrite.ir import Op, verify
from qfrewrite.passes import FoldDeadChannels
from tests.graphs import tiny_mobilenet
from tests.quant_graphs import dead_channel_mobilenet


def _x(rng, n=4):
    return rng.normal(scale=2.0, size=(n, 12, 12, 3)).astype(np.float32)


@pytest.mark.parametrize("pad,tiny", [("SAME", 0.0), ("VALID", 0.0), ("SAME", 1e-13)])
def test_fold_is_exact_and_zeroes_the_outlier_weights(rng, pad, tiny):
    g = dead_channel_mobilenet(rng, pad=pad, tiny=tiny)
    x = _x(rng)
    ref = run_graph(g, x)[0]
    res = FoldDeadChannels()(g)
    verify(g)
    assert res.modified
    stem, dw = g.find(Op.CONV2D)[0], g.find(Op.DEPTHWISE_CONV2D)[0]
    assert res.stats["constant_channels"][stem.name] == [1, 4]
    # channel 1 is a constant 0 (negative bias): its depthwise weights go whatever the padding
    assert np.all(dw.weight.const[:, :, 1, :] == 0)
    assert np.all(stem.weight.const[..., [1, 4]] == 0)
    if pad == "VALID":  # channel 4 is a constant 2.0: foldable only without padding
        assert np.all(dw.weight.const[:, :, 4, :] == 0)
        assert res.skipped == []
    else:
        assert np.any(dw.weight.const[:, :, 4, :] != 0)
        [why] = res.skips_for(dw.name)
        assert "[4]" in why and "padding" in why
    # the depthwise channel fed by 0 is a constant folded on into the next pointwise conv
    pw = g.find(Op.CONV2D)[1]
    assert 1 in res.stats["folded_into"][pw.name]
    assert np.all(pw.weight.const[:, :, 1, :] == 0)
    out = run_graph(g, x)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_depthwise_spread_drops(rng):
    from qfrewrite.analysis.channel_stats import graph_stats_summary

    g = dead_channel_mobilenet(rng, pad="VALID")
    dw = g.find(Op.DEPTHWISE_CONV2D)[0].name
    before = graph_stats_summary(g)[dw]["max_range"]
    FoldDeadChannels()(g)
    after = graph_stats_summary(g)[g.find(Op.DEPTHWISE_CONV2D)[0].name]["max_range"]
    assert after < before / 10


def test_no_constant_channel_is_a_no_op(rng):
    g = tiny_mobilenet(rng, bias=True)
    kernels = [n.weight.const.copy() for n in g.find(Op.CONV2D, Op.DEPTHWISE_CONV2D, Op.DENSE)]
    res = FoldDeadChannels()(g)
    assert not res.modified and res.reason
    for k, n in zip(kernels, g.find(Op.CONV2D, Op.DEPTHWISE_CONV2D, Op.DENSE)):
        np.testing.assert_array_equal(k, n.weight.const)


def test_constant_reaching_a_graph_output_keeps_its_producer(rng):
    from qfrewrite.ir import ConvAttrs, Graph

    g = Graph()
    x = g.add_input("x", (None, 4, 4, 2))
    k = rng.normal(size=(1, 1, 2, 3))
    k[..., 0] = 0.0
    c = g.add_node(Op.CONV2D, [x, g.const(k), g.const(np.array([1.5, 0.0, 0.0]))], ConvAttrs())
    g.outputs = [c.output]
    res = FoldDeadChannels()(g)
    assert not res.modified and res.stats["constant_channels"] == {c.name: [0]}
    assert c.bias.const[0] == 1.5


def test_bounds_find_a_channel_that_never_crosses_its_relu(rng):
    """Weights of 1e-6 (far above the zero tolerance) against a bias of -1: after a ReLU6 input the pre-activation
    stays below 0, so the ReLU outputs a constant 0."""
    g = dead_channel_mobilenet(rng, pad="SAME", tiny=0.0, dead=(), dead_bias=())
    pw = g.find(Op.CONV2D)[1]
    k, b = pw.weight.const.copy(), pw.bias.const.copy()
    k[..., 3] = 1e-6 * np.sign(rng.normal(size=k[..., 3].shape))
    b[3] = -1.0
    pw.inputs[1].set_const(k)
    pw.inputs[2].set_const(b)
    x = _x(rng)
    ref = run_graph(g, x)[0]
    res = FoldDeadChannels(zero_tol=0.0)(g)
    assert res.modified
    dw2 = g.find(Op.DEPTHWISE_CONV2D)[1]
    assert 3 in res.stats["folded_into"][dw2.name] and np.all(dw2.weight.const[:, :, 3, :] == 0)
    assert res.stats["constant_channels"][g.find(Op.CLIP)[2].name] == [3]
    assert 3 in res.stats["producers_cleared"][pw.name] and np.all(g.find(Op.CONV2D)[1].weight.const[..., 3] == 0)
    np.testing.assert_allclose(run_graph(g, x)[0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_bias_that_can_cross_zero_is_not_constant(rng):
    g = dead_channel_mobilenet(rng, pad="SAME", tiny=0.0, dead=(), dead_bias=())
    pw = g.find(Op.CONV2D)[1]
    k, b = pw.weight.const.copy(), pw.bias.const.copy()
    k[..., 3] = 0.05  # 6 inputs x 6 x 0.05 = 1.8 > 1: the channel can become positive
    b[3] = -1.0
    pw.inputs[1].set_const(k)
    pw.inputs[2].set_const(b)
    res = FoldDeadChannels(zero_tol=0.0)(g)
    assert pw.name not in res.stats["constant_channels"]
