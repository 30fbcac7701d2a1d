"""The pass manager's report as text, JSON and PNG."""
import json

import numpy as np
import pytest

import qfrewrite
from qfrewrite.analysis.channel_stats import graph_stats_summary
from qfrewrite.errors import QfrewriteError
from qfrewrite.instruments import ChannelStatistics, CollectReport
from qfrewrite.pass_infra import Context, PassManager
from qfrewrite.passes import CrossLayerEqualization, FoldBatchNorm
from qfrewrite.report import Report, jsonable
from tests.graphs import tiny_mobilenet
from tests.planted import planted_mobilenet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():
    g = planted_mobilenet(np.random.default_rng(0), zeros={}, dead_feeders=())
    return qfrewrite.rewrite(g, passes=[FoldBatchNorm(), CrossLayerEqualization(clip="exact")])


def test_report_holds_statistics_before_and_after_each_pass(result):
    rep = result.report
    assert [p.name for p in rep.passes] == ["FoldBatchNorm", "CrossLayerEqualization"]
    fbn, cle = rep["FoldBatchNorm"], rep["CrossLayerEqualization"]
    # the "as quantized" view: folding changes nothing, equalization shrinks the planted depthwise outliers
    assert fbn.stats_before["dw1"].spread == pytest.approx(fbn.stats_after["dw1"].spread, rel=1e-5)
    assert cle.stats_before is fbn.stats_after
    for dw in ("dw1", "dw2"):
        assert cle.stats_after[dw].spread < 0.5 * cle.stats_before[dw].spread
        assert cle.stats_after[dw].sqnr_db["per_tensor"] > cle.stats_before[dw].sqnr_db["per_tensor"]
    assert rep.first_stats is fbn.stats_before and rep.last_stats is cle.stats_after


def test_text_table(result):
    text = str(result.report)
    assert "\x1b[" not in text  # plain text, no colour codes
    for word in ("FoldBatchNorm", "CrossLayerEqualization", "dw spread", "dw1", "dw2", "->"):
        assert word in text
    first = result.report.first_stats.totals()["max_depthwise_spread"]
    last = result.report.last_stats.totals()["max_depthwise_spread"]
    assert f"{first:.3g} -> {last:.3g}" in text


def test_json(result):
    d = json.loads(result.report.to_json())
    assert [p["name"] for p in d["passes"]] == ["FoldBatchNorm", "CrossLayerEqualization"]
    cle = d["passes"][1]
    assert cle["stats_after"]["layers"]["dw1"]["spread"] < cle["stats_before"]["layers"]["dw1"]["spread"]
    assert cle["stats_before"]["totals"]["outlier_channels"] >= 4
    first, last = d["layers_first"]["dw1"], d["layers_last"]["dw1"]
    assert first["name"] == "dw1" and first["outlier_channels"] == [3, 11]
    assert len(first["per_channel"]["w_min"]) == 16 and len(last["per_channel"]["bn_scale"]) == 16
    np.testing.assert_allclose(np.subtract(first["per_channel"]["w_max"], first["per_channel"]["w_min"]).max(),
                               first["max_range"], rtol=1e-6)  # float32 resolution in the JSON


def test_plot_writes_a_png_atomically(result, tmp_path):
    out = tmp_path / "sub" / "report.png"
    result.report.plot(out)
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["report.png"]  # no temporary file left


def test_report_with_a_custom_hook_or_no_statistics(rng):
    collect = CollectReport()
    PassManager([FoldBatchNorm()], instruments=[ChannelStatistics(graph_stats_summary), collect]).run(
        tiny_mobilenet(rng), Context())
    report = collect.report
    d = json.loads(report.to_json())
    assert "layers_first" not in d and d["passes"][0]["stats_after"]
    assert "FoldBatchNorm" in str(report) and "dw spread" not in str(report)
    with pytest.raises(QfrewriteError, match="statistics"):
        report.plot("never-written.png")
    bare = CollectReport()
    PassManager([FoldBatchNorm()], instruments=[bare]).run(tiny_mobilenet(rng), Context())
    assert bare.report[0].stats_before is None and "FoldBatchNorm" in str(bare.report)
    assert str(Report()) == "(no pass ran)"


def test_jsonable_handles_numpy_and_non_finite_values():
    x = {"a": np.float32(1.5), "b": np.arange(3), "c": float("inf"), "d": (np.int64(2), None), 3: np.bool_(True),
         "e": [float("nan")]}
    assert jsonable(x) == {"a": 1.5, "b": [0, 1, 2], "c": "inf", "d": [2, None], "3": True, "e": ["nan"]}
    json.dumps(jsonable(x))
