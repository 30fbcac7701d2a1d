"""Streaming activation observers: histograms that re-bin exactly, per-channel statistics, caching."""
from __future__ import annotations

import numpy as np
import pytest

from qfrewrite.backend.executor import Executor
from qfrewrite.data import CalibrationSet
from qfrewrite.errors import DataError
from qfrewrite.ir import Op
from qfrewrite.pass_infra import Context
from qfrewrite.quant.observers import (ActivationStats, StreamingHistogram, TensorObserver, activation_names,
                                       activation_stats, observe)
from tests.graphs import tiny_mobilenet


def test_histogram_regrowth_matches_one_histogram_of_everything():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(0.5, 0.1, 1000), rng.normal(0, 1, 5000), rng.normal(3, 2, 5000), rng.uniform(-9, 0, 100)]
    h = StreamingHistogram(bins=256)
    for c in chunks:
        h.update(c.astype(np.float32))
    data = np.concatenate(chunks)
    assert h.lo <= data.min() and h.hi >= data.max() and h.lo <= 0.0
    assert h.counts.sum() == data.size
    ref, _ = np.histogram(data, bins=h.edges)
    # exact re-binning: only values within float rounding of a bin edge may land one bin over
    assert np.abs(h.counts - ref).sum() <= 4


def test_histogram_growth_keeps_the_grid_on_the_data():
    """A two-sided stream whose minimum falls a little in every chunk: each growth fits the grid to what it holds, so
    the values span at least half the bins at the end (keeping the old extent doubled the span at every growth, and
    ten growths left the values on a few of the 256 bins), and the counts stay exact."""
    rng = np.random.default_rng(3)
    h = StreamingHistogram(bins=256)
    chunks = [np.concatenate([rng.uniform(-1.0 - 0.05 * i, 1.0, 500), [-1.0 - 0.05 * i]]) for i in range(10)]
    for c in chunks:
        h.update(c.astype(np.float32))
    data = np.concatenate(chunks)
    assert h.lo <= data.min() and h.hi >= data.max() and h.counts.sum() == data.size
    assert (data.max() - data.min()) / (h.hi - h.lo) > 0.5
    ref, _ = np.histogram(data, bins=h.edges)
    assert np.abs(h.counts - ref).sum() <= 4


def test_histogram_constant_and_zero_data():
    h = StreamingHistogram(bins=16)
    h.update(np.zeros(10, np.float32))
    h.update(np.zeros(5, np.float32))
    assert h.counts.sum() == 15 and h.width > 0
    h.update(np.full(3, 2.0, np.float32))
    assert h.hi >= 2.0 and h.counts.sum() == 18


def test_tensor_observer_channel_statistics():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(3, 4, 4, 5)).astype(np.float32) * np.arange(1, 6) for _ in range(4)]
    xs[2][0, 0, 0, 1] = 0.0
    o = TensorObserver("t", bins=64)
    for x in xs:
        o.update(x)
    s = o.result()
    flat = np.concatenate(xs).reshape(-1, 5)
    np.testing.assert_allclose(s.channel_min, flat.min(0))
    np.testing.assert_allclose(s.channel_max, flat.max(0))
    assert s.min == flat.min() and s.max == flat.max() and s.count == len(flat)
    assert s.zeros == int(np.sum(flat == 0)) and s.hist.sum() == flat.size


def test_observe_graph_matches_executor_and_is_chunk_invariant():
    rng = np.random.default_rng(2)
    g = tiny_mobilenet(rng)
    x = rng.normal(size=(10, 16, 16, 3)).astype(np.float32)
    names = activation_names(g)
    assert names[0] == g.inputs[0].name and len(names) == len(g) + 1
    a = observe(g, [x[:4], x[4:]], names, chunk=3, bins=128)
    b = observe(g, [x], names, chunk=10, bins=128)
    clip = g.find(Op.CLIP)[1].output.name
    _, taps = Executor(g, taps=[clip])(x)
    t = taps[clip].reshape(-1, taps[clip].shape[-1])
    for s in (a[clip], b[clip]):
        np.testing.assert_allclose(s.channel_max, t.max(0), rtol=1e-5)
    np.testing.assert_allclose(a[clip].channel_min, b[clip].channel_min, rtol=1e-5, atol=1e-6)
    assert a[g.inputs[0].name].max == x.max()
    assert b[clip].zeros == int(np.sum(t == 0))


def test_analysis_cached_in_context_and_invalidated():
    rng = np.random.default_rng(3)
    g = tiny_mobilenet(rng)
    ctx = Context(CalibrationSet([rng.normal(size=(4, 16, 16, 3))]))
    every = activation_stats(g, ctx)
    assert ctx.cached(ActivationStats().name, g)
    sub = activation_stats(g, ctx, [g.inputs[0].name])
    assert sub[g.inputs[0].name] is every[g.inputs[0].name]  # served from the cache
    ctx.invalidate()
    assert not ctx.cached(ActivationStats().name, g)
    with pytest.raises(DataError, match="calibration data"):
        activation_stats(g, Context())


def test_histogram_row_sampling_keeps_exact_moments_and_range():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    x[3, 31, 31, 2] = 50.0  # an extreme value on a row the stride may skip
    full, sampled = TensorObserver("a", 256), TensorObserver("b", 256, hist_rows=500)
    full.update(x)
    sampled.update(x)
    a, b = full.result(), sampled.result()
    np.testing.assert_array_equal(a.channel_max, b.channel_max)
    np.testing.assert_array_equal(a.channel_min, b.channel_min)
    assert b.hist_hi >= 50.0 and sampled.hist_count < full.hist_count // 4 and b.hist.sum() == sampled.hist_count
    # the sampled histogram has the shape of the full one
    assert np.abs(a.hist / a.hist.sum() - b.hist / b.hist.sum()).sum() < 0.1


def test_reduced_sample_is_the_strided_positions():
    """The in-graph histogram sample (a gather) holds exactly the evenly strided positions of each item."""
    from qfrewrite.backend.executor import ReducingExecutor, Reduction
    from qfrewrite.ir import Graph

    g = Graph("id")
    x = g.add_input("x", (None, 5, 7, 3))
    g.outputs.append(x)
    data = np.random.default_rng(1).standard_normal((2, 5, 7, 3)).astype(np.float32)
    out = ReducingExecutor(g, {"x": Reduction(min=True, sample_rows=4)})(data)["x"]
    np.testing.assert_array_equal(out["sample"], data.reshape(2, 35, 3)[:, ::9, :])


def test_hist_total_bounds_the_values_histogrammed_over_the_whole_pass():
    """Each image gives ``min(hist_values, hist_total // images)`` values (``// C`` positions); min/max stay exact."""
    from qfrewrite.ir import Graph

    g = Graph("id")
    x = g.add_input("x", (None, 8, 8, 4))
    g.outputs.append(x)
    data = np.random.default_rng(2).standard_normal((10, 8, 8, 4)).astype(np.float32)
    batches = [data[:6], data[6:]]
    free = observe(g, batches, ["x"], hist_values=64, hist_total=None, total=10)["x"]
    bound = observe(g, batches, ["x"], hist_values=64, hist_total=200, total=10)["x"]
    unknown = observe(g, batches, ["x"], hist_values=64, hist_total=200)["x"]  # no total: per image only
    assert free.hist.sum() == 10 * 64 and unknown.hist.sum() == 10 * 64
    assert bound.hist.sum() == 10 * (200 // 10 // 4) * 4  # 20 values an image: 5 positions of 4 channels
    for s in (bound, unknown):
        np.testing.assert_array_equal(s.channel_min, data.min(axis=(0, 1, 2)))
        np.testing.assert_array_equal(s.channel_max, data.max(axis=(0, 1, 2)))
