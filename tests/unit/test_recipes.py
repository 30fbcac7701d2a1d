import numpy as np
import pytest

import qfrewrite
from qfrewrite import recipes
from qfrewrite.errors import QfrewriteError
from qfrewrite.pass_infra import Context, Pass, ordered
from qfrewrite.passes import CorrectBias, CrossLayerEqualization, FoldBatchNorm, FoldDeadChannels, InsertFakeQuant
from qfrewrite.spec import QuantSpec
from tests.quant_graphs import dead_channel_mobilenet


@pytest.mark.parametrize("recipe", [recipes.plain, recipes.dfq, recipes.qualcomm])
def test_recipes_are_pass_lists(recipe):
    passes = recipe(weights="per_channel", quantize=False)
    assert passes and all(isinstance(p, Pass) for p in passes)
    assert not any(type(p).__name__ == "InsertFakeQuant" for p in passes)


def test_dfq_carries_the_spec_that_its_passes_read():
    passes = recipes.dfq(weights="per_channel", weight_bits=7, quantize=False)
    assert passes.spec == QuantSpec(weights="per_channel", weight_bits=7)
    cb = [p for p in passes if isinstance(p, CorrectBias)][0]
    assert cb.spec_statement() == QuantSpec()  # no option of its own: it reads the pipeline's spec
    ctx = Context(spec=passes.spec)
    assert (cb.option(ctx, "weights"), cb.option(ctx, "bits")) == ("per_channel", 7)
    assert [type(p) for p in passes].index(FoldDeadChannels) < [type(p) for p in passes].index(CrossLayerEqualization)
    cle = [p for p in passes if isinstance(p, CrossLayerEqualization)][0]
    assert cle.clip is None and not cle.exact  # the spec's choice: the fused clip, exact on the calibration data
    assert recipes.dfq(weights="per_tensor", clip="exact", quantize=False)[2].exact


def test_recipe_order_comes_from_the_contracts_not_the_listing():
    dfq = recipes.dfq(weights="per_tensor", absorb=True, compare=False)
    assert [p.name for p in dfq] == ["FoldBatchNorm", "FoldDeadChannels", "CrossLayerEqualization", "AbsorbBias",
                                     "CorrectBias", "InsertFakeQuant"]
    shuffled = ordered([InsertFakeQuant(), CorrectBias(), CrossLayerEqualization(), FoldDeadChannels(),
                        FoldBatchNorm()])
    assert [p.name for p in shuffled] == [p.name for p in recipes.dfq(weights="per_tensor", compare=False)]


def test_dfq_compares_itself_with_plain_by_default():
    dfq = recipes.dfq(weights="per_tensor")
    assert [p.name for p in dfq] == ["FoldBatchNorm", "FoldDeadChannels", "SelectBest"]
    cands = dfq[2].candidates
    assert [p.name for p in cands["dfq"].passes] == ["CrossLayerEqualization", "CorrectBias",
                                                    "InsertFakeQuant"]
    assert [p.name for p in cands["plain"].passes] == ["InsertFakeQuant"]


def test_dfq_equalizes_except_for_per_channel_8_bit_nearest_rounding():
    names = lambda r: [p.name for p in r]  # noqa: E731
    assert names(recipes.dfq(quantize=False)) == ["FoldBatchNorm", "FoldDeadChannels", "CorrectBias"]
    assert names(recipes.dfq(weights="per_channel")[2].candidates["dfq"].passes) == ["CorrectBias", "InsertFakeQuant"]
    for kw in ({"weights": "per_tensor"}, {"weight_bits": 4}, {"rounding": "learned"},
               {"weights": "per_channel", "equalize": True}):
        assert "CrossLayerEqualization" in names(recipes.dfq(quantize=False, **kw)), kw
    assert "CrossLayerEqualization" not in names(recipes.dfq(weights="per_tensor", equalize=False, quantize=False))
    with pytest.raises(QfrewriteError, match="equalize=True"):
        recipes.dfq(weights="per_channel", clip="exact")
    assert names(recipes.dfq(weights="per_channel", equalize=True, clip="exact", quantize=False))[2] == \
        "CrossLayerEqualization"


def test_select_best_keeps_channel_histograms_only_for_a_candidate_that_rescales(monkeypatch):
    """The shared calibration pass bins per channel only when a candidate's pass hands the statistics on rescaled."""
    import qfrewrite.passes.select_best as select_best

    asked = []
    real = select_best.CalibrationPass

    def spy(graph, total, channel_histograms=True):
        asked.append(channel_histograms)
        return real(graph, total, channel_histograms=channel_histograms)

    monkeypatch.setattr(select_best, "CalibrationPass", spy)
    rng = np.random.default_rng(0)
    g = dead_channel_mobilenet(rng)
    x = rng.standard_normal((40, *g.inputs[0].shape[1:])).astype(np.float32)
    for weights in ("per_channel", "per_tensor"):
        res = qfrewrite.rewrite(g, passes=recipes.dfq(weights=weights), data=x)
        assert res.report["SelectBest"].stats["scores"]
    assert asked == [False, True]


def test_recipe_options_must_be_spec_fields_or_fakequant_knobs():
    with pytest.raises(TypeError, match="unexpected options"):
        recipes.plain(wieghts="per_channel")
    assert recipes.plain(percentile=99.9)[-1].percentile == 99.9


def test_recipes_end_with_insert_fakequant_when_available():
    try:
        from qfrewrite.passes import InsertFakeQuant  # noqa: F401
    except ImportError:
        pytest.skip("InsertFakeQuant is not in this build")
    for recipe in (recipes.plain, recipes.qualcomm, lambda **kw: recipes.dfq(compare=False, **kw)):
        assert type(recipe(weights="per_tensor")[-1]).__name__ == "InsertFakeQuant"


def test_dfq_rewrite_runs_end_to_end(rng):
    g = dead_channel_mobilenet(rng, pad="VALID")
    x = rng.normal(size=(8, 12, 12, 3)).astype(np.float32)
    res = qfrewrite.rewrite(g, passes=recipes.dfq(weights="per_tensor", compare=False), data=x)
    names = [p.name for p in res.report.passes]
    assert names[:4] == ["FoldBatchNorm", "FoldDeadChannels", "CrossLayerEqualization", "CorrectBias"]
    assert res.report["FoldDeadChannels"].modified and res.report["CorrectBias"].modified
    assert res.report["CorrectBias"].drift is not None  # not exact: the manager measured the drift


def test_dfq_keeps_plain_when_plain_is_closer_to_float(rng, monkeypatch):
    """The comparison decides: with dfq's rewriting made worse on purpose, plain is kept and the report says why."""
    from qfrewrite.passes import correct_bias

    g = dead_channel_mobilenet(rng, pad="VALID")
    x = rng.normal(size=(48, 12, 12, 3)).astype(np.float32)
    res = qfrewrite.rewrite(g, passes=recipes.dfq(weights="per_tensor"), data=x)
    sel = res.report["SelectBest"]
    assert sel.stats["held_back"] == 16 and sel.stats["calibrated_on"] == 32 and sel.stats["kept"] in ("dfq", "plain")
    assert "held-back" in sel.stats["why"] and set(sel.stats["scores"]) == {"dfq", "plain"}
    assert any(p.name.startswith("SelectBest > ") for p in res.report.passes)  # the kept pipeline's passes
    # sabotage the rewriting: a bias "correction" that adds a large error makes plain the better candidate
    monkeypatch.setattr(correct_bias.CorrectBias, "_mean_error",
                        staticmethod(lambda node, delta, m: np.full(delta.shape[-1] if node.op.value != "DepthwiseConv2D"
                                                                    else delta.shape[2] * delta.shape[3], -50.0)))
    res = qfrewrite.rewrite(g, passes=recipes.dfq(weights="per_tensor"), data=x)
    sel = res.report["SelectBest"]
    assert sel.stats["kept"] == "plain"
    assert sel.stats["scores"]["plain"]["sqnr_db"] > sel.stats["scores"]["dfq"]["sqnr_db"]
    assert not res.graph.find(qfrewrite.Op.MINIMUM) and "InsertFakeQuant" in str(res.report)


def test_dfq_is_not_worse_than_plain_on_a_mobilenet_v3(rng):
    """MobileNetV3 (hard-swish, squeeze-excite, hard-sigmoid gates) with non-trivial BatchNorm statistics: on inputs
    that neither recipe saw, dfq's int8 outputs are at least as close to float as plain's (within 0.5 dB: the choice
    is made on held-back calibration images, not on these)."""
    pytest.importorskip("keras")
    from qfrewrite.backend.executor import Executor
    from qfrewrite.numerics.metrics import output_drift
    from tests.keras_models import mobilenet_v3_small

    g = qfrewrite.load(mobilenet_v3_small(96))
    calib = rng.uniform(0, 255, (48, 96, 96, 3)).astype(np.float32)
    fresh = rng.uniform(0, 255, (24, 96, 96, 3)).astype(np.float32)
    reference = Executor(g)(fresh)
    sqnr = {}
    for name, recipe in (("plain", recipes.plain), ("dfq", recipes.dfq)):
        res = qfrewrite.rewrite(g, passes=recipe(weights="per_tensor"), data=calib, stats=False)
        sqnr[name] = output_drift(reference, Executor(res.graph, quantize=True)(fresh))["sqnr_db"]
        if name == "dfq":
            sel = res.report["SelectBest"]
            assert set(sel.stats["scores"]) == {"dfq", "plain"}
    assert sqnr["dfq"] >= sqnr["plain"] - 0.5, sqnr


def test_learned_rounding_replaces_bias_correction_in_both_candidates():
    dfq = recipes.dfq(rounding="learned", weight_bits=4)
    assert dfq.spec.rounding == "learned" and dfq.spec.weight_bits == 4
    cands = dfq[2].candidates
    assert [p.name for p in cands["dfq"].passes] == ["CrossLayerEqualization", "LearnedRounding", "InsertFakeQuant"]
    assert [p.name for p in cands["plain"].passes] == ["LearnedRounding", "InsertFakeQuant"]
    assert [p.name for p in recipes.plain(rounding="learned")] == ["FoldBatchNorm", "LearnedRounding",
                                                                   "InsertFakeQuant"]
    assert "LearnedRounding" not in [p.name for p in recipes.plain()]


def test_learned_rounding_recipe_beats_nearest_at_four_bits(rng):
    """End to end at W4: the learned-rounding recipe's int8 outputs are closer to float than nearest rounding's on
    images it did not calibrate on, and every kernel of the result lies on the 4-bit grid it will be stored with."""
    from qfrewrite.backend.executor import Executor
    from qfrewrite.ir import WEIGHTED_OPS
    from qfrewrite.numerics.metrics import output_drift
    from qfrewrite.quant.weights import quantized_kernel

    g = dead_channel_mobilenet(rng, pad="VALID")
    calib = rng.normal(size=(48, 12, 12, 3)).astype(np.float32)
    fresh = rng.normal(size=(24, 12, 12, 3)).astype(np.float32)
    reference = Executor(g)(fresh)
    sqnr = {}
    for rounding in ("nearest", "learned"):
        res = qfrewrite.rewrite(g, passes=recipes.plain(weight_bits=4, rounding=rounding), data=calib, stats=False)
        sqnr[rounding] = output_drift(reference, Executor(res.graph, quantize=True)(fresh))["sqnr_db"]
        for node in res.graph.find(*WEIGHTED_OPS):
            assert node.weight_quant.bits == 4
            if rounding == "learned":
                np.testing.assert_array_equal(quantized_kernel(node, node.weight_quant), node.weight.const)
    assert sqnr["learned"] > sqnr["nearest"], sqnr
