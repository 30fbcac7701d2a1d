import numpy as np
import pytest

from qfrewrite.backend.executor import run_graph
from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import Op, verify
from qfrewrite.passes import FoldBatchNorm, ReLU6ToReLU
from tests.graphs import tiny_mobilenet


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("scope,expected", [("pointwise", 1), ("depthwise", 1), ("all", 3)])
def test_scope(rng, scope, expected, fold):
    g = tiny_mobilenet(rng)
    if fold:
        FoldBatchNorm()(g)
    res = ReLU6ToReLU(scope)(g)
    verify(g)
    assert res.modified and res.stats["replaced"] == expected
    assert len(g.find(Op.RELU)) == expected and len(g.find(Op.CLIP)) == 3 - expected


def test_function_changes_only_above_six(rng):
    g = tiny_mobilenet(rng, bn=False)  # no biases: small inputs give activations far below 6
    x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    ref = run_graph(g, x)[0]
    g2 = g.copy()
    assert not ReLU6ToReLU.exact
    ReLU6ToReLU("all")(g2)
    x_small = x * 1e-3  # activations far below 6: identical
    np.testing.assert_allclose(run_graph(g2, x_small)[0], run_graph(g, x_small)[0], rtol=1e-5, atol=1e-6)
    big = x * 100
    assert not np.allclose(run_graph(g2, big)[0], run_graph(g, big)[0])


def test_no_relu6_is_a_no_op(rng):
    g = tiny_mobilenet(rng)
    ReLU6ToReLU("all")(g)
    res = ReLU6ToReLU("all")(g)
    assert not res.modified and res.reason


def test_bad_scope():
    with pytest.raises(QfrewriteError, match="scope"):
        ReLU6ToReLU("everything")
