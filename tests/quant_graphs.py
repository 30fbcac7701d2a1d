"""Synthetic graphs for the quantization-friendly passes: dead channels, equalization pairs."""
from __future__ import annotations

import numpy as np

from qfrewrite.ir import ClipAttrs, ConvAttrs, GlobalMeanAttrs, Graph, Op


def dead_channel_mobilenet(rng, hw=12, c_in=3, width=6, dead=(1, 4), dead_bias=(-0.5, 2.0), pad="SAME",
                           tiny=0.0) -> Graph:
    """Folded-BN MobileNetV1-like chain with dead stem channels: conv 3x3 (channels ``dead`` have weights ``tiny``
    and biases ``dead_bias``) -> ReLU6 -> depthwise 3x3 (``pad``) -> ReLU6 -> pointwise 1x1 -> ReLU6 -> depthwise
    -> ReLU6 -> mean -> dense."""
    g = Graph("dead_channel_mobilenet")
    x = g.add_input("input", (None, hw, hw, c_in))

    def layer(op, x, kshape, attrs, c, kernel=None, b=None):
        k = kernel if kernel is not None else rng.normal(scale=0.5, size=kshape)
        b = b if b is not None else rng.normal(scale=0.5, size=c)
        y = g.add_node(op, [x, g.const(k), g.const(b)], attrs).output
        return g.add_node(Op.CLIP, [y], ClipAttrs(0.0, 6.0)).output

    k0 = rng.normal(scale=0.5, size=(3, 3, c_in, width))
    b0 = rng.normal(scale=0.5, size=width)
    for ch, bias in zip(dead, dead_bias):
        k0[..., ch] = tiny
        b0[ch] = bias
    y = layer(Op.CONV2D, x, None, ConvAttrs((2, 2), "SAME"), width, k0, b0)
    kd = rng.normal(scale=0.5, size=(3, 3, width, 1))
    kd[:, :, list(dead), 0] *= 50.0  # the outliers of a near-zero-variance BN fold
    y = layer(Op.DEPTHWISE_CONV2D, y, None, ConvAttrs((1, 1), pad), width, kd)
    y = layer(Op.CONV2D, y, (1, 1, width, 2 * width), ConvAttrs(), 2 * width)
    y = layer(Op.DEPTHWISE_CONV2D, y, (3, 3, 2 * width, 1), ConvAttrs((1, 1), "SAME"), 2 * width)
    y = g.add_node(Op.GLOBAL_MEAN, [y], GlobalMeanAttrs(keepdims=False)).output
    y = g.add_node(Op.DENSE, [y, g.const(rng.normal(size=(2 * width, 5))), g.const(rng.normal(size=5))]).output
    g.outputs = [y]
    return g


def dw_pw_graph(rng, hw=8, c=6, bn=True, dw_bias=None, pw_kernel=(1, 1), clip_hi=6.0) -> Graph:
    """depthwise 3x3 SAME [+ BN] -> Clip(0, hi) -> conv ``pw_kernel`` (SAME) -> output."""
    g = Graph("dw_pw")
    x = g.add_input("x", (None, hw, hw, c))
    ins = [x, g.const(rng.normal(scale=0.5, size=(3, 3, c, 1)))]
    if dw_bias is not None:
        ins.append(g.const(dw_bias))
    y = g.add_node(Op.DEPTHWISE_CONV2D, ins, ConvAttrs(padding="SAME")).output
    if bn:
        from tests.graphs import add_bn

        y = add_bn(g, rng, y, c)
    y = g.add_node(Op.CLIP, [y], ClipAttrs(0.0, clip_hi)).output
    k2 = rng.normal(scale=0.5, size=(*pw_kernel, c, 2 * c))
    y = g.add_node(Op.CONV2D, [y, g.const(k2), g.const(rng.normal(size=2 * c))], ConvAttrs(padding="SAME")).output
    g.outputs = [y]
    return g
