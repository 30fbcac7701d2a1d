"""diagnose of quantized and float .tflite files: the planted MobileNet's outlier and zero channels found from the
stored codes of its int8 file, and from the weights alone (no BN scale to blame) in its float file."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import qfrewrite
from qfrewrite import recipes
from qfrewrite.analysis.tflite_int8 import FEW_LEVELS, Int8Diagnosis, _levels, is_quantized_tflite
from qfrewrite.cli import main
from qfrewrite.diagnose import Diagnosis, diagnose
from tests.planted import PLANTED_OUTLIERS, PLANTED_ZEROS, expected, planted_mobilenet


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The planted MobileNet as a float file and as int8 files with per-tensor and per-channel weights."""
    d = tmp_path_factory.mktemp("tflite")
    g = planted_mobilenet(np.random.default_rng(0))
    x = np.random.default_rng(1).normal(size=(8, 16, 16, 3)).astype(np.float32)
    out = {"float": d / "planted.tflite", "per_tensor": d / "planted_pt.tflite",
           "per_channel": d / "planted_pc.tflite"}
    qfrewrite.rewrite(g).to_tflite(out["float"])
    for w in ("per_tensor", "per_channel"):
        qfrewrite.rewrite(g, passes=recipes.plain(weights=w), data=x).to_tflite(out[w])
    return out


def test_levels_count_distinct_codes_per_channel():
    codes = np.array([[0, 0, 0, 0], [-1, 0, 1, 1], [-128, 127, 5, 5]], np.int8)
    assert _levels(codes, 128, 256).tolist() == [1, 3, 3]
    u = np.array([[0, 255, 255], [7, 7, 7]], np.uint8)
    assert _levels(u, 0, 256).tolist() == [2, 1]


def test_per_tensor_file_names_the_planted_channels(files):
    d = diagnose(files["per_tensor"])
    assert isinstance(d, Int8Diagnosis)
    layers = {ls.name: ls for ls in d.layers}
    assert set(layers) == {"stem", "dw1", "pw1", "dw2", "pw2", "dense"}
    for name, chans in PLANTED_OUTLIERS.items():
        assert layers[name].dominated and set(layers[name].outlier_channels) == set(chans), name
    for name, chans in PLANTED_ZEROS.items():  # all-zero channels use one level
        assert set(chans) <= set(layers[name].few_level_channels)
        assert all(layers[name].levels[c] == 1 for c in chans)
    assert not layers["pw2"].dominated and not layers["stem"].dominated
    assert {ls.name for ls in d.ranked()[:2]} == {"dw1", "dw2"}
    # the median channel of a dominated layer keeps only a few codes of 127
    assert layers["dw1"].median_reach < 127 / 8 and layers["pw2"].median_reach > 127 / 4
    text = d.render(top=6)
    assert "requantizing it loses accuracy" in text and "range set by channel(s) 11" in text
    assert "no BN scale is known" in text


def test_per_channel_file_has_no_range_domination_but_keeps_zero_channels(files):
    d = diagnose(files["per_channel"])
    layers = {ls.name: ls for ls in d.layers}
    assert all(ls.per_channel and not ls.dominated for ls in d.layers if ls.op != "FULLY_CONNECTED")
    assert set(PLANTED_ZEROS["dw2"]) <= set(layers["dw2"].few_level_channels)
    live = [c for c in range(layers["dw2"].channels) if c not in PLANTED_ZEROS["dw2"]]
    assert (layers["dw2"].spans[live] == 127).all()  # every live channel reaches the full range
    assert (layers["dw2"].levels[live] > FEW_LEVELS).all()


def test_json_has_one_entry_per_layer_with_scales_and_levels(files, tmp_path):
    js = tmp_path / "d.json"
    r = CliRunner().invoke(main, ["diagnose", str(files["per_tensor"]), "--json", str(js), "--plot",
                                  str(tmp_path / "d.png")])
    assert r.exit_code == 0, r.output
    doc = json.loads(js.read_text())
    assert doc["quantized"] and len(doc["layers"]) == 6
    dw1 = next(e for e in doc["layers"] if e["name"] == "dw1")
    assert dw1["weights"] == "per_tensor" and dw1["weight_scale"]["min"] == dw1["weight_scale"]["max"] > 0
    assert sorted(dw1["range_dominated_by"]) == [3, 11] and 7 in dw1["few_level_channels"]
    assert len(dw1["levels"]) == 16 and dw1["input"]["dtype"] == "int8"
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_convert_of_a_quantized_file_is_one_line_error(files, tmp_path):
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(imgs / "a.png")
    r = CliRunner().invoke(main, ["convert", str(files["per_tensor"]), "-o", str(tmp_path / "o.tflite"), "--data",
                                  str(imgs), "--preprocess", "127.5/127.5"])
    assert r.exit_code == 1
    assert "requantize" in r.output and "loses accuracy" in r.output and "diagnose" in r.output
    assert not (tmp_path / "o.tflite").exists()


def test_float_file_outliers_from_weights_alone(files):
    assert not is_quantized_tflite(files["float"]) and is_quantized_tflite(files["per_tensor"])
    d = diagnose(files["float"])
    assert isinstance(d, Diagnosis) and d.bn_folded_in_source
    got = {e["name"]: (e["outlier_channels"], e["zero_channels"]) for e in d.to_dict()["layers"]}
    want = {k: v for k, v in expected().items() if k != "dense"}
    assert {k: got[k] for k in want} == want
    text = d.render(top=3)
    assert "cannot be attributed to a BN scale" in text and "the BN scale causes it" not in text
    assert d.to_dict()["batchnorm_folded_in_source"] is True
    for e in d.to_dict()["layers"]:
        for o in e.get("outliers", []):
            assert "caused_by_bn" not in o


def test_a_source_with_batchnorm_keeps_its_bn_attribution():
    """The planted graph itself (BatchNorm present) still blames the BN scales: the tflite note is not general."""
    d = diagnose(planted_mobilenet(np.random.default_rng(0)))
    assert not d.bn_folded_in_source and "the BN scale causes it" in d.render(top=3)


def test_a_legacy_uint8_file_with_asymmetric_weights(tmp_path):
    """TensorFlow 1's converter in uint8 mode (dummy ranges): uint8 weights with a zero point, as old hub files."""
    tf = pytest.importorskip("tensorflow")
    tf1 = tf.compat.v1
    k = np.random.default_rng(0).normal(size=(3, 3, 3, 4)).astype(np.float32)
    k[..., 1] *= 50.0  # the channel that sets the range
    k[..., 2] = 0.0  # a channel with one level
    g = tf.Graph()
    with g.as_default():
        x = tf1.placeholder(tf.float32, (1, 8, 8, 3), name="input")
        y = tf.nn.relu6(tf.nn.conv2d(x, tf.constant(k), 1, "SAME"))
        with tf1.Session(graph=g) as sess:
            conv = tf1.lite.TFLiteConverter.from_session(sess, [x], [y])
            conv.inference_type = tf.uint8
            conv.quantized_input_stats = {"input": (128.0, 127.0)}
            conv.default_ranges_stats = (0.0, 6.0)
            path = tmp_path / "u8.tflite"
            path.write_bytes(conv.convert())
    with pytest.raises(qfrewrite.QuantizedModelError, match="uint8"):
        qfrewrite.load(path)
    d = diagnose(path)
    (layer,) = d.layers
    assert layer.dtype == "uint8" and not layer.per_channel and layer.zero_points[0] != 0
    assert layer.full_span == 255 and layer.levels[2] == 1 and layer.few_level_channels == [2]
    assert layer.outlier_channels == [1] and layer.spread > 10
    assert layer.input_quant == {"dtype": "uint8", "scale": pytest.approx(1 / 127), "zero_point": 128}
