"""The measured layer harm on torchvision's MobileNetV2 (../shared): equal to an independent run of the whole graph
with one layer's weights fake-quantized, and the first depthwise layer, whose per-tensor weights hurt the logits
most, ranked first although its own weight SQNR is ordinary."""
from __future__ import annotations

import pytest

import qfrewrite
from qfrewrite.analysis.layer_harm import estimated_harm_db, measure_layer_harm
from qfrewrite.backend.executor import run_graph
from qfrewrite.diagnose import diagnose
from qfrewrite.images import load_image_folder
from qfrewrite.numerics.metrics import sqnr_db
from qfrewrite.quant.weights import weight_quant_attrs
from tests.conftest import shared_path

pytestmark = pytest.mark.real

#: the first depthwise layer (measured worst), a later depthwise layer, a pointwise projection and the classifier
LAYERS = ("/features/features.1/conv/conv.0/conv.0.0/Conv", "/features/features.9/conv/conv.1/conv.1.0/Conv",
          "/features/features.9/conv/conv.2/Conv", "/classifier/classifier.1/Gemm")


def test_mobilenet_v2_harm_matches_whole_graph_runs():
    g = qfrewrite.load(shared_path("models", "torchvision_mobilenet_v2.onnx"))
    x = next(iter(load_image_folder(shared_path("images", "imagenet_sample"), g, preprocess="torch",
                                    limit=4).batches()))
    by_source = {n.source_name: n.name for n in g}
    layers = [by_source[s] for s in LAYERS]
    h = measure_layer_harm(g, [x], granularities=("per_tensor",), layers=layers)
    ref = run_graph(g, x)[0]
    for name in layers:
        q = g.copy()
        q.node(name).weight_quant = weight_quant_attrs(q.node(name), "per_tensor", "minmax", 8)
        assert h.layers[name].db("per_tensor") == pytest.approx(sqnr_db(ref, run_graph(q, x, quantize=True)[0]),
                                                                abs=0.05)
    ranked = [lh.source_name for lh in h.ranked("per_tensor")]
    assert ranked[0] == LAYERS[0]
    # its weights alone do not say so: another of these layers has the worse whole-kernel SQNR
    stats = diagnose(g).stats
    est = {s: estimated_harm_db(stats[by_source[s]]) for s in LAYERS}
    assert est[LAYERS[1]] < est[LAYERS[0]]
