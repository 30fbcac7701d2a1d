"""Builders of small synthetic MobileNet-like graphs for unit tests."""
from __future__ import annotations

import numpy as np

from qfrewrite.ir import (BatchNormAttrs, ClipAttrs, ConvAttrs, GlobalMeanAttrs, Graph, Op)


def bn_params(rng, c, var_lo=0.1):
    return [rng.uniform(0.5, 2.0, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(var_lo, 1.0, c)]


def add_bn(g, rng, x, c, eps=1e-3, params=None):
    params = params if params is not None else bn_params(rng, c)
    return g.add_node(Op.BATCH_NORM, [x] + [g.const(p) for p in params], BatchNormAttrs(eps)).output


def tiny_mobilenet(rng, hw=16, c_in=3, width=8, classes=5, bias=False, bn=True, dense_head=True) -> Graph:
    """stem conv 3x3/2 + BN + ReLU6 -> depthwise 3x3 + BN + ReLU6 -> pointwise 1x1 + BN + ReLU6 -> mean -> head."""
    g = Graph("tiny_mobilenet")
    x = g.add_input("input", (None, hw, hw, c_in))

    def conv(op, x, kshape, attrs, c):
        ins = [x, g.const(rng.normal(scale=0.5, size=kshape))]
        if bias:
            ins.append(g.const(rng.normal(scale=0.1, size=c)))
        y = g.add_node(op, ins, attrs).output
        if bn:
            y = add_bn(g, rng, y, c)
        return g.add_node(Op.CLIP, [y], ClipAttrs(0.0, 6.0)).output

    y = conv(Op.CONV2D, x, (3, 3, c_in, width), ConvAttrs((2, 2), "SAME"), width)
    y = conv(Op.DEPTHWISE_CONV2D, y, (3, 3, width, 1), ConvAttrs((1, 1), ((1, 1), (1, 1))), width)
    y = conv(Op.CONV2D, y, (1, 1, width, 2 * width), ConvAttrs(), 2 * width)
    y = g.add_node(Op.GLOBAL_MEAN, [y], GlobalMeanAttrs(keepdims=False)).output
    if dense_head:
        y = g.add_node(Op.DENSE, [y, g.const(rng.normal(size=(2 * width, classes))),
                                  g.const(rng.normal(size=classes))]).output
    g.outputs = [y]
    return g
