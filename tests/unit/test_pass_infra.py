"""The pass manager's contracts, spec resolution, instruments and typed skip reasons."""
import ast
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

import qfrewrite
from qfrewrite.contracts import Property, graph_properties
from qfrewrite.data import CalibrationSet
from qfrewrite.errors import (DataError, PassError, PipelineOrderError, PostconditionError, PreconditionError,
                              SpecConflictError)
from qfrewrite.instruments import CollectReport, MeasureDrift, Verify
from qfrewrite.ir import Op
from qfrewrite.pass_infra import Context, Instrument, Pass, PassManager, PassResult, Skip, ordered
from qfrewrite.passes import (AbsorbBias, CorrectBias, CrossLayerEqualization, FoldBatchNorm, FoldDeadChannels,
                              InsertFakeQuant, ReLU6ToReLU)
from qfrewrite.spec import QuantSpec, resolve_spec
from tests.graphs import tiny_mobilenet

REPO = Path(__file__).resolve().parents[2]


def _data(rng, n=8):
    return CalibrationSet([rng.normal(size=(n, 16, 16, 3)).astype(np.float32)])


# -- the quantization spec -------------------------------------------------------------------------------------------
def test_conflicting_explicit_options_name_both_passes(rng):
    pm = PassManager([FoldBatchNorm(), CorrectBias(weights="per_tensor"), InsertFakeQuant(weights="per_channel")])
    with pytest.raises(SpecConflictError) as err:
        pm.run(tiny_mobilenet(rng), Context(_data(rng)))
    msg = str(err.value)
    assert "CorrectBias(weights='per_tensor'" in msg and "InsertFakeQuant(weights='per_channel')" in msg


def test_a_spec_given_to_rewrite_conflicts_with_a_pass_option(rng):
    with pytest.raises(SpecConflictError, match="the spec given to rewrite"):
        qfrewrite.rewrite(tiny_mobilenet(rng), [FoldBatchNorm(), InsertFakeQuant(weights="per_tensor")],
                          data=rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
                          spec=QuantSpec(weights="per_channel"))


def test_unstated_options_come_from_the_pipeline(rng):
    """The list that once lost 20 points: CorrectBias() now corrects the per-channel weights InsertFakeQuant applies."""
    g = tiny_mobilenet(rng)
    res = qfrewrite.rewrite(g, [FoldBatchNorm(), FoldDeadChannels(), CrossLayerEqualization(clip="exact"),
                                CorrectBias(), InsertFakeQuant(weights="per_channel")],
                            data=rng.normal(size=(8, 16, 16, 3)).astype(np.float32), stats=False)
    assert res.spec.weights == "per_channel" and res.report["CorrectBias"].stats["weights"] == "per_channel"
    assert all(n.weight_quant.per_channel for n in res.graph.find(Op.CONV2D, Op.DEPTHWISE_CONV2D))


def test_spec_fields_are_checked_and_merged():
    with pytest.raises(qfrewrite.QfrewriteError, match="weights must be one of"):
        QuantSpec(weights="per_row")
    with pytest.raises(qfrewrite.QfrewriteError, match="weight_bits"):
        QuantSpec(weight_bits=1)
    spec = resolve_spec(QuantSpec(weights="per_tensor"), [("p", QuantSpec(weight_bits=4))])
    assert (spec.weights, spec.weight_bits, spec.activations) == ("per_tensor", 4, "mse")


def test_a_recipe_carries_its_spec_into_rewrite(rng):
    from qfrewrite import recipes

    res = qfrewrite.rewrite(tiny_mobilenet(rng), recipes.plain(weights="per_tensor"),
                            data=rng.normal(size=(4, 16, 16, 3)).astype(np.float32), stats=False)
    assert res.spec.weights == "per_tensor"
    assert all(not n.weight_quant.per_channel for n in res.graph.find(Op.CONV2D, Op.DEPTHWISE_CONV2D))


# -- contracts -------------------------------------------------------------------------------------------------------
def test_passes_in_the_wrong_order_are_refused_before_any_work(rng):
    g = tiny_mobilenet(rng)
    ran = []

    class Spy(Instrument):
        def before_pass(self, p, graph, ctx, record):
            ran.append(p.name)

    pm = PassManager([FoldBatchNorm(), InsertFakeQuant(), CorrectBias()], instruments=[Spy()])
    with pytest.raises(PipelineOrderError) as err:
        pm.run(g, Context(_data(rng)))
    assert "CorrectBias (pass 3) cannot run after InsertFakeQuant (pass 2)" in str(err.value)
    assert "move CorrectBias before InsertFakeQuant" in str(err.value) and ran == []


def test_a_requirement_established_later_names_the_pass_to_move(rng):
    with pytest.raises(PipelineOrderError, match="requires 'BatchNorm folded', which FoldBatchNorm \\(pass 2\\)"):
        PassManager([CrossLayerEqualization(), FoldBatchNorm()]).run(tiny_mobilenet(rng), Context())
    with pytest.raises(PipelineOrderError, match="add a pass that establishes it \\(FoldBatchNorm\\)"):
        PassManager([CrossLayerEqualization()]).run(tiny_mobilenet(rng), Context())


def test_equalization_before_dead_channel_folding_is_refused(rng):
    with pytest.raises(PipelineOrderError, match="FoldDeadChannels \\(pass 3\\) cannot run after "
                                                 "CrossLayerEqualization"):
        PassManager([FoldBatchNorm(), CrossLayerEqualization(), FoldDeadChannels()]).run(tiny_mobilenet(rng),
                                                                                          Context())


def test_a_graph_without_batchnorm_already_has_it_folded(rng):
    g = tiny_mobilenet(rng, bn=False)
    assert Property.BN_FOLDED in graph_properties(g) and Property.QUANTIZED not in graph_properties(g)
    res = PassManager([CrossLayerEqualization()]).run(g, Context())
    assert res.modified


def test_missing_data_is_refused_before_any_work(rng):
    with pytest.raises(DataError, match="CorrectBias, InsertFakeQuant need calibration data"):
        PassManager([FoldBatchNorm(), CorrectBias(), InsertFakeQuant()]).run(tiny_mobilenet(rng), Context())


def test_learned_rounding_in_the_spec_requires_a_rounding_pass(rng):
    with pytest.raises(PipelineOrderError, match="requires 'weights rounded'"):
        PassManager([FoldBatchNorm(), InsertFakeQuant()]).run(
            tiny_mobilenet(rng), Context(_data(rng), spec=QuantSpec(rounding="learned")))


def test_order_derives_from_the_contracts():
    names = [p.name for p in ordered([InsertFakeQuant(), ReLU6ToReLU(), CorrectBias(), AbsorbBias(),
                                      CrossLayerEqualization(), FoldDeadChannels(), FoldBatchNorm()])]
    assert names.index("FoldBatchNorm") < names.index("FoldDeadChannels") < names.index("CrossLayerEqualization")
    assert names.index("AbsorbBias") < names.index("CorrectBias") < names.index("InsertFakeQuant")
    assert names.index("ReLU6ToReLU") < names.index("InsertFakeQuant")


class _Claims(Pass):
    """A pass that claims BatchNorm folded without folding."""

    ensures = frozenset({Property.BN_FOLDED})

    def run(self, graph, ctx):
        return PassResult(graph, False, {}, [Skip(None, "does nothing")])


def test_postconditions_are_checked_on_the_graph(rng):
    with pytest.raises(PassError, match="_Claims: the graph is not 'BatchNorm folded' after it ran"):
        PassManager([_Claims()]).run(tiny_mobilenet(rng), Context())
    assert PostconditionError.__mro__[1].__name__ == "ContractError"


class _Unfolds(Pass):
    """A pass that puts a foldable BatchNorm back (breaking a property a later pass requires)."""

    def run(self, graph, ctx):
        from tests.graphs import add_bn

        conv = graph.find(Op.CONV2D)[-1]
        reader, idx = conv.output.uses()[0]
        y = add_bn(graph, np.random.default_rng(0), conv.output, conv.output.shape[-1])
        reader.set_input(idx, y)
        return PassResult(graph, True)


def test_preconditions_are_checked_on_the_graph(rng):
    with pytest.raises(PassError, match="CrossLayerEqualization: the graph is not 'BatchNorm folded' before it runs"):
        PassManager([FoldBatchNorm(), _Unfolds(), CrossLayerEqualization()]).run(tiny_mobilenet(rng), Context())
    assert issubclass(PreconditionError, qfrewrite.QfrewriteError)


def test_contract_checks_can_be_turned_off(rng):
    res = PassManager([FoldBatchNorm(), CrossLayerEqualization(), FoldDeadChannels()],
                      check_contracts=False).run(tiny_mobilenet(rng), Context())
    assert res.stats["passes"] == ["FoldBatchNorm", "CrossLayerEqualization", "FoldDeadChannels"]


# -- instruments and skip reasons ------------------------------------------------------------------------------------
def test_instruments_see_every_pass_and_the_report_keeps_skips(rng):
    seen = []

    class Log(Instrument):
        def start(self, graph, ctx):
            seen.append("start")

        def before_pass(self, p, graph, ctx, record):
            seen.append(f"before {p.name}")

        def after_pass(self, p, result, ctx, record):
            seen.append(f"after {p.name} {record.modified}")

        def finish(self, graph, ctx):
            seen.append("finish")

    collect = CollectReport()
    g = tiny_mobilenet(rng)
    res = PassManager([FoldBatchNorm(), FoldBatchNorm(), ReLU6ToReLU()],
                      instruments=[Verify(), MeasureDrift(), Log(), collect]).run(g, Context())
    assert seen == ["start", "before FoldBatchNorm", "after FoldBatchNorm True", "before FoldBatchNorm",
                    "after FoldBatchNorm False", "before ReLU6ToReLU", "after ReLU6ToReLU True", "finish"]
    rep = collect.report
    assert rep[1].skipped == [Skip(None, "no BatchNorm after a foldable layer")]
    assert rep[0].drift is None and rep[2].drift["sqnr_db"] > 0  # exact passes are not measured
    assert res.skipped[0].reason.startswith("FoldBatchNorm: ")
    assert rep.to_dict()["passes"][1]["skipped"] == [{"node": None, "reason": "no BatchNorm after a foldable layer"}]
    assert "nothing to do: no BatchNorm after a foldable layer" in str(rep)


def test_a_failing_instrument_names_the_pass(rng):
    class Broken(Instrument):
        def after_pass(self, p, result, ctx, record):
            raise RuntimeError("boom")

    with pytest.raises(PassError, match="pass FoldBatchNorm failed after it ran .*RuntimeError: boom"):
        PassManager([FoldBatchNorm()], instruments=[Broken()]).run(tiny_mobilenet(rng), Context())


def test_skips_name_the_node_and_the_reason(rng):
    g = tiny_mobilenet(rng, dense_head=False)
    FoldBatchNorm()(g)
    res = CrossLayerEqualization()(g)
    last = g.find(Op.CONV2D)[-1]
    [why] = res.skips_for(last.name)
    assert "is a graph output" in why
    assert all(isinstance(s, Skip) and s.reason for s in res.skipped)


# -- the package's structure -----------------------------------------------------------------------------------------
def _module_imports():
    """{module: set of project modules it imports}, every import statement counted (also those inside functions)."""
    mods = {}
    for base, pkg in (("qfrewrite", "qfrewrite"), ("passes", "qfrewrite.passes")):
        for p in (REPO / base).rglob("*.py"):
            parts = list(p.relative_to(REPO / base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg] + parts)] = p
    edges = {m: set() for m in mods}

    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package
                    for _ in range(node.level - 1):
                        up = up.rpartition(".")[0]
                    base = up + ("." + node.module if node.module else "")
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t)
                if r and r != name:
                    edges[name].add(r)
    return edges


def test_no_import_cycle_among_the_modules():
    g = nx.DiGraph([(a, b) for a, bs in _module_imports().items() for b in bs])
    assert list(nx.simple_cycles(g)) == []


def test_pass_infra_is_a_leaf_and_the_core_never_imports_the_passes():
    edges = _module_imports()
    assert edges["qfrewrite.pass_infra"] <= {"qfrewrite.contracts", "qfrewrite.errors", "qfrewrite.ir",
                                             "qfrewrite.spec"}
    application = {"qfrewrite", "qfrewrite.api", "qfrewrite.recipes", "qfrewrite.convert", "qfrewrite.diagnose",
                   "qfrewrite.cli", "qfrewrite.__main__", "qfrewrite.demo", "qfrewrite.demo.run",
                   "qfrewrite.evaluate", "qfrewrite.finetune"}
    for mod, targets in edges.items():
        if mod not in application and not mod.startswith("qfrewrite.passes"):
            assert not any(t.startswith("qfrewrite.passes") for t in targets), mod
        if mod.startswith("qfrewrite.passes"):
            assert not targets & application, mod


def test_the_readme_pass_runs_under_the_manager(rng):
    import re

    from qfrewrite.ir import ClipAttrs

    text = (REPO / "README.md").read_text()
    [code] = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class DropIdentityClips" in b]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    drop = scope["DropIdentityClips"]()
    g = tiny_mobilenet(rng, bn=False)
    conv = g.find(Op.CONV2D)[0]
    reader, idx = conv.output.uses()[0]
    ident = g.add_node(Op.CLIP, [conv.output], ClipAttrs(None, None))
    reader.set_input(idx, ident.output)
    res = PassManager([drop]).run(g, Context())
    assert res.modified and not any(n.attrs == ClipAttrs(None, None) for n in g.find(Op.CLIP))
    assert {s.reason for s in res.skipped} == {"DropIdentityClips: clips a bound"}
    with pytest.raises(PipelineOrderError, match="DropIdentityClips"):
        PassManager([CrossLayerEqualization(), drop]).run(tiny_mobilenet(rng), Context())
