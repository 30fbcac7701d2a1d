import numpy as np
import pytest

from qfrewrite.errors import GraphError, VerificationError
from qfrewrite.ir import ClipAttrs, ConvAttrs, Graph, Op, verify
from tests.graphs import tiny_mobilenet


def test_build_and_verify(rng):
    g = tiny_mobilenet(rng)
    verify(g)
    ops = [n.op for n in g.topological_order()]
    assert ops[0] is Op.CONV2D and ops[-1] is Op.DENSE
    assert g.outputs[0].shape == (None, 5)
    assert g.find(Op.DEPTHWISE_CONV2D)[0].output.shape == (None, 8, 8, 8)


def test_producer_and_uses(rng):
    g = tiny_mobilenet(rng)
    conv = g.find(Op.CONV2D)[0]
    bn = conv.output.consumers()[0]
    assert bn.op is Op.BATCH_NORM and bn.inputs[0].producer is conv
    assert conv.output.uses() == [(bn, 0)]


def test_remove_refuses_dangling_use(rng):
    g = tiny_mobilenet(rng)
    conv = g.find(Op.CONV2D)[0]
    with pytest.raises(GraphError, match="is used by"):
        g.remove_node(conv)
    verify(g)


def test_replace_all_uses_and_bypass(rng):
    g = tiny_mobilenet(rng)
    clip = g.find(Op.CLIP)[0]
    before = len(g)
    g.bypass(clip)
    verify(g)
    assert len(g) == before - 1
    assert clip.graph is None


def test_verifier_catches_shape_mismatch(rng):
    g = tiny_mobilenet(rng)
    g.find(Op.CLIP)[0].output.shape = (None, 3, 3, 3)
    with pytest.raises(VerificationError, match="output shape"):
        verify(g)


def test_verifier_catches_cross_graph_value(rng):
    g = Graph()
    x = g.add_input("x", (None, 4, 4, 2))
    other = Graph()
    with pytest.raises(GraphError, match="another graph"):
        g.add_node(Op.RELU, [other.add_input("y", (None, 4, 4, 2))])
    y = g.add_node(Op.RELU, [x])
    g.outputs = [y.output]
    verify(g)


def test_copy_is_deep(rng):
    g = tiny_mobilenet(rng)
    h = g.copy()
    h.find(Op.CONV2D)[0].weight.const[...] = 0
    assert np.any(g.find(Op.CONV2D)[0].weight.const != 0)


def test_typed_attrs_are_checked():
    g = Graph()
    x = g.add_input("x", (None, 4, 4, 2))
    with pytest.raises(GraphError, match="ClipAttrs"):
        g.add_node(Op.CLIP, [x], ConvAttrs())
    assert g.add_node(Op.CLIP, [x], ClipAttrs(0, 6)).attrs.is_relu6
