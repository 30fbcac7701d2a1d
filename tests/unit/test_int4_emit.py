"""Weights of fewer than 8 bits stored honestly: INT4 initializers in ONNX (opset 21) and INT4 tensors in TFLite for
grids of at most 4 bits, int8 codes holding the fewer levels for 5..7 bits, every stored weight on the IR's grid."""
import dataclasses
import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qfrewrite
from qfrewrite import recipes
from qfrewrite.backend.executor import run_graph
from qfrewrite.emit.onnx_emitter import emit_onnx
from qfrewrite.ir import WEIGHTED_OPS, Op
from qfrewrite.numerics.quantize import nudge
from qfrewrite.quant.weights import weight_quant_attrs
from tests.graphs import tiny_mobilenet
from tests.unit.test_onnx_emitter import ort_run


def quantized(rng, bits, weights="per_channel", other=()):
    """tiny_mobilenet through recipes.plain(weight_bits=bits, weights=weights), with the kernels at the topological
    positions ``other`` switched to the other granularity; returns the graph and its test input. (Per-channel
    weights turn the dense head into a 1x1 conv; per-tensor ones keep it a dense layer.)"""
    g = tiny_mobilenet(rng, bias=True)
    x = rng.normal(size=(32, 16, 16, 3)).astype(np.float32)
    res = qfrewrite.rewrite(g, passes=recipes.plain(weight_bits=bits, weights=weights), data=x[:8])
    kernels = [n for n in res.graph.topological_order() if n.op in WEIGHTED_OPS]
    flip = "per_tensor" if weights == "per_channel" else "per_channel"
    for i in other:
        kernels[i].weight_quant = weight_quant_attrs(kernels[i], flip, bits=bits)
    return res.graph, x


def with_bits(graph, bits):
    """A copy of ``graph`` whose kernels keep their weight ranges with ``bits`` bits."""
    g = graph.copy()
    for n in g:
        if n.weight_quant is not None:
            n.weight_quant = dataclasses.replace(n.weight_quant, bits=bits)
    return g


def output_step(g):
    """The quantization step of the output (of the last FakeQuant before it: a reshape may follow)."""
    node = g.outputs[0].producer
    while node.op is not Op.FAKE_QUANT:
        node = node.inputs[0].producer
    fq = node.attrs
    return float(nudge(fq.lo[0], fq.hi[0], fq.bits, fq.narrow_range)[2])


def weight_codes(model):
    """{kernel initializer name: (TensorProto data type, codes, zero point)} of the DequantizeLinear nodes feeding a
    Conv or Gemm weight."""
    inits = {i.name: i for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm") and n.input[1] in dq:
            d = dq[n.input[1]]
            out[d.input[0]] = (inits[d.input[0]].data_type, numpy_helper.to_array(inits[d.input[0]]).astype(np.int64),
                               numpy_helper.to_array(inits[d.input[2]]).astype(np.int64))
    return out


def test_int4_onnx_weights_run_in_onnxruntime_and_equal_the_simulation(rng):
    g, x = quantized(rng, 4, other=(1, 3))  # the depthwise conv and the dense head per tensor
    kernels = [n for n in g.topological_order() if n.op in WEIGHTED_OPS]
    assert [n.weight_quant.per_channel for n in kernels] == [True, False, True, False]
    sim = run_graph(g, x, quantize=True)[0]
    step = output_step(g)
    exact = emit_onnx(g, int32_bias=False)
    assert exact.opset_import[0].version == 21
    np.testing.assert_allclose(ort_run(exact, x)[0], sim, rtol=0, atol=1e-4 * step)
    m = emit_onnx(g)  # int32 biases: a value near a rounding boundary may move by one step
    assert np.abs(ort_run(m, x)[0] - sim).max() <= step * 1.001
    codes = weight_codes(m)
    assert len(codes) == len(kernels)
    for dtype, c, zp in codes.values():
        assert dtype == onnx.TensorProto.INT4
        assert c.min() >= -7 and c.max() <= 7 and not zp.any()
    w8 = emit_onnx(with_bits(g, 8))
    assert w8.opset_import[0].version == 13
    assert {d for d, _, _ in weight_codes(w8).values()} == {onnx.TensorProto.INT8}
    n_weights = sum(n.weight.const.size for n in kernels)
    saved = len(w8.SerializeToString()) - len(m.SerializeToString())
    assert n_weights // 2 - 8 * len(kernels) <= saved <= n_weights // 2 + 8 * len(kernels)  # half a byte a weight


@pytest.mark.parametrize("bits,container,levels", [(2, onnx.TensorProto.INT4, 1), (3, onnx.TensorProto.INT4, 3),
                                                    (5, onnx.TensorProto.INT8, 15), (7, onnx.TensorProto.INT8, 63)])
def test_other_weight_widths_store_their_own_levels(rng, bits, container, levels):
    g, x = quantized(rng, bits, other=(2,))
    m = emit_onnx(g, int32_bias=False)
    np.testing.assert_allclose(ort_run(m, x)[0], run_graph(g, x, quantize=True)[0], rtol=0,
                               atol=1e-4 * output_step(g))
    for dtype, c, zp in weight_codes(m).values():
        assert dtype == container and np.abs(c).max() == levels and not zp.any()


def test_int4_weights_below_opset_21_are_int8_codes_with_a_warning(rng, caplog):
    g, x = quantized(rng, 4)
    with caplog.at_level(logging.WARNING, logger="qfrewrite.emit.onnx_emitter"):
        m = emit_onnx(g, opset=13, int32_bias=False)
    assert sum("no INT4" in r.getMessage() for r in caplog.records) == 1
    for dtype, c, zp in weight_codes(m).values():
        assert dtype == onnx.TensorProto.INT8 and np.abs(c).max() <= 7
    np.testing.assert_allclose(ort_run(m, x)[0], run_graph(g, x, quantize=True)[0], rtol=0,
                               atol=1e-4 * output_step(g))


def test_eight_bit_weights_are_left_as_they_were(rng, caplog):
    g, _ = quantized(rng, 8)
    with caplog.at_level(logging.WARNING, logger="qfrewrite.emit.onnx_emitter"):
        m = emit_onnx(g)
    assert not caplog.records and m.opset_import[0].version == 13
    assert all(d == onnx.TensorProto.INT8 and np.abs(c).max() == 127 for d, c, _ in weight_codes(m).values())


def tflite_codes(flatbuffer):
    """{TFLite kernel tensor name: (integer codes, scales, quantized dimension)} of every CONV_2D,
    DEPTHWISE_CONV_2D and FULLY_CONNECTED kernel, as LiteRT reads them."""
    from qfrewrite.tflite_inspect import inspect_tflite, interpreter

    info, it = inspect_tflite(flatbuffer), interpreter(flatbuffer, delegates=False)
    out = {}
    for op in info.ops:
        if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            t = info.tensors[op.inputs[1]]
            out[t.name] = (op.name, it.get_tensor(t.index).astype(np.int64), t.scales, t.quantized_dimension)
    return out


def ir_layout(node, kernel):
    """An IR kernel in TFLite's layout: Conv2D OHWI, depthwise 1HW(C*M), Dense (out, in)."""
    if node.op is Op.CONV2D:
        return kernel.transpose(3, 0, 1, 2)
    if node.op is Op.DEPTHWISE_CONV2D:
        return kernel.reshape(1, *kernel.shape[:2], -1)
    return kernel.T


@pytest.mark.parametrize("bits", [4, 3, 5])
def test_tflite_kernels_hold_exactly_the_ir_grid(rng, bits):
    from qfrewrite.emit.storage import summarize, tflite_kernels
    from qfrewrite.emit.tflite import emit_tflite
    from qfrewrite.numerics.qdq import symmetric_levels, weight_storage_bits
    from qfrewrite.quant.weights import quantized_kernel
    from qfrewrite.tflite_inspect import interpreter

    g, x = quantized(rng, bits, "per_tensor", other=(0, 2))  # per-channel convs, a per-tensor FULLY_CONNECTED
    fb = emit_tflite(g)
    storage = weight_storage_bits(bits)
    kernels = tflite_kernels(fb)
    assert {k.dtype for k in kernels} == {f"int{storage}"}
    codes = tflite_codes(fb)
    assert sorted(op for op, *_ in codes.values()) == ["CONV_2D", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"]
    levels, store = symmetric_levels(bits), symmetric_levels(storage)
    m = store // levels
    for node in (n for n in g if n.op in WEIGHTED_OPS):
        name = next(k for k in codes if k.startswith(node.name + "/"))
        _, c, scales, axis = codes[name]
        assert np.abs(c).max() <= levels * m and not (c % m).any()  # on the bits-bit grid: codes k * m, |k| <= L
        per = np.moveaxis(c, axis, 0).reshape(c.shape[axis], -1) if scales.size > 1 else c.reshape(1, -1)
        assert max(len(np.unique(row)) for row in per) <= 2 * levels + 1
        shape = [1] * c.ndim
        if scales.size > 1:
            shape[axis] = -1
        want = ir_layout(node, quantized_kernel(node, node.weight_quant))
        np.testing.assert_allclose(c * scales.reshape(shape), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    it = interpreter(fb)
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    got = []
    for xi in x:
        it.set_tensor(inp, xi[None])
        it.invoke()
        got.append(it.get_tensor(out)[0])
    sim = run_graph(g, x, quantize=True)[0]
    assert np.mean(np.abs(np.stack(got) - sim) <= 1.01 * output_step(g)) >= 0.95
    w8 = emit_tflite(with_bits(g, 8))
    saved = len(w8) - len(fb)
    small, big = summarize(kernels, fb), summarize(tflite_kernels(w8), w8)
    assert big.kernel_bytes == small.int8_bytes
    if storage == 4:
        assert small.kernel_bytes * 2 - small.int8_bytes <= len(kernels)  # half a byte a weight (odd counts round up)
        assert abs(saved - (big.kernel_bytes - small.kernel_bytes)) <= 16 * len(kernels)  # flatbuffer alignment
    else:
        assert small.kernel_bytes == big.kernel_bytes and saved == 0


def test_storage_grids_leave_native_widths_alone_and_keep_the_function(rng):
    from qfrewrite.emit.tflite import weights_on_storage_grids

    for bits in (2, 4, 8):
        g, _ = quantized(rng, bits)
        assert weights_on_storage_grids(g) is g
    g, x = quantized(rng, 3, other=(1,))
    before = {n.name: (n.weight.const.copy(), n.weight_quant) for n in g if n.weight_quant is not None}
    moved = weights_on_storage_grids(g)
    assert all(n.weight_quant.bits == 4 for n in moved if n.weight_quant is not None)
    for n in g:  # the caller's graph is not touched
        if n.weight_quant is not None:
            np.testing.assert_array_equal(n.weight.const, before[n.name][0])
            assert n.weight_quant == before[n.name][1]
    np.testing.assert_allclose(run_graph(moved, x, quantize=True)[0], run_graph(g, x, quantize=True)[0],
                               rtol=1e-5, atol=1e-5)


def test_an_emitted_int4_tflite_is_read_back_and_diagnosed(rng, tmp_path):
    from qfrewrite.analysis.tflite_int8 import diagnose_int8_tflite
    from qfrewrite.emit.tflite import emit_tflite
    from qfrewrite.importers.tflite_reader import read_tflite

    g, _ = quantized(rng, 4, "per_tensor", other=(0, 2))
    path = tmp_path / "w4.tflite"
    path.write_bytes(emit_tflite(g))
    f = read_tflite(path)
    by_name = {f.name(i): i for i in range(len(f.tensors))}
    for name, (_, codes, _, _) in tflite_codes(path.read_bytes()).items():  # the unpacked nibbles are LiteRT's codes
        np.testing.assert_array_equal(f.raw(by_name[name]), codes)
    layers = diagnose_int8_tflite(path).layers
    assert len(layers) == 4 and {ls.dtype for ls in layers} == {"int4"}
    assert all(ls.full_span == 7 and ls.levels.max() <= 15 and ls.spans.max() <= 7 for ls in layers)
    assert max(ls.spans.max() for ls in layers if ls.per_channel) == 7  # min/max ranges: a channel reaches 7
