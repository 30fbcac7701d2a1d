"""layer_harm: the measured output SQNR of each layer quantized alone equals an independent run of the whole graph
with that one layer fake-quantized; it ranks a layer by where it sits, not only by its weights; diagnose shows it."""
import json
import math

import numpy as np
import pytest

from qfrewrite.analysis.layer_harm import estimated_harm_db, measure_layer_harm, noise_inputs, ranked_layers
from qfrewrite.backend.executor import run_graph
from qfrewrite.diagnose import diagnose
from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import WEIGHTED_OPS, ClipAttrs, ConvAttrs, FakeQuantAttrs, GlobalMeanAttrs, Graph, Op
from qfrewrite.numerics.metrics import sqnr_db
from qfrewrite.quant.weights import weight_quant_attrs
from tests.graphs import add_bn


def planted_branch_graph(rng, outlier=40.0):
    """stem conv -> ReLU6 -> {``quiet``: a 1x1 conv with one outlier channel whose output is scaled by 1e-3,
    ``loud``: a plain 1x1 conv} -> Add -> depthwise -> mean -> Dense. ``quiet`` has by far the worst weights, but
    its error reaches the outputs a thousand times smaller."""
    g = Graph("branches")
    x = g.add_input("input", (None, 8, 8, 3))

    def conv(name, x, kshape, op=Op.CONV2D, attrs=None, bias=True):
        k = rng.normal(scale=0.5, size=kshape).astype(np.float32)
        ins = [x, g.const(k, name=name + "/kernel")]
        if bias:
            ins.append(g.const(rng.normal(scale=0.1, size=kshape[-1] if op is not Op.DEPTHWISE_CONV2D
                                          else kshape[2] * kshape[3]), name=name + "/bias"))
        return g.add_node(op, ins, attrs or ConvAttrs(), name=name)

    stem = conv("stem", x, (3, 3, 3, 8), attrs=ConvAttrs((1, 1), "SAME"))
    y = add_bn(g, rng, stem.output, 8)
    y = g.add_node(Op.CLIP, [y], ClipAttrs(0.0, 6.0)).output
    quiet = conv("quiet", y, (1, 1, 8, 8))
    k = quiet.weight.const.copy()
    k[..., 3] *= outlier
    quiet.weight.set_const(k)
    scaled = g.add_node(Op.MUL, [quiet.output, g.const(np.full(8, 1e-3))]).output
    loud = conv("loud", y, (1, 1, 8, 8))
    y = g.add_node(Op.ADD, [scaled, loud.output]).output
    y = conv("dw", y, (3, 3, 8, 1), Op.DEPTHWISE_CONV2D, ConvAttrs((1, 1), "SAME")).output
    y = g.add_node(Op.CLIP, [y], ClipAttrs(0.0, 6.0)).output
    y = g.add_node(Op.GLOBAL_MEAN, [y], GlobalMeanAttrs()).output
    head = g.add_node(Op.DENSE, [y, g.const(rng.normal(size=(8, 5)), name="head/kernel"),
                                 g.const(rng.normal(size=5), name="head/bias")], name="head")
    g.outputs = [head.output]
    return g


def _folded(g):
    from qfrewrite.pass_infra import Context
    from qfrewrite.passes import FoldBatchNorm

    f = g.copy()
    FoldBatchNorm().run(f, Context())
    return f


def _independent_weight_harm(g, x, name, granularity):
    ref = run_graph(g, x)[0]
    q = g.copy()
    node = q.node(name)
    node.weight_quant = weight_quant_attrs(node, granularity, "minmax", 8)
    return sqnr_db(ref, run_graph(q, x, quantize=True)[0])


def _independent_act_harm(g, x, value, fq):
    ref = run_graph(g, x)[0]
    q = g.copy()
    v = q.value(value)
    uses = v.uses()
    node = q.add_node(Op.FAKE_QUANT, [v], fq)
    for n, i in uses:
        n.set_input(i, node.output)
    q.outputs = [node.output if o is v else o for o in q.outputs]
    return sqnr_db(ref, run_graph(q, x, quantize=True)[0])


@pytest.fixture
def graph_and_data(rng):
    g = planted_branch_graph(rng)
    return g, rng.normal(size=(10, 8, 8, 3)).astype(np.float32)


def test_measured_harm_equals_an_independent_run_of_the_whole_graph(graph_and_data):
    g, x = graph_and_data
    f = _folded(g)
    act_value = f.node("stem").output  # stem -> (BN folded) -> ReLU6
    relu = act_value.consumers()[0]
    fq = FakeQuantAttrs(lo=(0.0,), hi=(6.0,), bits=4)
    h = measure_layer_harm(f, [x[:6], x[6:]], act_ranges={"stem": fq}, chunk=4)
    assert h.images == 10 and h.columns == ("per_tensor", "per_channel", "activations")
    assert set(h.layers) == {n.name for n in f.find(*WEIGHTED_OPS)}
    for name, lh in h.layers.items():
        for gran in ("per_tensor", "per_channel"):
            assert lh.db(gran) == pytest.approx(_independent_weight_harm(f, x, name, gran), abs=0.02), (name, gran)
    stem = h.layers["stem"]
    assert stem.act_tensor == relu.output.name and stem.act_range == (0.0, 6.0)
    assert stem.db("activations") == pytest.approx(_independent_act_harm(f, x, relu.output.name, fq), abs=0.02)
    assert "activations" not in h.layers["loud"].output_sqnr_db  # no range given


def test_harm_ranks_by_position_where_the_weights_alone_mislead(graph_and_data):
    g, x = graph_and_data
    f = _folded(g)
    h = measure_layer_harm(f, [x])
    d = diagnose(g)
    # the weights alone: the outlier layer is by far the worst
    assert ranked_layers(d.stats, None)[0].name == "quiet"
    assert estimated_harm_db(d.stats["quiet"]) < min(estimated_harm_db(ls) for n, ls in d.stats.items()
                                                     if n != "quiet")
    # at the outputs its error is 1000x smaller: the least harmful layer
    measured = [lh.name for lh in h.ranked("per_tensor")]
    assert measured[-1] == "quiet"
    assert h.layers["quiet"].db("per_tensor") > max(lh.db("per_tensor") for lh in h.layers.values()
                                                   if lh.name != "quiet") + 20


def test_exactly_representable_weights_do_no_harm(rng):
    g = planted_branch_graph(rng)
    node = g.node("loud")
    k = rng.integers(-127, 128, size=node.weight.const.shape).astype(np.float32)
    k.flat[0] = 127.0
    node.weight.set_const(k / 127.0)  # on the per-tensor grid exactly
    h = measure_layer_harm(_folded(g), [rng.normal(size=(3, 8, 8, 3)).astype(np.float32)], layers=["loud"])
    assert list(h.layers) == ["loud"] and math.isinf(h.layers["loud"].db("per_tensor"))


def test_diagnose_with_data_ranks_by_the_measured_harm(graph_and_data):
    g, x = graph_and_data
    d = diagnose(g, x)
    assert d.harm is not None and d.harm.images == len(x)
    assert [ls.name for ls in d.ranked()] == [lh.name for lh in d.harm.ranked("per_tensor")]
    j = json.loads(d.to_json())
    assert j["ranking"]["measured"] is True and j["ranking"]["images"] == len(x)
    assert set(j["ranking"]["seconds"]) >= {"float", "per_tensor", "per_channel", "activations"}
    for e in j["layers"]:
        assert set(e["output_sqnr_db"]) == {"per_tensor", "per_channel", "activations"}
        assert e["act_range"] is not None and e["suggestions"] is not None
    dbs = [e["output_sqnr_db"]["per_tensor"] for e in j["layers"]]
    assert dbs == sorted(dbs)
    text = d.render()
    assert "measured harm" in text and "out W/T" in text and "out A" in text and "on 10 image(s)" in text
    # per-channel ranking and a harm limit
    dc = diagnose(g, x, weights="per_channel", harm_images=4)
    assert dc.harm.images == 4
    assert [ls.name for ls in dc.ranked()] == [lh.name for lh in dc.harm.ranked("per_channel")]
    # the model is untouched (BatchNorm still there)
    assert len(g.find(Op.BATCH_NORM)) == 1


def test_diagnose_without_data_says_the_ranking_is_an_estimate(graph_and_data):
    g, _ = graph_and_data
    d = diagnose(g)
    assert d.harm is None
    j = d.to_dict()
    assert j["ranking"]["measured"] is False and "estimate" in j["ranking"]["by"]
    assert all("output_sqnr_db" not in e for e in j["layers"])
    text = d.render()
    assert "estimate" in text and "out W/T" not in text
    assert [ls.name for ls in d.ranked()] == [ls.name for ls in ranked_layers(d.stats, None)]
    with pytest.raises(QfrewriteError, match="per_tensor"):
        diagnose(g, weights="per-tensor")


def test_without_data_noise_inputs_estimate_the_harm(graph_and_data):
    g, _ = graph_and_data
    d = diagnose(g, noise_images=6)
    assert d.harm is not None and d.harm.inputs == "noise" and d.harm.images == 6
    assert d.harm.columns == ("per_tensor", "per_channel")  # no activation ranges without data
    # the branch scaled by 1e-3 is found harmless on noise too, where the weights alone rank it worst
    assert d.ranked()[-1].name == "quiet" and ranked_layers(d.stats, None)[0].name == "quiet"
    j = d.to_dict()
    assert j["ranking"]["measured"] is False and j["ranking"]["inputs"] == "noise"
    assert "estimate" in j["ranking"]["by"] and "noise" in j["ranking"]["by"]
    text = d.render()
    assert "Gaussian-noise" in text and "estimated on" in text and "out W/T" in text


def test_noise_inputs_are_standard_normal_after_the_models_own_normalisation(rng):
    from qfrewrite.ir import NormalizeAttrs

    g = planted_branch_graph(rng)
    z = noise_inputs(g, 64)
    assert z.shape == (64, 8, 8, 3) and abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    raw = Graph("raw")
    x = raw.add_input("pixels", (None, 4, 4, 3))
    y = raw.add_node(Op.NORMALIZE, [x], NormalizeAttrs((1 / 127.5,) * 3, (-1.0,) * 3)).output
    raw.outputs = [y]
    z = noise_inputs(raw, 64)
    assert abs(z.mean() - 127.5) < 5 and abs(z.std() - 127.5) < 5  # pixels whose normalised values are N(0, 1)
