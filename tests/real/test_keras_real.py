"""The real Keras 2 MobileNetV1 0.25 ``.h5`` from ../shared: import it (Keras 3 itself refuses the file), fold
BatchNorm, emit float TFLite and Keras, and compare each with an independent reference on real images
(preprocessing x / 127.5 - 1, centre crop 224).

The reference is Keras 3 rebuilding the file with a ``DepthwiseConv2D`` that drops the Keras 2 ``groups`` argument
(tf_keras when it is installed): it shares no code with the importer, which reads the file with h5py.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

import qfrewrite
from qfrewrite.backend.executor import run_graph
from qfrewrite.images import load_image
from qfrewrite.ir import Op
from qfrewrite.passes import FoldBatchNorm
from tests.conftest import shared_path

pytestmark = [pytest.mark.real, pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")]

N_IMAGES = 200  # MANIFEST.md: top-1 62.5 % on the first 200 images
MANIFEST_TOP1 = 0.625


@pytest.fixture(scope="module")
def h5():
    return shared_path("models", "keras_mobilenet_v1_0.25_224.h5")


@pytest.fixture(scope="module")
def images():
    folder = shared_path("images", "imagenet_sample")
    rows = [line.rstrip("\n").split("\t") for line in open(folder / "labels.tsv")][1:N_IMAGES + 1]
    x = np.stack([load_image(folder / r[0], (224, 224)) for r in rows]).astype(np.float32)
    return x / 127.5 - 1.0, np.array([int(r[1]) for r in rows])


@pytest.fixture(scope="module")
def reference(h5, images):
    """Logits (layer reshape_2) and softmax of the file's own model."""
    try:
        import tf_keras

        model = tf_keras.models.load_model(str(h5), compile=False)
        logits_model = tf_keras.Model(model.inputs, model.get_layer("reshape_2").output)
    except ImportError:
        import keras

        class DepthwiseConv2D(keras.layers.DepthwiseConv2D):  # Keras 2 configs carry groups=1
            def __init__(self, *args, groups=None, **kwargs):
                super().__init__(*args, **kwargs)

        model = keras.models.load_model(str(h5), custom_objects={"DepthwiseConv2D": DepthwiseConv2D}, compile=False)
        logits_model = keras.Model(model.inputs, model.get_layer("reshape_2").output)
    x, _ = images
    logits = np.concatenate([logits_model(x[i:i + 50]).numpy() for i in range(0, len(x), 50)])
    probs = np.concatenate([model(x[i:i + 50]).numpy() for i in range(0, len(x), 50)])
    return logits, probs


def _litert(path, x):
    """The float TFLite model at ``path`` run in LiteRT on ``x``."""
    from qfrewrite.evaluate import predict

    return predict(str(path), x)


def _top1(scores, labels) -> float:
    return float(np.mean(scores.argmax(1) == labels))


def _rel(out, ref) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def test_import_matches_the_files_model(h5, images, reference):
    digest = hashlib.sha256(h5.read_bytes()).hexdigest()
    g = qfrewrite.load(h5)
    assert g.meta["keras_version"] == "2.8.0" and g.meta["output_names"] == ["predictions"]
    assert g.op_counts() == {"BatchNorm": 27, "Clip": 27, "Conv2D": 15, "DepthwiseConv2D": 13, "GlobalMean": 1,
                             "Pad": 4, "Reshape": 1, "Softmax": 1}
    x, labels = images
    assert np.abs(run_graph(g, x)[0] - reference[1]).max() <= 1e-4
    logits = qfrewrite.load(h5, outputs=["reshape_2"])
    out = run_graph(logits, x)[0]
    assert _rel(out, reference[0]) <= 1e-5  # logits reach about 26: 1e-5 of that is float32 summation noise
    assert _top1(out, labels) == pytest.approx(MANIFEST_TOP1, abs=0.005)
    assert hashlib.sha256(h5.read_bytes()).hexdigest() == digest


def test_folded_float_tflite_matches_and_scores_as_the_manifest_says(h5, images, reference, tmp_path):
    x, labels = images
    res = qfrewrite.rewrite(h5, passes=[FoldBatchNorm()])
    assert res.report["FoldBatchNorm"].stats["folded"] == 27 and not res.graph.find(Op.BATCH_NORM)
    res.to_tflite(tmp_path / "probs.tflite")
    assert np.abs(_litert(tmp_path / "probs.tflite", x) - reference[1]).max() <= 1e-4
    qfrewrite.rewrite(h5, passes=[FoldBatchNorm()], outputs=["reshape_2"]).to_tflite(tmp_path / "logits.tflite")
    out = _litert(tmp_path / "logits.tflite", x)
    assert _rel(out, reference[0]) <= 1e-5
    assert _top1(out, labels) == pytest.approx(MANIFEST_TOP1, abs=0.005)
    assert np.mean(out.argmax(1) == reference[0].argmax(1)) >= 0.995


def test_to_keras_gives_a_loadable_float_model(h5, images, reference, tmp_path):
    res = qfrewrite.rewrite(h5, passes=[])
    model = res.to_keras()
    x, _ = images
    np.testing.assert_allclose(model(x[:8]).numpy(), reference[1][:8], rtol=0, atol=1e-5)
    path = tmp_path / "v1_025.keras"
    model.save(path)
    back = qfrewrite.load(path)
    assert back.op_counts() == res.graph.op_counts()
    np.testing.assert_allclose(run_graph(back, x[:8])[0], reference[1][:8], rtol=0, atol=1e-5)
