"""ONNX emitter: emitted float models match the IR executor; QDQ models match its ``quantize=True`` simulation."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qfrewrite
from qfrewrite.backend.executor import Executor, run_graph
from qfrewrite.emit.onnx_emitter import emit_onnx
from qfrewrite.errors import EmitError
from qfrewrite.ir import (ClipAttrs, ConcatAttrs, ConvAttrs, FakeQuantAttrs, GlobalMeanAttrs, Graph, NormalizeAttrs,
                          Op, PadAttrs, PoolAttrs, ReshapeAttrs, SoftmaxAttrs)
from qfrewrite.numerics.quantize import fake_quant_np, nudge, symmetric_weight_attrs
from qfrewrite.passes import FoldBatchNorm
from tests.graphs import tiny_mobilenet


def ort_run(model, *xs, optimize=False):
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {i.name: (x.transpose(0, 3, 1, 2) if x.ndim == 4 else x) for i, x in zip(s.get_inputs(), xs)}
    return [o.transpose(0, 2, 3, 1) if o.ndim == 4 else o for o in s.run(None, feeds)]


def assert_close(out, ref, rtol=1e-5):
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * max(np.abs(ref).max(), 1.0))


@pytest.mark.parametrize("fold,opset", [(False, 13), (True, 13), (True, 18)])
def test_float_tiny_mobilenet(rng, fold, opset):
    g = tiny_mobilenet(rng, bias=True)
    if fold:
        FoldBatchNorm()(g)
    x = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
    m = emit_onnx(g, opset=opset)
    assert m.opset_import[0].version == opset
    assert {n.op_type for n in m.graph.node} >= {"Conv", "Clip", "Gemm", "ReduceMean"}
    assert ("BatchNormalization" in {n.op_type for n in m.graph.node}) is not fold
    assert m.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 3  # NCHW
    assert_close(ort_run(m, x)[0], run_graph(g, x)[0])


def layout_graph(rng):
    """Ops whose axes, pads or constants depend on the layout, with three outputs."""
    g = Graph("layout")
    x = g.add_input("img", (None, 7, 7, 4))
    y = g.add_node(Op.NORMALIZE, [x], NormalizeAttrs((0.5, 1.0, 2.0, 1.5), (0.1, 0.0, -0.2, 0.3))).output
    y = g.add_node(Op.PAD, [y], PadAttrs(((0, 1), (2, 1)), 0.25)).output
    y = g.add_node(Op.CONV2D, [y, g.const(rng.normal(size=(3, 3, 4, 6))), g.const(rng.normal(size=6))],
                   ConvAttrs((2, 2), "SAME")).output
    y = g.add_node(Op.HARD_SWISH, [y]).output
    y = g.add_node(Op.DEPTHWISE_CONV2D, [y, g.const(rng.normal(size=(3, 3, 6, 2)))],
                   ConvAttrs((1, 1), ((1, 0), (2, 1)), (1, 1))).output
    y = g.add_node(Op.HARD_SIGMOID, [y]).output
    a = g.add_node(Op.AVG_POOL, [y], PoolAttrs((3, 3), (1, 1), "SAME")).output
    b = g.add_node(Op.AVG_POOL, [y], PoolAttrs((2, 2), (1, 1), ((1, 0), (1, 0)))).output
    c = g.add_node(Op.MAX_POOL, [y], PoolAttrs((3, 3), (1, 1), ((1, 1), (1, 1)))).output
    y = g.add_node(Op.CONCAT, [a, b, c], ConcatAttrs(-1)).output
    y = g.add_node(Op.MUL, [y, g.const(rng.uniform(0.5, 2.0, 36))]).output
    y = g.add_node(Op.ADD, [y, g.const(rng.normal(size=36))]).output
    y = g.add_node(Op.MINIMUM, [y, g.const(rng.uniform(0.5, 1.0, 36))]).output
    y = g.add_node(Op.SIGMOID, [y]).output
    s = g.add_node(Op.SOFTMAX, [y], SoftmaxAttrs(-1)).output  # over channels
    f = g.add_node(Op.FLATTEN, [y]).output  # HWC order
    d = g.add_node(Op.DENSE, [f, g.const(rng.normal(size=(f.shape[1], 5))), g.const(rng.normal(size=5))]).output
    r = g.add_node(Op.RESHAPE, [y], ReshapeAttrs((-1, 12))).output
    r = g.add_node(Op.RESHAPE, [r], ReshapeAttrs((6, 9, -1))).output  # back to rank 4, NHWC order
    m = g.add_node(Op.GLOBAL_MEAN, [r], GlobalMeanAttrs(keepdims=True)).output
    m = g.add_node(Op.CLIP, [m], ClipAttrs(None, 0.7)).output
    g.outputs = [s, d, m]
    return g


@pytest.mark.parametrize("opset", [13, 14])  # HardSwish is an ONNX op from opset 14
def test_layout_sensitive_ops_match_the_executor(rng, opset):
    g = layout_graph(rng)
    x = rng.normal(size=(2, 7, 7, 4)).astype(np.float32)
    refs = run_graph(g, x)
    m = emit_onnx(g, opset=opset)
    assert ("HardSwish" in {n.op_type for n in m.graph.node}) is (opset >= 14)
    outs = ort_run(m, x)
    for out, ref in zip(outs, refs):
        assert_close(out, ref)


def test_emitted_model_imports_back_to_the_same_function(rng, tmp_path):
    g = layout_graph(rng)
    emit_onnx(g, tmp_path / "layout.onnx")
    back = qfrewrite.load(tmp_path / "layout.onnx")
    x = rng.normal(size=(2, 7, 7, 4)).astype(np.float32)
    for out, ref in zip(run_graph(back, x), run_graph(g, x)):
        assert_close(out, ref)


def test_emission_leaves_the_graph_alone_and_writes_atomically(rng, tmp_path):
    g = tiny_mobilenet(rng)
    before = (g.summary(), [v.const.copy() for v in g.values() if v.is_const])
    path = tmp_path / "out" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(b"old")
    emit_onnx(g, path)
    assert g.summary() == before[0]
    assert all(np.array_equal(a, v.const) for a, v in zip(before[1], [v for v in g.values() if v.is_const]))
    assert onnx.load(str(path)).graph.node and [p.name for p in path.parent.iterdir()] == ["model.onnx"]


def test_result_to_onnx_keeps_source_io_names(rng, tmp_path):
    g = tiny_mobilenet(rng)
    g.meta["output_names"] = ["logits"]
    res = qfrewrite.rewrite(g, passes=[FoldBatchNorm()])
    m = res.to_onnx(tmp_path / "m.onnx")
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
    x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    assert_close(ort_run(m, x)[0], run_graph(g, x)[0])


# -- QDQ ----------------------------------------------------------------------------------------------------------
def quantize_by_hand(g, x, per_channel=True, narrow_act=False):
    """FakeQuant after the input and after every activation, pooling and dense output, with min/max ranges measured
    on ``x``; symmetric weights. (What InsertFakeQuant does, written out so this test depends on nothing else.)"""
    wanted = [g.inputs[0]] + [n.output for n in g if n.op in (Op.CLIP, Op.RELU, Op.GLOBAL_MEAN, Op.DENSE, Op.ADD)]
    _, taps = Executor(g, taps=[v.name for v in wanted[1:]])(x)
    taps[wanted[0].name] = x
    for v in wanted:
        a = taps[v.name]
        uses, is_out = v.uses(), any(v is o for o in g.outputs)
        fq = g.add_node(Op.FAKE_QUANT, [v], FakeQuantAttrs((float(min(a.min(), 0.0)),), (float(max(a.max(), 0.0)),),
                                                           narrow_range=narrow_act))
        for node, i in uses:
            node.set_input(i, fq.output)
        if is_out:
            g.outputs = [fq.output if o is v else o for o in g.outputs]
    for n in g.find(Op.CONV2D, Op.DEPTHWISE_CONV2D, Op.DENSE):
        n.weight_quant = symmetric_weight_attrs(n, per_channel=per_channel)
    return g


def output_step(g):
    fq = g.outputs[0].producer.attrs
    return float(nudge(fq.lo[0], fq.hi[0], fq.bits, fq.narrow_range)[2])


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_qdq_matches_the_simulation(rng, per_channel, dtype):
    g = tiny_mobilenet(rng, bias=True)
    FoldBatchNorm()(g)
    x = rng.normal(size=(64, 16, 16, 3)).astype(np.float32)
    quantize_by_hand(g, x[:8], per_channel)
    sim = run_graph(g, x, quantize=True)[0]
    flt = run_graph(g, x, quantize=False)[0]
    step = output_step(g)
    fq = g.outputs[0].producer.attrs
    # the inner quantizers change many output codes, so matching the simulation below means something
    assert np.mean(~np.isclose(sim, fake_quant_np(flt, fq.lo, fq.hi), atol=1e-4 * step)) > 0.3
    exact = emit_onnx(g, activation_dtype=dtype, int32_bias=False)
    np.testing.assert_allclose(ort_run(exact, x)[0], sim, rtol=0, atol=1e-4 * step)
    m = emit_onnx(g, activation_dtype=dtype)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") == len(g.find(Op.FAKE_QUANT)) and "Clip" not in ops  # clips absorbed
    for optimize in (False, True):  # int32 biases: a value near a rounding boundary may move by one step
        out = ort_run(m, x, optimize=optimize)[0]
        assert np.abs(out - sim).max() <= step * 1.001
        assert np.mean(np.isclose(out, sim, atol=1e-4 * step)) > 0.95


def test_qdq_layers_become_integer_kernels_in_onnxruntime(rng, tmp_path):
    g = tiny_mobilenet(rng, bias=True)
    FoldBatchNorm()(g)
    quantize_by_hand(g, rng.normal(size=(4, 16, 16, 3)).astype(np.float32))
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(emit_onnx(g).SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops


def test_qdq_parameters_are_the_nudged_ranges(rng):
    g = tiny_mobilenet(rng, bias=True)
    FoldBatchNorm()(g)
    quantize_by_hand(g, rng.normal(size=(4, 16, 16, 3)).astype(np.float32))
    m = emit_onnx(g, activation_dtype="int8")
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    by_out = {n.output[0]: n for n in m.graph.node}
    for fq in g.find(Op.FAKE_QUANT):
        lo, hi, scale = (float(v) for v in nudge(fq.attrs.lo[0], fq.attrs.hi[0]))
        q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.name.startswith("node/" + fq.name))
        assert float(inits[q.input[1]]) == pytest.approx(scale, rel=1e-6)
        assert int(inits[q.input[2]]) == round(-lo / scale) - 128 and inits[q.input[2]].dtype == np.int8
    conv = g.find(Op.CONV2D)[0]
    dq = by_out[next(n for n in m.graph.node if n.op_type == "Conv").input[1]]
    codes, w_scale = inits[dq.input[0]], inits[dq.input[1]]
    assert codes.dtype == np.int8 and codes.min() >= -127 and {a.name: a.i for a in dq.attribute}["axis"] == 0
    np.testing.assert_allclose(w_scale, np.asarray(conv.weight_quant.hi) / 127, rtol=1e-6)


def test_narrow_range_activations_are_clipped_before_quantizing(rng):
    g = tiny_mobilenet(rng, bias=True, bn=False)
    x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    quantize_by_hand(g, x, narrow_act=True)
    m = emit_onnx(g)
    assert sum(n.op_type == "Clip" for n in m.graph.node) == len(g.find(Op.FAKE_QUANT))
    out, sim = ort_run(m, x)[0], run_graph(g, x, quantize=True)[0]
    assert np.abs(out - sim).max() <= output_step(g) * 1.001


def test_quantized_false_writes_the_float_function(rng):
    g = tiny_mobilenet(rng, bias=True, bn=False)
    x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    quantize_by_hand(g, x)
    m = emit_onnx(g, quantized=False)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in m.graph.node}
    assert_close(ort_run(m, x)[0], run_graph(g, x, quantize=False)[0])


def test_float_graph_cannot_be_emitted_as_qdq(rng):
    with pytest.raises(EmitError, match="FakeQuant"):
        emit_onnx(tiny_mobilenet(rng), quantized=True)
    with pytest.raises(EmitError, match="activation_dtype"):
        emit_onnx(tiny_mobilenet(rng), activation_dtype="int16")
