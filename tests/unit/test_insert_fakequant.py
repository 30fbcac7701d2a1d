"""InsertFakeQuant: placement (after fused activations, not on same-scale ops), weights, exact rewrites, no-ops."""
from __future__ import annotations

import numpy as np
import pytest

from qfrewrite.backend.executor import run_graph
from qfrewrite.data import CalibrationSet
from qfrewrite.errors import DataError, QfrewriteError
from qfrewrite.ir import (ClipAttrs, ConvAttrs, FakeQuantAttrs, GlobalMeanAttrs, Graph, NormalizeAttrs, Op,
                          PadAttrs, verify)
from qfrewrite.numerics.metrics import output_drift
from qfrewrite.pass_infra import Context
from qfrewrite.passes import FoldBatchNorm, InsertFakeQuant
from qfrewrite.passes.insert_fakequant import quantization_points
from tests.graphs import add_bn, tiny_mobilenet


def _ctx(rng, shape, n=16):
    return Context(CalibrationSet([rng.normal(size=(n, *shape)).astype(np.float32)]))


def _fq_inputs(g):
    """{name of the node the FakeQuant reads from (or the graph input): FakeQuant node}."""
    return {(fq.inputs[0].producer.name if fq.inputs[0].producer else fq.inputs[0].name): fq
            for fq in g.find(Op.FAKE_QUANT)}


def residual_block(rng, hw=8, c=4, relu_after_add=False, unfolded_bn=False, normalize=False, softmax=False):
    """[Normalize] -> conv 1x1 + ReLU6 -> Pad -> depthwise 3x3 VALID + ReLU6 -> project 1x1 -> Add(input of block)
    [-> ReLU] -> GlobalMean -> Dense [-> Softmax]; optional unfolded BatchNorm after the Add."""
    g = Graph("residual")
    x = g.add_input("x", (None, hw, hw, c))
    y = x
    if normalize:
        y = g.add_node(Op.NORMALIZE, [y], NormalizeAttrs((0.5, 0.25, 2.0, 1.0), (-1.0, 0.0, 0.5, 0.0)),
                       name="norm").output
    stem = g.add_node(Op.CONV2D, [y, g.const(rng.normal(scale=0.5, size=(1, 1, c, c))),
                                  g.const(rng.normal(size=c))], ConvAttrs(), name="stem").output
    h = g.add_node(Op.CLIP, [g.add_node(Op.CONV2D, [stem, g.const(rng.normal(scale=0.5, size=(1, 1, c, 2 * c))),
                                                    g.const(rng.normal(size=2 * c))], ConvAttrs(),
                                        name="expand").output], ClipAttrs(0.0, 6.0), name="expand_relu6").output
    h = g.add_node(Op.PAD, [h], PadAttrs(((1, 1), (1, 1))), name="pad").output
    h = g.add_node(Op.DEPTHWISE_CONV2D, [h, g.const(rng.normal(scale=0.5, size=(3, 3, 2 * c, 1))),
                                         g.const(rng.normal(size=2 * c))], ConvAttrs(), name="dw").output
    h = g.add_node(Op.CLIP, [h], ClipAttrs(0.0, 6.0), name="dw_relu6").output
    h = g.add_node(Op.CONV2D, [h, g.const(rng.normal(scale=0.5, size=(1, 1, 2 * c, c))),
                               g.const(rng.normal(size=c))], ConvAttrs(), name="project").output
    y = g.add_node(Op.ADD, [stem, h], name="add").output
    if unfolded_bn:
        y = add_bn(g, rng, y, c)
    if relu_after_add:
        y = g.add_node(Op.RELU, [y], name="add_relu").output
    y = g.add_node(Op.GLOBAL_MEAN, [y], GlobalMeanAttrs(keepdims=False), name="mean").output
    y = g.add_node(Op.DENSE, [y, g.const(rng.normal(size=(c, 5))), g.const(rng.normal(size=5))], name="fc").output
    if softmax:
        y = g.add_node(Op.SOFTMAX, [y], name="softmax").output
    g.outputs = [y]
    return g


def test_placement_after_fused_activations_mobilenet(rng):
    g = tiny_mobilenet(rng)
    FoldBatchNorm()(g)
    res = InsertFakeQuant()(g, _ctx(rng, (16, 16, 3)))
    assert res.modified
    verify(g)
    fqs = _fq_inputs(g)
    # input, three ReLU6 outputs, the mean and the logits; none between a conv and its ReLU6
    assert len(fqs) == 6 and g.inputs[0].name in fqs
    for clip in g.find(Op.CLIP):
        assert clip.name in fqs
        assert clip.inputs[0].producer.op in (Op.CONV2D, Op.DEPTHWISE_CONV2D)
    assert all(n.weight_quant is not None and n.weight_quant.per_channel
               for n in g.find(Op.CONV2D, Op.DEPTHWISE_CONV2D))
    # per-channel: the Dense head is a 1x1 conv between reshapes, its output quantized before the reshape
    assert not g.find(Op.DENSE) and res.stats["dense_as_conv"] == ["dense"]
    head = [n for n in g.find(Op.CONV2D) if n.meta.get("from_dense")][0]
    assert head.name in fqs and g.outputs[0].producer.op is Op.RESHAPE
    # every range has an integer zero point and the logits use min/max
    for fq in g.find(Op.FAKE_QUANT):
        lo, hi = fq.attrs.lo[0], fq.attrs.hi[0]
        z = -lo / ((hi - lo) / 255)
        assert lo <= 0 <= hi and abs(z - round(z)) < 1e-6


def test_residual_add_pad_and_relu_after_add(rng):
    g = residual_block(rng, relu_after_add=True)
    pts = quantization_points(g)
    names = {g.value(p).producer.name if g.value(p).producer else p for p in pts}
    # stem (read by the conv and the add), expand_relu6, dw_relu6, project (read by the add), add_relu, mean, fc
    assert names == {"x", "stem", "expand_relu6", "dw_relu6", "project", "add_relu", "mean", "fc"}
    assert "pad" not in names and "add" not in names and "expand" not in names
    ref = run_graph(g, rng.normal(size=(4, 8, 8, 4)).astype(np.float32))


def test_per_tensor_keeps_dense_and_mse_ranges_fit_observed(rng):
    g = residual_block(rng)
    x = rng.normal(size=(16, 8, 8, 4)).astype(np.float32)
    InsertFakeQuant(weights="per_tensor", activations="minmax")(g, Context(CalibrationSet([x])))
    assert len(g.find(Op.DENSE)) == 1 and not g.find(Op.DENSE)[0].weight_quant.per_channel
    fqs = _fq_inputs(g)
    assert "add" in fqs  # no ReLU after the add: the add output is materialised
    lo, hi = fqs["x"].attrs.lo[0], fqs["x"].attrs.hi[0]
    step = (hi - lo) / 255
    assert lo <= x.min() + step and hi >= x.max() - step and hi - lo <= x.max() - x.min() + 2 * step


def test_float_function_kept_by_structural_rewrites(rng):
    g = residual_block(rng, unfolded_bn=True, normalize=True, softmax=True)
    x = rng.normal(size=(8, 8, 8, 4)).astype(np.float32)
    ref = run_graph(g, x)[0]
    res = InsertFakeQuant(weights="per_channel")(g, Context(CalibrationSet([x])))
    assert not g.find(Op.BATCH_NORM) and not g.find(Op.NORMALIZE) and not g.find(Op.DENSE)
    assert len(res.stats["rewritten_as_elementwise"]) == 2
    np.testing.assert_allclose(run_graph(g, x, quantize=False)[0], ref, rtol=1e-5, atol=1e-6)
    fqs = _fq_inputs(g)
    assert fqs["softmax"].attrs.lo == (0.0,) and fqs["softmax"].attrs.hi == (255 / 256,)
    assert "norm/mul" in fqs and "norm/add" in fqs
    drift = output_drift([ref], run_graph(g, x, quantize=True))
    assert drift["sqnr_db"] > 20


def test_minimum_input_takes_output_range(rng):
    g = Graph("clip")
    x = g.add_input("x", (None, 6, 6, 3))
    y = g.add_node(Op.CONV2D, [x, g.const(rng.normal(size=(1, 1, 3, 3))), g.const(np.ones(3))], ConvAttrs()).output
    y = g.add_node(Op.RELU, [y], name="relu").output
    y = g.add_node(Op.MINIMUM, [y, g.const(np.array([0.5, 1.0, 2.0]))], name="min").output
    g.outputs = [g.add_node(Op.CONV2D, [y, g.const(rng.normal(size=(1, 1, 3, 2)))], ConvAttrs(), name="out").output]
    InsertFakeQuant()(g, _ctx(rng, (6, 6, 3)))
    fqs = _fq_inputs(g)
    assert fqs["relu"].attrs == fqs["min"].attrs and fqs["min"].attrs.hi[0] <= 2.0 + 1e-6


def test_simulated_int8_close_to_float(rng):
    g = tiny_mobilenet(rng, classes=10)
    x = rng.normal(size=(32, 16, 16, 3)).astype(np.float32)
    ref = run_graph(g, x)[0]
    FoldBatchNorm()(g)
    for acts in ("mse", "minmax", "percentile"):
        h = g.copy()
        InsertFakeQuant(activations=acts)(h, Context(CalibrationSet([x])))
        assert output_drift([ref], run_graph(h, x, quantize=True))["sqnr_db"] > 25, acts
    # kl runs too; it may under-range the ReLU6 outputs that saturate at 6 (a known weakness)
    h = g.copy()
    res = InsertFakeQuant(activations="kl")(h, Context(CalibrationSet([x])))
    assert all(0 < hi <= 6.0 + 1e-6 for name, (lo, hi) in res.stats["ranges"].items() if name.startswith("clip"))


def test_needs_data_and_leaves_fakequant_graph_alone(rng):
    g = tiny_mobilenet(rng)
    with pytest.raises(DataError, match="InsertFakeQuant needs calibration data"):
        InsertFakeQuant()(g, Context())
    ctx = _ctx(rng, (16, 16, 3))
    InsertFakeQuant()(g, ctx)
    n = len(g)
    res = InsertFakeQuant()(g, ctx)
    assert not res.modified and "FakeQuant" in res.reason and len(g) == n


def test_existing_weight_quant_kept_and_bad_options(rng):
    g = tiny_mobilenet(rng, dense_head=False)
    conv = g.find(Op.CONV2D)[0]
    mine = FakeQuantAttrs(lo=(-1.0,), hi=(1.0,), bits=8, narrow_range=True)
    conv.weight_quant = mine
    res = InsertFakeQuant(weights="per_tensor")(g, _ctx(rng, (16, 16, 3)))
    assert conv.weight_quant is mine and res.stats["weight_quant"] == 2
    with pytest.raises(QfrewriteError, match="per_channel"):
        InsertFakeQuant(weights="per_row")
    with pytest.raises(QfrewriteError, match="mse"):
        InsertFakeQuant(activations="max")
    with pytest.raises(QfrewriteError, match="bits=8"):
        InsertFakeQuant(bits=4)
