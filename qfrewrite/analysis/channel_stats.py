"""Per-channel weight statistics of every Conv2D, DepthwiseConv2D and Dense layer.

For output channel ``c`` of a kernel ``W``: ``lo_c = min W[..., c]``, ``hi_c = max W[..., c]``, ``range_c = hi_c - lo_c``.
A layer's *spread* is ``max_c range_c / median_c range_c`` (inf when the median is 0): how many times wider the
per-tensor range is than a typical channel needs.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ..ir import Graph, Node, Op

__all__ = ["weight_channel_ranges", "graph_stats_summary"]


def weight_channel_ranges(node: Node) -> np.ndarray:
    """``(C_out, 2)`` array of per-output-channel (min, max) of the node's kernel."""
    k = node.weight.const
    if node.op is Op.DEPTHWISE_CONV2D:
        kh, kw, c, m = k.shape
        flat = k.reshape(kh * kw, c * m)
    else:
        flat = k.reshape(-1, k.shape[-1])
    return np.stack([flat.min(axis=0), flat.max(axis=0)], axis=1)


def graph_stats_summary(graph: Graph) -> Dict[str, Any]:
    """A compact per-layer summary: ``{layer: {"spread": x, "max_range": y, "zero_channels": n}}``."""
    out: Dict[str, Any] = {}
    for node in graph.find(Op.CONV2D, Op.DEPTHWISE_CONV2D, Op.DENSE):
        r = weight_channel_ranges(node)
        rng = r[:, 1] - r[:, 0]
        med = float(np.median(rng))
        out[node.name] = {
            "spread": float(rng.max() / med) if med > 0 else float("inf"),
            "max_range": float(rng.max()),
            "zero_channels": int(np.sum(np.all(r == 0, axis=1))),
        }
    return out
