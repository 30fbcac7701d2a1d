"""Fold inference BatchNorm into the preceding Conv2D, DepthwiseConv2D or Dense layer (exact).

Maths: :mod:`qfrewrite.numerics.batchnorm`. The source epsilon is kept (Keras 1e-3, torch 1e-5, 0 is legal).

Handled: a BatchNorm whose input is the output of a Conv2D / DepthwiseConv2D / Dense used by nothing else
(the layer gains a bias if it had none). Left alone: a BatchNorm after any other op, or after a layer whose output
has other consumers or is a graph output (folding would change those readers); these are counted in
``stats["skipped"]`` with the reason.

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

from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import Graph, Node, Op
from qfrewrite.numerics.batchnorm import bn_scale_shift, fold_bn_into_kernel
from qfrewrite.pass_infra import Context, Pass, PassResult

__all__ = ["FoldBatchNorm"]

log = logging.getLogger(__name__)

_SCOPES = {
    "all": (Op.CONV2D, Op.DEPTHWISE_CONV2D, Op.DENSE),
    "depthwise": (Op.DEPTHWISE_CONV2D,),
    "pointwise": (Op.CONV2D, Op.DENSE),
}


class FoldBatchNorm(Pass):
    """Fold BatchNorm into the weights and bias of the layer before it."""

    exact = True

    def __init__(self, scope: str = "all"):
        if scope not in _SCOPES:
            raise QfrewriteError(f"FoldBatchNorm scope must be one of {sorted(_SCOPES)}, got {scope!r}")
        self.scope = scope

    def __repr__(self) -> str:
        return f"FoldBatchNorm(scope={self.scope!r})"

    def _check(self, bn: Node):
        """Return the producer layer to fold into, or a reason string why not."""
        producer = bn.inputs[0].producer
        if producer is None or producer.op not in _SCOPES["all"]:
            return f"input is {'a graph input' if producer is None else producer.op.value}"
        if producer.op not in _SCOPES[self.scope]:
            return f"{producer.op.value} outside scope {self.scope!r}"
        out = producer.output
        if len(out.uses()) != 1 or any(out is o for o in producer.graph.outputs):
            return "layer output has other readers"
        if producer.weight_quant is not None:
            return "layer kernel is already quantized"
        return producer

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        folded: List[str] = []
        skipped: Dict[str, str] = {}
        degenerate: Dict[str, List[int]] = {}
        zero_var: Dict[str, List[int]] = {}
        for bn in graph.find(Op.BATCH_NORM):
            layer = self._check(bn)
            if isinstance(layer, str):
                skipped[bn.name] = layer
                continue
            gamma, beta, mean, var = (v.const for v in bn.inputs[1:5])
            scale, shift, bad = bn_scale_shift(gamma, beta, mean, var, bn.attrs.epsilon)
            if bad.any():
                degenerate[bn.name] = np.flatnonzero(bad).tolist()
            zv = np.flatnonzero(np.asarray(var) == 0)
            if zv.size:
                zero_var[bn.name] = zv.tolist()
            bias = layer.bias.const if layer.bias is not None else None
            k2, b2 = fold_bn_into_kernel(layer.weight.const, bias, scale, shift,
                                         depthwise=layer.op is Op.DEPTHWISE_CONV2D)
            new_k = graph.const(k2, name=layer.name + "/kernel_folded")
            layer.set_input(1, new_k)
            new_b = graph.const(b2, name=layer.name + "/bias_folded")
            if layer.bias is not None:
                layer.set_input(2, new_b)
            else:
                layer.append_input(new_b)
            layer.meta.setdefault("folded_bn", bn.source_name)
            layer.meta["bn_scale"] = scale.astype(np.float32)
            graph.bypass(bn)
            folded.append(bn.name)
        if folded:
            graph.remove_unused()
        stats = {"folded": len(folded), "skipped": skipped, "zero_variance_channels": zero_var}
        if zero_var:
            log.warning("BatchNorm channels with zero variance (folded scale gamma/sqrt(eps), often weight outliers "
                        "of constant channels; FoldDeadChannels folds those away): %s", zero_var)
        if degenerate:
            stats["degenerate_channels"] = degenerate
            log.warning("BatchNorm channels with variance + eps == 0 folded as constants: %s", degenerate)
        if not folded:
            stats["reason"] = "no BatchNorm after a foldable layer" + (f" in scope {self.scope!r}"
                                                                       if self.scope != "all" else "")
        return PassResult(graph, bool(folded), stats)
