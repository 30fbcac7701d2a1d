"""The TensorFlow importers on small GraphDefs built here with tf.compat.v1 and on a small Keras SavedModel: each op
form imported, run through qfrewrite's executor and compared with TensorFlow running the source."""
from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import qfrewrite  # noqa: E402
from qfrewrite.backend.executor import run_graph  # noqa: E402
from qfrewrite.errors import ModelLoadError, UnsupportedOpError  # noqa: E402
from qfrewrite.importers.tf_importer import load_graphdef, load_saved_model  # noqa: E402
from qfrewrite.ir import Op  # noqa: E402
from qfrewrite.passes import FoldBatchNorm  # noqa: E402

RNG = np.random.default_rng(0)


def _c(*shape, scale=0.5):
    return tf.constant(RNG.normal(scale=scale, size=shape).astype(np.float32))


def _graphdef(build, in_shape=(1, 8, 8, 3)):
    """Build ``out = build(x)`` in a fresh TF graph with placeholder ``x`` of ``in_shape``."""
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, in_shape, name="x")
        tf.identity(build(x), name="out")
    return g.as_graph_def()


def _tf_run(gd, output, x, input_name="x"):
    """TensorFlow running the GraphDef, one sample at a time (the placeholders fix batch 1)."""
    g = tf.Graph()
    with g.as_default():
        tf.import_graph_def(gd, name="")
    with tf.compat.v1.Session(graph=g) as sess:
        return np.concatenate([sess.run(output + ":0", {input_name + ":0": xi[None]}) for xi in x])


def _write(gd, tmp_path, name="m.pb"):
    path = tmp_path / name
    path.write_bytes(gd.SerializeToString())
    return path


def _check(gd, tmp_path, x=None, **kw):
    """Import, run batched through the executor and compare with TensorFlow at float32 tolerance."""
    x = RNG.normal(size=(3, 8, 8, 3)).astype(np.float32) if x is None else x
    kw.setdefault("outputs", "out")
    g = load_graphdef(_write(gd, tmp_path), **kw)
    ref = _tf_run(gd, "out", x)
    out = run_graph(g, x)[0]
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    return g


# -- op forms ---------------------------------------------------------------------------------------------------------
CASES = {
    "conv_same_stride2_biasadd_relu6": (
        lambda x: tf.nn.relu6(tf.nn.bias_add(tf.nn.conv2d(x, _c(3, 3, 3, 4), 2, "SAME"), _c(4))),
        {"Conv2D": 1, "Clip": 1}),
    "conv_valid_dilated_relu": (
        lambda x: tf.nn.relu(tf.nn.conv2d(x, _c(3, 3, 3, 5), 1, "VALID", dilations=2)),
        {"Conv2D": 1, "Relu": 1}),
    "conv_explicit_padding": (
        lambda x: tf.nn.conv2d(x, _c(3, 3, 3, 4), [1, 2, 2, 1], [[0, 0], [1, 2], [0, 1], [0, 0]]),
        {"Conv2D": 1}),
    "depthwise_same_stride2_multiplier2_sigmoid": (
        lambda x: tf.sigmoid(tf.nn.depthwise_conv2d(x, _c(3, 3, 3, 2), [1, 2, 2, 1], "SAME")),
        {"DepthwiseConv2D": 1, "Sigmoid": 1}),
    "depthwise_valid_biasadd": (
        lambda x: tf.nn.bias_add(tf.nn.depthwise_conv2d(x, _c(3, 3, 3, 1), [1, 1, 1, 1], "VALID"), _c(3)),
        {"DepthwiseConv2D": 1}),
    "reshape_matmul_biasadd_softmax": (
        lambda x: tf.nn.softmax(tf.nn.bias_add(tf.matmul(tf.reshape(x, [-1, 192]), _c(192, 7)), _c(7))),
        {"Reshape": 1, "Dense": 1, "Softmax": 1}),
    "mean_matmul_transposed_add": (
        lambda x: tf.raw_ops.Add(x=tf.matmul(tf.reduce_mean(x, [1, 2]), _c(6, 3), transpose_b=True), y=_c(6)),
        {"GlobalMean": 1, "Dense": 1}),
    "arithmetic_with_constants": (
        lambda x: (lambda y: tf.raw_ops.Add(x=tf.subtract(_c(3), y) * x, y=y - tf.raw_ops.Sub(x=y, y=_c(1))))(
            tf.add(x * _c(3), _c(1, 1, 1, 3)) - _c(3)),
        {"Mul": 4, "Add": 6}),
    "fused_batch_norm_v3": (
        lambda x: tf.compat.v1.nn.fused_batch_norm(
            tf.nn.conv2d(x, _c(1, 1, 3, 4), 1, "VALID"), _c(4) + 1.5, _c(4), _c(4),
            tf.constant(RNG.uniform(0.5, 2, 4).astype(np.float32)), epsilon=1e-3, is_training=False)[0],
        {"Conv2D": 1, "BatchNorm": 1}),
    "fused_batch_norm_v1": (
        lambda x: tf.raw_ops.FusedBatchNorm(
            x=x, scale=_c(3) + 1.5, offset=_c(3), mean=_c(3),
            variance=tf.constant(RNG.uniform(0.5, 2, 3).astype(np.float32)), epsilon=1e-5, is_training=False)[0],
        {"BatchNorm": 1}),
    "pools": (
        lambda x: tf.nn.max_pool2d(tf.nn.avg_pool2d(x, 3, 2, "SAME"), 2, 1, "VALID")
        + tf.nn.avg_pool2d(tf.nn.max_pool2d(x, 3, 2, "SAME"), 2, 1, "VALID"),
        {"AveragePool": 2, "MaxPool": 2, "Add": 1}),
    "mean_keepdims_squeeze": (
        lambda x: tf.squeeze(tf.reduce_mean(tf.nn.relu(x), [1, 2], keepdims=True), [1, 2])
        + tf.squeeze(tf.reduce_mean(x, [-3, -2], keepdims=True)),
        {"Relu": 1, "GlobalMean": 2, "Reshape": 2, "Add": 1}),
    "concat_channels": (
        lambda x: tf.concat([tf.nn.relu(x), tf.sigmoid(x), x], axis=-1),
        {"Relu": 1, "Sigmoid": 1, "Concat": 1}),
    "pad_and_padv2": (
        lambda x: tf.nn.max_pool2d(tf.pad(tf.pad(x, [[0, 0], [1, 2], [0, 1], [0, 0]]),
                                          [[0, 0], [1, 0], [0, 1], [0, 0]], constant_values=0.5), 2, 2, "VALID"),
        {"Pad": 2, "MaxPool": 1}),
    "identities_and_placeholder_with_default": (
        lambda x: tf.stop_gradient(tf.identity_n([x, tf.identity(tf.compat.v1.placeholder_with_default(
            tf.nn.relu(x), [None, 8, 8, 3]))])[1]),
        {"Relu": 1}),
    "constant_subexpressions_folded": (
        lambda x: tf.reshape(tf.nn.conv2d(x, _c(3, 3, 3, 4) * 2.0 + tf.sqrt(tf.constant(4.0)), 2, "SAME"),
                             tf.stack([tf.constant(-1), tf.constant(4) * tf.constant(16)])),
        {"Conv2D": 1, "Reshape": 1}),
    "reshape_to_a_shape_computed_from_the_input": (
        lambda x: tf.reshape(tf.nn.relu(x), tf.stack([tf.shape(x)[0], tf.constant(-1)])),
        {"Relu": 1, "Reshape": 1}),
    "reshape_keeping_the_fixed_batch": (
        lambda x: tf.reshape(tf.nn.relu(x), [1, 8 * 8 * 3]),
        {"Relu": 1, "Reshape": 1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_forms_match_tensorflow(case, tmp_path):
    build, counts = CASES[case]
    g = _check(_graphdef(build), tmp_path)
    assert g.op_counts() == counts
    assert g.inputs[0].shape == (None, 8, 8, 3)  # batch 1 in the file, open after import
    assert g.meta["format"] == "graphdef" and g.meta["input_layout"] == "NHWC" and g.meta["output_names"] == ["out"]
    for n in g:
        assert n.meta["source_name"] in {m.name for m in _graphdef(build).node} or n.op is Op.BATCH_NORM


def test_conv_attributes_and_fused_bias(tmp_path):
    g = _check(_graphdef(CASES["conv_explicit_padding"][0]), tmp_path)
    conv, = g.find(Op.CONV2D)
    assert conv.attrs.padding == ((1, 2), (0, 1)) and conv.attrs.strides == (2, 2)
    g = _check(_graphdef(CASES["conv_valid_dilated_relu"][0]), tmp_path)
    assert g.find(Op.CONV2D)[0].attrs.dilations == (2, 2)
    g = _check(_graphdef(CASES["conv_same_stride2_biasadd_relu6"][0]), tmp_path)
    conv, = g.find(Op.CONV2D)
    assert conv.bias is not None and conv.meta["bias_source"].endswith("BiasAdd")
    assert g.find(Op.CLIP)[0].attrs.is_relu6


def test_bias_stays_an_add_when_the_layer_output_has_another_reader(tmp_path):
    def build(x):
        y = tf.nn.conv2d(x, _c(1, 1, 3, 3), 1, "VALID")
        return tf.nn.bias_add(y, _c(3)) + y

    g = _check(_graphdef(build), tmp_path)
    assert g.find(Op.CONV2D)[0].bias is None and len(g.find(Op.ADD)) == 2


def _slim_batch_norm(x, scope, c, eps, scale=True, center=True):
    """TF-slim's layout: variables as Const + ``/read`` Identity in ``scope``; the arithmetic of
    tf.nn.batch_normalization in another scope (``net/net/...``, as slim's ops are)."""
    def var(name, v):
        return tf.identity(tf.constant(v.astype(np.float32), name=f"{scope}/{name}"), name=f"{scope}/{name}/read")

    mean = var("moving_mean", RNG.normal(size=c))
    variance = var("moving_variance", RNG.uniform(0.05, 2.0, c))
    gamma = var("gamma", RNG.uniform(0.5, 2.0, c)) if scale else None
    beta = var("beta", RNG.normal(size=c)) if center else None
    with tf.name_scope("net/net/" + scope.split("/", 1)[1] + "/batchnorm"):
        return tf.nn.batch_normalization(x, mean, variance, beta, gamma, eps)


@pytest.mark.parametrize("scale,center,eps", [(True, True, 1e-3), (False, False, 1e-5), (True, False, 0.0)])
def test_unfused_slim_batch_norm_is_one_batch_norm(tmp_path, scale, center, eps):
    def build(x):
        y = tf.nn.conv2d(x, _c(3, 3, 3, 4), 1, "SAME")
        return tf.nn.relu6(_slim_batch_norm(y, "net/Conv2d_0/BatchNorm", 4, eps, scale, center))

    g = _check(_graphdef(build), tmp_path)
    assert g.op_counts() == {"Conv2D": 1, "BatchNorm": 1, "Clip": 1}
    bn = g.node("net/Conv2d_0/BatchNorm")
    assert bn.source_name == "net/Conv2d_0/BatchNorm"
    assert bn.attrs.epsilon == pytest.approx(eps, rel=1e-6, abs=0)
    res = FoldBatchNorm()(g)
    assert res.modified and not g.find(Op.BATCH_NORM)


def test_affine_arithmetic_that_is_not_a_batch_norm_stays_mul_add(tmp_path):
    # x * c + d with plain constants: no rsqrt(var + eps), so nothing to recognise
    g = _check(_graphdef(lambda x: x * _c(3) + _c(3)), tmp_path)
    assert g.op_counts() == {"Mul": 1, "Add": 1}


def test_batch_norm_arithmetic_read_elsewhere_is_not_absorbed(tmp_path):
    def build(x):
        y = tf.nn.conv2d(x, _c(1, 1, 3, 3), 1, "VALID")
        inv = tf.math.rsqrt(tf.constant(RNG.uniform(0.5, 2, 3).astype(np.float32)) + 1e-3)
        scaled = y * inv
        return scaled + (_c(3) - _c(3) * inv) + tf.nn.relu(scaled)  # x * inv has a second reader

    g = _check(_graphdef(build), tmp_path)
    assert not g.find(Op.BATCH_NORM)


def test_placeholder_with_default_can_be_the_input(tmp_path):
    def build(x):
        h = tf.compat.v1.placeholder_with_default(tf.reshape(tf.nn.relu(x), [-1, 192]), [None, 192], name="bottleneck")
        return tf.nn.softmax(tf.matmul(h, _c(192, 4)) + _c(4))

    gd = _graphdef(build)
    g = load_graphdef(_write(gd, tmp_path), inputs=["bottleneck"], outputs="out")
    assert g.inputs[0].shape == (None, 192) and g.op_counts() == {"Dense": 1, "Softmax": 1}
    h = RNG.normal(size=(2, 192)).astype(np.float32)
    np.testing.assert_allclose(run_graph(g, h)[0], _tf_run(gd, "out", h, "bottleneck"), rtol=1e-5, atol=1e-6)


# -- choosing inputs and outputs --------------------------------------------------------------------------------------
def _two_heads():
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (1, 8, 8, 3), name="x")
        y = tf.nn.relu(x, name="features")
        tf.identity(tf.nn.relu6(y), name="head_a")
        tf.tanh(y, name="head_b")  # an op the IR lacks, on the other head only
    return g.as_graph_def()


def test_unreached_nodes_are_ignored(tmp_path):
    g = load_graphdef(_write(_two_heads(), tmp_path), outputs=["head_a:0"])
    assert g.op_counts() == {"Relu": 1, "Clip": 1} and g.meta["output_names"] == ["head_a"]


def test_several_sinks_need_outputs(tmp_path):
    with pytest.raises(ModelLoadError, match="2 sink nodes: head_a, head_b"):
        load_graphdef(_write(_two_heads(), tmp_path))


def test_unsupported_op_on_the_path_names_node_op_and_supported_list(tmp_path):
    with pytest.raises(UnsupportedOpError) as info:
        load_graphdef(_write(_two_heads(), tmp_path), outputs="head_b")
    err = info.value
    assert err.node == "head_b" and err.op == "Tanh" and "Conv2D" in err.supported
    assert "m.pb" in str(err) and "DepthwiseConv2dNative" in str(err)


def test_unknown_output_and_input_names(tmp_path):
    path = _write(_two_heads(), tmp_path)
    with pytest.raises(ModelLoadError, match="no node named 'head_c'.*head_a"):
        load_graphdef(path, outputs="head_c")
    with pytest.raises(ModelLoadError, match="'features' is a Relu"):
        load_graphdef(path, inputs="features", outputs="head_a")


def test_default_output_is_the_single_sink_through_the_dispatcher(tmp_path):
    gd = _graphdef(lambda x: tf.nn.relu(x))
    path = _write(gd, tmp_path)
    before = path.read_bytes()
    g = qfrewrite.load(path)
    assert g.meta["output_names"] == ["out"] and g.op_counts() == {"Relu": 1}
    assert path.read_bytes() == before


def test_input_shape_fills_open_dims(tmp_path):
    build = CASES["depthwise_same_stride2_multiplier2_sigmoid"][0]
    gd = _graphdef(build, in_shape=(None, None, None, 3))
    path = _write(gd, tmp_path)
    with pytest.raises(ModelLoadError, match="open dims.*input_shape"):
        load_graphdef(path, outputs="out")
    with pytest.raises(ModelLoadError, match="contradicts"):
        load_graphdef(path, outputs="out", input_shape=(None, 8, 8, 4))
    g = _check(gd, tmp_path, input_shape=(None, 8, 8, 3))
    assert g.inputs[0].shape == (None, 8, 8, 3)


def test_unfrozen_variables_are_reported(tmp_path):
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (1, 8, 8, 3), name="x")
        w = tf.Variable(np.ones((1, 1, 3, 2), np.float32), name="w")
        tf.identity(tf.nn.conv2d(x, w, 1, "VALID"), name="out")
    with pytest.raises(UnsupportedOpError, match="kernel .* is not a constant; freeze the graph"):
        load_graphdef(_write(g.as_graph_def(), tmp_path), outputs="out")


# -- bad files --------------------------------------------------------------------------------------------------------
def test_corrupt_truncated_and_empty_files(tmp_path):
    data = _graphdef(CASES["conv_same_stride2_biasadd_relu6"][0]).SerializeToString()
    bad = tmp_path / "corrupt.pb"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff\x0fnot a graph" + bytes(RNG.integers(0, 256, 64, dtype=np.uint8)))
    with pytest.raises(ModelLoadError, match="corrupt.pb"):
        load_graphdef(bad)
    cut = tmp_path / "truncated.pb"
    for n in (len(data) // 2, len(data) - 7):
        cut.write_bytes(data[:n])
        with pytest.raises(ModelLoadError, match="truncated.pb") as info:
            load_graphdef(cut, outputs="out")
        assert info.value.__cause__ is None and info.value.__suppress_context__
    empty = tmp_path / "empty.pb"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.pb.*no nodes"):
        load_graphdef(empty)


# -- SavedModel -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_saved_model(tmp_path_factory):
    """Keras MobileNetV2 (alpha 0.35, 96x96, random weights and BN statistics) exported as a SavedModel."""
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(scale=0.5, size=c).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.2, 2.0, c).astype(np.float32))
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype(np.float32))
            layer.beta.assign(rng.normal(scale=0.5, size=c).astype(np.float32))
    path = tmp_path_factory.mktemp("sm") / "mobilenet_v2"
    model.export(str(path), verbose=False)
    x = rng.uniform(-1, 1, size=(3, 96, 96, 3)).astype(np.float32)
    sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    # the input's name follows Keras's global name counter ("keras_tensor", "keras_tensor_12", ...)
    key = next(iter(sig.structured_input_signature[1]))
    ref = sig(**{key: tf.constant(x)})["output_0"].numpy()
    return path, x, ref, key


@pytest.fixture(scope="module")
def saved_model_graph(keras_saved_model):
    return qfrewrite.load(keras_saved_model[0])


def test_saved_model_matches_its_signature(keras_saved_model, saved_model_graph):
    path, x, ref, _ = keras_saved_model
    g = saved_model_graph.copy()
    assert g.meta["format"] == "savedmodel" and g.meta["output_names"] == ["output_0"]
    assert g.meta["input_layout"] == "NHWC" and g.inputs[0].shape == (None, 96, 96, 3)
    counts = g.op_counts()
    assert counts["BatchNorm"] == 52 and counts["DepthwiseConv2D"] == 17 and counts["Conv2D"] == 35
    assert counts["Pad"] == 4 and counts["Clip"] == 35 and counts["Dense"] == 1 and counts["Softmax"] == 1
    bn = next(n for n in g.find(Op.BATCH_NORM) if n.name.endswith("bn_Conv1_1"))
    assert bn.attrs.epsilon == pytest.approx(1e-3)
    np.testing.assert_allclose(run_graph(g, x)[0], ref, rtol=1e-5, atol=1e-6)
    res = FoldBatchNorm()(g)
    assert res.stats["folded"] == 52
    np.testing.assert_allclose(run_graph(g, x)[0], ref, rtol=1e-4, atol=1e-6)


def test_saved_model_outputs_by_key_and_node(keras_saved_model, saved_model_graph):
    path, x, ref, key = keras_saved_model
    pooled = saved_model_graph.find(Op.GLOBAL_MEAN)[0].source_name
    # the graph file of a SavedModel is redirected to its folder; outputs mix a signature key and a node name
    g = load_graphdef(path / "saved_model.pb", inputs=[key], outputs=[pooled, "output_0"],
                      input_shape={key: (None, 96, 96, 3)})
    assert g.meta["output_names"] == [pooled, "output_0"]
    assert [v.shape for v in g.outputs] == [(None, 1280), (None, 10)]
    features, probs = run_graph(g, x)
    np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)
    assert features.min() >= 0 and features.max() <= 6  # the mean of ReLU6 outputs


def test_saved_model_errors(tmp_path):
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "saved_model.pb").write_bytes(b"\x08\x01\x12\xff\xff\xff garbage")
    with pytest.raises(ModelLoadError, match="bad_model"):
        qfrewrite.load(bad)

    class TwoSignatures(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32)])
        def a(self, x):
            return {"y": tf.nn.relu(x)}

        @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32)])
        def b(self, x):
            return {"y": tf.sigmoid(x)}

    m = TwoSignatures()
    tf.saved_model.save(m, str(tmp_path / "two"), signatures={"a": m.a, "b": m.b})
    with pytest.raises(ModelLoadError, match=r"several signatures \['a', 'b'\]"):
        load_saved_model(tmp_path / "two")
