"""The TFLite importer on small files written by TensorFlow's own converter: every op of the MobileNet family read
back and checked numerically against LiteRT running the file; float16 weights; unsupported ops; truncated and
corrupt files; quantized files refused."""
from __future__ import annotations

import numpy as np
import pytest

import qfrewrite
from qfrewrite.backend.executor import Executor
from qfrewrite.errors import ModelLoadError, QuantizedModelError, UnsupportedOpError
from qfrewrite.importers.tflite_ops import layer_name
from qfrewrite.ir import ClipAttrs, Graph, Op
from qfrewrite.tflite_inspect import interpreter, inspect_tflite

tf = pytest.importorskip("tensorflow")

HW, C = 8, 4


def _tflite(fn, shape=(1, HW, HW, C), float16=False) -> bytes:
    """``fn`` as TensorFlow's converter writes it (float; float16 weights when asked)."""
    cf = tf.function(fn, input_signature=[tf.TensorSpec(shape, tf.float32)], autograph=False).get_concrete_function()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([cf], tf.Module())
    if float16:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    return conv.convert()


def _run_file(data: bytes, x: np.ndarray) -> np.ndarray:
    it = interpreter(data)
    d, o = it.get_input_details()[0], it.get_output_details()[0]
    out = []
    for i in range(len(x)):
        it.set_tensor(d["index"], x[i:i + 1])
        it.invoke()
        out.append(it.get_tensor(o["index"]).copy())
    return np.concatenate(out)


def _roundtrip(tmp_path, data: bytes, name="m", n=3, shape=(HW, HW, C)):
    """Load the file; return (graph, file outputs, graph outputs) on ``n`` random inputs."""
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(data)
    graph = qfrewrite.load(path)
    x = np.random.default_rng(1).normal(size=(n, *shape)).astype(np.float32)
    return graph, _run_file(data, x), Executor(graph)(x)[0]


def _close(a, b, rel=1e-5):
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rel * max(np.abs(a).max(), 1e-6), np.abs(a - b).max()


R = np.random.default_rng(0)
K33 = tf.constant(R.normal(size=(3, 3, C, 6)).astype(np.float32))
DW = tf.constant(R.normal(size=(3, 3, C, 2)).astype(np.float32))
B6 = tf.constant(R.normal(size=6).astype(np.float32))
B8 = tf.constant(R.normal(size=8).astype(np.float32))
VEC = tf.constant(R.uniform(0.5, 2.0, size=C).astype(np.float32))
FC = tf.constant(R.normal(size=(C, 5)).astype(np.float32))

#: name -> (function, TFLite ops the file must hold, IR ops the import must hold)
CASES = {
    "conv_relu6": (lambda x: tf.nn.relu6(tf.nn.bias_add(tf.nn.conv2d(x, K33, 2, "SAME"), B6)),
                   {"CONV_2D"}, {Op.CONV2D, Op.CLIP}),
    "conv_valid_dilated_relu": (lambda x: tf.nn.relu(tf.nn.conv2d(x, K33, 1, "VALID", dilations=2)),
                                {"CONV_2D"}, {Op.CONV2D, Op.RELU}),
    "depthwise_multiplier": (lambda x: tf.nn.relu6(tf.nn.bias_add(tf.nn.depthwise_conv2d(
        x, DW, [1, 1, 1, 1], "SAME"), B8)), {"DEPTHWISE_CONV_2D"}, {Op.DEPTHWISE_CONV2D, Op.CLIP}),
    "pad_pools": (lambda x: tf.nn.max_pool2d(tf.nn.avg_pool2d(tf.pad(x, [[0, 0], [1, 2], [0, 1], [0, 0]]), 3, 2,
                                                              "SAME"), 2, 1, "VALID"),
                  {"PAD", "AVERAGE_POOL_2D", "MAX_POOL_2D"}, {Op.PAD, Op.AVG_POOL, Op.MAX_POOL}),
    "add_mul_sub": (lambda x: (x * VEC + 0.5) - tf.nn.relu(x) * 2.0 - (1.0 - x),
                    {"ADD", "SUB"}, {Op.ADD, Op.MUL}),
    "pad_conv_folded": (lambda x: tf.nn.conv2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), K33, 2, "VALID"),
                        {"PAD", "CONV_2D"}, {Op.CONV2D}),
    "pad_kept": (lambda x: tf.nn.depthwise_conv2d(tf.pad(x, [[0, 0], [1, 1], [0, 2], [0, 0]], constant_values=1.0),
                                                  DW, [1, 2, 2, 1], "VALID")
                 + tf.concat([tf.reduce_mean(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), [1, 2], keepdims=True)] * 2,
                             axis=-1), {"PADV2", "PAD"}, {Op.PAD, Op.DEPTHWISE_CONV2D}),
    "hard_swish_sigmoid": (lambda x: x * tf.nn.relu6(x + 3.0) / 6.0 + tf.sigmoid(x),
                           {"HARD_SWISH", "LOGISTIC"}, {Op.HARD_SWISH, Op.SIGMOID}),
    "min_max": (lambda x: tf.minimum(tf.maximum(x, 0.0), 6.0) + tf.minimum(x, VEC) + tf.maximum(x, -1.0),
                {"MINIMUM", "MAXIMUM"}, {Op.CLIP, Op.MINIMUM}),
    "concat_relus": (lambda x: tf.concat([tf.nn.relu(x), tf.nn.relu6(x * 4.0), tf.clip_by_value(x, -1.0, 1.0)],
                                         axis=-1), {"CONCATENATION"}, {Op.CONCAT, Op.RELU, Op.CLIP}),
    "mean_fc_softmax": (lambda x: tf.nn.softmax(tf.matmul(tf.reduce_mean(x, [1, 2]), FC) + 0.1),
                        {"MEAN", "FULLY_CONNECTED", "SOFTMAX"}, {Op.GLOBAL_MEAN, Op.DENSE, Op.SOFTMAX}),
    "mean_keepdims_squeeze_reshape": (lambda x: tf.reshape(tf.squeeze(tf.reduce_mean(x, [1, 2], keepdims=True),
                                                                      [1, 2]) * 3.0, [1, 2, 2]),
                                      {"MEAN"}, {Op.GLOBAL_MEAN, Op.RESHAPE}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_op_reads_back_as_the_file_computes(tmp_path, case):
    fn, file_ops, ir_ops = CASES[case]
    data = _tflite(fn)
    assert file_ops <= set(inspect_tflite(data).op_counts()), inspect_tflite(data).op_counts()
    graph, want, got = _roundtrip(tmp_path, data, case)
    assert ir_ops <= {n.op for n in graph}, graph.op_counts()
    assert graph.inputs[0].shape[0] is None  # the batch is opened
    assert graph.meta["format"] == "tflite" and graph.meta["batchnorm_folded_in_source"]
    _close(want, got)
    # and re-emitted by the TFLite emitter, the same numbers again
    _close(want, _run_file(qfrewrite.rewrite(graph).to_tflite(), np.random.default_rng(1).normal(
        size=(3, HW, HW, C)).astype(np.float32)))


def test_a_zero_pad_before_a_valid_conv_becomes_its_padding(tmp_path):
    graph, want, got = _roundtrip(tmp_path, _tflite(CASES["pad_conv_folded"][0]), "padconv")
    assert not graph.find(Op.PAD) and graph.find(Op.CONV2D)[0].attrs.padding == ((1, 1), (1, 1))
    graph, want, got = _roundtrip(tmp_path, _tflite(CASES["pad_kept"][0]), "padkept")
    assert len(graph.find(Op.PAD)) == 2  # a non-zero pad, and a pad read by a mean: left alone


def test_fused_relu6_and_min_max_merge_into_one_clip(tmp_path):
    graph, want, got = _roundtrip(tmp_path, _tflite(lambda x: tf.minimum(tf.maximum(x * VEC, 0.0), 6.0)), "mm")
    clips = graph.find(Op.CLIP)
    assert len(clips) == 1 and clips[0].attrs.is_relu6, graph.op_counts()
    _close(want, got)


def test_float16_weights_are_dequantized_constants(tmp_path):
    fn = CASES["conv_relu6"][0]
    data = _tflite(fn, float16=True)
    info = inspect_tflite(data)
    assert "DEQUANTIZE" in info.op_counts()
    assert any(t.dtype is np.float16 for t in info.tensors.values())
    graph, want, got = _roundtrip(tmp_path, data, "fp16")
    assert graph.meta["weights_dtype"] == "float16"
    assert "DEQUANTIZE" not in str(graph.op_counts())
    _close(want, got)
    # the stored float16 values, not the float32 originals
    k = graph.find(Op.CONV2D)[0].weight.const
    assert np.array_equal(k, k.astype(np.float16).astype(np.float32))


def test_unsupported_op_names_op_tensor_and_file(tmp_path):
    path = tmp_path / "tanh.tflite"
    path.write_bytes(_tflite(lambda x: tf.tanh(tf.nn.conv2d(x, K33, 1, "SAME"))))
    with pytest.raises(UnsupportedOpError) as err:
        qfrewrite.load(path)
    msg = str(err.value)
    assert "'TANH'" in msg and str(path) in msg and "CONV_2D" in msg  # the op, the file, the supported list
    assert err.value.node  # the output tensor's name


def test_outputs_cut_before_an_unsupported_op(tmp_path):
    data = _tflite(lambda x: tf.tanh(tf.nn.relu(tf.nn.conv2d(x, K33, 1, "SAME"))))
    path = tmp_path / "cut.tflite"
    path.write_bytes(data)
    f_tensors = [t for t in inspect_tflite(data).tensors.values() if "Relu" in t.name]
    graph = qfrewrite.load(path, outputs=[f_tensors[0].name])
    assert graph.op_counts() == {"Conv2D": 1, "Relu": 1}


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.99])
def test_truncated_flatbuffer_is_a_model_load_error(tmp_path, fraction):
    data = _tflite(CASES["conv_relu6"][0])
    path = tmp_path / "cut.tflite"
    path.write_bytes(data[:max(8, int(len(data) * fraction))])
    with pytest.raises(ModelLoadError, match="cut.tflite"):
        qfrewrite.load(path)


def test_not_a_flatbuffer(tmp_path):
    path = tmp_path / "junk.tflite"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a TFLite flatbuffer"):
        qfrewrite.load(path)


def test_a_constant_whose_buffer_is_short_is_refused(tmp_path):
    from qfrewrite.importers import tflite_reader

    data = bytearray(_tflite(CASES["conv_relu6"][0]))
    f = tflite_reader.parse_tflite(bytes(data))
    t = next(i for i in range(len(f.tensors)) if f.raw(i) is not None and f.raw(i).size > 10)
    f.model.buffers[f.tensors[t].buffer].data = f.model.buffers[f.tensors[t].buffer].data[:-4]
    with pytest.raises(ModelLoadError, match="holds .* bytes"):
        tflite_reader._check_buffers(f)


def test_a_quantized_file_is_refused_by_load_rewrite_and_convert(tmp_path, rng):
    from tests.graphs import tiny_mobilenet

    from qfrewrite import recipes
    from qfrewrite.convert import convert

    g = tiny_mobilenet(rng)
    x = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
    path = tmp_path / "q.tflite"
    qfrewrite.rewrite(g, passes=recipes.plain(), data=x).to_tflite(path)
    before = path.read_bytes()
    for call in (lambda: qfrewrite.load(path), lambda: qfrewrite.rewrite(path, passes=[]),
                 lambda: convert(path, tmp_path / "out.tflite", x)):
        with pytest.raises(QuantizedModelError, match="loses accuracy") as err:
            call()
        assert "float model" in str(err.value) and "diagnose" in str(err.value)
    assert path.read_bytes() == before and not (tmp_path / "out.tflite").exists()


def test_leaves_a_float_graph_alone(tmp_path, rng):
    """A graph emitted to float TFLite and read back has the ops it had (the BatchNorm folded by the converter)."""
    from tests.graphs import tiny_mobilenet

    g = tiny_mobilenet(rng, bn=False, bias=True)
    path = tmp_path / "tiny.tflite"
    qfrewrite.rewrite(g).to_tflite(path)
    back = qfrewrite.load(path)
    assert {k: v for k, v in back.op_counts().items() if k != "Reshape"} == g.op_counts()
    x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    _close(Executor(g)(x)[0], Executor(back)(x)[0])


def test_layer_names_from_fused_tensor_names():
    assert layer_name("model/conv1_relu/Relu6;model/conv1/BiasAdd;model/conv1/Conv2D") == "model/conv1"
    assert layer_name("dw1_relu6/Relu6;dw1_bn/add;dw1/depthwise;dw1_bn/Const;dw1_bn/Const_11") == "dw1"
    assert layer_name("logits") == "logits"


def test_merge_clips_leaves_lone_and_disjoint_clips_alone():
    from qfrewrite.importers.tflite_ops import merge_clips

    g = Graph("g")
    x = g.add_input("x", (None, 4))
    a = g.add_node(Op.CLIP, [x], ClipAttrs(None, -2.0)).output  # x <= -2 ...
    b = g.add_node(Op.CLIP, [a], ClipAttrs(0.0, None)).output  # ... then >= 0: disjoint, a constant 0
    g.outputs = [b]
    assert merge_clips(g) == 0 and len(g.find(Op.CLIP)) == 2
    g2 = Graph("g2")
    y = g2.add_input("x", (None, 4))
    g2.outputs = [g2.add_node(Op.CLIP, [y], ClipAttrs(0.0, 6.0)).output]
    assert merge_clips(g2) == 0
