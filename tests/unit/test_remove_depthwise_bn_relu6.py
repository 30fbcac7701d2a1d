import numpy as np
import pytest

from qfrewrite.backend.executor import run_graph
from qfrewrite.ir import Op, verify
from qfrewrite.passes import FoldBatchNorm, RemoveDepthwiseBNReLU6
from tests.graphs import tiny_mobilenet
from tests.quant_graphs import dw_pw_graph


def _without_clip(g):
    ref = g.copy()
    ref.bypass(ref.find(Op.CLIP)[0])
    return ref


@pytest.mark.parametrize("fold_first", [False, True])
def test_bn_moves_into_the_pointwise_conv(rng, fold_first):
    g = dw_pw_graph(rng, bn=True, dw_bias=rng.normal(size=6) if fold_first else None)
    natural = g.find(Op.DEPTHWISE_CONV2D)[0].weight.const.copy()
    if fold_first:
        FoldBatchNorm()(g)
    ref_graph = _without_clip(g)
    x = rng.normal(size=(4, 8, 8, 6)).astype(np.float32)
    ref = run_graph(ref_graph, x)[0]
    p = RemoveDepthwiseBNReLU6()
    assert not p.exact
    res = p(g)
    verify(g)
    assert res.modified and res.stats["rewritten"] == 1 and "destroys" in res.stats["warning"]
    assert "to_keras" in res.stats["warning"]
    assert not g.find(Op.CLIP) and not g.find(Op.BATCH_NORM)
    dw = g.find(Op.DEPTHWISE_CONV2D)[0]
    np.testing.assert_allclose(dw.weight.const, natural, rtol=1e-5, atol=1e-6)
    assert dw.bias is None or not np.any(dw.bias.const)
    # exact up to the removed ReLU6
    np.testing.assert_allclose(run_graph(g, x)[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_padded_consumer_is_left_alone(rng):
    g = dw_pw_graph(rng, pw_kernel=(3, 3))
    res = RemoveDepthwiseBNReLU6()(g)
    assert not res.modified and any("padding" in s.reason for s in res.skipped)
    assert len(g.find(Op.CLIP)) == 1 and len(g.find(Op.BATCH_NORM)) == 1


def test_no_depthwise_is_a_no_op(rng):
    g = tiny_mobilenet(rng)
    g.bypass(g.find(Op.CLIP)[1])  # the depthwise's clip: the depthwise BN is now followed by the pointwise conv
    n = len(g)
    res = RemoveDepthwiseBNReLU6()(g)
    assert not res.modified and res.reason and len(g) == n
