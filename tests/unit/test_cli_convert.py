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


def test_convert_summary_states_the_weight_storage_read_from_the_files(converted):
    out, text = converted
    assert "weights      8-bit (nearest rounding): TFLite int8 (kernels" in text and "ONNX int8" in text
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert summary["weight_bits"] == 8 and summary["rounding"] == "nearest"
    st = summary["storage"]
    assert st["tflite"]["file_bytes"] == out.stat().st_size == summary["size_bytes"]
    assert st["onnx"]["file_bytes"] == out.with_suffix(".onnx").stat().st_size
    assert st["tflite"]["dtypes"] == st["onnx"]["dtypes"] == ["int8"]
    assert st["tflite"]["kernel_bytes"] == st["tflite"]["int8_bytes"] == st["onnx"]["kernel_bytes"]


def test_convert_with_4_bit_weights_writes_int4_kernels(tmp_path):
    import onnx

    from qfrewrite.emit.storage import onnx_kernels, tflite_kernels

    out = tmp_path / "w4.tflite"
    res = CliRunner().invoke(main, ["convert", str(DEMO_MODEL), "-o", str(out), "--data", str(DEMO_IMAGES),
                                    "--preprocess", "inception", "--recipe", "plain", "--holdout", "0", "--limit", "3",
                                    "--weight-bits", "4", "--rounding", "nearest", "--onnx", str(tmp_path / "w4.onnx")])
    assert res.exit_code == 0, res.output
    assert "weights      4-bit (nearest rounding): TFLite int4 (kernels" in res.output
    assert "at int8), ONNX int4" in res.output
    assert_fully_integer(out)
    st = json.loads(out.with_suffix(".json").read_text())["summary"]["storage"]
    tfl, onx = tflite_kernels(out.read_bytes()), onnx_kernels(onnx.load(str(tmp_path / "w4.onnx")))
    assert {k.dtype for k in tfl} == {k.dtype for k in onx} == {"int4"} and len(tfl) == len(onx) == 28
    assert st["tflite"]["kernel_bytes"] == sum(k.bytes for k in tfl) and st["onnx"]["file_bytes"] == \
        (tmp_path / "w4.onnx").stat().st_size
    assert 2 * st["tflite"]["kernel_bytes"] - st["tflite"]["int8_bytes"] <= len(tfl)  # half a byte a weight


def test_bad_weight_bits_and_rounding_are_usage_errors(tmp_path):
    from qfrewrite.convert import recipe_passes
    from qfrewrite.errors import QfrewriteError

    for opt in (["--weight-bits", "9"], ["--weight-bits", "four"], ["--rounding", "stochastic"]):
        res = CliRunner().invoke(main, ["convert", str(DEMO_MODEL), "-o", str(tmp_path / "x.tflite"), "--data",
                                        str(DEMO_IMAGES), *opt])
        assert res.exit_code == 2 and opt[0] in res.output and "Traceback" not in res.output
    assert not list(tmp_path.iterdir())
    spec = recipe_passes("dfq", "per_tensor", weight_bits=4).spec
    assert (spec.weight_bits, spec.rounding, spec.weights) == (4, "nearest", "per_tensor")
    with pytest.raises(QfrewriteError, match="weight_bits"):
        recipe_passes("plain", weight_bits=1)
    with pytest.raises(QfrewriteError, match="rounding"):
        recipe_passes("plain", rounding="up")


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
