"""diagnose and the report on the real models in ../shared: layer names as in the source, the TF-slim MobileNetV1
dead channels found, the spread falling after FoldBatchNorm + CrossLayerEqualization, and (slow) the command line
printing within 20 seconds."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import qfrewrite
from qfrewrite.diagnose import diagnose
from qfrewrite.ir import Op
from tests.conftest import REPO, shared_path

pytestmark = pytest.mark.real

MODELS = {
    "keras_mobilenet_v1_0.25_224.h5": "keras_importer",
    "torchvision_mobilenet_v2.onnx": "onnx_importer",
    "efficientnet_lite0.onnx": "onnx_importer",
    "tf_mobilenet_v1_1.0_224_frozen.pb": "tf_importer",
}


def _model(name):
    module = f"qfrewrite.importers.{MODELS[name]}"
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not in this build")
    return shared_path("models", name)


_GRAPHS = {}


def _graph(name):
    if name not in _GRAPHS:
        _GRAPHS[name] = qfrewrite.load(_model(name))
    return _GRAPHS[name]


def _source_names(path):
    """Every layer/node name of the source model, read with the source framework's own tools."""
    if path.suffix == ".h5":
        import h5py

        with h5py.File(path, "r") as f:
            cfg = json.loads(f.attrs["model_config"])
        return {layer["config"]["name"] for layer in cfg["config"]["layers"]}
    if path.suffix == ".onnx":
        import onnx

        return {n.name for n in onnx.load(str(path), load_external_data=False).graph.node}
    import tensorflow as tf

    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString(path.read_bytes())
    return {n.name for n in gd.node}


@pytest.mark.parametrize("name", list(MODELS))
def test_diagnosis_names_layers_as_in_the_source(name):
    g = _graph(name)
    d = diagnose(g).to_dict(per_channel=False)
    layers = d["layers"]
    assert len(layers) == len(g.find(Op.CONV2D, Op.DEPTHWISE_CONV2D, Op.DENSE)) > 20
    assert {e["name"] for e in layers} <= _source_names(_model(name))
    for e in layers:
        assert set(e["outlier_channels"]).isdisjoint(e["zero_channels"])
        assert [o["channel"] for o in e["outliers"]] == e["outlier_channels"]
    ranks = [e["sqnr_db"]["per_tensor"] for e in layers]
    assert ranks == sorted(ranks)


def test_tf_slim_v1_dead_channels_behind_depthwise_outliers():
    """DESIGN: TF-slim MobileNetV1's depthwise outliers read dead stem/pointwise channels through near-zero-variance
    BatchNorms. The diagnosis must say so: outliers caused by the BN scale, reading a dead channel, FoldDeadChannels
    suggested for them."""
    d = diagnose(_graph("tf_mobilenet_v1_1.0_224_frozen.pb")).to_dict(per_channel=False)
    dead = [(e["name"], o) for e in d["layers"] if e["op"] == "DepthwiseConv2D" for o in e["outliers"]
            if o.get("reads_dead_input_of")]
    assert len(dead) >= 5
    assert all(o["caused_by_bn"] for _, o in dead)
    fdc = next(s for s in d["suggestions"] if s["pass"] == "FoldDeadChannels")
    assert {layer for layer, _ in dead} <= set(fdc["layers"])
    assert sum(len(e["near_zero_channels"]) + len(e["zero_channels"]) for e in d["layers"]) >= 10


@pytest.mark.parametrize("name", list(MODELS))
def test_report_shows_the_spread_falling_after_fold_batchnorm_and_equalization(name, tmp_path):
    """FoldBatchNorm + CrossLayerEqualization, with FoldDeadChannels between them where the diagnosis finds outliers
    that read dead channels (equalization leaves constant channels alone: DESIGN). Without data the fused clip's
    interval bounds reach the ReLU6 almost everywhere and hold those channels at scale 1, so the spread is shown with
    the exact clips, which equalize every channel."""
    pytest.importorskip("qfrewrite.passes.cross_layer_equalization")
    from qfrewrite.passes import CrossLayerEqualization, FoldBatchNorm, FoldDeadChannels

    g = _graph(name)
    diag = diagnose(g)
    reads_dead = any(ls.dead_inputs.keys() & set(ls.outlier_channels) for ls in diag.stats.values())
    passes = [FoldBatchNorm()] + ([FoldDeadChannels()] if reads_dead else []) + [CrossLayerEqualization(clip="exact")]
    res = qfrewrite.rewrite(g, passes=passes)
    first, last = res.report.first_stats.totals(), res.report.last_stats.totals()
    assert last["median_depthwise_spread"] < 0.7 * first["median_depthwise_spread"]
    assert last["max_depthwise_spread"] < first["max_depthwise_spread"]
    cle = res.report["CrossLayerEqualization"]
    assert cle.modified
    assert cle.stats_after.totals()["median_depthwise_spread"] < cle.stats_before.totals()["median_depthwise_spread"]
    # readable as text, JSON and PNG
    text = str(res.report)
    assert "CrossLayerEqualization" in text and "->" in text
    d = json.loads(res.report.to_json())
    assert len(d["layers_last"]) == len(res.report.last_stats)
    png = res.report.plot(tmp_path / "report.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_cli_prints_within_20_seconds(name, tmp_path):
    path = _model(name)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "qfrewrite", "diagnose", str(path), "--json", str(tmp_path / "d.json")],
                       capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    seconds = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr
    assert "layers ranked by how badly" in p.stdout
    assert seconds < 20, f"{name}: {seconds:.1f} s"
    d = json.loads((tmp_path / "d.json").read_text())
    assert all(np.isfinite(e["spread"]) or e["spread"] == "inf" for e in d["layers"])
