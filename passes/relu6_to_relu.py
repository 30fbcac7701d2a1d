"""Replace ReLU6 (``Clip(0, 6)``) by ReLU after chosen layers (not exact).

The Qualcomm MobileNet architecture (arXiv 1803.08607) uses ReLU in its pointwise convs, so that a per-tensor
activation range is set by the data rather than capped at 6 for every channel. On a pretrained graph the function
changes wherever an activation exceeded 6: on TF-slim MobileNetV1 in float, switching only the 1x1 convs cost 0.3
point of top-1 and switching every ReLU6 13 points; torchvision MobileNetV2 lost 0.15 either way. The pass manager
reports the measured drift.

``scope``: ``"pointwise"`` (after Conv2D with a 1x1 kernel and after Dense), ``"depthwise"`` (after
DepthwiseConv2D), ``"all"`` (every ``Clip(0, 6)``). The producing layer is looked up through an unfolded BatchNorm.
Left alone: clips with other bounds, and clips after other ops (outside ``"all"``).

Contract: cannot run once the graph is quantized (the activation ranges were calibrated on the clipped function).
"""
from __future__ import annotations

import logging
from typing import List, Optional

from qfrewrite.contracts import Property
from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import Graph, Node, Op
from qfrewrite.pass_infra import Context, Pass, PassResult, Skip

__all__ = ["ReLU6ToReLU"]

log = logging.getLogger(__name__)

_SCOPES = ("pointwise", "depthwise", "all")


def _layer_before(node: Node) -> Optional[Node]:
    prod = node.inputs[0].producer
    if prod is not None and prod.op is Op.BATCH_NORM:
        prod = prod.inputs[0].producer
    return prod


def _in_scope(layer: Optional[Node], scope: str) -> bool:
    if scope == "all":
        return True
    if layer is None:
        return False
    if scope == "depthwise":
        return layer.op is Op.DEPTHWISE_CONV2D
    if layer.op is Op.DENSE:
        return True
    return layer.op is Op.CONV2D and layer.weight.const.shape[:2] == (1, 1)


class ReLU6ToReLU(Pass):
    """Turn ``Clip(0, 6)`` into ``Relu`` after the layers of ``scope``."""

    exact = False
    forbids = frozenset({Property.QUANTIZED})

    def __init__(self, scope: str = "pointwise"):
        if scope not in _SCOPES:
            raise QfrewriteError(f"ReLU6ToReLU scope must be one of {_SCOPES}, got {scope!r}")
        self.scope = scope

    def __repr__(self) -> str:
        return f"ReLU6ToReLU(scope={self.scope!r})"

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        replaced: List[str] = []
        for clip in graph.find(Op.CLIP):
            if not clip.attrs.is_relu6 or not _in_scope(_layer_before(clip), self.scope):
                continue
            relu = graph.add_node(Op.RELU, [clip.inputs[0]], name=clip.name + "/relu", meta=dict(clip.meta))
            clip.output.replace_all_uses_with(relu.output)
            graph.remove_node(clip)
            replaced.append(clip.name)
        stats = {"replaced": len(replaced), "nodes": replaced, "scope": self.scope}
        if replaced:
            stats["note"] = "not exact: activations above 6 are no longer clipped (see the drift)"
        skipped = [] if replaced else [Skip(None, f"no ReLU6 in scope {self.scope!r}")]
        return PassResult(graph, bool(replaced), stats, skipped)
