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


def quantized(rng, bits, per_tensor=()):
    """tiny_mobilenet through recipes.plain(weight_bits=bits), with the kernels at the topological positions
    ``per_tensor`` switched to per-tensor weights; returns the graph and its test input."""
    g = tiny_mobilenet(rng, bias=True)
    x = rng.normal(size=(32, 16, 16, 3)).astype(np.float32)
    res = qfrewrite.rewrite(g, passes=recipes.plain(weight_bits=bits), data=x[:8])
    kernels = [n for n in res.graph.topological_order() if n.op in WEIGHTED_OPS]
    for i in per_tensor:
        kernels[i].weight_quant = weight_quant_attrs(kernels[i], "per_tensor", bits=bits)
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
    g, x = quantized(rng, 4, per_tensor=(1, 3))  # the depthwise conv and the dense head per tensor
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
    g, x = quantized(rng, bits, per_tensor=(2,))
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
