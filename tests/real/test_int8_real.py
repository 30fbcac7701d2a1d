"""Fully integer TFLite from the real models in ../shared: calibration on an image folder, a file with no float op
and the chosen ranges, agreement with the FakeQuant simulation layer by layer and at the output, accuracy on held-out
images. The Keras MobileNetV1 0.25 runs by default (small); the others are marked slow."""
from __future__ import annotations

import sys

import numpy as np
import pytest

import qfrewrite
from qfrewrite.backend.executor import Executor
from qfrewrite.evaluate import evaluate, predict
from qfrewrite.images import ImageFolder
from qfrewrite.ir import Op
from qfrewrite.numerics.quantize import fake_quant_np
from qfrewrite.passes import FoldBatchNorm, InsertFakeQuant
from qfrewrite.tflite_inspect import assert_fully_integer, layer_agreement, tensors_for_node
from tests.conftest import REPO, shared_path

pytestmark = pytest.mark.real

sys.path.insert(0, str(REPO))
from benchmarks.common import MODELS  # noqa: E402


def _quantize(name, weights, n_calib, tmp_path, io_dtype="float32"):
    spec = MODELS[name]
    path = shared_path(spec["file"])
    folder = shared_path("images", "imagenet_sample")
    graph = qfrewrite.load(path, **spec.get("load", {}))
    images = ImageFolder(folder, preprocess=spec["preprocess"], limit=2 * n_calib, progress=False).read(graph)
    calib, held_out = images.subset(slice(0, None, 2)), images.subset(slice(1, None, 2))
    result = qfrewrite.rewrite(graph, passes=[FoldBatchNorm(), InsertFakeQuant(weights=weights)], data=calib,
                               stats=False)
    out = tmp_path / f"{name}.tflite"
    result.to_tflite(out, io_dtype=io_dtype)
    return graph, result, out, held_out


def _check_file(result, out, io_dtype="float32"):
    info = assert_fully_integer(str(out), io_dtype=io_dtype)
    fqs = result.graph.find(Op.FAKE_QUANT)
    for fq in fqs:
        lo, hi = fq.attrs.lo[0], fq.attrs.hi[0]
        scale = (hi - lo) / 255
        src = fq.inputs[0].producer
        found = [t for t in tensors_for_node(info, fq.name) + (tensors_for_node(info, src.name) if src else [])
                 if t.dtype is np.int8]
        assert found, f"no int8 tensor for {fq.name}"
        for t in found:
            assert t.scale == pytest.approx(scale, rel=1e-5), (fq.name, t.name)
            assert t.zero_point == int(round(-lo / scale)) - 128, (fq.name, t.name)
    return info


def test_keras_v1_per_channel_int8(tmp_path):
    graph, result, out, held_out = _quantize("keras_v1_025", "per_channel", 24, tmp_path)
    info = _check_file(result, out)
    ops = info.op_counts()
    assert ops["CONV_2D"] == 15 and ops["DEPTHWISE_CONV_2D"] == 13 and "SOFTMAX" in ops
    # the int8 file against the simulation: layer by layer (each layer fed the file's own int8 inputs) and at
    # the output. The inputs are put on the input quantization grid first: x/127.5 - 1 puts every pixel half-way
    # between two grid points, where TFLite's QUANTIZE and TF's fake quant round ties differently.
    fqs = result.graph.find(Op.FAKE_QUANT)
    fq_in = [f for f in fqs if f.inputs[0] is result.graph.inputs[0]][0].attrs
    x = fake_quant_np(np.concatenate(list(held_out.batches()))[:3], fq_in.lo[0], fq_in.hi[0])
    layers = layer_agreement(result.graph, str(out), x)
    assert len(layers) == len(fqs) - 1  # every quantized tensor but the input
    for name, agree in layers.items():
        assert agree["within_1_lsb"] >= 0.999 and agree["max_lsb"] <= 2.01, (name, agree)
    sim_out = Executor(result.graph, quantize=True)(x)[0]
    q8 = predict(str(out), x)
    assert np.mean(np.abs(q8 - sim_out) <= 1.01 / 256) >= 0.99
    # accuracy on 24 held-out images: the int8 model keeps most float predictions
    res = evaluate(str(out), held_out, reference=graph)
    assert res.images == 24 and res.top1_agreement >= 0.7 and res.sqnr_db > 8


def test_keras_v1_uint8_io(tmp_path):
    graph, result, out, held_out = _quantize("keras_v1_025", "per_channel", 8, tmp_path, io_dtype="uint8")
    info = _check_file(result, out, io_dtype="uint8")
    inp = info.tensors[info.inputs[0]]
    assert inp.dtype is np.uint8
    fq = [f for f in result.graph.find(Op.FAKE_QUANT) if f.inputs[0] is result.graph.inputs[0]][0]
    assert inp.range()[0] == pytest.approx(fq.attrs.lo[0], abs=1e-6)
    res = evaluate(str(out), held_out, reference=graph)
    assert res.top1_agreement >= 0.6


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision_v2", "tf_slim_v1", "efficientnet_lite0"])
@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
def test_int8_every_importer(name, weights, tmp_path):
    graph, result, out, held_out = _quantize(name, weights, 32, tmp_path)
    _check_file(result, out)
    x = np.concatenate(list(held_out.batches()))[:2]
    fq_in = [f for f in result.graph.find(Op.FAKE_QUANT) if f.inputs[0] is result.graph.inputs[0]][0].attrs
    for name, agree in layer_agreement(result.graph, str(out), fake_quant_np(x, fq_in.lo[0], fq_in.hi[0])).items():
        assert agree["within_1_lsb"] >= 0.99, (name, agree)
    res = evaluate(str(out), held_out, reference=graph)
    assert res.images == 32
    if weights == "per_channel":  # per-tensor weights collapse TF-slim MobileNetV1 (its folded outlier channels)
        assert res.sqnr_db > 8 and res.top1_agreement >= 0.8
