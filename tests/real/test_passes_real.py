"""The quantization-friendly passes on the real models in ../shared: exactness of the exact passes on real images,
the TF-slim MobileNetV1 dead channels, and (slow) the accuracy measurements behind the recipes."""
from __future__ import annotations

import numpy as np
import pytest

import qfrewrite
from qfrewrite.analysis.channel_stats import graph_stats_summary
from qfrewrite.backend.executor import run_graph
from qfrewrite.ir import Op
from qfrewrite.passes import CrossLayerEqualization, FoldBatchNorm, FoldDeadChannels
from tests.conftest import shared_path

pytestmark = pytest.mark.real

LOGITS = "MobilenetV1/Logits/SpatialSqueeze"


def _images(n, start=0, preprocess=lambda x: x / 127.5 - 1.0):
    from qfrewrite.images import load_image

    folder = shared_path("images", "imagenet_sample")
    rows = [line.rstrip("\n").split("\t") for line in open(folder / "labels.tsv")][1:]
    rows = rows[start:start + n]
    x = np.stack([load_image(folder / r[0], (224, 224)) for r in rows]).astype(np.float32)
    return preprocess(x), np.array([int(r[1]) for r in rows])


@pytest.fixture(scope="module")
def v1():
    pytest.importorskip("qfrewrite.importers.tf_importer", reason="the TF GraphDef importer is not in this build")
    pb = shared_path("models", "tf_mobilenet_v1_1.0_224_frozen.pb")
    return qfrewrite.rewrite(qfrewrite.load(pb, outputs=[LOGITS]), passes=[FoldBatchNorm()], stats=False).graph


@pytest.fixture(scope="module")
def v1_images():
    return _images(4)[0]


def _close(out, ref, rtol=1e-4):
    assert np.abs(out - ref).max() <= rtol * np.abs(ref).max()


def test_dead_channels_of_tf_slim_v1_fold_exactly(v1, v1_images):
    ref = run_graph(v1, v1_images)[0]
    g = v1.copy()
    before = graph_stats_summary(g)
    res = FoldDeadChannels()(g)
    assert res.modified
    # about 20 stem/pointwise channels trained to ~1e-13 weights, and the depthwise channels they feed
    assert res.stats["num_constant_channels"] >= 20
    assert sum(len(v) for v in res.stats["dead_weights_zeroed"].values()) >= 20
    after = graph_stats_summary(g)
    worst = lambda s: max(v["spread"] for k, v in s.items() if "depthwise" in k)
    assert worst(after) < worst(before) / 2
    _close(run_graph(g, v1_images)[0], ref)


def test_exact_equalization_keeps_tf_slim_v1(v1, v1_images):
    ref = run_graph(v1, v1_images)[0]
    g = v1.copy()
    FoldDeadChannels()(g)
    res = CrossLayerEqualization(clip="exact")(g)
    assert res.modified and res.stats["pairs"] == 27 and len(g.find(Op.MINIMUM)) == 27
    assert res.stats["guarded_channels"] > 0
    _close(run_graph(g, v1_images)[0], ref)


def _split(graph, preset, n_calib, n_eval):
    from benchmarks.common import split_images
    from qfrewrite.images import ImageFolder

    allimg = ImageFolder(shared_path("images", "imagenet_sample"), preprocess=preset, progress=False).read(graph)
    return split_images(allimg, n_calib, n_eval)


def _top1(graph, images, offset, quantize):
    from benchmarks.bench_passes import top1

    return top1(graph, images, offset, quantize)


@pytest.mark.slow
def test_dfq_per_tensor_keeps_tf_slim_v1(v1):
    """Plain per-tensor W8A8 collapses (about 3%); the dfq recipe stays close to float (measured -0.25 on 800
    images); on 300 evaluation images allow 1.5 points of sampling noise."""
    from qfrewrite import recipes

    calib, evals = _split(v1, "inception", 200, 300)
    f32 = _top1(v1, evals, 1, False)
    res = qfrewrite.rewrite(v1, passes=recipes.dfq(weights="per_tensor"), data=calib, stats=False)
    assert _top1(res.graph, evals, 1, True) >= f32 - 1.5


@pytest.mark.slow
def test_qualcomm_block_without_retraining_destroys_accuracy(v1):
    from qfrewrite.passes import RemoveDepthwiseBNReLU6

    _, evals = _split(v1, "inception", 1, 100)
    assert _top1(v1, evals, 1, False) > 80
    g = v1.copy()
    res = RemoveDepthwiseBNReLU6()(g)
    assert res.stats["rewritten"] == 13 and "to_keras" in res.stats["warning"]
    assert _top1(g, evals, 1, False) < 5


@pytest.mark.slow
def test_dfq_tf_slim_v1_emits_an_int8_tflite_model_with_per_channel_clips(v1):
    """The exact-clip equalization's per-channel MINIMUM goes through TensorFlow's converter in a full int8 model
    whose predictions agree with the simulated int8 graph."""
    from ai_edge_litert.interpreter import Interpreter

    from qfrewrite import recipes
    from qfrewrite.backend.executor import Executor

    calib, evals = _split(v1, "inception", 100, 20)
    res = qfrewrite.rewrite(v1, passes=recipes.dfq(weights="per_tensor"), data=calib, stats=False)
    assert len(res.graph.find(Op.MINIMUM)) == 27
    it = Interpreter(model_content=res.to_tflite())
    it.allocate_tensors()
    ops = {d["op_name"] for d in it._get_ops_details()}
    assert "MINIMUM" in ops and "QUANTIZE" in ops
    x = evals.preprocess(evals.images)
    sim = Executor(res.graph, quantize=True)(x)[0]
    got = []
    for i in range(len(x)):
        it.set_tensor(it.get_input_details()[0]["index"], x[i:i + 1])
        it.invoke()
        got.append(it.get_tensor(it.get_output_details()[0]["index"])[0])
    assert np.mean(np.argmax(got, -1) == np.argmax(sim, -1)) >= 0.9
