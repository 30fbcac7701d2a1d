"""SelectBest: the score it reports is the held-back output SQNR of the graph it returns against the graph before it,
and candidates that leave the graph alone leave it alone."""
import numpy as np

from qfrewrite.backend.executor import Executor
from qfrewrite.calibration import as_calibration_set
from qfrewrite.data import holdout_indices
from qfrewrite.numerics.metrics import output_drift
from qfrewrite.pass_infra import Context
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


def test_candidates_that_change_nothing_leave_the_graph_alone(rng):
    g = FoldBatchNorm().run(dead_channel_mobilenet(rng, pad="VALID"), Context()).graph  # no BatchNorm left
    x = rng.normal(size=(40, 12, 12, 3)).astype(np.float32)
    res = SelectBest({"fold": [FoldBatchNorm()], "nothing": []}).run(g.copy(), Context(data=as_calibration_set(x, g)))
    assert not res.modified
    np.testing.assert_array_equal(Executor(res.graph)(x)[0], Executor(g)(x)[0])
