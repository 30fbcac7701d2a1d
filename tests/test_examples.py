"""Every script in examples/ runs and prints what it promises."""
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, shared_path

EXAMPLES = REPO / "examples"


def run(script, *args, cwd):
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_convert_keras(tmp_path):
    out = run("convert_keras.py", "--out", tmp_path / "m.tflite", cwd=tmp_path)
    assert "InsertFakeQuant" in out and "wrote" in out and (tmp_path / "m.tflite").stat().st_size > 100_000


def test_diagnose_model(tmp_path):
    out = run("diagnose_model.py", "--json", tmp_path / "d.json", "--plot", tmp_path / "d.png", cwd=tmp_path)
    assert "worst layer: conv_dw_13" in out
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_compose_passes(tmp_path):
    out = run("compose_passes.py", cwd=tmp_path)
    assert "CountDepthwise" in out and "InsertFakeQuant: output SQNR" in out


def test_convert_torchvision_onnx(tmp_path):
    model = shared_path("models", "torchvision_mobilenet_v2.onnx")
    images = shared_path("images", "imagenet_sample")
    out = run("convert_torchvision_onnx.py", model, images, "--calib", 16, "--eval", 8, "--out", tmp_path / "mv2",
              cwd=tmp_path)
    assert "int8 tflite" in out and "top-1 agreement" in out
    assert (tmp_path / "mv2.tflite").exists() and (tmp_path / "mv2.onnx").exists()
