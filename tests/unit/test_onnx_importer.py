"""ONNX importer: small graphs built with onnx.helper, one per op form; the imported graph (run by qfrewrite's
executor) must match onnxruntime (graph optimizations off) at float32 tolerances."""
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qfrewrite
from qfrewrite.backend.executor import run_graph
from qfrewrite.errors import ModelLoadError, UnsupportedOpError
from qfrewrite.importers.onnx_importer import load_onnx
from qfrewrite.ir import Op
from qfrewrite.passes import FoldBatchNorm

F = TensorProto.FLOAT


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def model(tmp_path, nodes, inits=(), in_shape=("N", 3, 8, 8), out="y", opset=13, name="m.onnx",
          in_name="x", out_shape=None):
    """Write a one-input, one-output ONNX model and return its path."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(in_name, F, list(in_shape))],
        [helper.make_tensor_value_info(out, F, out_shape)], list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7 if opset <= 14 else 8
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m)
    path = tmp_path / name
    onnx.save(m, str(path))
    return path


def onnx_ref(path, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def to_source_layout(graph, y):
    return y.transpose(0, 3, 1, 2) if graph.meta["output_layouts"][0] == "NCHW" else y


def check(path, x, rtol=1e-5, **load_kw):
    """Import ``path``, run both, compare; returns the graph."""
    g = load_onnx(path, **load_kw)
    ref = onnx_ref(path, x)
    xin = x.transpose(0, 2, 3, 1) if g.meta["input_layout"] == "NCHW" and x.ndim == 4 else x
    out = to_source_layout(g, run_graph(g, xin)[0])
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * max(np.abs(ref).max(), 1.0))
    return g


@pytest.fixture
def x(rng):
    return rng.normal(size=(2, 3, 8, 8)).astype(np.float32)


# -- convolutions -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attrs", [
    dict(pads=[1, 1, 1, 1]),
    dict(pads=[0, 1, 2, 1], strides=[2, 2]),
    dict(pads=[2, 2, 2, 2], dilations=[2, 2]),
    dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(auto_pad="SAME_LOWER", strides=[2, 2]),
    dict(auto_pad="VALID"),
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_padding_forms(tmp_path, rng, x, attrs, bias):
    ins = ["x", "w", "b"] if bias else ["x", "w"]
    inits = [_init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
             _init("b", rng.normal(size=4).astype(np.float32))]
    g = check(model(tmp_path, [helper.make_node("Conv", ins, ["y"], kernel_shape=[3, 3], **attrs)], inits), x)
    assert g.op_counts() == {"Conv2D": 1}


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv(tmp_path, rng, x, mult):
    w = rng.normal(size=(3 * mult, 1, 3, 3)).astype(np.float32)
    p = model(tmp_path, [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=3, pads=[1, 1, 1, 1])],
              [_init("w", w), _init("b", rng.normal(size=3 * mult).astype(np.float32))])
    g = check(p, x)
    (dw,) = g.find(Op.DEPTHWISE_CONV2D)
    assert dw.weight.const.shape == (3, 3, 3, mult)


def test_grouped_conv_is_block_diagonal(tmp_path, rng):
    x = rng.normal(size=(2, 4, 6, 6)).astype(np.float32)
    p = model(tmp_path, [helper.make_node("Conv", ["x", "w"], ["y"], group=2, pads=[1, 1, 1, 1])],
              [_init("w", rng.normal(size=(6, 2, 3, 3)).astype(np.float32))], in_shape=("N", 4, 6, 6))
    g = check(p, x)
    (conv,) = g.find(Op.CONV2D)
    assert conv.meta["groups"] == 2 and np.all(conv.weight.const[:, :, 2:, :3] == 0)


def test_weights_as_constant_nodes(tmp_path, rng, x):
    w = helper.make_node("Constant", [], ["w"], value=_init("wv", rng.normal(size=(4, 3, 1, 1)).astype(np.float32)))
    p = model(tmp_path, [w, helper.make_node("Conv", ["x", "w"], ["y"])])
    check(p, x)


def test_separate_batchnorm_keeps_epsilon_and_folds_exactly(tmp_path, rng, x):
    c = 4
    inits = [_init("w", rng.normal(size=(c, 3, 3, 3)).astype(np.float32)),
             _init("s", rng.uniform(0.5, 2, c).astype(np.float32)), _init("bb", rng.normal(size=c).astype(np.float32)),
             _init("m", rng.normal(size=c).astype(np.float32)), _init("v", rng.uniform(0.1, 1, c).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["y"], epsilon=1e-3)]
    p = model(tmp_path, nodes, inits)
    g = check(p, x)
    (bn,) = g.find(Op.BATCH_NORM)
    assert bn.attrs.epsilon == pytest.approx(1e-3)
    res = FoldBatchNorm()(g)
    assert res.modified and not g.find(Op.BATCH_NORM)
    ref = onnx_ref(p, x)
    np.testing.assert_allclose(run_graph(g, x.transpose(0, 2, 3, 1))[0].transpose(0, 3, 1, 2), ref,
                               rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# -- dense --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trans_b,alpha,beta,c_shape", [(1, 1.0, 1.0, (5,)), (0, 0.5, 2.0, (1, 5)), (1, 1.0, 1.0, None)])
def test_gemm_after_global_pool(tmp_path, rng, x, trans_b, alpha, beta, c_shape):
    w = rng.normal(size=(5, 3) if trans_b else (3, 5)).astype(np.float32)
    inits = [_init("w", w)] + ([_init("c", rng.normal(size=c_shape).astype(np.float32))] if c_shape else [])
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w"] + (["c"] if c_shape else []), ["y"], transB=trans_b, alpha=alpha,
                              beta=beta)]
    g = check(model(tmp_path, nodes, inits), x)
    assert g.op_counts()["Dense"] == 1


def test_gemm_after_flatten_of_a_spatial_map_permutes_rows(tmp_path, rng, x):
    """ONNX flattens C, H, W; the IR flattens H, W, C: per-feature constants and kernel rows follow."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Add", ["f", "shift"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Gemm", ["r", "w", "c"], ["y"], transB=1)]
    inits = [_init("w", rng.normal(size=(7, 3 * 8 * 8)).astype(np.float32)), _init("c", np.zeros(7, np.float32)),
             _init("shift", rng.normal(size=3 * 8 * 8).astype(np.float32))]
    check(model(tmp_path, nodes, inits), x)


def test_global_max_pool_cast_and_identity_transpose(tmp_path, x):
    nodes = [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 1, 2, 3]),
             helper.make_node("GlobalMaxPool", ["t"], ["y"])]
    g = check(model(tmp_path, nodes), x)
    assert g.op_counts() == {"MaxPool": 1}


def test_matmul_add_becomes_dense_with_bias(tmp_path, rng, x):
    nodes = [helper.make_node("ReduceMean", ["x"], ["p"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["p", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    inits = [_init("w", rng.normal(size=(3, 6)).astype(np.float32)), _init("b", rng.normal(size=6).astype(np.float32))]
    g = check(model(tmp_path, nodes, inits), x)
    assert g.op_counts() == {"Dense": 1, "GlobalMean": 1} and g.find(Op.DENSE)[0].bias is not None


# -- activations --------------------------------------------------------------------------------------------------
# bounds as attributes at opset 10 (onnxruntime has no kernels for opset < 7 Mul), as inputs from opset 11
@pytest.mark.parametrize("opset,lo,hi,expect", [
    (10, 0.0, 6.0, Op.CLIP), (10, -1.0, None, Op.CLIP), (13, 0.0, 6.0, Op.CLIP), (13, 0.0, None, Op.RELU),
    (13, None, 2.5, Op.CLIP), (13, None, None, None),
])
def test_clip_forms(tmp_path, x, opset, lo, hi, expect):
    inits = []
    if opset < 11:
        kw = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
        node = helper.make_node("Clip", ["x"], ["y"], **kw)
    else:
        ins = ["x", "lo" if lo is not None else "", "hi" if hi is not None else ""]
        while ins[-1] == "":
            ins.pop()
        inits = [_init(n, np.float32(v)) for n, v in (("lo", lo), ("hi", hi)) if v is not None]
        node = helper.make_node("Clip", ins, ["y"])
    nodes = [helper.make_node("Mul", ["x", "k"], ["x3"]), node]
    nodes[1].input[0] = "x3"
    g = check(model(tmp_path, nodes, inits + [_init("k", np.float32(3.0))], opset=opset), x)
    ops = {n.op for n in g}
    assert (expect in ops) if expect else ops == {Op.MUL}
    if expect is Op.CLIP and (lo, hi) == (0.0, 6.0):
        assert g.find(Op.CLIP)[0].attrs.is_relu6


@pytest.mark.parametrize("alpha,beta,expect", [(1 / 6, 0.5, {Op.HARD_SIGMOID}), (0.2, 0.5, {Op.MUL, Op.ADD, Op.CLIP})])
def test_hard_sigmoid(tmp_path, x, alpha, beta, expect):
    nodes = [helper.make_node("Mul", ["x", "k"], ["x4"]),
             helper.make_node("HardSigmoid", ["x4"], ["y"], alpha=alpha, beta=beta)]
    g = check(model(tmp_path, nodes, [_init("k", np.float32(4.0))]), x)
    assert {n.op for n in g} - {Op.MUL} == expect - {Op.MUL}


def _hard_swish_nodes(form):
    k = [_init("k", np.float32(4.0)), _init("three", np.float32(3.0)), _init("zero", np.float32(0.0)),
         _init("six", np.float32(6.0)), _init("sixth", np.float32(1 / 6))]
    pre = [helper.make_node("Mul", ["x", "k"], ["a"])]
    relu6 = [helper.make_node("Add", ["a", "three"], ["a3"]), helper.make_node("Clip", ["a3", "zero", "six"], ["r"])]
    if form == "div":  # x * relu6(x + 3) / 6
        body = relu6 + [helper.make_node("Mul", ["a", "r"], ["p"]), helper.make_node("Div", ["p", "six"], ["y"])]
    elif form == "mul_sixth":  # (relu6(x + 3) * x) * (1/6)
        body = relu6 + [helper.make_node("Mul", ["r", "a"], ["p"]), helper.make_node("Mul", ["sixth", "p"], ["y"])]
    elif form == "hard_sigmoid_div":  # x * (relu6(x + 3) / 6)
        body = relu6 + [helper.make_node("Div", ["r", "six"], ["h"]), helper.make_node("Mul", ["a", "h"], ["y"])]
    elif form == "torch_hard_sigmoid":  # PyTorch < opset 14: x * HardSigmoid(x)
        body = [helper.make_node("HardSigmoid", ["a"], ["h"], alpha=1 / 6, beta=0.5),
                helper.make_node("Mul", ["a", "h"], ["y"])]
    else:  # opset 14 HardSwish
        body = [helper.make_node("HardSwish", ["a"], ["y"])]
    return pre + body, k


@pytest.mark.parametrize("form", ["div", "mul_sixth", "hard_sigmoid_div", "torch_hard_sigmoid", "op"])
def test_hard_swish_forms(tmp_path, x, form):
    nodes, inits = _hard_swish_nodes(form)
    g = check(model(tmp_path, nodes, inits, opset=14), x)
    assert g.op_counts() == {"HardSwish": 1, "Mul": 1}


def test_relu6_times_x_without_sixth_is_not_hard_swish(tmp_path, x):
    nodes, inits = _hard_swish_nodes("div")
    nodes[-1] = helper.make_node("Div", ["p", "k"], ["y"])  # divided by 4, not 6
    g = check(model(tmp_path, nodes, inits), x)
    assert not g.find(Op.HARD_SWISH) and not g.find(Op.HARD_SIGMOID) and g.find(Op.CLIP)


def test_squeeze_excite_block(tmp_path, rng, x):
    inits = [_init("w1", rng.normal(size=(2, 3, 1, 1)).astype(np.float32)), _init("b1", np.ones(2, np.float32)),
             _init("w2", rng.normal(size=(3, 2, 1, 1)).astype(np.float32)), _init("b2", np.zeros(3, np.float32))]
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Conv", ["p", "w1", "b1"], ["c1"]), helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c2"]),
             helper.make_node("HardSigmoid", ["c2"], ["s"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["x", "s"], ["y"])]
    g = check(model(tmp_path, nodes, inits), x)
    assert g.op_counts() == {"Conv2D": 2, "GlobalMean": 1, "HardSigmoid": 1, "Mul": 1, "Relu": 1}


def test_sigmoid(tmp_path, x):
    check(model(tmp_path, [helper.make_node("Sigmoid", ["x"], ["y"])]), x)


# -- padding, pooling, reductions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [10, 13])
def test_pad_constant(tmp_path, x, opset):
    pads = [0, 0, 1, 0, 0, 0, 2, 1]
    if opset < 11:
        node, inits = helper.make_node("Pad", ["x"], ["y"], pads=pads, value=0.5), []
    else:
        node = helper.make_node("Pad", ["x", "p", "v"], ["y"])
        inits = [_init("p", np.asarray(pads, np.int64)), _init("v", np.float32(0.5))]
    g = check(model(tmp_path, [node], inits, opset=opset), x)
    assert g.find(Op.PAD)[0].attrs.pads == ((1, 2), (0, 1))


def test_pad_amounts_from_a_constant_subgraph_are_folded(tmp_path, x):
    """PyTorch's legacy exporter computes ZeroPad2d amounts with ConstantOfShape/Concat/Reshape/Slice/Transpose."""
    c = lambda name, v: helper.make_node("Constant", [], [name], value=_init(name + "_v", np.asarray(v, np.int64)))
    nodes = [
        c("pad4", [0, 1, 0, 1]), c("len", [4]),
        helper.make_node("ConstantOfShape", ["len"], ["zeros"], value=_init("z", np.zeros(1, np.int64))),
        helper.make_node("Concat", ["pad4", "zeros"], ["p8"], axis=0),
        c("shape2", [-1, 2]), helper.make_node("Reshape", ["p8", "shape2"], ["p42"]),
        c("st", [-1]), c("en", [-(2 ** 62)]), c("ax", [0]), c("step", [-1]),
        helper.make_node("Slice", ["p42", "st", "en", "ax", "step"], ["rev"]),
        helper.make_node("Transpose", ["rev"], ["tr"], perm=[1, 0]),
        c("flat", [-1]), helper.make_node("Reshape", ["tr", "flat"], ["pads_i"]),
        helper.make_node("Cast", ["pads_i"], ["pads"], to=TensorProto.INT64),
        helper.make_node("Pad", ["x", "pads", ""], ["y"], mode="constant"),
    ]
    g = check(model(tmp_path, nodes), x)
    assert g.op_counts() == {"Pad": 1}


def test_reflect_pad_is_unsupported(tmp_path, x):
    p = model(tmp_path, [helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect")],
              [_init("p", np.asarray([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    with pytest.raises(UnsupportedOpError, match="reflect"):
        load_onnx(p)


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
])
def test_maxpool(tmp_path, rng, attrs):
    x = rng.normal(size=(2, 3, 9, 9)).astype(np.float32)
    check(model(tmp_path, [helper.make_node("MaxPool", ["x"], ["y"], **attrs)], in_shape=("N", 3, 9, 9)), x)


@pytest.mark.parametrize("include", [0, 1])
@pytest.mark.parametrize("attrs", [dict(pads=[1, 1, 1, 1]), dict(pads=[0, 0, 1, 1], strides=[2, 2]),
                                   dict(auto_pad="SAME_UPPER", strides=[2, 2]), dict(auto_pad="VALID")])
def test_average_pool_count_include_pad(tmp_path, x, include, attrs):
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], count_include_pad=include, **attrs)
    check(model(tmp_path, [node]), x)


@pytest.mark.parametrize("opset,keep", [(13, 1), (13, 0), (18, 0)])
def test_reduce_mean_over_hw(tmp_path, x, opset, keep):
    if opset >= 18:
        node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keep)
        inits = [_init("axes", np.asarray([-1, -2], np.int64))]
    else:
        node, inits = helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=keep), []
    g = check(model(tmp_path, [node], inits, opset=opset), x)
    assert g.op_counts() == {"GlobalMean": 1}


def test_reduce_mean_over_channels_is_unsupported(tmp_path, x):
    p = model(tmp_path, [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1])])
    with pytest.raises(UnsupportedOpError, match="ReduceMean"):
        load_onnx(p)


@pytest.mark.parametrize("opset,axis,rank4", [(13, 1, True), (13, -1, False), (11, 1, False)])
def test_softmax_axes(tmp_path, x, opset, axis, rank4):
    nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=axis)]
    if not rank4:
        nodes[:0] = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"])]
        nodes[2].input[0] = "f"
    check(model(tmp_path, nodes, opset=opset), x)


# -- layout-only ops and reshapes -----------------------------------------------------------------------------------
def test_identity_dropout_squeeze_unsqueeze(tmp_path, rng, x):
    nodes = [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("GlobalAveragePool", ["i"], ["p"]),
             helper.make_node("Squeeze", ["p", "axes"], ["s"]), helper.make_node("Dropout", ["s"], ["d"]),
             helper.make_node("Unsqueeze", ["d", "axes"], ["u"]), helper.make_node("Conv", ["u", "w"], ["y"])]
    inits = [_init("axes", np.asarray([2, 3], np.int64)), _init("w", rng.normal(size=(4, 3, 1, 1)).astype(np.float32))]
    check(model(tmp_path, nodes, inits), x)


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_dependent_reshape_through_shape_ops(tmp_path, rng, batch):
    """``x.view(x.size(0), -1)`` as PyTorch exports it: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    x = rng.normal(size=(batch, 3, 8, 8)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Shape", ["p"], ["sh"]),
             helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["p", "target"], ["y"])]
    inits = [_init("zero", np.int64(0)), _init("ax0", np.asarray([0], np.int64)),
             _init("minus1", np.asarray([-1], np.int64))]
    g = check(model(tmp_path, nodes, inits, out_shape=["N", 3]), x)
    assert g.outputs[0].shape == (None, 3)


def test_reshape_that_mixes_channels_and_positions_is_refused(tmp_path, x):
    p = model(tmp_path, [helper.make_node("Reshape", ["x", "s"], ["y"])], [_init("s", np.asarray([0, 6, 4, 8], np.int64))])
    with pytest.raises(UnsupportedOpError, match="Reshape.*transpose"):
        load_onnx(p)


def test_nhwc_input_behind_a_transpose(tmp_path, rng):
    """tf2onnx style: the model takes NHWC and transposes to NCHW for its convolutions."""
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 3, 1])]
    p = model(tmp_path, nodes, [_init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32))], in_shape=("N", 8, 8, 3))
    g = check(p, x)
    assert g.meta["input_layout"] == "NHWC" and g.meta["output_layouts"] == ["same"]


# -- element-wise -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,const_first,shape", [
    ("Add", False, (3, 1, 1)), ("Sub", False, (1, 3, 1, 1)), ("Sub", True, (3, 1, 1)), ("Mul", True, (3, 1, 1)),
    ("Div", False, ()), ("Div", False, (3, 1, 1)), ("Add", False, (8,)),
])
def test_binary_with_constant(tmp_path, rng, x, op, const_first, shape):
    c = rng.uniform(0.5, 2.0, size=shape).astype(np.float32)
    ins = ["c", "x"] if const_first else ["x", "c"]
    check(model(tmp_path, [helper.make_node(op, ins, ["y"])], [_init("c", c)]), x)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul"])
def test_binary_of_two_tensors(tmp_path, x, op):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(op, ["x", "r"], ["y"])]
    check(model(tmp_path, nodes), x)


@pytest.mark.parametrize("shape,expect", [((), Op.CLIP), ((3, 1, 1), Op.MINIMUM)])
def test_min_with_a_constant(tmp_path, rng, x, shape, expect):
    c = rng.uniform(0.0, 1.0, size=shape).astype(np.float32)
    g = check(model(tmp_path, [helper.make_node("Min", ["x", "c"], ["y"])], [_init("c", c)]), x)
    assert [n.op for n in g] == [expect]


def test_division_by_a_tensor_is_unsupported(tmp_path, x):
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Div", ["x", "s"], ["y"])]
    with pytest.raises(UnsupportedOpError, match="division"):
        load_onnx(model(tmp_path, nodes))


def test_concat_on_channels(tmp_path, x):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Concat", ["r", "s"], ["y"], axis=1)]
    g = check(model(tmp_path, nodes), x)
    assert g.find(Op.CONCAT)[0].attrs.axis == -1


# -- shapes, cutting, errors --------------------------------------------------------------------------------------
def test_open_spatial_dims_need_input_shape(tmp_path, rng):
    p = model(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], in_shape=("N", 3, "H", "W"))
    with pytest.raises(ModelLoadError, match="input_shape"):
        load_onnx(p)
    x = rng.normal(size=(1, 3, 5, 7)).astype(np.float32)
    g = check(p, x, input_shape=(1, 3, 5, 7))
    assert g.inputs[0].shape == (None, 5, 7, 3)
    with pytest.raises(ModelLoadError, match="contradicts"):
        load_onnx(model(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], name="s.onnx"), input_shape=(1, 3, 9, 9))


def test_inputs_and_outputs_cut_the_graph(tmp_path, rng, x):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["r"], ["s"]),
             helper.make_node("Mul", ["s", "k"], ["y"])]
    p = model(tmp_path, nodes, [_init("k", np.float32(2.0))])
    g = load_onnx(p, outputs=["s"])
    assert g.op_counts() == {"Relu": 1, "Sigmoid": 1} and g.meta["output_names"] == ["s"]
    g = load_onnx(p, inputs=["r"])
    assert g.op_counts() == {"Mul": 1, "Sigmoid": 1} and g.inputs[0].name == "r"
    with pytest.raises(ModelLoadError, match="no tensor or node named 'nope'"):
        load_onnx(p, outputs=["nope"])


def test_unsupported_op_names_node_op_and_supported_list(tmp_path, x):
    p = model(tmp_path, [helper.make_node("LRN", ["x"], ["y"], size=3, name="norm1")])
    with pytest.raises(UnsupportedOpError) as info:
        load_onnx(p)
    msg = str(info.value)
    assert "'LRN'" in msg and "'norm1'" in msg and "Conv" in msg and "HardSigmoid" in msg


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_files_give_a_model_load_error(tmp_path, rng, x, damage):
    good = model(tmp_path, [helper.make_node("Conv", ["x", "w"], ["y"])],
                 [_init("w", rng.normal(size=(64, 3, 3, 3)).astype(np.float32))])
    data = good.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes({"garbage": b"\x08\x07not an onnx model\xff" * 10, "truncated": data[: len(data) // 2],
                     "empty": b""}[damage])
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        qfrewrite.load(bad)


def test_import_leaves_the_file_alone_and_sets_meta(tmp_path, x):
    p = model(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], in_shape=("batch", 3, 8, 8))
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    g = qfrewrite.load(p)
    assert hashlib.sha256(p.read_bytes()).hexdigest() == digest
    assert g.meta["format"] == "onnx" and g.meta["input_layout"] == "NCHW" and g.meta["input_name"] == "x"
    assert g.meta["output_names"] == ["y"] and g.meta["source"] == str(p)
    assert g.inputs[0].shape == (None, 8, 8, 3)
