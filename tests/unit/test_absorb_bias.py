import numpy as np
import pytest

from qfrewrite.backend.executor import run_graph
from qfrewrite.data import CalibrationSet
from qfrewrite.errors import DataError
from qfrewrite.ir import Op, verify
from qfrewrite.numerics.bias import absorption_amount
from qfrewrite.pass_infra import Context
from qfrewrite.passes import AbsorbBias
from tests.quant_graphs import dw_pw_graph


def _graph(rng, bias, clip_hi=6.0, pw_kernel=(1, 1)):
    return dw_pw_graph(rng, bn=False, dw_bias=np.full(6, bias), clip_hi=clip_hi, pw_kernel=pw_kernel)


@pytest.mark.parametrize("clip_hi", [6.0, None])
def test_absorption_is_exact_on_the_calibration_data(rng, clip_hi):
    g = _graph(rng, 3.0, clip_hi)
    x = rng.uniform(-0.2, 0.2, size=(8, 8, 8, 6)).astype(np.float32)
    ref = run_graph(g, x)[0]
    res = AbsorbBias()(g, Context(CalibrationSet([x])))
    verify(g)
    assert res.modified and res.stats["absorbed_channels"] == {g.find(Op.DEPTHWISE_CONV2D)[0].name: 6}
    dw = g.find(Op.DEPTHWISE_CONV2D)[0]
    assert np.all(dw.bias.const < 3.0) and np.all(dw.bias.const >= -1e-6)
    if clip_hi is not None:
        assert not g.find(Op.CLIP) and len(g.find(Op.MINIMUM)) == 1
    np.testing.assert_allclose(run_graph(g, x)[0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_negative_preactivation_is_a_no_op(rng):
    g = _graph(rng, -0.5)
    x = rng.normal(size=(4, 8, 8, 6)).astype(np.float32)
    res = AbsorbBias()(g, Context(CalibrationSet([x])))
    assert not res.modified and res.reason and len(g.find(Op.CLIP)) == 1


def test_padded_consumer_is_skipped(rng):
    g = _graph(rng, 3.0, pw_kernel=(3, 3))
    res = AbsorbBias()(g, Context(CalibrationSet([np.zeros((2, 8, 8, 6), np.float32)])))
    assert not res.modified and any("padding" in s.reason for s in res.skipped if s.node is not None)


def test_needs_data(rng):
    with pytest.raises(DataError):
        AbsorbBias()(_graph(rng, 3.0))


def test_absorption_amounts():
    c = absorption_amount(np.array([-1.0, 2.0, 5.0]), np.array([0, 3.0, 6.0]), np.array([1.0, 0.1, 1.0]), "min", 6.0)
    np.testing.assert_allclose(c, [0.0, 2.0, 3.0])
    c = absorption_amount(np.array([0.0]), np.array([4.0]), np.array([1.0]), "3sigma")
    np.testing.assert_allclose(c, [1.0])
