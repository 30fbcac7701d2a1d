"""Single-reader chains between two layers.

A *chain* joins layer 1 to layer 2 through nodes that each read the previous value alone and that a caller accepts
(typically positively homogeneous, channel-wise ops: ReLU, ``Clip(0, hi)``, zero Pad, pools, channel-keeping
reshapes). Anything else ends the search with a reason: a second reader (a residual ``Add``), a graph output, an op
the caller refuses, or layer 2 reading the value as a weight.
"""
from __future__ import annotations

from typing import Callable, Collection, List, Tuple, Union

from .graph import Node
from .queries import sole_reader_or_reason
from .traits import WEIGHTED_OPS

__all__ = ["walk_chain", "MAX_CHAIN"]

#: the longest chain searched: real chains are a few nodes long, the bound keeps a malformed graph from looping
MAX_CHAIN = 64


def walk_chain(layer: Node, through: Callable[[Node], bool], targets: Collection = WEIGHTED_OPS,
               what: str = "accepted") -> Union[Tuple[List[Node], Node], str]:
    """Follow the single-reader path from ``layer``'s output to the next node of ``targets``.

    Every node in between must satisfy ``through``. Returns ``(chain nodes, next layer)`` or a reason string
    (``what`` names the property ``through`` tests, for the reason).
    """
    chain: List[Node] = []
    value = layer.output
    for _ in range(MAX_CHAIN):
        nxt = sole_reader_or_reason(value)
        if isinstance(nxt, str):
            return f"{value.name} {nxt}"
        if nxt.op in targets:
            if nxt.inputs[0] is not value:
                return f"{nxt.name} reads {value.name} as a weight"
            return chain, nxt
        if not through(nxt):
            return f"{nxt.name} ({nxt.op.value}) is not {what}"
        chain.append(nxt)
        value = nxt.output
    return f"no layer within {MAX_CHAIN} nodes of {layer.name}"
