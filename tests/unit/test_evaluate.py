"""qfrewrite.evaluate: top-k, label offset, SQNR/agreement against a reference, TFLite/Graph/Result/folder inputs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import qfrewrite
from qfrewrite.errors import DataError
from qfrewrite.evaluate import EvalResult, predict, sqnr_db, topk_accuracy
from qfrewrite.ir import Op
from qfrewrite.passes import FoldBatchNorm, InsertFakeQuant
from tests.graphs import tiny_mobilenet


def test_topk_and_offset():
    scores = np.array([[0.1, 0.5, 0.2, 0.9], [0.8, 0.1, 0.05, 0.0], [0.0, 0.1, 0.3, 0.2]])
    labels = np.array([3, 1, 2])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, labels, 2) == 1.0
    assert topk_accuracy(scores, np.array([0, 2, 0]), 2) == pytest.approx(0.0)
    assert topk_accuracy(scores, labels, 3) == 1.0
    # with a background class at position 0, class c is position c + 1
    assert topk_accuracy(scores, np.array([2, -1, 1]), 1, offset=1) == 1.0


def test_sqnr():
    ref = np.array([3.0, 4.0])
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(ref, ref + np.array([0.3, 0.4])) == pytest.approx(20.0)


def _folder(tmp_path, rng, n=6, classes=5):
    rows = ["file\tclass_index"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\t{i % classes}")
    (tmp_path / "labels.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_graph_result_and_tflite_on_folder(tmp_path, rng):
    g = tiny_mobilenet(rng, classes=5)
    folder = _folder(tmp_path, rng)
    res_float = qfrewrite.evaluate(g, str(folder), preprocess="inception")
    assert isinstance(res_float, EvalResult) and res_float.images == 6 and 0 <= res_float.top1 <= 1
    assert res_float.top5 == 1.0  # 5 classes
    # the same arrays and labels by hand
    from qfrewrite.images import ImageFolder

    data = ImageFolder(folder, preprocess="inception").read(g)
    x = np.concatenate(list(data.batches()))
    out = predict(g, x)
    assert res_float.top1 == topk_accuracy(out, data.labels, 1)
    # quantized: the Result runs the FakeQuant simulation, the TFLite file the int8 model; both against float
    result = qfrewrite.rewrite(g, passes=[FoldBatchNorm(), InsertFakeQuant()], data=x, stats=False)
    path = tmp_path / "m.tflite"
    result.to_tflite(path)
    sim = qfrewrite.evaluate(result, data, reference=g)
    q8 = qfrewrite.evaluate(str(path), str(folder), reference=out, preprocess="inception", limit=4)
    assert q8.images == 4 and sim.images == 6
    assert sim.sqnr_db > 15 and q8.sqnr_db > 15
    assert np.isfinite(sim.sqnr_db) and 0 <= q8.top1_agreement <= 1
    np.testing.assert_allclose(predict(str(path), x[:4]), predict(result, x[:4]),
                               atol=2 * _out_step(result))
    with pytest.raises(DataError, match="preprocess"):
        qfrewrite.evaluate(str(path), str(folder))


def _out_step(result):
    fq = result.graph.find(Op.FAKE_QUANT)[-1].attrs
    return (fq.hi[0] - fq.lo[0]) / 255


def test_arrays_labels_and_1001_offset(rng):
    g = tiny_mobilenet(rng, classes=1001, width=4)
    x = rng.normal(size=(5, 16, 16, 3)).astype(np.float32)
    out = predict(g, x)
    labels = np.argmax(out, 1) - 1
    res = qfrewrite.evaluate(g, x, labels=labels)
    assert res.label_offset == 1 and res.top1 == 1.0
    assert qfrewrite.evaluate(g, x, labels=labels, label_offset=0).top1 == 0.0
    res = qfrewrite.evaluate(g, x, reference=out)
    assert res.top1 is None and res.sqnr_db == float("inf") and res.top1_agreement == 1.0
    with pytest.raises(DataError, match="labels"):
        qfrewrite.evaluate(g, x, labels=labels[:3])


def test_arrays_in_the_source_layout(rng):
    g = tiny_mobilenet(rng, classes=5)
    g.meta["input_layout"] = "NCHW"
    x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    labels = np.argmax(predict(g, x), 1)
    assert qfrewrite.evaluate(g, x.transpose(0, 3, 1, 2), labels=labels).top1 == 1.0
