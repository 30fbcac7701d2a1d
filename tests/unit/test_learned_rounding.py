import numpy as np
import pytest

from qfrewrite.analysis.patch_moments import PatchMoments
from qfrewrite.backend.executor import Executor
from qfrewrite.contracts import Property
from qfrewrite.data import CalibrationSet
from qfrewrite.errors import PipelineOrderError, QfrewriteError
from qfrewrite.ir import ConvAttrs, Graph, Op, ReshapeAttrs, layer_kind, verify
from qfrewrite.numerics.kernels import as_rows
from qfrewrite.numerics.quantize import fake_quant_np
from qfrewrite.numerics.rounding import Grid, nearest, round_rows, row_errors
from qfrewrite.pass_infra import Context, PassManager
from qfrewrite.passes import CorrectBias, FoldBatchNorm, InsertFakeQuant, LearnedRounding
from qfrewrite.quant.weights import quantized_kernel, weight_quant_attrs
from qfrewrite.spec import QuantSpec

from tests.graphs import tiny_mobilenet


def _layer(rng, op, strides=(1, 1), padding="SAME", dilations=(1, 1), hw=9, c=4):
    g = Graph()
    x = g.add_input("x", (None, hw, hw, c))
    if op is Op.DENSE:
        flat = g.add_node(Op.RESHAPE, [x], ReshapeAttrs((hw * hw * c,))).output
        n = g.add_node(op, [flat, g.const(rng.normal(size=(hw * hw * c, 5))), g.const(rng.normal(size=5))])
    else:
        k = rng.normal(size=(3, 3, c, 2 if op is Op.DEPTHWISE_CONV2D else 5))
        nb = k.shape[2] * k.shape[3] if op is Op.DEPTHWISE_CONV2D else 5
        n = g.add_node(op, [x, g.const(k), g.const(rng.normal(size=nb))], ConvAttrs(strides, padding, dilations))
    g.outputs = [n.output]
    return g


def _correlated_inputs(rng, n, hw=9, c=4):
    base = rng.normal(size=(n, hw, hw, 1))
    return (np.maximum(base + 0.3 * rng.normal(size=(n, hw, hw, c)), 0) + 0.5).astype(np.float32)


@pytest.mark.parametrize("op,strides,padding,dilations", [
    (Op.CONV2D, (1, 1), "SAME", (1, 1)), (Op.CONV2D, (2, 2), "SAME", (1, 1)), (Op.CONV2D, (1, 1), "VALID", (2, 2)),
    (Op.DEPTHWISE_CONV2D, (2, 2), "SAME", (1, 1)), (Op.DEPTHWISE_CONV2D, (1, 1), ((1, 0), (2, 1)), (1, 1)),
    (Op.DENSE, None, None, None)])
def test_patch_moments_give_the_measured_output_error(rng, op, strides, padding, dilations):
    """d H d^T from the gathered patches equals the mean squared output change of the layer when its kernel moves
    by d: the patches are the ones the layer reads (order, padding, strides, dilation)."""
    g = _layer(rng, op, strides, padding, dilations) if op is not Op.DENSE else _layer(rng, op)
    x = _correlated_inputs(rng, 12)
    layer = g.find(op)[0]
    p = PatchMoments().compute(g, Context(CalibrationSet([x[:5], x[5:]])))[layer.name]
    delta = rng.normal(size=layer.weight.const.shape) * 0.1
    moved = g.copy()
    mlayer = moved.find(op)[0]
    mlayer.set_input(1, moved.const((layer.weight.const + delta).astype(np.float32)))
    dy = Executor(moved)(x)[0].astype(np.float64) - Executor(g)(x)[0].astype(np.float64)
    measured = (dy.reshape(-1, dy.shape[-1]) ** 2).mean(axis=0)
    kind = layer_kind(layer)
    d = as_rows(mlayer.weight.const.astype(np.float64), kind) - as_rows(layer.weight.const.astype(np.float64), kind)
    predicted = row_errors(d, p.second_moment(centered=False)).reshape(-1)
    np.testing.assert_allclose(predicted, measured, rtol=2e-3, atol=1e-6)
    # the centred moments give the error once the mean shift is removed
    centred = ((dy - dy.reshape(-1, dy.shape[-1]).mean(0)).reshape(-1, dy.shape[-1]) ** 2).mean(axis=0)
    np.testing.assert_allclose(row_errors(d, p.second_moment(centered=True)).reshape(-1), centred, rtol=2e-3,
                               atol=1e-6)


def test_rows_keep_nearest_where_it_is_optimal():
    """With uncorrelated inputs of equal energy (H proportional to I) the objective separates per weight and
    nearest rounding is optimal: every row keeps it."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 10))
    a = np.abs(w).max(axis=1, keepdims=True)
    grid = Grid(-a, a / 7, 14)
    q, e_near, e_chosen, learned = round_rows(w, np.eye(10) * 0.5, grid)
    assert not learned.any()
    np.testing.assert_array_equal(q, nearest(w, grid))
    np.testing.assert_array_equal(e_near, e_chosen)


def test_learned_rounding_lowers_the_layer_error_on_correlated_inputs(rng):
    """On correlated inputs the learned rounding lowers the error (the objective it minimises) well below nearest
    rounding, no row is worse, and the result stays on the grid."""
    x = rng.normal(size=(4000, 1)) + 0.2 * rng.normal(size=(4000, 16))
    h = x.T @ x / len(x)
    w = rng.normal(size=(8, 16))
    a = np.abs(w).max(axis=1, keepdims=True)
    grid = Grid(-a, a / 7, 14)
    q, e_near, e_chosen, learned = round_rows(w, h, grid)
    assert learned.any() and np.all(e_chosen <= e_near) and e_chosen.sum() < 0.5 * e_near.sum()
    np.testing.assert_allclose(row_errors(q - w, h), e_chosen)
    codes = (q - grid.nlo) / grid.step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-9)
    assert codes.min() >= 0 and codes.max() <= 14


@pytest.mark.parametrize("op", [Op.CONV2D, Op.DEPTHWISE_CONV2D])
@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
def test_the_pass_beats_nearest_rounding_on_the_int8_layer(rng, op, weights):
    """A one-layer graph at 4 bits: the simulated quantized layer's output error on the calibration images is lower
    with the pass than with nearest rounding plus bias correction, the kernel lies on exactly the grid InsertFakeQuant
    applies, and the report's two output SQNRs differ by what the simulation measures."""
    g = _layer(rng, op)
    x = _correlated_inputs(rng, 16)
    ref = Executor(g)(x)[0].astype(np.float64)
    spec = QuantSpec(weights=weights, weight_bits=4)
    errs = {}
    for name, p in (("nearest", CorrectBias()), ("learned", LearnedRounding(blocks=False))):
        work = g.copy()
        res = p(work, Context(CalibrationSet([x]), spec=spec))
        verify(work)
        layer = work.find(op)[0]
        fq = weight_quant_attrs(g.find(op)[0], weights, "minmax", 4)
        if name == "learned":
            assert res.modified and layer.weight_quant == fq
            np.testing.assert_array_equal(quantized_kernel(layer, fq), layer.weight.const)
            stats = res.stats["layers"][layer.name]
            gain_db = stats["learned_sqnr_db"] - stats["nearest_sqnr_db"]
        else:
            layer.weight_quant = fq
        y = Executor(work, quantize=True)(x)[0].astype(np.float64)
        errs[name] = float(((y - ref) ** 2).mean())
    assert errs["learned"] < errs["nearest"]
    assert gain_db > 0
    assert abs(10 * np.log10(errs["nearest"] / errs["learned"]) - gain_db) < 0.05


def test_the_bias_absorbs_the_mean_error(rng):
    g = _layer(rng, Op.CONV2D)
    x = _correlated_inputs(rng, 16)
    ref = Executor(g)(x)[0].astype(np.float64).mean(axis=(0, 1, 2))
    LearnedRounding(blocks=False)(g, Context(CalibrationSet([x]), spec=QuantSpec(weight_bits=4)))
    got = Executor(g, quantize=True)(x)[0].astype(np.float64).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_leaves_kernels_on_their_grid_alone(rng):
    g = _layer(rng, Op.CONV2D)
    layer = g.find(Op.CONV2D)[0]
    fq = weight_quant_attrs(layer, "per_channel", "minmax", 8)
    layer.set_input(1, g.const(fake_quant_np(layer.weight.const, np.asarray(fq.lo), np.asarray(fq.hi), 8, True)))
    before = layer.weight.const.copy()
    res = LearnedRounding()(g, Context(CalibrationSet([_correlated_inputs(rng, 4)])))
    assert not res.modified and res.stats["rounded"] == 0
    assert any("grid already" in s.reason for s in res.skipped)
    np.testing.assert_array_equal(g.find(Op.CONV2D)[0].weight.const, before)


def test_needs_data_and_checks_its_options(rng):
    g = _layer(rng, Op.CONV2D)
    with pytest.raises(QfrewriteError, match="calibration data"):
        LearnedRounding()(g, Context())
    with pytest.raises(QfrewriteError, match="weight bits"):
        LearnedRounding(bits=12)
    with pytest.raises(QfrewriteError, match="per_channel"):
        LearnedRounding(weights="per_row")


def test_contract_orders_it_before_correct_bias_and_quantization(rng):
    lr = LearnedRounding()
    c = lr.contract(QuantSpec().resolved())
    assert {Property.WEIGHTS_ROUNDED, Property.WEIGHTS_FINAL, Property.BIAS_CORRECTED} <= c.ensures
    with pytest.raises(PipelineOrderError, match="LearnedRounding"):
        PassManager([CorrectBias(), LearnedRounding()]).check(tiny_mobilenet(rng))
    with pytest.raises(PipelineOrderError, match="weights rounded"):
        PassManager([FoldBatchNorm(), InsertFakeQuant()]).check(tiny_mobilenet(rng), QuantSpec(rounding="learned"))
    PassManager([FoldBatchNorm(), LearnedRounding(), InsertFakeQuant()]).check(tiny_mobilenet(rng),
                                                                               QuantSpec(rounding="learned"))


def test_learned_rounding_on_a_mobilenet_v3(rng):
    """MobileNetV3Small (hard-swish, squeeze-excite, hard-sigmoid gates; non-trivial BatchNorm statistics),
    per-tensor W8: on inputs the calibration did not see, learned rounding's int8 outputs are closer to float than
    nearest rounding's, and no layer's reported output error rose."""
    pytest.importorskip("keras")
    import qfrewrite
    from qfrewrite import recipes
    from qfrewrite.numerics.metrics import output_drift
    from tests.keras_models import mobilenet_v3_small

    g = qfrewrite.load(mobilenet_v3_small(64))
    calib = rng.uniform(0, 255, (32, 64, 64, 3)).astype(np.float32)
    fresh = rng.uniform(0, 255, (16, 64, 64, 3)).astype(np.float32)
    reference = Executor(g)(fresh)
    sqnr = {}
    for rounding in ("nearest", "learned"):
        res = qfrewrite.rewrite(g, passes=recipes.plain(weights="per_tensor", rounding=rounding), data=calib,
                                stats=False)
        sqnr[rounding] = output_drift(reference, Executor(res.graph, quantize=True)(fresh))["sqnr_db"]
    layers = res.report["LearnedRounding"].stats["layers"]
    assert len(layers) > 50 and all(v["learned_sqnr_db"] >= v["nearest_sqnr_db"] for v in layers.values())
    assert sqnr["learned"] > sqnr["nearest"], sqnr


def test_each_layer_keeps_its_own_weight_bits_and_reuses_handed_on_moments(rng):
    """A layer whose weight_quant is preset at 4 bits is rounded on that grid while the others get the spec's 8
    bits; moments put in the context for the graph state are used as they are (no pass over the data: the context
    holds no data images the pass could read, only a stand-in set that is never batched)."""
    g = FoldBatchNorm()(tiny_mobilenet(rng), Context()).graph
    x = rng.uniform(0, 1, (8, 16, 16, 3)).astype(np.float32)
    depthwise = g.find(Op.DEPTHWISE_CONV2D)[0]
    fq4 = weight_quant_attrs(depthwise, "per_channel", "minmax", 4)
    depthwise.weight_quant = fq4
    ctx = Context(CalibrationSet([x]), spec=QuantSpec(weights="per_channel", weight_bits=8))
    from qfrewrite.analysis.patch_moments import gather_patch_moments

    names = sorted(n.name for n in g.find(Op.CONV2D, Op.DEPTHWISE_CONV2D, Op.DENSE))
    moments = gather_patch_moments(g, CalibrationSet([x]))

    class NoBatches(CalibrationSet):
        def batches(self):
            raise AssertionError("the pass read the data although its moments were handed on")

    ctx.data = NoBatches([x])
    ctx.put(PatchMoments(names), g, moments)
    res = LearnedRounding(blocks=False)(g, ctx)  # block reconstruction reads the images (test above)
    layers = res.stats["layers"]
    assert layers[depthwise.name]["bits"] == 4
    assert {v["bits"] for k, v in layers.items() if k != depthwise.name} == {8}
    assert g.node(depthwise.name).weight_quant == fq4
    np.testing.assert_array_equal(quantized_kernel(g.node(depthwise.name), fq4), g.node(depthwise.name).weight.const)
    for n in g.find(Op.CONV2D, Op.DENSE):
        assert n.weight_quant.bits == 8
        np.testing.assert_array_equal(quantized_kernel(n, n.weight_quant), n.weight.const)


def _residual_graph(rng, hw=8, c=6):
    """conv -> relu6 -> [depthwise -> relu6 -> 1x1 conv] + skip -> 1x1 conv -> relu: one residual block."""
    from qfrewrite.ir import ClipAttrs

    g = Graph("residual")
    x = g.add_input("x", (None, hw, hw, 3))

    def layer(op, y, kshape, attrs, clip=True):
        n = kshape[2] * kshape[3] if op is Op.DEPTHWISE_CONV2D else kshape[3]
        y = g.add_node(op, [y, g.const(rng.normal(scale=0.4, size=kshape)), g.const(rng.normal(scale=0.1, size=n))],
                       attrs).output
        return g.add_node(Op.CLIP, [y], ClipAttrs(0.0, 6.0)).output if clip else y

    a = layer(Op.CONV2D, x, (3, 3, 3, c), ConvAttrs((1, 1), "SAME"))
    b = layer(Op.DEPTHWISE_CONV2D, a, (3, 3, c, 1), ConvAttrs((1, 1), "SAME"))
    b = layer(Op.CONV2D, b, (1, 1, c, c), ConvAttrs(), clip=False)
    s = g.add_node(Op.ADD, [a, b]).output
    g.outputs = [layer(Op.CONV2D, s, (1, 1, c, 4), ConvAttrs((1, 1), "SAME"))]
    return g


def test_segments_read_one_value_and_never_cut_a_residual_block(rng):
    from qfrewrite.ir import single_input_segments

    g = _residual_graph(rng)
    segments = single_input_segments(g, min_weighted=1)
    assert [n.name for _, nodes in segments for n in nodes] == [n.name for n in g.topological_order()]
    for start, nodes in segments:
        produced = {n.output.name for n in nodes}
        reads = {v.name for n in nodes for v in n.inputs if not v.is_const and v.name not in produced}
        assert reads == {start.name}
    add = g.find(Op.ADD)[0]
    holding = [nodes for _, nodes in segments if add in nodes][0]
    assert {n.op for n in holding} >= {Op.DEPTHWISE_CONV2D, Op.ADD}  # the branch and its skip in one segment
    assert [sum(n.op in (Op.CONV2D, Op.DEPTHWISE_CONV2D) for n in nodes) for _, nodes in segments] == [1, 2, 1]
    two = g.copy()
    two.outputs = [two.outputs[0], two.find(Op.ADD)[0].output]
    assert single_input_segments(two) is None


def _block_error(g, ref_graph, x):
    y = Executor(g, quantize=True)(x)[0].astype(np.float64)
    return float(((y - Executor(ref_graph)(x)[0]) ** 2).sum() / len(x))


def test_block_reconstruction_lowers_the_output_error_of_the_layerwise_rounding(rng):
    """3-bit weights on a graph of four layers, two blocks (the first three layers with the residual block, then the
    last layer): rounding the first block's kernels together for its output lowers its output error below the
    layer-wise rounding's, the model's output error ends below the layer-wise rounding's and equal to what the
    report gives for the last block, the kernels stay on exactly their grid, and with too little training every
    block keeps the layer-wise rounding, bit for bit."""
    g = _residual_graph(rng)
    x = rng.uniform(0, 1, (64, 8, 8, 3)).astype(np.float32)
    spec = QuantSpec(weight_bits=3)
    layerwise = g.copy()
    LearnedRounding(blocks=False)(layerwise, Context(CalibrationSet([x]), spec=spec))
    blocked = g.copy()
    res = LearnedRounding(block_iterations=300)(blocked, Context(CalibrationSet([x]), spec=spec))
    verify(blocked)
    first, last = res.stats["blocks"]
    assert len(first["layers"]) == 3 and len(last["layers"]) == 1
    assert first["kept"] and first["reconstructed_error"] < first["layerwise_error"]
    final = last["reconstructed_error"] if last["kept"] else last["layerwise_error"]
    np.testing.assert_allclose(_block_error(blocked, g, x), final, rtol=1e-3)
    assert _block_error(blocked, g, x) < _block_error(layerwise, g, x)
    for node in blocked.find(Op.CONV2D, Op.DEPTHWISE_CONV2D):
        np.testing.assert_array_equal(quantized_kernel(node, node.weight_quant), node.weight.const)
    short = g.copy()
    res = LearnedRounding(block_iterations=1)(short, Context(CalibrationSet([x]), spec=spec))
    assert not any(b["kept"] for b in res.stats["blocks"])  # one step from the layer-wise codes moves none
    for a, b in zip(short.find(Op.CONV2D, Op.DEPTHWISE_CONV2D), layerwise.find(Op.CONV2D, Op.DEPTHWISE_CONV2D)):
        np.testing.assert_array_equal(a.weight.const, b.weight.const)


def test_block_reconstruction_only_below_eight_bits_and_on_single_output_graphs(rng):
    g = _residual_graph(rng)
    x = rng.uniform(0, 1, (16, 8, 8, 3)).astype(np.float32)
    res = LearnedRounding()(g.copy(), Context(CalibrationSet([x]), spec=QuantSpec(weight_bits=8)))
    assert "blocks" not in res.stats
    two = g.copy()
    two.outputs = [two.outputs[0], two.find(Op.ADD)[0].output]
    res = LearnedRounding(block_iterations=2)(two, Context(CalibrationSet([x]), spec=QuantSpec(weight_bits=4)))
    assert "blocks" not in res.stats and any("one input and one output" in s.reason for s in res.skipped)
    with pytest.raises(QfrewriteError, match="blocks"):
        LearnedRounding(blocks="yes")
