"""The TF-slim MobileNetV1 frozen GraphDef from ../shared: import, fold BatchNorm, emit float TFLite and ONNX, and
compare each with TensorFlow running the .pb itself on real images (preprocessing x / 127.5 - 1, 1001 logits,
ImageNet class = argmax - 1)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import qfrewrite
from qfrewrite.backend.executor import run_graph
from qfrewrite.images import load_image
from qfrewrite.importers.tf_importer import load_graphdef
from qfrewrite.ir import Op
from qfrewrite.passes import FoldBatchNorm
from tests.conftest import shared_path

pytestmark = pytest.mark.real

LOGITS = "MobilenetV1/Logits/SpatialSqueeze"
N_IMAGES = 4
RTOL = 1e-4


def _rel(out, ref) -> float:
    return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def pb():
    return shared_path("models", "tf_mobilenet_v1_1.0_224_frozen.pb")


@pytest.fixture(scope="module")
def images():
    folder = shared_path("images", "imagenet_sample")
    rows = [line.rstrip("\n").split("\t") for line in open(folder / "labels.tsv")][1:N_IMAGES + 1]
    x = np.stack([load_image(folder / r[0], (224, 224)) for r in rows]).astype(np.float32)
    return x / 127.5 - 1.0


@pytest.fixture(scope="module")
def reference(pb, images):
    """TensorFlow running the file as it is: the placeholder's batch is fixed to 1, so one image at a time."""
    import tensorflow as tf

    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString(pb.read_bytes())
    g = tf.Graph()
    with g.as_default():
        tf.import_graph_def(gd, name="")
    with tf.compat.v1.Session(graph=g) as sess:
        outs = [sess.run([LOGITS + ":0", "final_result:0"], {"input:0": x[None]}) for x in images]
    return {"logits": np.concatenate([o[0] for o in outs]), "final_result": np.concatenate([o[1] for o in outs])}


@pytest.fixture(scope="module")
def imported(pb):
    return load_graphdef(pb, outputs=[LOGITS])


@pytest.fixture(scope="module")
def folded(imported):
    return qfrewrite.rewrite(imported, passes=[FoldBatchNorm()])


def test_import_recognises_the_unfused_batch_norms(imported, pb):
    counts = imported.op_counts()
    assert counts == {"AveragePool": 1, "BatchNorm": 27, "Clip": 27, "Conv2D": 15, "DepthwiseConv2D": 13,
                      "Reshape": 1}
    bn = imported.node("MobilenetV1/Conv2d_0/BatchNorm")
    assert bn.op is Op.BATCH_NORM and bn.attrs.epsilon == pytest.approx(1e-3)
    assert bn.source_name == "MobilenetV1/Conv2d_0/BatchNorm"
    assert all(n.attrs.is_relu6 for n in imported.find(Op.CLIP))
    logits_conv = imported.node("MobilenetV1/Logits/Conv2d_1c_1x1/convolution")
    assert logits_conv.bias is not None and logits_conv.bias.shape == (1001,)
    assert [v.shape for v in imported.inputs] == [(None, 224, 224, 3)]  # the file fixes batch 1; opened
    assert [v.shape for v in imported.outputs] == [(None, 1001)]
    assert imported.meta["format"] == "graphdef" and imported.meta["input_layout"] == "NHWC"
    assert imported.meta["output_names"] == [LOGITS] and imported.meta["source"] == str(pb)


def test_imported_graph_matches_tensorflow_batched(imported, images, reference):
    out = run_graph(imported, images, batch_size=N_IMAGES)[0]
    assert out.shape == (N_IMAGES, 1001)
    assert _rel(out, reference["logits"]) < RTOL
    assert (out.argmax(1) == reference["logits"].argmax(1)).all()


def test_fold_then_float_tflite_matches_tensorflow(imported, folded, images, reference, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    assert folded.report["FoldBatchNorm"].modified
    assert len(imported) == 84 and len(folded.graph) == 84 - 27 and not folded.graph.find(Op.BATCH_NORM)
    assert _rel(run_graph(folded.graph, images)[0], reference["logits"]) < RTOL
    path = tmp_path / "mobilenet_v1.tflite"
    folded.to_tflite(path)
    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    i, o = interp.get_input_details()[0], interp.get_output_details()[0]
    outs = []
    for x in images:
        interp.set_tensor(i["index"], x[None])
        interp.invoke()
        outs.append(interp.get_tensor(o["index"])[0])
    outs = np.stack(outs)
    assert _rel(outs, reference["logits"]) < RTOL
    assert (outs.argmax(1) == reference["logits"].argmax(1)).all()


@pytest.mark.skipif(importlib.util.find_spec("qfrewrite.emit.onnx_emitter") is None,
                    reason="the ONNX emitter (qfrewrite/emit/onnx_emitter.py) is not in this checkout yet")
def test_fold_then_float_onnx_matches_tensorflow(folded, images, reference, tmp_path):
    import onnxruntime as ort

    path = tmp_path / "mobilenet_v1.onnx"
    folded.to_onnx(path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = images if inp.shape[-1] == 3 else images.transpose(0, 3, 1, 2)
    if isinstance(inp.shape[0], int):  # a fixed batch: one image at a time
        out = np.concatenate([sess.run(None, {inp.name: xi[None]})[0] for xi in x])
    else:
        out = sess.run(None, {inp.name: np.ascontiguousarray(x)})[0]
    assert _rel(out, reference["logits"]) < RTOL
    assert (out.argmax(1) == reference["logits"].argmax(1)).all()


def test_default_output_is_the_single_sink(pb, images, reference):
    g = qfrewrite.load(pb)  # through the dispatcher; the sink is the retrained 2-class head
    assert g.meta["output_names"] == ["final_result"]
    assert g.op_counts()["Dense"] == 1 and g.op_counts()["Softmax"] == 1
    assert _rel(run_graph(g, images)[0], reference["final_result"]) < RTOL
