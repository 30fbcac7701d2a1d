"""Fold inference BatchNorm into the preceding Conv2D, DepthwiseConv2D or Dense layer (exact).

Maths: :mod:`qfrewrite.numerics.batchnorm`. The source epsilon is kept (Keras 1e-3, torch 1e-5, 0 is legal).

Handled: a BatchNorm whose input is the output of a Conv2D / DepthwiseConv2D / Dense used by nothing else
(:func:`qfrewrite.ir.batchnorm_fold_target`; the layer gains a bias if it had none). The layer records the fold
(:class:`~qfrewrite.ir.FoldedBatchNorm`: the BatchNorm's name and scale). Left alone, each as a skip with the
reason: a BatchNorm after any other op, or after a layer whose output has other consumers or is a graph output
(folding would change those readers).

Contract: ensures ``BN_FOLDED`` (with ``scope="all"``); cannot run once the weights are final or quantized.

Zero-variance channels are folded without dividing by zero and reported in ``stats["zero_variance_channels"]``
(``{bn: [channels]}``); those with ``var + eps == 0`` also in ``stats["degenerate_channels"]`` (folded as the
constant ``beta``).

``scope``: ``"all"``; ``"depthwise"`` (only BatchNorms after DepthwiseConv2D); ``"pointwise"`` (only after Conv2D
and Dense, i.e. every non-depthwise layer).
"""
from __future__ import annotations

import logging
from typing import Dict, List

import numpy as np

from qfrewrite.contracts import Property
from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import (WEIGHTED_OPS, FoldedBatchNorm, Graph, Node, Op, batchnorm_fold_target, bn_affine, set_bias,
                          set_kernel)
from qfrewrite.numerics.batchnorm import fold_bn_into_kernel
from qfrewrite.pass_infra import Context, Pass, PassResult, Skip

__all__ = ["FoldBatchNorm"]

log = logging.getLogger(__name__)

_SCOPES = {
    "all": WEIGHTED_OPS,
    "depthwise": (Op.DEPTHWISE_CONV2D,),
    "pointwise": (Op.CONV2D, Op.DENSE),
}


class FoldBatchNorm(Pass):
    """Fold BatchNorm into the weights and bias of the layer before it."""

    exact = True
    forbids = frozenset({Property.WEIGHTS_FINAL, Property.QUANTIZED})

    def __init__(self, scope: str = "all"):
        if scope not in _SCOPES:
            raise QfrewriteError(f"FoldBatchNorm scope must be one of {sorted(_SCOPES)}, got {scope!r}")
        self.scope = scope

    @property
    def ensures(self):  # type: ignore[override]
        return frozenset({Property.BN_FOLDED}) if self.scope == "all" else frozenset()

    def __repr__(self) -> str:
        return f"FoldBatchNorm(scope={self.scope!r})"

    def _check(self, bn: Node):
        """Return the producer layer to fold into, or a reason string why not."""
        layer = batchnorm_fold_target(bn)
        if not isinstance(layer, str) and layer.op not in _SCOPES[self.scope]:
            return f"{layer.op.value} outside scope {self.scope!r}"
        return layer

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        folded: List[str] = []
        skipped: List[Skip] = []
        degenerate: Dict[str, List[int]] = {}
        zero_var: Dict[str, List[int]] = {}
        for bn in graph.find(Op.BATCH_NORM):
            layer = self._check(bn)
            if isinstance(layer, str):
                skipped.append(Skip(bn.name, layer))
                continue
            scale, shift, bad = bn_affine(bn)
            if bad.any():
                degenerate[bn.name] = np.flatnonzero(bad).tolist()
            zv = np.flatnonzero(np.asarray(bn.inputs[4].const) == 0)
            if zv.size:
                zero_var[bn.name] = zv.tolist()
            bias = layer.bias.const if layer.bias is not None else None
            k2, b2 = fold_bn_into_kernel(layer.weight.const, bias, scale, shift,
                                         depthwise=layer.op is Op.DEPTHWISE_CONV2D)
            set_kernel(graph, layer, k2, "folded")
            set_bias(graph, layer, b2, "folded")
            prior = layer.folded_bn
            layer.folded_bn = (FoldedBatchNorm(bn.source_name, scale) if prior is None
                               else FoldedBatchNorm(f"{prior.name}+{bn.source_name}", prior.scale * scale))
            graph.bypass(bn)
            folded.append(bn.name)
        if folded:
            graph.remove_unused()
        stats = {"folded": len(folded), "zero_variance_channels": zero_var}
        if zero_var:
            log.warning("BatchNorm channels with zero variance (folded scale gamma/sqrt(eps), often weight outliers "
                        "of constant channels; FoldDeadChannels folds those away): %s", zero_var)
        if degenerate:
            stats["degenerate_channels"] = degenerate
            log.warning("BatchNorm channels with variance + eps == 0 folded as constants: %s", degenerate)
        if not folded:
            skipped.append(Skip(None, "no BatchNorm after a foldable layer"
                                + (f" in scope {self.scope!r}" if self.scope != "all" else "")))
        return PassResult(graph, bool(folded), stats, skipped)
