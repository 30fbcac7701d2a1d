"""Per-channel histograms: exact per-channel re-binning, a pooled histogram that follows a per-channel rescaling,
and the activation statistics that equalization and bias correction hand on instead of another calibration pass."""
from __future__ import annotations

import numpy as np
import pytest

from qfrewrite.data import CalibrationSet
from qfrewrite.ir import Op, set_kernel
from qfrewrite.numerics.ranges import mse_range
from qfrewrite.pass_infra import Context, PassManager
from qfrewrite.quant.channel_histograms import ChannelHistograms
from qfrewrite.quant.observers import TensorObserver
from qfrewrite.spec import QuantSpec


def _feed(h: ChannelHistograms, chunks):
    for x in chunks:
        flat = x.reshape(-1, x.shape[-1])
        h.update(x, flat.min(0), flat.max(0))


def _channel_chunks(rng, channels=5):
    scales = np.geomspace(0.01, 30.0, channels)
    chunks = [np.maximum(rng.normal(0.2, s, size=(3, 7, channels)), 0.0) * scales for s in (0.1, 1.0, 3.0)]
    chunks.append(rng.normal(-1.0, 2.0, size=(2, 7, channels)) * scales)  # the range grows to the left too
    return [c.astype(np.float32) for c in chunks], scales


def test_each_channel_regrows_exactly(rng):
    chunks, _ = _channel_chunks(rng)
    h = ChannelHistograms(5, bins=64)
    _feed(h, chunks)
    flat = np.concatenate([c.reshape(-1, 5) for c in chunks])
    for c in range(5):
        edges = h.lo[c] + h.width[c] * np.arange(65)
        values = flat[:, c][flat[:, c] != 0]  # exact zeros are counted apart
        ref, _ = np.histogram(values, bins=edges)
        assert h.counts[c].sum() == len(values)
        assert np.abs(h.counts[c] - ref).sum() <= 2  # values within float rounding of an edge may land one over
        assert h.lo[c] <= min(flat[:, c].min(), 0.0) and h.hi[c] >= flat[:, c].max()
    np.testing.assert_array_equal(h.zeros, np.sum(flat == 0, axis=0))


@pytest.mark.parametrize("factor", [np.ones(5), np.geomspace(50.0, 0.02, 5)])
def test_pooled_histogram_follows_a_per_channel_scaling(rng, factor):
    """The pooled histogram of the rescaled channels equals the histogram of the rescaled values up to where inside
    a channel's bin its values lie: at every pooled edge the cumulative counts differ by at most one source bin per
    channel; totals and exact zeros are exact, and the MSE range chosen on it is the one chosen on the values."""
    chunks, _ = _channel_chunks(rng)
    h = ChannelHistograms(5, bins=128)
    _feed(h, chunks)
    flat = np.concatenate([c.reshape(-1, 5) for c in chunks]).astype(np.float64) * factor
    counts, lo, hi = h.rescaled(factor).pooled(512)
    assert lo == pytest.approx(min(flat.min(), 0.0)) and hi == pytest.approx(flat.max())
    assert counts.sum() == pytest.approx(flat.size)
    nz = flat[flat != 0]
    ref, edges = np.histogram(nz, bins=np.linspace(lo, hi, 513))
    zero_bin = int(np.floor(-lo / ((hi - lo) / 512)))
    ref = ref.astype(np.float64)
    ref[min(zero_bin, 511)] += flat.size - nz.size
    gap = np.abs(np.cumsum(counts) - np.cumsum(ref)).max()
    assert gap <= h.counts.max(axis=1).sum()
    zeros = float(flat.size - nz.size)
    full = np.histogram(flat.ravel(), bins=np.linspace(lo, hi, 4097))[0]
    a = mse_range(counts, lo, hi, flat.min(), flat.max(), zeros=zeros)
    b = mse_range(full, lo, hi, flat.min(), flat.max(), zeros=zeros)
    assert a == pytest.approx(b, abs=0.02 * (hi - lo))


def test_rescaling_refuses_what_it_cannot_follow(rng):
    x = rng.normal(size=(4, 6, 3)).astype(np.float32)
    with_channels = TensorObserver("a", bins=64, channel_bins=32)
    pooled_only = TensorObserver("b", bins=64)
    for o in (with_channels, pooled_only):
        o.update(x)
    stats = with_channels.result()
    with pytest.raises(ValueError, match="positive"):
        stats.rescaled(np.array([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match="per-channel histograms"):
        pooled_only.result().rescaled(np.ones(3))
    moved = stats.rescaled(np.array([2.0, 0.5, 1.0]))
    np.testing.assert_allclose(moved.channel_max, stats.channel_max * [2.0, 0.5, 1.0])
    assert moved.zeros == stats.zeros and moved.hist.sum() == pytest.approx(stats.hist.sum())
    assert stats.rescaled(np.ones(3)).hist.sum() == pytest.approx(stats.hist.sum())


def _quantized_ranges(graph, ctx, passes):
    from qfrewrite.passes import InsertFakeQuant

    res = PassManager(list(passes) + [InsertFakeQuant()]).run(graph, ctx)
    return next(r for r in res.nested if r.name == "InsertFakeQuant").stats["ranges"]


def test_equalization_and_bias_correction_hand_on_the_shared_calibration(rng, monkeypatch):
    """With the statistics of one shared calibration pass in the context, CrossLayerEqualization (fused clip) and
    CorrectBias hand them on, rescaled and unchanged, and InsertFakeQuant runs no pass of its own over the data. Its
    ranges are those of a fresh calibration of the equalized graph (bias correction moves the float graph away from
    what the int8 model computes, so the fresh reference is the graph before it)."""
    from qfrewrite.analysis.calibration_pass import calibration_statistics, serve
    from qfrewrite.passes import CorrectBias, CrossLayerEqualization, FoldBatchNorm
    from qfrewrite.quant import observers
    from tests.graphs import tiny_mobilenet

    g = tiny_mobilenet(rng, width=8)
    FoldBatchNorm()(g)
    for node in g.find(Op.DEPTHWISE_CONV2D):  # channel ranges over two decades: the equalization has work to do
        set_kernel(g, node, node.weight.const * np.geomspace(0.05, 5.0, 8)[None, None, :, None], "spread")
    x = rng.normal(size=(24, 16, 16, 3)).astype(np.float32)
    spec = QuantSpec(weights="per_tensor")

    shared = g.copy()
    ctx = Context(CalibrationSet([x[:12], x[12:]]), spec=spec)
    serve(ctx, shared, calibration_statistics(shared, ctx.data))
    calls = []
    real = observers.observe
    monkeypatch.setattr(observers, "observe", lambda *a, **k: calls.append(1) or real(*a, **k))
    handed_on = _quantized_ranges(shared, ctx, [CrossLayerEqualization(clip="fused"), CorrectBias()])
    assert calls == []  # no second pass over the data
    monkeypatch.setattr(observers, "observe", real)

    fresh = g.copy()
    res = CrossLayerEqualization(clip="fused")(fresh, Context(CalibrationSet([x])))
    assert res.modified and res.stats["max_scale"] > 1.5
    reference = _quantized_ranges(fresh, Context(CalibrationSet([x]), spec=spec), [])
    assert set(handed_on) == set(reference)
    for name, (lo, hi) in reference.items():
        span = hi - lo
        assert handed_on[name][0] == pytest.approx(lo, abs=0.02 * span), name
        assert handed_on[name][1] == pytest.approx(hi, abs=0.02 * span), name


def test_padded_and_reshaped_values_follow_from_their_inputs(rng):
    """The shared pass does not read a constant Pad's or a channel-keeping reshape's output: their extremes and mean
    maps, derived from the input's, equal what observing them gives."""
    import unittest.mock as mock

    from qfrewrite.analysis.calibration_pass import calibration_statistics, map_names, observed_names
    from qfrewrite.backend import executor
    from qfrewrite.ir import ClipAttrs, ConvAttrs, GlobalMeanAttrs, Graph, PadAttrs, ReshapeAttrs
    from qfrewrite.quant import observers

    g = Graph("padded")
    x = g.add_input("x", (None, 9, 9, 3))
    y = g.add_node(Op.CONV2D, [x, g.const(rng.normal(size=(1, 1, 3, 4))), g.const(rng.normal(size=4))],
                   ConvAttrs()).output
    y = g.add_node(Op.CLIP, [y], ClipAttrs(0.0, 6.0)).output
    y = g.add_node(Op.PAD, [y], PadAttrs(((1, 0), (0, 1))), name="pad").output
    y = g.add_node(Op.DEPTHWISE_CONV2D, [y, g.const(rng.normal(size=(3, 3, 4, 1))), g.const(rng.normal(size=4))],
                   ConvAttrs((2, 2), "VALID")).output
    y = g.add_node(Op.RELU, [y]).output
    y = g.add_node(Op.GLOBAL_MEAN, [y], GlobalMeanAttrs(keepdims=True)).output
    y = g.add_node(Op.RESHAPE, [y], ReshapeAttrs((4,)), name="flat").output
    y = g.add_node(Op.DENSE, [y, g.const(rng.normal(size=(4, 3))), g.const(rng.normal(size=3))]).output
    g.outputs = [y]
    data = CalibrationSet([rng.normal(size=(6, 9, 9, 3)).astype(np.float32)])
    read = []

    class Recording(executor.ReducingExecutor):
        def __init__(self, graph, reductions, **kw):
            read.extend(reductions)
            super().__init__(graph, reductions, **kw)

    with mock.patch.object(executor, "ReducingExecutor", Recording):
        stats = calibration_statistics(g, data)
    pad, flat = g.node("pad").output.name, g.node("flat").output.name
    assert {pad, flat} <= set(stats) and not {pad, flat} & set(read) and read
    truth = observers.observe(g, data.batches(), observed_names(g), maps=map_names(g))
    for name in observed_names(g):
        np.testing.assert_allclose(stats[name].channel_min, truth[name].channel_min, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(stats[name].channel_max, truth[name].channel_max, rtol=1e-6, atol=1e-6)
        assert stats[name].count == truth[name].count
        if truth[name].map_mean is not None:
            np.testing.assert_allclose(stats[name].map_mean, truth[name].map_mean, rtol=1e-5, atol=1e-6)


def test_a_calibration_pass_fed_in_two_parts_is_one_pass_over_both():
    """CalibrationPass fed a then b gives the statistics of one pass over a + b (extremes, counts, mean maps, every
    histogrammed value), and the statistics it gave after a are not changed by feeding b (the per-channel histograms
    a result holds stay as they were)."""
    from qfrewrite.analysis.calibration_pass import CalibrationPass, calibration_statistics
    from qfrewrite.passes import FoldBatchNorm
    from tests.quant_graphs import dead_channel_mobilenet

    rng = np.random.default_rng(5)
    g = FoldBatchNorm().run(dead_channel_mobilenet(rng, pad="VALID"), Context()).graph
    x = rng.normal(size=(20, 12, 12, 3)).astype(np.float32)
    a, b = CalibrationSet([x[:14]]), CalibrationSet([x[14:]])
    parts = CalibrationPass(g, 20)
    first = parts.feed(a).statistics()
    before = {n: s.channel_hist.counts.copy() for n, s in first.items() if s.channel_hist is not None}
    both = parts.feed(b).statistics()
    assert parts.images == 20 and before
    once = calibration_statistics(g, CalibrationSet([x]))
    for name, truth in once.items():
        got = both[name]
        np.testing.assert_array_equal(got.channel_min, truth.channel_min)
        np.testing.assert_array_equal(got.channel_max, truth.channel_max)
        assert got.count == truth.count and got.zeros == truth.zeros
        if truth.map_mean is not None:
            np.testing.assert_allclose(got.map_mean, truth.map_mean, rtol=1e-6, atol=1e-7)
        if truth.hist is not None:
            assert got.hist.sum() == truth.hist.sum()
            assert got.channel_hist.counts.sum() == truth.channel_hist.counts.sum()
    for name, counts in before.items():
        np.testing.assert_array_equal(first[name].channel_hist.counts, counts)
        assert both[name].channel_hist.counts.sum() > counts.sum()
