"""Per-channel statistics: the range rules, the BN-folded view, the weight SQNR, activations and caching."""
import numpy as np
import pytest

from qfrewrite.analysis import channel_math as cm
from qfrewrite.analysis.channel_stats import (ChannelStats, compute_channel_stats, graph_stats_summary,
                                              weight_channel_ranges)
from qfrewrite.ir import ConvAttrs, Graph, Op
from qfrewrite.numerics.quantize import fake_quant_np, kernel_channels_last, symmetric_weight_attrs
from qfrewrite.instruments import ChannelStatistics, CollectReport
from qfrewrite.pass_infra import Context, Pass, PassManager, PassResult, Skip
from qfrewrite.passes import FoldBatchNorm
from tests.graphs import tiny_mobilenet
from tests.planted import expected, planted_mobilenet


# -- the rules on plain arrays ---------------------------------------------------------------------------------------
def test_outlier_rule_flags_a_wide_channel_among_similar_ones():
    r = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 10.0, 1.0, 0.98])
    assert cm.outlier_channels(r).tolist() == [5]


def test_outlier_rule_needs_four_times_the_median_even_when_ranges_are_uniform():
    r = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 3.9])  # MAD == 0: only the ratio gate decides
    assert cm.outlier_channels(r).size == 0
    r[-1] = 4.0
    assert cm.outlier_channels(r).tolist() == [5]


def test_outlier_rule_is_scale_free_and_ignores_small_ranges():
    rng = np.random.default_rng(1)
    r = rng.lognormal(0.0, 0.2, 64)
    r[[7, 40]] = [30.0, 50.0]
    r[12] = 0.01  # a small range hurts nobody: not an outlier
    for scale in (1e-4, 1.0, 1e3):
        assert cm.outlier_channels(r * scale).tolist() == [7, 40]


def test_widely_spread_ranges_have_no_outlier_without_a_gap():
    r = np.geomspace(0.1, 10.0, 50)  # a smooth 100x spread: large spread, but no channel stands out
    assert cm.outlier_channels(r).size == 0 and cm.spread(r) > 4


def test_fewer_than_three_live_channels_give_no_outlier():
    assert cm.outlier_channels(np.array([1.0, 100.0])).size == 0
    assert cm.outlier_channels(np.array([0.0, 0.0, 1.0, 100.0])).size == 0


def test_zero_and_near_zero_channels_and_spread():
    w_min = np.array([-1.0, 0.0, -1e-9, -0.5, -1.0])
    w_max = np.array([1.0, 0.0, 1e-9, 0.5, 3.0])
    r = w_max - w_min
    assert cm.zero_channels(w_min, w_max).tolist() == [1]
    assert cm.near_zero_channels(r).tolist() == [2]  # below median / 255
    assert cm.live_mask(r).tolist() == [True, False, False, True, True]
    # the median is over the non-zero channels: (2e-9, 1, 2, 4) -> 1.5
    assert cm.median_range(r) == pytest.approx(1.5)
    assert cm.spread(r) == pytest.approx(4.0 / 1.5)
    assert cm.spread(np.zeros(3)) == np.inf


def test_channel_sqnr_matches_its_definition():
    rng = np.random.default_rng(0)
    flat = rng.normal(size=(9, 4))
    flat[:, 2] *= 20.0
    q_pt = cm.quantize_symmetric(flat, per_channel=False)
    q_pc = cm.quantize_symmetric(flat, per_channel=True)
    for q in (q_pt, q_pc):
        want = 10 * np.log10((flat ** 2).sum(0) / ((flat - q) ** 2).sum(0))
        np.testing.assert_allclose(cm.channel_sqnr_db(flat, q), want, rtol=1e-12)
    # the wide channel sets the per-tensor step: the others lose about 20 log10(20) = 26 dB
    loss = cm.channel_sqnr_db(flat, q_pc) - cm.channel_sqnr_db(flat, q_pt)
    assert np.all(loss[[0, 1, 3]] > 20) and abs(loss[2]) < 1e-9
    z = np.zeros((9, 1))
    assert np.isnan(cm.channel_sqnr_db(z, z)[0]) and np.isinf(cm.channel_sqnr_db(np.ones((9, 1)), np.ones((9, 1))))[0]


# -- layer statistics on graphs --------------------------------------------------------------------------------------
def test_folded_view_equals_the_weights_after_fold_batchnorm(rng):
    g = planted_mobilenet(rng)
    view = compute_channel_stats(g, fold_bn=True)
    folded = g.copy()
    assert FoldBatchNorm()(folded).modified
    after = compute_channel_stats(folded, fold_bn=True)
    assert list(view) == list(after)
    for name, ls in view.items():
        node = folded.node(name)
        r = weight_channel_ranges(node)
        np.testing.assert_allclose(ls.w_min, r[:, 0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ls.w_max, r[:, 1], rtol=1e-6, atol=1e-7)
        assert ls.outlier_channels == after[name].outlier_channels
        assert ls.zero_channels == after[name].zero_channels
        assert ls.sqnr_db["per_tensor"] == pytest.approx(after[name].sqnr_db["per_tensor"], abs=1e-3)
        if name != "dense":  # the BN scale: from the BatchNorm node before folding, from meta after
            bn = g.node(name + "_bn")
            gamma, _, _, var = (v.const.astype(np.float64) for v in bn.inputs[1:5])
            np.testing.assert_allclose(ls.bn_scale, gamma / np.sqrt(var + 1e-3), rtol=1e-6)
            np.testing.assert_allclose(after[name].bn_scale, ls.bn_scale, rtol=1e-6)
            assert ls.bn_folded_here and not after[name].bn_folded_here
    assert len(g.find(Op.BATCH_NORM)) == 5  # the statistics never change the graph


def test_planted_channels_are_found_exactly_and_only_in_the_folded_view(rng):
    g = planted_mobilenet(rng)
    stats = compute_channel_stats(g, fold_bn=True)
    got = {ls.source_name: (ls.outlier_channels, ls.zero_channels) for ls in stats.values()}
    assert got == expected()
    assert all(not ls.near_zero_channels for ls in stats.values())
    assert stats["dw2"].dead_inputs == {5: "pw1"}
    details = {d["channel"]: d for d in stats["dw2"].outlier_details()}
    assert details[5]["caused_by_bn"] and details[22]["caused_by_bn"]
    assert details[5]["reads_dead_input_of"] == "pw1" and "reads_dead_input_of" not in details[22]
    assert details[5]["bn_scale_over_median"] > 10
    # the raw kernels are ordinary: the outliers come from the BatchNorm scales
    raw = compute_channel_stats(g, fold_bn=False)
    assert raw["dw1"].outlier_channels == [] and raw["dw2"].outlier_channels == []
    assert raw["dw1"].zero_channels == [7]
    # per-tensor weights hurt the planted layers most
    assert [ls.source_name for ls in stats.ranked()[:2]] == ["dw1", "dw2"] or \
        [ls.source_name for ls in stats.ranked()[:2]] == ["dw2", "dw1"]


@pytest.mark.parametrize("seed", range(8))
def test_clean_model_has_no_outlier_zero_or_near_zero_channel(seed):
    g = planted_mobilenet(np.random.default_rng(seed), outliers={}, zeros={}, dead_feeders=())
    stats = compute_channel_stats(g)
    for ls in stats.values():
        assert ls.outlier_channels == [] and ls.zero_channels == [] and ls.near_zero_channels == []
        assert ls.dead_inputs == {}


def test_sqnr_agrees_with_the_weight_quantization_of_insert_fakequant(rng):
    g = tiny_mobilenet(rng, bn=False)
    stats = compute_channel_stats(g)
    for node in g.find(Op.CONV2D, Op.DEPTHWISE_CONV2D, Op.DENSE):
        flat = kernel_channels_last(node)
        for mode, per_channel in (("per_tensor", False), ("per_channel", True)):
            a = symmetric_weight_attrs(node, per_channel)
            q = fake_quant_np(flat, np.array(a.lo), np.array(a.hi), narrow_range=True).astype(np.float64)
            want = 10 * np.log10((flat.astype(np.float64) ** 2).sum() / ((flat - q) ** 2).sum())
            assert stats[node.name].tensor_sqnr_db[mode] == pytest.approx(want, abs=1e-3)
        assert stats[node.name].sqnr_db["per_channel"] >= stats[node.name].sqnr_db["per_tensor"] - 1e-9


def test_depthwise_multiplier_and_dead_inputs():
    rng = np.random.default_rng(3)
    g = Graph()
    x = g.add_input("x", (None, 8, 8, 3))
    k1 = rng.normal(size=(1, 1, 3, 4))
    k1[..., 1] = 0.0
    c = g.add_node(Op.CONV2D, [x, g.const(k1)], ConvAttrs(), name="pw")
    y = g.add_node(Op.PAD, [c.output], name="pad").output
    dw = g.add_node(Op.DEPTHWISE_CONV2D, [y, g.const(rng.normal(size=(3, 3, 4, 2)))], ConvAttrs(), name="dw")
    g.outputs = [dw.output]
    stats = compute_channel_stats(g)
    assert stats["pw"].zero_channels == [1]
    assert stats["dw"].channels == 8 and stats["dw"].dead_inputs == {2: "pw", 3: "pw"}
    k = g.node("dw").weight.const.reshape(9, 8)
    np.testing.assert_array_equal(stats["dw"].w_max, k.max(0))


def test_graph_stats_summary_keeps_its_keys(rng):
    g = planted_mobilenet(rng)
    s = graph_stats_summary(g)
    assert set(s) == {"stem", "dw1", "pw1", "dw2", "pw2", "dense"}
    assert s["dw2"]["zero_channels"] == 2 and s["dw1"]["max_range"] > 0 and s["dw1"]["spread"] >= 1


# -- activations and caching -----------------------------------------------------------------------------------------
def test_activation_ranges_match_the_executor(rng):
    from qfrewrite.backend.executor import Executor
    from qfrewrite.data import CalibrationSet

    g = planted_mobilenet(rng, hw=8)
    x = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    ctx = Context(data=CalibrationSet([x[:4], x[4:]]))
    assert compute_channel_stats(g, ctx, activations="auto").with_activations is False  # nothing cached yet
    stats = ctx.analysis(ChannelStats(activations="always"), g)
    assert stats.with_activations
    names = [ls.act_tensor for ls in stats.values()]
    assert names[0] == "stem_relu6:0" and names[-1] == g.outputs[0].name
    _, taps = Executor(g, taps=names)(x)
    for ls in stats.values():
        t = taps[ls.act_tensor].reshape(-1, ls.channels)
        np.testing.assert_allclose(ls.act_min, t.min(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ls.act_max, t.max(0), rtol=1e-6, atol=1e-6)
    # now cached: "auto" picks them up
    assert compute_channel_stats(g, ctx, activations="auto").with_activations


class _Counting(ChannelStats):
    calls = 0

    def compute(self, graph, ctx):
        type(self).calls += 1
        return super().compute(graph, ctx)


class _NoOp(Pass):
    def run(self, graph, ctx):
        return PassResult(graph, False, {}, [Skip(None, "nothing to do")])


def test_pass_manager_caches_the_statistics_until_a_pass_modifies(rng):
    g = planted_mobilenet(rng)
    _Counting.calls = 0
    ctx = Context()
    collect = CollectReport()
    res = PassManager([_NoOp(), _NoOp(), FoldBatchNorm(), _NoOp()],
                      instruments=[ChannelStatistics(_Counting()), collect]).run(g, ctx)
    assert res.modified
    assert _Counting.calls == 2  # before the first pass and after FoldBatchNorm: never for a no-op
    rep = collect.report
    assert rep[0].stats_before is rep[1].stats_after is rep[2].stats_before
    assert rep[2].stats_after is not rep[2].stats_before and rep[3].stats_before is rep[2].stats_after
    assert ctx.analysis(_Counting(), g) is rep[3].stats_after and _Counting.calls == 2


def test_a_plain_callable_hook_still_works(rng):
    g = tiny_mobilenet(rng)
    collect = CollectReport()
    PassManager([FoldBatchNorm()], instruments=[ChannelStatistics(graph_stats_summary), collect]).run(g, Context())
    rep = collect.report
    assert isinstance(rep[0].stats_after, dict) and rep[0].stats_after != rep[0].stats_before
