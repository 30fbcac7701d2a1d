"""diagnose: exactly the planted channels, nothing on a clean model, JSON/text/PNG, never changing the model."""
import json

import numpy as np
import pytest

from qfrewrite.diagnose import HURT_DB, diagnose, layer_suggestions
from qfrewrite.errors import DataError, ModelLoadError
from qfrewrite.ir import Op
from tests.planted import PLANTED_OUTLIERS, expected, planted_mobilenet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _by_name(d):
    return {e["name"]: e for e in d["layers"]}


def test_diagnose_names_exactly_the_planted_channels(rng, tmp_path):
    g = planted_mobilenet(rng)
    consts = {v.name: v.const.copy() for v in g.values() if v.is_const}
    diag = diagnose(g)
    d = json.loads(diag.to_json(tmp_path / "d.json"))
    assert json.loads((tmp_path / "d.json").read_text()) == d
    layers = _by_name(d)
    assert len(d["layers"]) == 6 and [e["rank"] for e in d["layers"]] == list(range(1, 7))
    assert {n: (e["outlier_channels"], e["zero_channels"]) for n, e in layers.items()} == expected()
    # the two planted depthwise layers are ranked worst, and hurt by per-tensor weights
    assert {e["name"] for e in d["layers"][:2]} == {"dw1", "dw2"}
    assert layers["dw1"]["hurt"] and layers["dw1"]["per_tensor_loss_db"] >= HURT_DB
    # outliers carry their values and the BN scale that causes them
    for name, chans in PLANTED_OUTLIERS.items():
        details = {o["channel"]: o for o in layers[name]["outliers"]}
        assert sorted(details) == sorted(chans)
        for c in chans:
            o = details[c]
            assert o["caused_by_bn"] and o["bn_scale_over_median"] > 10
            assert o["range"] == pytest.approx(layers[name]["per_channel"]["w_max"][c]
                                               - layers[name]["per_channel"]["w_min"][c])
    assert {o["channel"]: o.get("reads_dead_input_of") for o in layers["dw2"]["outliers"]} == {5: "pw1", 22: None}
    # suggestions: dead channels -> FoldDeadChannels, spread -> CLE, hurt -> per-channel weights and CorrectBias
    passes = {s["pass"]: s for s in d["suggestions"]}
    assert list(passes)[0] == "FoldBatchNorm"
    assert set(passes["FoldDeadChannels"]["layers"]) == {"dw1", "pw1", "dw2"}
    assert set(passes["CrossLayerEqualization"]["layers"]) >= {"dw1", "dw2"}
    assert {"dw1", "dw2"} <= set(passes["CorrectBias"]["layers"]) == set(passes["per-channel weights"]["layers"])
    # the model is untouched
    assert len(g.find(Op.BATCH_NORM)) == 5
    for v in g.values():
        if v.is_const:
            np.testing.assert_array_equal(v.const, consts[v.name])


def test_text_names_the_channels_and_their_bn_scales(rng):
    text = diagnose(planted_mobilenet(rng)).render(top=3)
    assert "\x1b[" not in text
    assert "outlier channel 3:" in text and "outlier channel 11:" in text and "outlier channel 5:" in text
    assert "the BN scale causes it" in text and "reads a dead channel of pw1" in text
    assert "all-zero channels: 2, 20" in text
    assert "FoldDeadChannels" in text and "CrossLayerEqualization" in text and "CorrectBias" in text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_model_reports_no_channel_and_no_dead_channel_fix(seed):
    g = planted_mobilenet(np.random.default_rng(seed), outliers={}, zeros={}, dead_feeders=())
    diag = diagnose(g)
    d = diag.to_dict()
    for e in d["layers"]:
        assert e["outlier_channels"] == [] and e["zero_channels"] == [] and e["near_zero_channels"] == []
        assert e["outliers"] == [] and not e["hurt"]
    assert [s["pass"] for s in d["suggestions"]] in (["FoldBatchNorm"], ["FoldBatchNorm", "CrossLayerEqualization"])
    assert "outlier and zero channels" not in diag.render()


def test_layer_suggestions_follow_the_documented_thresholds(rng):
    stats = diagnose(planted_mobilenet(rng, outliers={}, zeros={}, dead_feeders=())).stats
    ls = stats["pw2"]
    ls.spread, ls.sqnr_db = 3.9, {"per_tensor": 40.0, "per_channel": 40.0 + HURT_DB - 0.01}
    assert layer_suggestions(ls) == []
    ls.spread, ls.sqnr_db = 4.0, {"per_tensor": 40.0, "per_channel": 40.0 + HURT_DB}
    assert [s["pass"] for s in layer_suggestions(ls)] == ["CrossLayerEqualization", "per-channel weights",
                                                          "CorrectBias"]
    ls.near_zero_channels = [1]
    assert layer_suggestions(ls)[0]["pass"] == "FoldDeadChannels"


def test_plot(rng, tmp_path):
    path = diagnose(planted_mobilenet(rng)).plot(tmp_path / "d.png", top=3)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_with_data_adds_activation_ranges(rng):
    g = planted_mobilenet(rng, hw=8)
    x = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    diag = diagnose(g, x)
    d = diag.to_dict()
    assert d["data"] == {"name": "array", "images": 4}
    e = _by_name(d)["dw1"]
    assert len(e["per_channel"]["act_max"]) == 16 and max(e["per_channel"]["act_max"]) <= 6.0
    assert e["act_spread"] is not None and "act range" not in diag.render()  # the measured harm takes its place
    assert "act range" in diagnose(g, x, harm=False).render()


def test_bad_input_raises_typed_errors(rng, tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        diagnose(tmp_path / "missing.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="bad.h5"):
        diagnose(bad)
    with pytest.raises(DataError):
        diagnose(planted_mobilenet(rng), np.zeros((2, 5, 5, 3), np.float32))
