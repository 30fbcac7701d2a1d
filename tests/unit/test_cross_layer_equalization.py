import numpy as np
import pytest

from qfrewrite.backend.executor import run_graph
from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import ClipAttrs, ConvAttrs, Graph, Op, verify
from qfrewrite.numerics.equalization import equalization_scales
from qfrewrite.numerics.kernels import in_absmax, out_absmax
from qfrewrite.passes import CrossLayerEqualization, FoldBatchNorm
from tests.quant_graphs import dead_channel_mobilenet


def _pair_graph(rng, second="depthwise", clip_hi=6.0, spread=(0.02, 20.0)):
    """conv 1x1 (channel ranges spread over 3 decades) -> Clip(0, hi) -> depthwise/conv 3x3 SAME."""
    g = Graph()
    x = g.add_input("x", (None, 8, 8, 3))
    k1 = rng.normal(size=(1, 1, 3, 6)) * np.geomspace(*spread, 6)
    c1 = g.add_node(Op.CONV2D, [x, g.const(k1), g.const(rng.normal(size=6))], ConvAttrs())
    y = g.add_node(Op.CLIP, [c1.output], ClipAttrs(0.0, clip_hi)).output
    if second == "depthwise":
        c2 = g.add_node(Op.DEPTHWISE_CONV2D, [y, g.const(rng.normal(size=(3, 3, 6, 1))), g.const(rng.normal(size=6))],
                        ConvAttrs(padding="SAME"))
    else:
        c2 = g.add_node(Op.CONV2D, [y, g.const(rng.normal(size=(3, 3, 6, 4))), g.const(rng.normal(size=4))],
                        ConvAttrs(padding="SAME"))
    g.outputs = [c2.output]
    return g


@pytest.mark.parametrize("second", ["depthwise", "conv"])
@pytest.mark.parametrize("clip_hi", [6.0, None])
def test_exact_clip_keeps_the_function_and_equalizes(rng, second, clip_hi):
    g = _pair_graph(rng, second, clip_hi)
    x = rng.normal(scale=3.0, size=(4, 8, 8, 3)).astype(np.float32)
    ref = run_graph(g, x)[0]
    p = CrossLayerEqualization(clip="exact", act_guard=False)
    assert p.exact
    res = p(g)
    verify(g)
    assert res.modified and res.stats["pairs"] == 1 and res.stats["converged"]
    c1, c2 = g.find(Op.CONV2D)[0], g.find(Op.CONV2D, Op.DEPTHWISE_CONV2D)[1]
    kind2 = "depthwise" if second == "depthwise" else "conv"
    np.testing.assert_allclose(out_absmax(c1.weight.const, "conv"), in_absmax(c2.weight.const, kind2), rtol=1e-3)
    assert not g.find(Op.CLIP)
    mins = g.find(Op.MINIMUM)
    assert len(mins) == (1 if clip_hi is not None else 0)
    if mins:
        vec = [v for v in mins[0].inputs if v.is_const][0].const
        assert vec.shape == (6,) and np.ptp(vec) > 0
    out = run_graph(g, x)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("with_data", [False, True])
def test_activation_guard_keeps_the_tensor_range(rng, with_data):
    from qfrewrite.backend.executor import Executor
    from qfrewrite.data import CalibrationSet
    from qfrewrite.pass_infra import Context

    g = _pair_graph(rng, "depthwise", 6.0)
    x = rng.normal(scale=3.0, size=(8, 8, 8, 3)).astype(np.float32)
    tap = lambda graph: Executor(graph, taps=[graph.find(Op.DEPTHWISE_CONV2D)[0].inputs[0].name])(x)[1]
    before = np.abs(next(iter(tap(g).values()))).max()
    ref = run_graph(g, x)[0]
    res = CrossLayerEqualization(clip="exact")(g, Context(CalibrationSet([x]) if with_data else None))
    assert res.modified and res.stats["min_scale"] >= (0.0 if with_data else 1.0)
    after = np.abs(next(iter(tap(g).values()))).max()
    assert after <= before * (1 + 1e-5)
    np.testing.assert_allclose(run_graph(g, x)[0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_relu_clip_is_declared_inexact_and_drops_the_clip(rng):
    g = _pair_graph(rng)
    p = CrossLayerEqualization(clip="relu")
    assert not p.exact
    res = p(g)
    assert res.modified and "warning" in res.stats
    assert not g.find(Op.CLIP) and not g.find(Op.MINIMUM) and len(g.find(Op.RELU)) == 1


def test_chain_of_three_converges_and_stays_exact(rng):
    g = dead_channel_mobilenet(rng, tiny=0.0)
    x = rng.normal(scale=2.0, size=(4, 12, 12, 3)).astype(np.float32)
    ref = run_graph(g, x)[0]
    res = CrossLayerEqualization(clip="exact", max_iter=100, tol=1e-4)(g)
    verify(g)
    assert res.stats["pairs"] == 4 and res.stats["converged"]  # the last depthwise pairs with the dense head
    # the dead stem channels (constant outputs) were never scaled: their weights stay exactly zero
    assert np.all(g.find(Op.CONV2D)[0].weight.const[..., [1, 4]] == 0)
    assert res.stats["guarded_channels"] >= 2
    out = run_graph(g, x)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_residual_add_blocks_the_pair(rng):
    g = Graph()
    x = g.add_input("x", (None, 8, 8, 4))
    c1 = g.add_node(Op.CONV2D, [x, g.const(rng.normal(size=(1, 1, 4, 4)) * [0.01, 1, 10, 100])], ConvAttrs())
    c2 = g.add_node(Op.DEPTHWISE_CONV2D, [c1.output, g.const(rng.normal(size=(3, 3, 4, 1)))], ConvAttrs(padding="SAME"))
    add = g.add_node(Op.ADD, [c1.output, c2.output])
    g.outputs = [add.output]
    before = c1.weight.const.copy()
    res = CrossLayerEqualization()(g)
    assert not res.modified and res.stats["pairs"] == 0
    assert any("2 readers" in why for why in res.skips_for(c1.name))
    np.testing.assert_array_equal(before, c1.weight.const)


def test_already_equal_ranges_are_a_no_op(rng):
    g = _pair_graph(rng, spread=(1.0, 1.0))
    c1, c2 = g.find(Op.CONV2D)[0], g.find(Op.DEPTHWISE_CONV2D)[0]
    # make both ranges 1 per channel
    c1.inputs[1].set_const(c1.weight.const / out_absmax(c1.weight.const, "conv"))
    c2.inputs[1].set_const(c2.weight.const / in_absmax(c2.weight.const, "depthwise")[None, None, :, None])
    res = CrossLayerEqualization()(g)
    assert not res.modified and res.reason
    assert len(g.find(Op.CLIP)) == 1


def test_scale_guards():
    s = equalization_scales([1.0, 0.0, 1e-9, 4.0, 1e8], [1.0, 1.0, 1.0, 1.0, 1.0], min_range=1e-3, max_scale=100)
    assert s[0] == 1.0 and s[1] == 1.0 and s[2] == 1.0 and s[3] == pytest.approx(2.0) and s[4] == 100.0
    assert equalization_scales([4.0, 4.0], [1.0, 1.0], frozen=[1])[1] == 1.0


def test_bad_option_raises():
    with pytest.raises(QfrewriteError, match="clip"):
        CrossLayerEqualization(clip="nope")


def _run_tflite(fb, x):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=fb)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    ops = {d["op_name"] for d in it._get_ops_details()}
    return it.get_tensor(it.get_output_details()[0]["index"]), ops


def _fake_quant_after(g, value, lo, hi):
    from qfrewrite.ir import FakeQuantAttrs

    users = value.uses()
    fq = g.add_node(Op.FAKE_QUANT, [value], FakeQuantAttrs((float(lo),), (float(hi),)))
    for node, i in users:
        node.set_input(i, fq.output)
    if any(o is value for o in g.outputs):
        g.outputs = [fq.output if o is value else o for o in g.outputs]
    return fq


def test_per_channel_minimum_converts_to_tflite_float_and_int8(rng):
    from qfrewrite.backend.executor import Executor
    from qfrewrite.emit.tflite import emit_tflite
    from qfrewrite.numerics.quantize import symmetric_weight_attrs
    from tests.quant_graphs import dw_pw_graph

    g = dw_pw_graph(rng, bn=False, dw_bias=rng.normal(size=6))
    dw = g.find(Op.DEPTHWISE_CONV2D)[0]
    dw.inputs[1].set_const(dw.weight.const * np.geomspace(0.05, 20, 6)[None, None, :, None])
    CrossLayerEqualization(clip="exact")(g)
    x = rng.normal(size=(1, 8, 8, 6)).astype(np.float32)
    ref = run_graph(g, x)[0]
    out, ops = _run_tflite(emit_tflite(g), x)
    assert "MINIMUM" in ops
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # int8: ranges set by hand (the clip vector's max) on the input, the ReLU, the MINIMUM and the output
    clip = [v for v in g.find(Op.MINIMUM)[0].inputs if v.is_const][0].const.max()
    _fake_quant_after(g, g.inputs[0], -4.0, 4.0)
    _fake_quant_after(g, g.find(Op.RELU)[0].output, 0.0, clip)
    _fake_quant_after(g, g.find(Op.MINIMUM)[0].output, 0.0, clip)
    r = float(np.abs(ref).max() * 1.2)
    _fake_quant_after(g, g.outputs[0], -r, r)
    for layer in g.find(Op.CONV2D, Op.DEPTHWISE_CONV2D):
        layer.weight_quant = symmetric_weight_attrs(layer, per_channel=True)
    verify(g)
    sim = Executor(g, quantize=True)(x)[0]
    out8, ops8 = _run_tflite(emit_tflite(g), x)
    assert "MINIMUM" in ops8 and "QUANTIZE" in ops8
    step = 2 * r / 255
    assert np.abs(out8 - sim).max() <= 1.01 * step


def test_the_folded_batchnorm_record_stays_true_through_equalization(rng):
    from qfrewrite.ir import layer_kind
    from qfrewrite.numerics.kernels import out_channels_last
    from tests.graphs import tiny_mobilenet

    g = tiny_mobilenet(rng)
    raw = {n.name: n.weight.const.copy() for n in g.find(Op.CONV2D, Op.DEPTHWISE_CONV2D)}
    FoldBatchNorm()(g)
    res = CrossLayerEqualization()(g.copy())  # the copy carries the records too
    assert res.modified
    stem = res.graph.find(Op.CONV2D)[0]  # reads the graph input: only its output channels were ever rescaled
    for n in [stem] + res.graph.find(Op.DEPTHWISE_CONV2D):  # a depthwise kernel's input rescaling is an output one
        kind = layer_kind(n)
        np.testing.assert_allclose(out_channels_last(n.weight.const, kind),
                                   out_channels_last(raw[n.name], kind) * n.folded_bn.scale, rtol=1e-5, atol=1e-7)
    assert any(np.any(np.abs(n.folded_bn.scale - g.node(n.name).folded_bn.scale) > 1e-3)
               for n in res.graph.find(Op.DEPTHWISE_CONV2D))  # equalization did move the depthwise records


def _binding_pair(rng):
    """conv (channels 0..5, channel 0 an outlier whose ReLU6 binds on the data) -> ReLU6 -> depthwise."""
    g = _pair_graph(rng, "depthwise", 6.0, spread=(1.0, 1.0))
    c1 = g.find(Op.CONV2D)[0]
    k = c1.weight.const.copy()
    k[..., 0] *= 40.0  # binds: far beyond 6 on the data
    k[..., 1:] *= np.linspace(0.05, 0.5, 5)  # never reach 6: free to grow up to their calibration maximum
    c1.inputs[1].set_const(k)
    return g


def test_fused_keeps_the_clip_and_is_exact_on_the_calibration_data(rng):
    from qfrewrite.backend.executor import Executor
    from qfrewrite.data import CalibrationSet
    from qfrewrite.pass_infra import Context

    g = _binding_pair(rng)
    before = g.copy()
    x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    pre = g.find(Op.CONV2D)[0].output.name
    m = Executor(g, taps=[pre])(x)[1][pre].reshape(-1, 6).max(axis=0)
    assert m[0] > 6 and np.all(m[1:] < 6)
    ref = run_graph(g, x)[0]
    p = CrossLayerEqualization(clip="fused")
    assert not p.exact  # exact on the calibration data, not for every input
    res = p(g, Context(CalibrationSet([x[:8], x[8:]])))
    verify(g)
    assert res.modified and res.stats["clip_bound_channels"] == 1 and res.stats["clip"] == "fused"
    assert len(g.find(Op.CLIP)) == 1 and g.find(Op.CLIP)[0].attrs.hi == 6.0 and not g.find(Op.MINIMUM)
    np.testing.assert_allclose(run_graph(g, x)[0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    am = Executor(g, taps=[pre])(x)[1][pre].reshape(-1, 6).max(axis=0)
    assert am[0] == pytest.approx(m[0], rel=1e-5)  # the channel whose clip binds kept s = 1
    assert np.all(am[1:] <= 6.0 * (1 + 1e-5)) and np.all(am[1:] > m[1:] * 1.01)  # the others grew up to the clip
    # an input beyond what calibration showed can cross a grown channel's clip: there the functions differ
    far = x * 10.0
    assert not np.allclose(run_graph(g, far)[0], run_graph(before, far)[0], rtol=1e-3, atol=1e-3)


def test_fused_without_data_is_exact_for_every_input(rng):
    """Without data the pre-clip maximum is an interval bound: a proof, so the rewrite is exact for any input."""
    g = Graph()
    x = g.add_input("x", (None, 8, 8, 3))
    y = g.add_node(Op.CONV2D, [x, g.const(rng.normal(size=(1, 1, 3, 6))), g.const(rng.normal(size=6))],
                   ConvAttrs()).output
    y = g.add_node(Op.CLIP, [y], ClipAttrs(0.0, 6.0)).output  # bounds the depthwise input to [0, 6]
    kd = rng.normal(size=(3, 3, 6, 1)) * np.array([0.01, 0.02, 0.05, 1.0, 2.0, 0.03])[None, None, :, None]
    y = g.add_node(Op.DEPTHWISE_CONV2D, [y, g.const(kd), g.const(rng.uniform(-0.5, 0.5, 6))],
                   ConvAttrs(padding="SAME")).output
    y = g.add_node(Op.CLIP, [y], ClipAttrs(0.0, 6.0)).output
    y = g.add_node(Op.CONV2D, [y, g.const(rng.normal(size=(1, 1, 6, 4))), g.const(rng.normal(size=4))],
                   ConvAttrs()).output
    g.outputs = [y]
    before = g.copy()
    res = CrossLayerEqualization(clip="fused")(g)
    verify(g)
    assert res.modified and res.stats["clip_bound_channels"] > 0 and not g.find(Op.MINIMUM)
    for scale in (1.0, 30.0, 300.0):  # far outside any data: still exact
        xs = rng.normal(scale=scale, size=(4, 8, 8, 3)).astype(np.float32)
        want = run_graph(before, xs)[0]
        np.testing.assert_allclose(run_graph(g, xs)[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_the_default_clip_follows_the_spec_and_adds_no_op(rng):
    from qfrewrite.passes.cross_layer_equalization import clip_for
    from qfrewrite.spec import QuantSpec

    assert clip_for(QuantSpec(target="tflite").resolved()) == "fused" == clip_for(QuantSpec(target="onnx"))
    g = _binding_pair(rng)
    res = CrossLayerEqualization()(g)
    assert res.stats.get("clip", "fused") == "fused" and not g.find(Op.MINIMUM)


def test_bias_correction_reuses_the_equalization_statistics(rng, monkeypatch):
    """The fused clip keeps the function on the calibration data, so the mean maps after equalization are the maps
    before it divided by the scales: CorrectBias reads them from the context (one pass over the data for both) and
    corrects exactly as it would from a fresh pass."""
    from qfrewrite.analysis import moments as moments_mod
    from qfrewrite.data import CalibrationSet
    from qfrewrite.pass_infra import Context, PassManager
    from qfrewrite.passes import CorrectBias
    from qfrewrite.spec import QuantSpec

    g = _binding_pair(rng)
    x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    calls = []
    real = moments_mod.ReducingExecutor
    monkeypatch.setattr(moments_mod, "ReducingExecutor", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = g.copy()
    PassManager([CrossLayerEqualization(clip="fused"), CorrectBias()]).run(
        shared, Context(CalibrationSet([x]), spec=QuantSpec(weights="per_tensor")))
    assert len(calls) == 1
    fresh = g.copy()
    CrossLayerEqualization(clip="fused")(fresh, Context(CalibrationSet([x])))
    CorrectBias()(fresh, Context(CalibrationSet([x]), spec=QuantSpec(weights="per_tensor")))
    for a, b in zip(shared.find(Op.CONV2D, Op.DEPTHWISE_CONV2D), fresh.find(Op.CONV2D, Op.DEPTHWISE_CONV2D)):
        np.testing.assert_allclose(a.bias.const, b.bias.const, rtol=1e-5, atol=1e-6)
