"""A small MobileNet with planted outlier and all-zero channels, for the statistics and diagnose tests.

stem conv 3x3/2 + BN + ReLU6 -> dw1 3x3 + BN + ReLU6 -> pw1 1x1 + BN + ReLU6 -> dw2 3x3 + BN + ReLU6
-> pw2 1x1 + BN + ReLU6 -> mean -> dense.

Clean weights: kernels N(0, 0.5), BN gamma in [0.8, 1.25], variance in [0.5, 1.5] (scales within about 2x of each
other). Planted:

* outliers: the BN variance of the channel is ``1e-6``, so the folded scale ``gamma / sqrt(1e-6 + eps)`` is about
  30x the others (the TF-slim MobileNetV1 pattern);
* zeros: every kernel weight of the channel is 0;
* ``dead_feeders``: pw1 output channels with all-zero weights (they are then zero channels of pw1 too); pair them with
  outliers of dw2 on the same channel to get "an outlier that reads a dead channel".
"""
from __future__ import annotations

from typing import Dict, Sequence

from qfrewrite.ir import BatchNormAttrs, ClipAttrs, ConvAttrs, GlobalMeanAttrs, Graph, Op

WIDTH = 16
#: what :func:`planted_mobilenet` plants by default, by layer name
PLANTED_OUTLIERS: Dict[str, Sequence[int]] = {"dw1": (3, 11), "dw2": (5, 22)}
PLANTED_ZEROS: Dict[str, Sequence[int]] = {"dw1": (7,), "dw2": (2, 20)}
PLANTED_DEAD_FEEDERS: Sequence[int] = (5,)


def planted_mobilenet(rng, outliers: Dict[str, Sequence[int]] = PLANTED_OUTLIERS,
                      zeros: Dict[str, Sequence[int]] = PLANTED_ZEROS,
                      dead_feeders: Sequence[int] = PLANTED_DEAD_FEEDERS, hw: int = 16, width: int = WIDTH,
                      classes: int = 5, eps: float = 1e-3) -> Graph:
    """The graph described in the module docstring; layers are named stem, dw1, pw1, dw2, pw2, dense and each
    carries its name as ``meta["source_name"]``."""
    g = Graph("planted_mobilenet")
    x = g.add_input("input", (None, hw, hw, 3))

    def block(name, op, x, kshape, attrs, c):
        k = rng.normal(scale=0.5, size=kshape)
        for ch in zeros.get(name, ()):
            if op is Op.DEPTHWISE_CONV2D:
                k[:, :, ch, :] = 0.0
            else:
                k[..., ch] = 0.0
        if name == "pw1":
            for ch in dead_feeders:
                k[..., ch] = 0.0
        y = g.add_node(op, [x, g.const(k)], attrs, name=name, meta={"source_name": name}).output
        gamma = rng.uniform(0.8, 1.25, c)
        var = rng.uniform(0.5, 1.5, c)
        for ch in outliers.get(name, ()):
            var[ch] = 1e-6
        params = [gamma, rng.normal(scale=0.5, size=c), rng.normal(scale=0.2, size=c), var]
        y = g.add_node(Op.BATCH_NORM, [y] + [g.const(p) for p in params], BatchNormAttrs(eps), name=name + "_bn",
                       meta={"source_name": name + "_bn"}).output
        return g.add_node(Op.CLIP, [y], ClipAttrs(0.0, 6.0), name=name + "_relu6").output

    y = block("stem", Op.CONV2D, x, (3, 3, 3, width), ConvAttrs((2, 2), "SAME"), width)
    y = block("dw1", Op.DEPTHWISE_CONV2D, y, (3, 3, width, 1), ConvAttrs((1, 1), "SAME"), width)
    y = block("pw1", Op.CONV2D, y, (1, 1, width, 2 * width), ConvAttrs(), 2 * width)
    y = block("dw2", Op.DEPTHWISE_CONV2D, y, (3, 3, 2 * width, 1), ConvAttrs((1, 1), "SAME"), 2 * width)
    y = block("pw2", Op.CONV2D, y, (1, 1, 2 * width, 2 * width), ConvAttrs(), 2 * width)
    y = g.add_node(Op.GLOBAL_MEAN, [y], GlobalMeanAttrs(keepdims=False)).output
    y = g.add_node(Op.DENSE, [y, g.const(rng.normal(scale=0.3, size=(2 * width, classes))),
                              g.const(rng.normal(scale=0.1, size=classes))], name="dense",
                   meta={"source_name": "dense"}).output
    g.outputs = [y]
    return g


def expected(outliers=PLANTED_OUTLIERS, zeros=PLANTED_ZEROS, dead_feeders=PLANTED_DEAD_FEEDERS):
    """``{layer: (outlier channels, zero channels)}`` that a diagnosis must report, every layer included."""
    out = {name: ([], []) for name in ("stem", "dw1", "pw1", "dw2", "pw2", "dense")}
    for name, chs in outliers.items():
        out[name][0].extend(sorted(chs))
    for name, chs in zeros.items():
        out[name][1].extend(sorted(chs))
    out["pw1"][1].extend(sorted(dead_feeders))
    return {k: (sorted(a), sorted(b)) for k, (a, b) in out.items()}
