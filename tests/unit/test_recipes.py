import numpy as np
import pytest

import qfrewrite
from qfrewrite import recipes
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
    assert [p for p in passes if isinstance(p, CrossLayerEqualization)][0].exact


def test_recipe_order_comes_from_the_contracts_not_the_listing():
    dfq = recipes.dfq(absorb=True)
    assert [p.name for p in dfq] == ["FoldBatchNorm", "FoldDeadChannels", "CrossLayerEqualization", "AbsorbBias",
                                     "CorrectBias", "InsertFakeQuant"]
    shuffled = ordered([InsertFakeQuant(), CorrectBias(), CrossLayerEqualization(), FoldDeadChannels(),
                        FoldBatchNorm()])
    assert [p.name for p in shuffled] == [p.name for p in recipes.dfq()]


def test_recipe_options_must_be_spec_fields_or_fakequant_knobs():
    with pytest.raises(TypeError, match="unexpected options"):
        recipes.plain(wieghts="per_channel")
    assert recipes.plain(percentile=99.9)[-1].percentile == 99.9


def test_recipes_end_with_insert_fakequant_when_available():
    try:
        from qfrewrite.passes import InsertFakeQuant  # noqa: F401
    except ImportError:
        pytest.skip("InsertFakeQuant is not in this build")
    for recipe in (recipes.plain, recipes.dfq, recipes.qualcomm):
        assert type(recipe(weights="per_tensor")[-1]).__name__ == "InsertFakeQuant"


def test_dfq_rewrite_runs_end_to_end(rng):
    g = dead_channel_mobilenet(rng, pad="VALID")
    x = rng.normal(size=(8, 12, 12, 3)).astype(np.float32)
    res = qfrewrite.rewrite(g, passes=recipes.dfq(weights="per_tensor"), data=x)
    names = [p.name for p in res.report.passes]
    assert names[:4] == ["FoldBatchNorm", "FoldDeadChannels", "CrossLayerEqualization", "CorrectBias"]
    assert res.report["FoldDeadChannels"].modified and res.report["CorrectBias"].modified
    assert res.report["CorrectBias"].drift is not None  # not exact: the manager measured the drift
