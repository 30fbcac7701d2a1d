"""The real PyTorch exports in ../shared: import, FoldBatchNorm, emit float TFLite and ONNX, and compare each with the
source model run in onnxruntime (graph optimizations off) on real images."""
import numpy as np
import onnxruntime as ort
import pytest

import qfrewrite
from qfrewrite.backend.executor import run_graph
from qfrewrite.images import load_image, resolve_preprocess
from qfrewrite.passes import FoldBatchNorm
from tests.conftest import shared_path

pytestmark = pytest.mark.real

N_IMAGES = 4
#: model -> (preprocessing preset, IR op counts after import; the exporter already folded every BatchNorm)
MODELS = {
    "torchvision_mobilenet_v2": ("torch", {"Add": 10, "Clip": 35, "Conv2D": 35, "Dense": 1, "DepthwiseConv2D": 17,
                                           "GlobalMean": 1, "Reshape": 1}),
    "efficientnet_lite0": ("efficientnet-lite", {"Add": 9, "Clip": 33, "Conv2D": 33, "Dense": 1, "DepthwiseConv2D": 16,
                                                 "GlobalMean": 1, "Pad": 17, "Reshape": 1}),
}


def real_images(preset):
    folder = shared_path("images", "imagenet_sample")
    rows = [line.split("\t")[0] for line in (folder / "labels.tsv").read_text().splitlines()[1:N_IMAGES + 1]]
    crops = np.stack([load_image(folder / f, (224, 224)) for f in rows])
    return resolve_preprocess(preset)(crops)


def onnx_reference(path, x_nhwc):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x_nhwc.transpose(0, 3, 1, 2)})[0]


def tflite_run(flatbuffer, x_nhwc):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=flatbuffer)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    outs = []
    for xi in x_nhwc:
        it.set_tensor(inp["index"], xi[None])
        it.invoke()
        outs.append(it.get_tensor(out["index"])[0])
    return np.stack(outs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fold_and_emit_match_the_source(name, tmp_path):
    preset, counts = MODELS[name]
    path = shared_path("models", f"{name}.onnx")
    x = real_images(preset)
    ref = onnx_reference(path, x)
    graph = qfrewrite.load(path)
    assert graph.op_counts() == counts and graph.meta["input_layout"] == "NCHW"
    res = qfrewrite.rewrite(graph, passes=[FoldBatchNorm()])
    assert not res.report["FoldBatchNorm"].modified and res.graph.op_counts() == counts
    scale = np.abs(ref).max()
    res.to_onnx(tmp_path / f"{name}.onnx")
    diffs = {
        "imported": np.abs(run_graph(graph, x)[0] - ref).max(),
        "tflite": np.abs(tflite_run(res.to_tflite(tmp_path / f"{name}.tflite"), x) - ref).max(),
        "onnx": np.abs(onnx_reference(tmp_path / f"{name}.onnx", x) - ref).max(),
    }
    print(f"{name}: {len(graph)} IR nodes before and {len(res.graph)} after FoldBatchNorm; max |diff| vs "
          f"onnxruntime (logits up to {scale:.2f}): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for what, d in diffs.items():
        assert d <= 1e-4 * scale, f"{what}: {d} > 1e-4 * {scale}"
    assert np.array_equal(ref.argmax(1), run_graph(res.graph, x)[0].argmax(1))


def unfold_batchnorm(src, dst, rng, eps=1e-5):
    """Write ``src`` with a BatchNormalization after every Conv (random statistics; weights and bias rescaled so the
    function stays the same): a real network with separate BN, as exports without folding give."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    inits = {i.name: i for i in m.graph.initializer}
    nodes = []
    for node in m.graph.node:
        nodes.append(node)
        if node.op_type != "Conv":
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        b = numpy_helper.to_array(inits[node.input[2]])
        c = w.shape[0]
        gamma, var = rng.uniform(0.5, 2.0, c), rng.uniform(0.1, 1.0, c)
        mean, beta = rng.normal(size=c), rng.normal(size=c)
        s = gamma / np.sqrt(var + eps)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array((w / s[:, None, None, None]).astype(np.float32),
                                                              node.input[1]))
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(((b - beta) / s + mean).astype(np.float32),
                                                              node.input[2]))
        out = node.output[0]
        node.output[0] = out + "/pre_bn"
        names = [f"{out}/bn_{k}" for k in ("scale", "bias", "mean", "var")]
        for n_, v in zip(names, (gamma, beta, mean, var)):
            m.graph.initializer.append(numpy_helper.from_array(v.astype(np.float32), n_))
        nodes.append(helper.make_node("BatchNormalization", [out + "/pre_bn", *names], [out], epsilon=eps))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, str(dst))


def test_separate_batchnorm_in_a_real_network_folds_exactly(tmp_path):
    path = shared_path("models", "torchvision_mobilenet_v2.onnx")
    src = tmp_path / "mobilenet_v2_bn.onnx"
    unfold_batchnorm(path, src, np.random.default_rng(0))
    x = real_images("torch")
    ref = onnx_reference(src, x)
    graph = qfrewrite.load(src)
    assert graph.op_counts()["BatchNorm"] == 52 and graph.find(qfrewrite.Op.BATCH_NORM)[0].attrs.epsilon == pytest.approx(1e-5)
    res = qfrewrite.rewrite(graph, passes=[FoldBatchNorm()])
    assert res.report["FoldBatchNorm"].stats["folded"] == 52 and len(res.graph) == len(graph) - 52
    res.to_onnx(tmp_path / "folded.onnx")
    scale = np.abs(ref).max()
    diffs = {"imported": np.abs(run_graph(graph, x)[0] - ref).max(),
             "folded": np.abs(run_graph(res.graph, x)[0] - ref).max(),
             "onnx": np.abs(onnx_reference(tmp_path / "folded.onnx", x) - ref).max()}
    print(f"MobileNetV2 with separate BN: {len(graph)} IR nodes before and {len(res.graph)} after FoldBatchNorm; "
          "max |diff| vs onnxruntime: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for what, d in diffs.items():
        assert d <= 1e-4 * scale, f"{what}: {d} > 1e-4 * {scale}"
