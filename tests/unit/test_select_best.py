"""SelectBest: the score it reports is the held-back output SQNR of the graph it returns against the graph before it,
and candidates that leave the graph alone leave it alone."""
import numpy as np

from qfrewrite.backend.executor import Executor
from qfrewrite.calibration import as_calibration_set
from qfrewrite.data import holdout_indices
from qfrewrite.numerics.metrics import output_drift
from qfrewrite.pass_infra import Context, PassManager
from qfrewrite.passes import FoldBatchNorm, InsertFakeQuant, SelectBest
from tests.quant_graphs import dead_channel_mobilenet


def test_the_kept_score_is_the_returned_graphs_drift_from_the_graph_before(rng):
    g = FoldBatchNorm().run(dead_channel_mobilenet(rng, pad="VALID"), Context()).graph
    x = rng.normal(size=(40, 12, 12, 3)).astype(np.float32)
    sel = SelectBest({"minmax": [InsertFakeQuant(weights="per_tensor", activations="minmax")],
                      "mse": [InsertFakeQuant(weights="per_tensor", activations="mse")]})
    res = sel.run(g.copy(), Context(data=as_calibration_set(x, g)))
    assert res.modified and res.stats["held_back"] == 16 and res.stats["calibrated_on"] == 24
    _, back = holdout_indices(len(x), 16)
    drift = output_drift(Executor(g)(x[back]), Executor(res.graph, quantize=True)(x[back]))
    kept = res.stats["kept"]
    np.testing.assert_allclose(res.stats["scores"][kept]["sqnr_db"], drift["sqnr_db"], rtol=1e-6)
    assert all(res.stats["scores"][kept]["sqnr_db"] >= s["sqnr_db"] for s in res.stats["scores"].values())


def test_the_kept_pipeline_is_calibrated_again_on_all_the_images(rng):
    """With ``refit=True`` the kept candidate is run again on every calibration image (the held-back ones included):
    its graph is the one its pipeline alone makes from all of them, not the one that was scored."""
    g = FoldBatchNorm().run(dead_channel_mobilenet(rng, pad="VALID"), Context()).graph
    x = rng.normal(size=(40, 12, 12, 3)).astype(np.float32)
    candidates = {w: [InsertFakeQuant(weights=w, activations="minmax")] for w in ("per_tensor", "per_channel")}
    scored = SelectBest(candidates).run(g.copy(), Context(data=as_calibration_set(x, g)))
    res = SelectBest(candidates, refit=True).run(g.copy(), Context(data=as_calibration_set(x, g)))
    kept = res.stats["kept"]
    assert kept == scored.stats["kept"] and res.stats["recalibrated_on"] == 40 and "all 40" in res.stats["why"]
    alone = PassManager([InsertFakeQuant(weights=kept, activations="minmax")]).run(
        g.copy(), Context(data=as_calibration_set(x, g)))
    refit_out = Executor(res.graph, quantize=True)(x)[0]
    np.testing.assert_allclose(refit_out, Executor(alone.graph, quantize=True)(x)[0], rtol=1e-6, atol=1e-6)
    # the held-back images moved the ranges: the scored graph differs
    assert not np.allclose(refit_out, Executor(scored.graph, quantize=True)(x)[0], rtol=1e-6, atol=1e-6)


def test_candidates_that_change_nothing_leave_the_graph_alone(rng):
    g = FoldBatchNorm().run(dead_channel_mobilenet(rng, pad="VALID"), Context()).graph  # no BatchNorm left
    x = rng.normal(size=(40, 12, 12, 3)).astype(np.float32)
    res = SelectBest({"fold": [FoldBatchNorm()], "nothing": []}).run(g.copy(), Context(data=as_calibration_set(x, g)))
    assert not res.modified
    np.testing.assert_array_equal(Executor(res.graph)(x)[0], Executor(g)(x)[0])


def test_block_reconstruction_waits_for_the_choice_and_runs_once_on_the_kept_pipeline(rng):
    """At 4 bits LearnedRounding's block reconstruction is left out while the candidates are compared (layer-wise
    rounding ranks them) and runs once, on the kept pipeline, run again in full on all the images; at 8 bits, where
    there is none, the scored graph is kept as it was."""
    from qfrewrite.passes import LearnedRounding
    from qfrewrite.spec import QuantSpec

    g = FoldBatchNorm().run(dead_channel_mobilenet(rng, pad="VALID"), Context()).graph
    x = rng.normal(size=(40, 12, 12, 3)).astype(np.float32)
    candidates = {w: [LearnedRounding(weights=w, block_iterations=20), InsertFakeQuant(weights=w)]
                  for w in ("per_tensor", "per_channel")}
    res = SelectBest(candidates).run(g.copy(), Context(data=as_calibration_set(x, g), spec=QuantSpec(weight_bits=4)))
    assert res.stats["recalibrated_on"] == 40 and "run again in full (LearnedRounding" in res.stats["why"]
    rounding = [r for r in res.nested if r.name == "LearnedRounding"]
    assert len(rounding) == 1 and "blocks" in rounding[0].stats and "blocks_deferred" not in rounding[0].stats
    res8 = SelectBest(candidates).run(g.copy(), Context(data=as_calibration_set(x, g), spec=QuantSpec(weight_bits=8)))
    assert "recalibrated_on" not in res8.stats
