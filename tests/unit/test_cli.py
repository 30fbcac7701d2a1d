"""The command line: ``qfrewrite diagnose`` through click's CliRunner, and once as a real subprocess."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from qfrewrite.cli import data_options, main, parse_preprocess, reports_errors
from qfrewrite.errors import ModelLoadError
from tests.planted import expected, planted_mobilenet

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """The planted MobileNet as a Keras file, as a user would bring it."""
    from qfrewrite.emit.keras_emitter import emit_keras

    path = tmp_path_factory.mktemp("model") / "planted.keras"
    emit_keras(planted_mobilenet(np.random.default_rng(0))).save(path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return d


def test_help_lists_diagnose():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "diagnose" in r.output
    r = CliRunner().invoke(main, ["diagnose", "--help"])
    assert r.exit_code == 0 and "--json" in r.output and "--plot" in r.output and "--preprocess" in r.output


def test_diagnose_json_and_plot(model_file, tmp_path):
    js, png = tmp_path / "d.json", tmp_path / "d.png"
    r = CliRunner().invoke(main, ["diagnose", str(model_file), "--json", str(js), "--plot", str(png), "--top", "3"])
    assert r.exit_code == 0, r.output
    assert "dw1" in r.output and "outlier channel 3" in r.output and "FoldDeadChannels" in r.output
    d = json.loads(js.read_text())
    assert {e["name"]: (e["outlier_channels"], e["zero_channels"]) for e in d["layers"]} == expected()
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_diagnose_with_an_image_folder(model_file, image_dir, tmp_path):
    js = tmp_path / "d.json"
    r = CliRunner().invoke(main, ["diagnose", str(model_file), "--data", str(image_dir), "--preprocess",
                                  "127.5/127.5", "--limit", "2", "--json", str(js)])
    assert r.exit_code == 0, r.output
    d = json.loads(js.read_text())
    assert d["data"]["images"] == 2 and d["layers"][0]["per_channel"]["act_max"] is not None
    assert d["ranking"]["measured"] and d["ranking"]["images"] == 2 and "out W/T" in r.output
    assert all(set(e["output_sqnr_db"]) == {"per_tensor", "per_channel", "activations"} for e in d["layers"])


def test_diagnose_after_dfq_and_without_the_harm(model_file, image_dir, tmp_path):
    js = tmp_path / "d.json"
    r = CliRunner().invoke(main, ["diagnose", str(model_file), "--data", str(image_dir), "--preprocess",
                                  "127.5/127.5", "--after", "dfq", "--weights", "per-channel", "--json", str(js)])
    assert r.exit_code == 0, r.output
    d = json.loads(js.read_text())
    assert d["after_recipe"] == "dfq" and "after dfq's rewrite" in r.output and d["batchnorms_in_graph"] == 0
    assert "per-channel" in d["ranking"]["by"]
    dbs = [e["output_sqnr_db"]["per_channel"] for e in d["layers"]]
    assert dbs == sorted(dbs)
    r = CliRunner().invoke(main, ["diagnose", str(model_file), "--data", str(image_dir), "--preprocess",
                                  "127.5/127.5", "--harm-images", "0", "--json", str(js)])
    assert r.exit_code == 0, r.output
    d = json.loads(js.read_text())
    assert not d["ranking"]["measured"] and "out W/T" not in r.output and "act range" in r.output
    r = CliRunner().invoke(main, ["diagnose", str(model_file), "--after", "dfq"])
    assert r.exit_code == 1 and "needs calibration data" in r.output
    r = CliRunner().invoke(main, ["diagnose", str(model_file), "--noise-images", "3", "--json", str(js)])
    assert r.exit_code == 0, r.output
    d = json.loads(js.read_text())
    assert d["ranking"]["inputs"] == "noise" and not d["ranking"]["measured"] and "Gaussian-noise" in r.output


@pytest.mark.parametrize("content", [None, b"\x00garbage", b""])
def test_unreadable_model_gives_one_line_and_exit_1(tmp_path, content):
    path = tmp_path / "model.h5"
    if content is not None:
        path.write_bytes(content)
    r = CliRunner().invoke(main, ["diagnose", str(path)])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(path) in lines[0]
    assert "Traceback" not in r.output


def test_bad_options(model_file, image_dir):
    r = CliRunner().invoke(main, ["diagnose", str(model_file), "--preprocess", "a/b"])
    assert r.exit_code == 2 and "MEAN/STD" in r.output
    r = CliRunner().invoke(main, ["diagnose", str(model_file), "--data", str(image_dir), "--preprocess", "nope"])
    assert r.exit_code == 1 and "unknown preprocessing preset" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["diagnose", str(model_file), "--top", "0"])
    assert r.exit_code == 2


def test_parse_preprocess():
    assert parse_preprocess(None) is None and parse_preprocess("torch") == "torch"
    assert parse_preprocess("127.5/127.5") == ((127.5,), (127.5,))
    assert parse_preprocess("1,2,3/4,5,6") == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))


def test_the_group_takes_new_commands_with_the_shared_helpers():
    @main.command("probe-test")
    @data_options
    @reports_errors
    def probe(data, preprocess, limit, batch_size):
        raise ModelLoadError("probe.onnx: not a readable ONNX model")

    try:
        r = CliRunner().invoke(main, ["probe-test"])
        assert r.exit_code == 1 and r.output.strip() == "Error: probe.onnx: not a readable ONNX model"
    finally:
        main.commands.pop("probe-test")


def test_python_m_qfrewrite_diagnose_subprocess(model_file):
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "qfrewrite", "diagnose", str(model_file), "--top", "2"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "layers ranked by how badly per-tensor 8-bit weights hurt them" in p.stdout
    assert "Traceback" not in p.stderr
