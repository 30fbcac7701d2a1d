"""High-bias absorption through ReLU (Nagel et al., arXiv 1906.04721, section 4.2; maths in
:mod:`qfrewrite.numerics.bias`).

For layer 1 -> ``Relu`` / ``Clip(0, hi)`` [/ per-channel ``Minimum``] -> layer 2, with ``c_i >= 0`` a lower bound of
layer 1's pre-activation channel ``i`` measured on the calibration data (``method="min"``: the data minimum;
``"3sigma"``: mean - 3 std, Nagel's Gaussian rule):

    b1_i -= c_i;   clip hi -> hi - c_i (per channel);   b2 += sum_taps W2[.., i, ..] c_i

The activation's range shrinks by ``c`` while the function is kept wherever the pre-activation stays above ``c``,
which holds on every calibration input with "min" and may fail on other inputs: the pass is declared not exact and
the pass manager reports its drift. A ``Clip(0, hi)`` with an absorbed channel becomes ``Relu`` + ``Minimum`` with the
per-channel constant ``hi - c``.

Left alone: pairs where layer 2 reads zero padding (a ``Pad`` in the chain, or a padded 3x3 conv/depthwise: the
padded zeros would stand for ``-c`` after absorption, so borders change), chains without a ReLU, and everything
:func:`qfrewrite.ir.walk_chain` refuses (several readers, residual ``Add``); each is a skip with the reason.

Contract: needs data; requires ``BN_FOLDED``; cannot run once the biases are corrected (the correction is measured on
the activations absorption shifts) or the graph quantized.
"""
from __future__ import annotations

import logging
from typing import Dict, List

import numpy as np

from qfrewrite.analysis.moments import channel_moments
from qfrewrite.contracts import Property
from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import (WEIGHTED_OPS, Graph, Node, Op, const_operand, is_positively_homogeneous, layer_kind,
                          padding_free, set_bias, walk_chain)
from qfrewrite.numerics.bias import absorption_amount
from qfrewrite.numerics.kernels import const_input_bias
from qfrewrite.pass_infra import Context, Pass, PassResult, Skip

__all__ = ["AbsorbBias"]

log = logging.getLogger(__name__)

#: the ops between the two layers: ReLU-like (a ReLU, a clip at 0, a per-channel clip) and zero padding
_CHAIN_OPS = (Op.RELU, Op.CLIP, Op.MINIMUM, Op.PAD)


def _chain_op(node: Node) -> bool:
    return node.op in _CHAIN_OPS and is_positively_homogeneous(node, rescaling_bounds=True)


class AbsorbBias(Pass):
    """Move the provably-positive part of a ReLU's input into the next layer's bias."""

    exact = False
    needs_data = True
    requires = frozenset({Property.BN_FOLDED})
    forbids = frozenset({Property.BIAS_CORRECTED, Property.QUANTIZED})

    def __init__(self, method: str = "min"):
        if method not in ("min", "3sigma"):
            raise QfrewriteError(f"AbsorbBias method must be 'min' or '3sigma', got {method!r}")
        self.method = method

    def __repr__(self) -> str:
        return f"AbsorbBias(method={self.method!r})"

    def _pairs(self, graph: Graph, skipped: List[Skip]):
        pairs = []
        for layer in graph.find(*WEIGHTED_OPS):
            if layer.bias is None:
                skipped.append(Skip(layer.name, "no bias"))
                continue
            res = walk_chain(layer, _chain_op, WEIGHTED_OPS, "a ReLU, a clip at 0 or zero padding")
            if isinstance(res, str):
                skipped.append(Skip(layer.name, res))
                continue
            chain, second = res
            if not chain or chain[0].op not in (Op.RELU, Op.CLIP):
                skipped.append(Skip(layer.name, "no ReLU after the layer"))
                continue
            if any(n.op is Op.PAD for n in chain) or not padding_free(second):
                skipped.append(Skip(layer.name, f"{second.name} reads zero padding"))
                continue
            pairs.append((layer, chain, second))
        return pairs

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        skipped: List[Skip] = []
        pairs = self._pairs(graph, skipped)
        if not pairs:
            return PassResult(graph, False, {"absorbed_layers": 0},
                              skipped + [Skip(None, "no layer -> ReLU -> padding-free layer pair")])
        moments = channel_moments(graph, ctx, [p[0].output.name for p in pairs])
        absorbed: Dict[str, int] = {}
        for layer, chain, second in pairs:
            mo = moments[layer.output.name]
            hi = None
            for n in chain:
                if n.op is Op.CLIP and n.attrs.hi is not None:
                    hi = n.attrs.hi if hi is None else min(hi, n.attrs.hi)
                elif n.op is Op.MINIMUM:
                    m = np.asarray(const_operand(n)[1].const, np.float64).reshape(-1)
                    hi = m if hi is None else np.minimum(hi, m)
            c = absorption_amount(mo.min, mo.mean, mo.std, self.method, hi)
            if not np.any(c > 0):
                continue
            set_bias(graph, layer, layer.bias.const.astype(np.float64) - c, "absorbed")
            self._shift_chain(graph, chain, c)
            k2 = second.weight.const
            b2 = (second.bias.const.astype(np.float64) if second.bias is not None else 0.0)
            set_bias(graph, second, b2 + const_input_bias(k2, c, layer_kind(second)), "absorbed")
            absorbed[layer.name] = int(np.sum(c > 0))
        if absorbed:
            graph.remove_unused()
        stats = {"absorbed_layers": len(absorbed), "absorbed_channels": absorbed, "method": self.method}
        if not absorbed:
            skipped.append(Skip(None, "no channel's pre-activation stays above 0 on the calibration data"))
        return PassResult(graph, bool(absorbed), stats, skipped)

    @staticmethod
    def _shift_chain(graph: Graph, chain, c: np.ndarray) -> None:
        for node in chain:
            if node.op is Op.MINIMUM:
                x, k = const_operand(node)
                vec = np.broadcast_to(np.asarray(k.const, np.float64).reshape(-1), c.shape) - c
                idx = [i for i, v in enumerate(node.inputs) if v is k][0]
                node.set_input(idx, graph.const(vec.astype(np.float32), name=node.name + "/clip_absorbed"))
            elif node.op is Op.CLIP:
                relu = graph.add_node(Op.RELU, [node.inputs[0]], name=node.name + "/relu", meta=dict(node.meta))
                out = relu
                if node.attrs.hi is not None:
                    out = graph.add_node(Op.MINIMUM, [relu.output, graph.const(
                        (node.attrs.hi - c).astype(np.float32), name=node.name + "/clip_absorbed")],
                        name=node.name + "/min", meta=dict(node.meta))
                node.output.replace_all_uses_with(out.output)
                graph.remove_node(node)
