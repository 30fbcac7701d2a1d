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
