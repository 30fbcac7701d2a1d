"""The ../shared models as float .tflite sources: written by TensorFlow's converter, read back and re-emitted within
1e-5; dfq int8 from the .tflite as accurate as from the original (the Keras MobileNetV1 0.25 by default, the others
marked slow); diagnose of an int8 file made from one."""
from __future__ import annotations

import sys

import numpy as np
import pytest

import qfrewrite
from qfrewrite import recipes
from qfrewrite.backend.executor import Executor
from qfrewrite.evaluate import evaluate, predict
from qfrewrite.images import ImageFolder
from tests.conftest import REPO, shared_path

pytestmark = pytest.mark.real

sys.path.insert(0, str(REPO))
from benchmarks.common import MODELS, split_images  # noqa: E402

REL = 1e-5
_CACHE = {}


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> (original graph, its float .tflite path, that file loaded), built once per model."""
    def get(name):
        if name not in _CACHE:
            spec = MODELS[name]
            original = qfrewrite.load(shared_path(spec["file"]), **spec.get("load", {}))
            path = tmp_path_factory.mktemp(name) / f"{name}.tflite"
            qfrewrite.rewrite(original, passes=[], stats=False).to_tflite(path)
            _CACHE[name] = (original, path, qfrewrite.load(path))
        return _CACHE[name]

    yield get
    _CACHE.clear()


def _images(name, graph, n):
    spec = MODELS[name]
    return ImageFolder(shared_path("images", "imagenet_sample"), preprocess=spec["preprocess"], limit=n,
                       progress=False).read(graph)


@pytest.mark.parametrize("name", list(MODELS))
def test_read_back_and_reemitted_within_1e_5(sources, name, tmp_path):
    original, path, graph = sources(name)
    assert graph.meta["format"] == "tflite" and not graph.find(qfrewrite.Op.BATCH_NORM)
    x = np.concatenate(list(_images(name, original, 4).batches()))
    in_file = predict(str(path), x)
    assert _rel(in_file, Executor(graph)(x)[0]) <= REL
    again = tmp_path / "again.tflite"
    qfrewrite.rewrite(graph, passes=[], stats=False).to_tflite(again)
    assert _rel(in_file, predict(str(again), x)) <= REL
    assert _rel(predict(original, x), in_file) <= 1e-4  # the converter's own fidelity to the original


def _dfq_top1(source, calib, evals, ref, load_opts):
    result = qfrewrite.rewrite(source, passes=recipes.dfq(), data=calib, stats=False, **load_opts)
    fb = result.to_tflite()
    r = evaluate(fb, evals, reference=ref)
    return r.top1, predict(fb, np.concatenate(list(evals.batches()))).argmax(-1)


@pytest.mark.parametrize("name", [n if n == "keras_v1_025" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in MODELS])
def test_dfq_from_the_tflite_is_as_accurate_as_from_the_original(sources, name):
    original, path, _ = sources(name)
    spec = MODELS[name]
    calib, evals = split_images(_images(name, original, 160), 32, 80)
    ref = predict(original, np.concatenate(list(evals.batches())))
    top1_orig, pred_orig = _dfq_top1(shared_path(spec["file"]), calib, evals, ref, spec.get("load", {}))
    top1_file, pred_file = _dfq_top1(path, calib, evals, ref, {})
    assert top1_orig > 0.3  # a working int8 model, not two broken ones agreeing
    assert abs(top1_file - top1_orig) <= 3 / len(evals), (top1_orig, top1_file)
    assert np.mean(pred_file == pred_orig) >= 0.9


def test_diagnose_an_int8_file_made_from_the_tflite(sources, tmp_path):
    from qfrewrite.analysis.tflite_int8 import Int8Diagnosis
    from qfrewrite.diagnose import diagnose

    original, path, graph = sources("keras_v1_025")
    calib = _images("keras_v1_025", graph, 16)
    int8 = tmp_path / "v1_pt.tflite"
    qfrewrite.rewrite(path, passes=recipes.plain(weights="per_tensor"), data=calib, stats=False).to_tflite(int8)
    d = diagnose(int8)
    assert isinstance(d, Int8Diagnosis) and len(d.layers) == 28
    dominated = {ls.name for ls in d.layers if ls.dominated}
    # the float diagnosis of the same model names conv_dw_13 as the worst spread (312x the median channel)
    assert any("conv_dw_13" in n for n in dominated), dominated
    assert d.totals()["few_level_channels"] > 0
