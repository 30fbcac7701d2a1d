"""Keras emitter: the emitted float Keras model computes the graph's function and loads back through qfrewrite."""
import numpy as np
import pytest

import qfrewrite
from qfrewrite.backend.executor import run_graph
from qfrewrite.emit.keras_emitter import emit_keras
from qfrewrite.errors import EmitError
from qfrewrite.ir import (ClipAttrs, ConcatAttrs, ConvAttrs, FakeQuantAttrs, GlobalMeanAttrs, Graph, NormalizeAttrs,
                          Op, PadAttrs, PoolAttrs, SoftmaxAttrs)
from qfrewrite.passes import FoldBatchNorm
from tests.graphs import tiny_mobilenet
from tests.keras_models import randomize_bn, zoo_model

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")


def _close(out, ref, tol=1e-5):
    assert out.shape == ref.shape and np.abs(ref).max() > 1e-2
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol * max(1.0, np.abs(ref).max()))


def op_zoo(rng) -> Graph:
    """A graph with every op the emitter writes in a non-obvious way (clips, constants, explicit pads, FakeQuant)."""
    g = Graph("op_zoo")
    x = g.add_input("input", (None, 12, 12, 3))
    y = g.add_node(Op.NORMALIZE, [x], NormalizeAttrs((0.5, 1.0, 2.0), (0.1, -0.2, 0.3)), name="norm").output
    conv = g.add_node(Op.CONV2D, [y, g.const(rng.normal(size=(3, 3, 3, 6))), g.const(rng.normal(size=6))],
                      ConvAttrs((2, 2), ((0, 2), (1, 0))), name="conv_asym")  # explicit, not TF's SAME
    conv.weight_quant = FakeQuantAttrs(lo=(-0.5,), hi=(0.5,), narrow_range=True)
    y = g.add_node(Op.FAKE_QUANT, [conv.output], FakeQuantAttrs(lo=(-2.0,), hi=(2.0,)), name="fq").output
    a = g.add_node(Op.CLIP, [y], ClipAttrs(-1.0, 2.0), name="clip_both").output
    b = g.add_node(Op.CLIP, [y], ClipAttrs(None, 0.5), name="clip_hi").output
    c = g.add_node(Op.CLIP, [y], ClipAttrs(0.3, None), name="clip_lo").output
    d = g.add_node(Op.MINIMUM, [y, g.const(rng.uniform(0.1, 1.0, 6))], name="per_channel_min").output
    e = g.add_node(Op.ADD, [g.const(np.float32(0.7)), y], name="add_scalar").output
    f = g.add_node(Op.MUL, [y, g.const(rng.normal(size=(1, 1, 1, 6)))], name="mul_channel").output
    h = g.add_node(Op.HARD_SWISH, [g.add_node(Op.ADD, [a, b], name="add_ab").output], name="hswish").output
    s = g.add_node(Op.HARD_SIGMOID, [g.add_node(Op.GLOBAL_MEAN, [c], GlobalMeanAttrs(True), name="se").output],
                   name="hsig").output
    h = g.add_node(Op.MUL, [h, s], name="se_mul").output
    y = g.add_node(Op.CONCAT, [h, d, e, f], ConcatAttrs(-1), name="cat").output
    y = g.add_node(Op.DEPTHWISE_CONV2D, [y, g.const(rng.normal(size=(3, 3, 24, 1)))],
                   ConvAttrs(padding=((1, 1), (1, 1))), name="dw_same").output  # explicit == SAME
    y = g.add_node(Op.PAD, [y], PadAttrs(((1, 0), (0, 1))), name="pad").output
    y = g.add_node(Op.AVG_POOL, [y], PoolAttrs((2, 2), (2, 2), ((0, 1), (0, 1))), name="avg_explicit").output
    y = g.add_node(Op.MAX_POOL, [y], PoolAttrs((2, 2), (1, 1), "SAME"), name="max").output
    y = g.add_node(Op.SIGMOID, [y], name="sig").output
    y = g.add_node(Op.FLATTEN, [y], name="flat").output
    y = g.add_node(Op.DENSE, [y, g.const(rng.normal(size=(y.shape[1], 4)) * 0.1)], name="fc").output
    g.outputs = [g.add_node(Op.SOFTMAX, [y], SoftmaxAttrs(-1), name="probs").output, y]
    return g


@pytest.mark.parametrize("bias", [False, True])
def test_tiny_mobilenet_keeps_batchnorm_statistics(rng, bias):
    g = tiny_mobilenet(rng, bias=bias)
    m = emit_keras(g)
    bns = [l for l in m.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 3
    for layer, node in zip(bns, g.find(Op.BATCH_NORM)):
        for w, v in zip(layer.get_weights(), node.inputs[1:5]):
            np.testing.assert_array_equal(w, v.const)
        assert layer.epsilon == pytest.approx(node.attrs.epsilon)
    x = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
    _close(m(x).numpy(), run_graph(g, x)[0])


def test_op_zoo_matches_the_float_graph_and_drops_fake_quant(rng, tmp_path):
    g = op_zoo(rng)
    n_nodes = len(g)
    m = emit_keras(g)
    assert len(g) == n_nodes and g.node("conv_asym").weight_quant is not None  # the graph is not changed
    x = rng.normal(size=(4, 12, 12, 3)).astype(np.float32)
    ref = run_graph(g, x)
    quant = run_graph(g, x, quantize=True)
    outs = [o.numpy() for o in m(x)]
    for o, r in zip(outs, ref):
        _close(o, r, tol=1e-4)
    assert np.abs(quant[1] - ref[1]).max() > 1e-3  # fake quantization would have shown
    names = {l.name for l in m.layers}
    assert "conv_asym__pad" in names and "dw_same__pad" not in names  # only non-SAME pads need ZeroPadding2D
    path = tmp_path / "zoo.keras"
    m.save(path)
    back = qfrewrite.load(path)
    for o, r in zip(run_graph(back, x), ref):
        _close(o, r, tol=1e-4)


def test_result_to_keras_round_trip(tmp_path):
    m = zoo_model()
    randomize_bn(m, np.random.default_rng(3))
    x = np.random.default_rng(4).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    res = qfrewrite.rewrite(m, passes=[FoldBatchNorm()], outputs=["logits"])
    ref = run_graph(res.graph, x)[0]
    k = res.to_keras()
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in k.layers)
    _close(k(x).numpy(), ref, tol=1e-4)
    path = tmp_path / "folded.keras"
    k.save(path)
    back = qfrewrite.load(path)
    assert back.op_counts() == res.graph.op_counts()
    _close(run_graph(back, x)[0], ref, tol=1e-4)


def test_unemittable_graphs_raise_emit_error(rng):
    g = Graph("bad_pad")
    x = g.add_input("x", (None, 4, 4, 2))
    g.outputs = [g.add_node(Op.PAD, [x], PadAttrs(((1, 1), (1, 1)), value=1.0), name="pad_one").output]
    with pytest.raises(EmitError, match="pad_one"):
        emit_keras(g)
    g = Graph("bad_const")
    x = g.add_input("x", (None, 4, 4, 2))
    g.outputs = [g.add_node(Op.ADD, [x, g.const(rng.normal(size=(4, 4, 2)))], name="add_map").output]
    with pytest.raises(EmitError, match="add_map.*per-channel"):
        emit_keras(g)
