"""`qfrewrite convert`, `eval` and `demo` on the bundled demo model and photos."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from qfrewrite.cli import main
from qfrewrite.demo.run import DEMO_IMAGES, DEMO_MODEL
from qfrewrite.tflite_inspect import assert_fully_integer


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "demo.tflite"
    res = CliRunner().invoke(main, ["convert", str(DEMO_MODEL), "-o", str(out), "--data", str(DEMO_IMAGES),
                                    "--preprocess", "inception", "--recipe", "plain", "--holdout", "2",
                                    "--onnx", str(out.with_suffix(".onnx"))])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_convert_writes_int8_model_report_and_onnx(converted):
    out, text = converted
    assert_fully_integer(out)
    assert "fully int8" in text and "held back 2" in text and "top-1 agreement" in text
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["summary"]["calibration_images"] == 7 and doc["summary"]["fully_integer"]
    assert [p["name"] for p in doc["report"]["passes"]] == ["FoldBatchNorm", "InsertFakeQuant"]
    import onnx

    onnx.checker.check_model(onnx.load(str(out.with_suffix(".onnx"))))


def test_eval_scores_a_tflite_file_against_a_reference(converted, tmp_path):
    out, _ = converted
    j = tmp_path / "eval.json"
    res = CliRunner().invoke(main, ["eval", str(out), "--data", str(DEMO_IMAGES), "--preprocess", "inception",
                                    "--reference", str(DEMO_MODEL), "--json", str(j)])
    # the demo photos carry no labels.tsv: agreement only
    assert res.exit_code == 0, res.output
    doc = json.loads(j.read_text())
    assert doc["images"] == 9 and doc["top1"] is None and 0.0 <= doc["top1_agreement"] <= 1.0


def test_convert_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(main, ["convert", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "x.tflite"),
                                    "--data", str(DEMO_IMAGES)])
    assert res.exit_code == 1 and "no such file" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["convert", str(DEMO_MODEL), "-o", str(tmp_path / "x.bin"),
                                    "--data", str(DEMO_IMAGES)])
    assert res.exit_code == 1 and ".tflite" in res.output
    assert not (tmp_path / "x.tflite").exists()


def test_demo_runs_as_a_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qfrewrite", "demo", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "Diagnosis" in text and "fully int8" in text and "Top-5 classes of grace_hopper.jpg" in text
    assert (tmp_path / "mobilenet_v1_0.25_int8.tflite").exists() and (tmp_path / "mobilenet_v1_0.25_int8.json").exists()
