"""Fully integer TFLite emission: integer-only ops, ranges read back equal to the chosen ones, agreement with the
FakeQuant simulation of the IR layer by layer and at the output, int8/uint8/float I/O."""
from __future__ import annotations

import numpy as np
import pytest

from qfrewrite.backend.executor import Executor
from qfrewrite.data import CalibrationSet
from qfrewrite.emit.tflite import emit_tflite
from qfrewrite.errors import EmitError
from qfrewrite.ir import FakeQuantAttrs, Op
from qfrewrite.pass_infra import Context
from qfrewrite.passes import FoldBatchNorm, InsertFakeQuant
from qfrewrite.tflite_inspect import (assert_fully_integer, float_ops, inspect_tflite, interpreter,
                                      layer_agreement, tensors_for_node)
from tests.graphs import tiny_mobilenet
from tests.unit.test_insert_fakequant import residual_block


def _quantized(rng, graph, shape, weights, n=24):
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    FoldBatchNorm()(graph)
    InsertFakeQuant(weights=weights)(graph, Context(CalibrationSet([x])))
    return graph, x


def _run(fb, x, preserve=False):
    it = interpreter(fb) if not preserve else _preserving(fb)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    outs, inters = [], []
    for i in range(len(x)):
        xi = x[i:i + 1]
        if inp["dtype"] != np.float32:
            s, z = inp["quantization"]
            xi = np.clip(np.round(xi / s + z), np.iinfo(inp["dtype"]).min, np.iinfo(inp["dtype"]).max)
        it.set_tensor(inp["index"], xi.astype(inp["dtype"]))
        it.invoke()
        y = it.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            s, z = out["quantization"]
            y = (y.astype(np.float32) - z) * s
        outs.append(y)
        if preserve:
            inters.append({d["index"]: it.get_tensor(d["index"]).copy() for d in it.get_tensor_details()
                           if d["dtype"] == np.int8 and len(d["shape"]) > 0})
    return np.concatenate(outs), inters


def _assert_ranges_in_file(g, info) -> int:
    """Every FakeQuant node's range is the scale and zero point of its tensor in the file; returns the count."""
    checked = 0
    for fq in g.find(Op.FAKE_QUANT):
        lo, hi = fq.attrs.lo[0], fq.attrs.hi[0]
        scale, zp = (hi - lo) / 255, int(round(-lo / ((hi - lo) / 255))) - 128
        src = fq.inputs[0].producer
        found = tensors_for_node(info, fq.name) + (tensors_for_node(info, src.name) if src else [])
        found = [t for t in found if t.dtype is np.int8]
        assert found, fq.name
        for t in found:
            assert t.scale == pytest.approx(scale, rel=1e-6) and t.zero_point == zp, (fq.name, t.name)
        checked += 1
    return checked


def _preserving(fb):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_content=fb, experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return it


@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
def test_fully_integer_ranges_and_layer_by_layer(rng, weights):
    g, x = _quantized(rng, residual_block(rng, relu_after_add=True), (8, 8, 4), weights)
    fb = emit_tflite(g)
    info = assert_fully_integer(fb, io_dtype="float32")
    ops = info.op_counts()
    assert ops.get("QUANTIZE") == 1 and ops.get("DEQUANTIZE") == 1 and "ADD" in ops
    kernels = [info.tensors[op.inputs[1]] for op in info.ops if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert all(k.dtype is np.int8 for k in kernels)
    assert all((len(k.scales) > 1) == (weights == "per_channel") for k in kernels if k.shape[-1] > 1)
    # every FakeQuant range is in the file exactly: scale and integer zero point
    fqs = g.find(Op.FAKE_QUANT)
    assert _assert_ranges_in_file(g, info) == len(fqs) >= 7
    # layer by layer: each quantized tensor against the simulation of its layer fed the file's own inputs
    layers = layer_agreement(g, fb, x[:4])
    assert len(layers) == len(fqs) - 1
    for name, agree in layers.items():
        assert agree["within_1_lsb"] >= 0.99 and agree["max_lsb"] <= 2.01, (name, agree)
    # and end to end
    sim_out = Executor(g, quantize=True)(x[:6])
    out, _ = _run(fb, x[:6])
    step = (fqs[-1].attrs.hi[0] - fqs[-1].attrs.lo[0]) / 255
    assert np.mean(np.abs(out - sim_out[0]) <= 1.01 * step) >= 0.95


@pytest.mark.parametrize("io_dtype", ["int8", "uint8"])
def test_integer_io(rng, io_dtype, tmp_path):
    g, x = _quantized(rng, tiny_mobilenet(rng), (16, 16, 3), "per_channel")
    path = tmp_path / "m.tflite"
    fb = emit_tflite(g, path, io_dtype=io_dtype)
    assert path.read_bytes() == fb
    info = assert_fully_integer(str(path), io_dtype=io_dtype)
    assert "QUANTIZE" not in info.op_counts() or io_dtype == "uint8"
    inp = info.tensors[info.inputs[0]]
    fq_in = [fq for fq in g.find(Op.FAKE_QUANT) if fq.inputs[0] is g.inputs[0]][0]
    assert inp.range()[0] == pytest.approx(fq_in.attrs.lo[0], abs=1e-6)
    assert inp.range()[1] == pytest.approx(fq_in.attrs.hi[0], abs=1e-6)
    out, _ = _run(fb, x[:8])
    sim = Executor(g, quantize=True)(x[:8])[0]
    fq = g.find(Op.FAKE_QUANT)[-1].attrs
    step = (fq.hi[0] - fq.lo[0]) / 255
    assert np.mean(np.abs(out - sim) <= 1.01 * step) >= 0.95


def test_float_op_inside_is_reported(rng):
    g = tiny_mobilenet(rng, dense_head=False, bn=False)
    # a hand-made graph with FakeQuant only at the input: the convolutions stay float
    fq = g.add_node(Op.FAKE_QUANT, [g.inputs[0]], FakeQuantAttrs((-4.0,), (4.0,)))
    conv = g.find(Op.CONV2D)[0]
    conv.set_input(0, fq.output)
    with pytest.raises(EmitError, match="not fully integer"):
        emit_tflite(g)
    problems = float_ops(inspect_tflite(emit_tflite(g, check=False)))
    assert problems and any("CONV_2D" in p for p in problems)


def test_emit_needs_fake_quant_for_int8(rng):
    with pytest.raises(EmitError, match="InsertFakeQuant"):
        emit_tflite(tiny_mobilenet(rng), quantized=True)
    with pytest.raises(EmitError, match="not a readable TFLite"):
        inspect_tflite(b"definitely not a flatbuffer")


def test_dead_channel_bias_does_not_overflow(rng):
    """A channel with near-zero weights and a large bias: the int32 bias code |b| / (s_in * s_w) would overflow;
    the weight range is widened so that the int8 output matches the float one."""
    from qfrewrite.ir import ConvAttrs, Graph
    from qfrewrite.quant.weights import MIN_ABSMAX

    g = Graph("dead")
    x_in = g.add_input("x", (None, 6, 6, 4))
    k = rng.normal(size=(1, 1, 4, 3)).astype(np.float32)
    k[..., 1] = 1e-9  # dead channel
    conv = g.add_node(Op.CONV2D, [x_in, g.const(k), g.const(np.array([0.5, 3.0, -2.0]))], ConvAttrs(), name="conv")
    g.outputs = [conv.output]
    x = rng.normal(size=(8, 6, 6, 4)).astype(np.float32)
    res = InsertFakeQuant()(g, Context(CalibrationSet([x])))
    assert res.stats["bias_fit_channels"] == {"conv": [1]}
    s_in = (g.find(Op.FAKE_QUANT)[0].attrs.hi[0] - g.find(Op.FAKE_QUANT)[0].attrs.lo[0]) / 255
    hi = np.asarray(conv.weight_quant.hi)
    assert 3.0 / (s_in * hi[1] / 127) <= 2 ** 30 + 1 and hi[1] > MIN_ABSMAX
    assert hi[0] == pytest.approx(np.abs(k[..., 0]).max())
    out, _ = _run(emit_tflite(g), x[:4])
    assert np.abs(out[..., 1] - 3.0).max() < 0.05  # the dead channel is its bias
    for name, agree in layer_agreement(g, emit_tflite(g), x[:2]).items():
        assert agree["max_lsb"] <= 1.01, (name, agree)


def test_concat_inputs_share_its_range_and_dense_on_maps(rng):
    """Concat runs at one scale in int8: its inputs take its range, so the file holds the chosen ranges; a Dense on
    an NHWC map becomes a 1x1 conv for per-channel weights."""
    from qfrewrite.ir import ClipAttrs, ConcatAttrs, ConvAttrs, Graph

    g = Graph("concat")
    x_in = g.add_input("x", (None, 6, 6, 3))
    a = g.add_node(Op.CONV2D, [x_in, g.const(rng.normal(size=(1, 1, 3, 4))), g.const(rng.normal(size=4))],
                   ConvAttrs(), name="a").output
    a = g.add_node(Op.CLIP, [a], ClipAttrs(0.0, 6.0), name="a_relu").output
    b = g.add_node(Op.CONV2D, [x_in, g.const(3 * rng.normal(size=(1, 1, 3, 2))), g.const(rng.normal(size=2))],
                   ConvAttrs(), name="b").output
    c = g.add_node(Op.CONCAT, [a, b], ConcatAttrs(-1), name="cat").output
    g.outputs = [g.add_node(Op.DENSE, [c, g.const(rng.normal(size=(6, 5))), g.const(rng.normal(size=5))],
                            name="fc").output]
    x = rng.normal(size=(8, 6, 6, 3)).astype(np.float32)
    ref = Executor(g)(x)[0]
    res = InsertFakeQuant()(g, Context(CalibrationSet([x])))
    assert res.stats["dense_as_conv"] == ["fc"] and not g.find(Op.DENSE) and not g.find(Op.RESHAPE)
    np.testing.assert_allclose(Executor(g)(x)[0], ref, rtol=1e-5, atol=1e-5)
    r = res.stats["ranges"]
    assert r["a_relu:0"] == r["b:0"] == r["cat:0"]
    fb = emit_tflite(g)
    info = assert_fully_integer(fb)
    assert "CONCATENATION" in info.op_counts()
    assert _assert_ranges_in_file(g, info) == 5
    for name, agree in layer_agreement(g, fb, x[:2]).items():
        assert agree["within_1_lsb"] >= 0.99, (name, agree)


@pytest.mark.parametrize("act", [Op.HARD_SWISH, Op.HARD_SIGMOID, Op.SIGMOID])
def test_mobilenet_v3_activations_fully_integer(rng, act):
    """HardSwish and Sigmoid have int8 kernels; HardSigmoid is spelled out as Add/Clip/Mul (a squeeze-excite gate)."""
    from qfrewrite.ir import ConvAttrs, Graph

    g = Graph("v3")
    x_in = g.add_input("x", (None, 6, 6, 3))
    a = g.add_node(Op.CONV2D, [x_in, g.const(rng.normal(size=(1, 1, 3, 4))), g.const(rng.normal(size=4))],
                   ConvAttrs(), name="a").output
    h = g.add_node(act, [a], name="act").output
    if act is not Op.HARD_SWISH:
        h = g.add_node(Op.MUL, [a, h], name="gate").output
    g.outputs = [g.add_node(Op.CONV2D, [h, g.const(rng.normal(size=(1, 1, 4, 2)))], ConvAttrs(), name="b").output]
    x = rng.normal(size=(8, 6, 6, 3)).astype(np.float32)
    ref = Executor(g)(x)[0]
    InsertFakeQuant()(g, Context(CalibrationSet([x])))
    np.testing.assert_allclose(Executor(g)(x)[0], ref, rtol=1e-5, atol=1e-5)  # rewrites are exact in float
    fb = emit_tflite(g)
    assert_fully_integer(fb)
    assert _assert_ranges_in_file(g, inspect_tflite(fb)) == len(g.find(Op.FAKE_QUANT))
    for name, agree in layer_agreement(g, fb, x[:2]).items():
        assert agree["within_1_lsb"] >= 0.99, (name, agree)
