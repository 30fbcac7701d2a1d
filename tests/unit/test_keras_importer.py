"""Keras importer: every supported source and layer matches Keras numerically; errors name the layer or file."""
import hashlib

import numpy as np
import pytest

import qfrewrite
from qfrewrite.backend.executor import run_graph
from qfrewrite.errors import ModelLoadError, UnsupportedOpError
from qfrewrite.importers.keras_importer import load_keras
from qfrewrite.ir import Op
from qfrewrite.passes import FoldBatchNorm
from tests.keras_models import mobilenet_block_model, randomize_bn, write_keras2_h5, zoo_model

keras = pytest.importorskip("keras")
L = keras.layers
# Keras warns when a one-input functional model is called on a bare array instead of a list
pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")


def _close(out, ref, tol=1e-5):
    ref = np.asarray(ref)
    assert out.shape == ref.shape
    assert np.abs(ref).max() > 1e-2  # the comparison must not be between two near-zero tensors
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol * max(1.0, np.abs(ref).max()))


@pytest.fixture(scope="module")
def zoo():
    m = zoo_model()
    randomize_bn(m, np.random.default_rng(1))
    x = np.random.default_rng(2).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    return m, x


def test_zoo_model_object_matches_keras(zoo):
    m, x = zoo
    g = qfrewrite.load(m)
    ops = g.op_counts()
    # SeparableConv2D -> depthwise + pointwise; the V3-style (x + 3) relu6 / 6 chain -> HardSigmoid; Dropout no node
    assert ops["DepthwiseConv2D"] == 3 and ops["Conv2D"] == 5 and ops["HardSigmoid"] == 1 and ops["HardSwish"] == 2
    assert ops["Normalize"] == 2 and g.meta["activations_recognised"] == {"HardSigmoid": 2, "HardSwish": 1}
    assert ops["Mul"] == 2  # the squeeze-excite gate and swish's x * sigmoid(x); no constant multiplications left
    assert not any(n.meta.get("source_name") == "drop" for n in g)
    assert g.meta["format"] == "keras" and g.meta["input_layout"] == "NHWC"
    assert g.meta["output_names"] == ["probs"] and g.meta["source"] == "zoo"
    assert g.inputs[0].shape == (None, 16, 16, 3)
    assert g.node("stem_bn").attrs.epsilon == pytest.approx(1e-3)
    assert g.node("stem").attrs.padding == "SAME" and g.node("dw").attrs.padding == "VALID"
    assert g.node("dw_pad").attrs.pads == ((0, 1), (0, 1))
    _close(run_graph(g, x)[0], m(x, training=False).numpy())
    logits = keras.Model(m.inputs, m.get_layer("logits").output)(x).numpy()
    g2 = qfrewrite.load(m, outputs=["logits"])
    assert g2.meta["output_names"] == ["logits"] and not g2.find(Op.SOFTMAX)
    _close(run_graph(g2, x)[0], logits)


@pytest.mark.parametrize("kind", ["keras2.h5", "keras3.h5", "model.keras"])
def test_zoo_model_files_match_keras(zoo, tmp_path, kind):
    m, x = zoo
    path = tmp_path / kind
    if kind == "keras2.h5":
        write_keras2_h5(m, path)
    else:
        m.save(path)
    g = qfrewrite.load(path)
    assert g.meta["source"] == str(path) and g.op_counts() == qfrewrite.load(m).op_counts()
    if kind == "keras2.h5":
        assert g.meta["keras_version"] == "2.8.0"
    _close(run_graph(g, x)[0], m(x, training=False).numpy())


def test_keras2_file_with_tfoplambda_and_groups(tmp_path):
    m = mobilenet_block_model()
    randomize_bn(m, np.random.default_rng(3))
    path = tmp_path / "k2.h5"
    write_keras2_h5(m, path)
    g = qfrewrite.load(path, outputs=["reshape_2"])
    assert g.op_counts()["Mul"] == 1 and g.op_counts()["Add"] == 1  # x * 0.5 + 0.25 from TFOpLambda layers
    x = np.random.default_rng(4).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    ref = keras.Model(m.inputs, m.get_layer("reshape_2").output)(x).numpy()
    _close(run_graph(g, x)[0], ref)


def test_hard_sigmoid_follows_the_files_keras_version(tmp_path):
    x_in = keras.Input((4, 4, 2))
    m = keras.Model(x_in, L.Activation("hard_sigmoid", name="hs")(L.Rescaling(4.0, name="wide")(x_in)))
    x = np.random.default_rng(5).uniform(-2, 2, (2, 4, 4, 2)).astype(np.float32)
    k3 = qfrewrite.load(m)
    assert k3.find(Op.HARD_SIGMOID)
    np.testing.assert_allclose(run_graph(k3, x)[0], np.clip(4 * x / 6 + 0.5, 0, 1), atol=1e-6)
    path = tmp_path / "k2.h5"
    write_keras2_h5(m, path)
    k2 = qfrewrite.load(path)  # Keras 2's hard_sigmoid is clip(0.2 x + 0.5, 0, 1)
    assert not k2.find(Op.HARD_SIGMOID)
    np.testing.assert_allclose(run_graph(k2, x)[0], np.clip(0.8 * x + 0.5, 0, 1), atol=1e-6)


@pytest.fixture(scope="module")
def nested():
    """A MobileNet backbone (Functional) and a Sequential head nested inside a new functional model."""
    backbone = keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=0.25, include_top=False, weights=None)
    head = keras.Sequential([L.GlobalAveragePooling2D(name="pool"), L.Dense(7, name="fc")], name="head")
    x_in = keras.Input((32, 32, 3), name="image")
    y = L.Rescaling(1 / 127.5, offset=-1.0, name="pre")(x_in)
    m = keras.Model(x_in, L.Softmax(name="probs")(head(backbone(y))), name="classifier")
    randomize_bn(m, np.random.default_rng(6))
    x = np.random.default_rng(7).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    return m, x


def test_nested_models_are_flattened(nested, tmp_path):
    m, x = nested
    bb = m.layers[2].name
    g = qfrewrite.load(m)
    assert len(g.find(Op.BATCH_NORM)) == 27
    conv1 = g.node(f"{bb}/conv1")
    assert conv1.meta["source_name"] == "conv1" and conv1.meta["source_model"] == bb
    assert g.node("head/fc").meta["source_model"] == "head"
    _close(run_graph(g, x)[0], m(x, training=False).numpy())
    inner = qfrewrite.load(m, outputs=["conv_pw_13_relu"])  # a unique inner name may be given bare
    ref = keras.Model(m.layers[2].inputs, m.layers[2].get_layer("conv_pw_13_relu").output)(
        x / 127.5 - 1.0).numpy()
    _close(run_graph(inner, x)[0], ref)
    path = tmp_path / "nested.h5"  # Keras 3 legacy HDF5: nested weights found by name
    m.save(path)
    _close(run_graph(qfrewrite.load(path), x)[0], m(x, training=False).numpy())


def test_nested_backbone_round_trips_to_float_tflite(nested, tmp_path):
    m, x = nested
    res = qfrewrite.rewrite(m, passes=[FoldBatchNorm()])
    assert not res.graph.find(Op.BATCH_NORM)
    path = tmp_path / "nested.tflite"
    res.to_tflite(path)
    _close(_litert(path, x), m(x, training=False).numpy(), tol=1e-4)


def test_sequential_model(tmp_path):
    m = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, activation="relu", name="c"),
                          L.BatchNormalization(center=False, name="bn"), L.Flatten(name="f"), L.Dense(3, name="d")],
                         name="seq")
    randomize_bn(m, np.random.default_rng(8))
    x = np.random.default_rng(9).normal(size=(2, 8, 8, 3)).astype(np.float32)
    g = qfrewrite.load(m)
    assert [n.op for n in g] == [Op.CONV2D, Op.RELU, Op.BATCH_NORM, Op.FLATTEN, Op.DENSE]
    assert g.meta["output_names"] == ["d"]
    _close(run_graph(g, x)[0], m(x).numpy())
    path = tmp_path / "seq.keras"
    m.save(path)
    _close(run_graph(qfrewrite.load(path), x)[0], m(x).numpy())


def test_input_shape_fills_open_dimensions():
    keras.utils.set_random_seed(10)  # the comparison needs outputs above 1e-2
    x_in = keras.Input((None, None, 3))
    m = keras.Model(x_in, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 3, padding="same")(x_in))))
    assert qfrewrite.load(m).inputs[0].shape == (None, None, None, 3)
    g = qfrewrite.load(m, input_shape=(24, 24, 3))
    assert g.inputs[0].shape == (None, 24, 24, 3)
    x = np.random.default_rng(10).normal(size=(2, 24, 24, 3)).astype(np.float32)
    _close(run_graph(g, x)[0], m(x).numpy())
    with pytest.raises(ModelLoadError, match="conflicts"):
        qfrewrite.load(m, input_shape=(24, 24, 4))


@pytest.mark.parametrize("layer,detail", [
    (lambda: L.LeakyReLU(name="leaky"), "LeakyReLU"),
    (lambda: L.ReLU(negative_slope=0.1, name="leaky"), "negative_slope"),
    (lambda: L.Conv2D(4, 1, groups=2, name="leaky"), "groups=2"),
    (lambda: L.Activation("tanh", name="leaky"), "tanh"),
])
def test_unsupported_layer_names_layer_class_and_supported(layer, detail):
    x_in = keras.Input((4, 4, 4))
    m = keras.Model(x_in, layer()(L.Conv2D(4, 1, name="conv")(x_in)))
    with pytest.raises(UnsupportedOpError) as err:
        qfrewrite.load(m)
    msg = str(err.value)
    assert "'leaky'" in msg and detail in msg and "supported:" in msg and "DepthwiseConv2D" in msg
    assert err.value.node == "leaky"


def test_corrupt_and_foreign_files_raise_model_load_error(tmp_path):
    m = mobilenet_block_model()
    good = tmp_path / "good.h5"
    write_keras2_h5(m, good)
    data = good.read_bytes()
    for name, content in [("truncated.h5", data[: len(data) // 2]), ("garbage.h5", b"not hdf5" * 100),
                          ("garbage.keras", b"PK\x03\x04 broken zip" * 10)]:
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ModelLoadError, match=name):
            qfrewrite.load(p)
    weights_only = tmp_path / "w.weights.h5"
    m.save_weights(weights_only)
    with pytest.raises(ModelLoadError, match="no model_config"):
        qfrewrite.load(weights_only)
    with pytest.raises(ModelLoadError, match="no such"):
        qfrewrite.load(tmp_path / "missing.h5")
    with pytest.raises(ModelLoadError, match="no layer named 'logit'.*logits"):
        qfrewrite.load(zoo_model(), outputs=["logit"])

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="custom")
            self.conv = L.Conv2D(2, 1)

        def call(self, x):
            return self.conv(x)

    sub = Subclassed()
    sub(np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(ModelLoadError, match="custom.*functional and sequential"):
        load_keras(sub)


def test_callers_model_and_file_are_untouched(tmp_path):
    m = mobilenet_block_model()
    randomize_bn(m, np.random.default_rng(11))
    before = [w.numpy().copy() for w in m.weights]
    config = m.get_config()
    res = qfrewrite.rewrite(m, passes=[FoldBatchNorm()])
    assert res.report["FoldBatchNorm"].modified and not res.graph.find(Op.BATCH_NORM)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, m.weights)) and m.get_config() == config
    path = tmp_path / "k2.h5"
    write_keras2_h5(m, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    qfrewrite.rewrite(path, passes=[FoldBatchNorm()])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


# -- keras.applications MobileNets -> float TFLite ------------------------------------------------------------------
def _litert(path, x):
    """The float TFLite model at ``path`` run in LiteRT on ``x``."""
    from qfrewrite.evaluate import predict

    return predict(str(path), x)


FAMILIES = {
    "v1_0.25": lambda: keras.applications.MobileNet(input_shape=(96, 96, 3), alpha=0.25, weights=None,
                                                    classifier_activation=None),
    "v1_0.5": lambda: keras.applications.MobileNet(input_shape=(128, 128, 3), alpha=0.5, weights=None,
                                                   classifier_activation=None),
    "v1_1.0": lambda: keras.applications.MobileNet(input_shape=(128, 128, 3), alpha=1.0, weights=None,
                                                   classifier_activation=None),
    "v2_0.35": lambda: keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None,
                                                      classifier_activation=None),
    "v3small_0.75": lambda: keras.applications.MobileNetV3Small(input_shape=(96, 96, 3), alpha=0.75, weights=None,
                                                                classifier_activation=None,
                                                                include_preprocessing=True),
    "v3large_0.75": lambda: keras.applications.MobileNetV3Large(input_shape=(96, 96, 3), alpha=0.75, weights=None,
                                                                classifier_activation=None,
                                                                include_preprocessing=True),
}
# the default run keeps one folded and one unfolded check per family; the rest is for `-m slow`
SLOW = {("v1_0.5", False), ("v1_1.0", True), ("v1_1.0", False), ("v2_0.35", False), ("v3large_0.75", False)}


@pytest.mark.parametrize("family,fold", [
    pytest.param(f, fold, marks=[pytest.mark.slow] if (f, fold) in SLOW else [])
    for f in FAMILIES for fold in (True, False)])
def test_keras_mobilenet_float_tflite_matches_keras(family, fold, tmp_path):
    rng = np.random.default_rng(12)
    m = FAMILIES[family]()
    randomize_bn(m, rng)
    hw = m.input_shape[1]
    x = rng.uniform(0, 255, (2, hw, hw, 3)).astype(np.float32)
    if family.startswith(("v1", "v2")):
        x = x / 127.5 - 1.0  # V3 carries its own Rescaling
    ref = m(x, training=False).numpy()
    res = qfrewrite.rewrite(m, passes=[FoldBatchNorm()] if fold else [])
    g = res.graph
    n_bn = sum(isinstance(l, L.BatchNormalization) for l in m.layers)
    assert len(g.find(Op.BATCH_NORM)) == (0 if fold else n_bn)
    if family.startswith("v3"):
        assert g.find(Op.NORMALIZE) and g.find(Op.HARD_SWISH) and g.find(Op.HARD_SIGMOID)
        assert not g.find(Op.MUL) or all(not n.inputs[1].is_const for n in g.find(Op.MUL))
    path = tmp_path / f"{family}.tflite"
    res.to_tflite(path)
    _close(_litert(path, x), ref, tol=1e-4)


def test_adapted_normalization_reads_its_weights():
    norm = L.Normalization(name="norm")
    data = np.random.default_rng(13).normal(3.0, 2.0, (32, 8, 8, 3)).astype(np.float32)
    norm.adapt(data)
    x_in = keras.Input((8, 8, 3))
    m = keras.Model(x_in, L.Conv2D(2, 1, name="c")(norm(x_in)))
    g = qfrewrite.load(m)
    assert g.node("norm").op is Op.NORMALIZE and len(g.node("norm").attrs.scale) == 3
    _close(run_graph(g, data[:4])[0], m(data[:4]).numpy())
