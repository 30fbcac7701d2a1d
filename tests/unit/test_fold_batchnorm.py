import numpy as np
import pytest

import qfrewrite
from qfrewrite.backend.executor import run_graph
from qfrewrite.ir import BatchNormAttrs, ClipAttrs, ConvAttrs, Graph, Op, verify
from qfrewrite.passes import FoldBatchNorm
from tests.graphs import add_bn, bn_params, tiny_mobilenet


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scope,expected", [("all", 3), ("depthwise", 1), ("pointwise", 2)])
def test_fold_is_exact(rng, bias, scope, expected):
    g = tiny_mobilenet(rng, bias=bias)
    x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    ref = run_graph(g, x)[0]
    res = FoldBatchNorm(scope)(g.copy())
    verify(res.graph)
    assert res.modified and res.stats["folded"] == expected
    assert len(res.graph.find(Op.BATCH_NORM)) == 3 - expected
    out = run_graph(res.graph, x)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_dense_fold_is_exact(rng):
    g = Graph()
    x = g.add_input("x", (None, 6))
    d = g.add_node(Op.DENSE, [x, g.const(rng.normal(size=(6, 4)))])
    y = add_bn(g, rng, d.output, 4, eps=1e-5)
    g.outputs = [y]
    xs = rng.normal(size=(8, 6)).astype(np.float32)
    ref = run_graph(g, xs)[0]
    res = FoldBatchNorm()(g)
    assert res.modified and not g.find(Op.BATCH_NORM)
    np.testing.assert_allclose(run_graph(g, xs)[0], ref, rtol=1e-5, atol=1e-6)


def test_no_batchnorm_is_a_no_op(rng):
    g = tiny_mobilenet(rng, bn=False)
    before = [n.name for n in g]
    res = FoldBatchNorm()(g)
    assert not res.modified and res.stats["folded"] == 0 and res.reason
    assert [n.name for n in g] == before


def test_bn_after_shared_output_is_left_alone(rng):
    g = Graph()
    x = g.add_input("x", (None, 8, 8, 4))
    c = g.add_node(Op.CONV2D, [x, g.const(rng.normal(size=(1, 1, 4, 4)))], ConvAttrs())
    y = add_bn(g, rng, c.output, 4)
    z = g.add_node(Op.ADD, [y, c.output])  # the conv output has a second reader
    g.outputs = [z.output]
    res = FoldBatchNorm()(g)
    assert not res.modified
    assert any("other readers" in s.reason for s in res.skipped)


def test_zero_variance_with_zero_eps_does_not_divide_by_zero(rng):
    g = Graph()
    x = g.add_input("x", (None, 8, 8, 4))
    c = g.add_node(Op.DEPTHWISE_CONV2D, [x, g.const(rng.normal(size=(3, 3, 4, 1)))], ConvAttrs(padding="SAME"))
    gamma, beta, mean, var = bn_params(rng, 4)
    var[2] = 0.0
    y = add_bn(g, rng, c.output, 4, eps=0.0, params=[gamma, beta, mean, var])
    g.outputs = [y]
    with np.errstate(all="raise"):
        res = FoldBatchNorm()(g)
    assert res.stats["degenerate_channels"] == {next(iter(res.stats["zero_variance_channels"])): [2]}
    k = g.find(Op.DEPTHWISE_CONV2D)[0]
    assert np.all(np.isfinite(k.weight.const)) and np.all(k.weight.const[..., 2, :] == 0)
    assert k.bias.const[2] == pytest.approx(beta[2])


def test_rewrite_does_not_touch_the_callers_graph(rng):
    g = tiny_mobilenet(rng)
    n = len(g)
    res = qfrewrite.rewrite(g, passes=[FoldBatchNorm()])
    assert len(g) == n and len(res.graph) == n - 3
    assert res.report["FoldBatchNorm"].modified


def test_zero_variance_with_eps_is_reported_and_finite(rng, caplog):
    g = Graph()
    x = g.add_input("x", (None, 8, 8, 4))
    c = g.add_node(Op.CONV2D, [x, g.const(rng.normal(size=(1, 1, 4, 4)))], ConvAttrs())
    gamma, beta, mean, var = bn_params(rng, 4)
    var[[0, 3]] = 0.0
    y = add_bn(g, rng, c.output, 4, eps=1e-3, params=[gamma, beta, mean, var])
    g.outputs = [y]
    xs = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    ref = run_graph(g, xs)[0]
    with caplog.at_level("WARNING"):
        res = FoldBatchNorm()(g)
    assert list(res.stats["zero_variance_channels"].values()) == [[0, 3]]
    assert "degenerate_channels" not in res.stats and "zero variance" in caplog.text
    np.testing.assert_allclose(run_graph(g, xs)[0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
