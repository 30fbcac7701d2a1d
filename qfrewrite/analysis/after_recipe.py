"""The graph a recipe's float rewrite leaves, for diagnosing which layers still hurt after it.

``dfq`` (:func:`qfrewrite.recipes.dfq`): FoldBatchNorm, FoldDeadChannels and CrossLayerEqualization keep the float
function (CrossLayerEqualization with its fused clip: on the calibration data), so their graph is the float
reference; CorrectBias changes each layer's bias for the error of that layer's quantized kernel, which holds only
when the kernel is quantized. So the view is the graph after the first three passes, and for each weight
granularity the biases CorrectBias computes for it: the layer harm (:func:`~qfrewrite.analysis.layer_harm.
measure_layer_harm`) uses a layer's corrected bias together with its quantized kernel, and the float biases
everywhere else.
"""
from __future__ import annotations

import logging
from typing import Dict, Sequence, Tuple

import numpy as np

from ..errors import QfrewriteError
from ..ir import WEIGHTED_OPS, Graph
from ..pass_infra import Context
from ..spec import QuantSpec

__all__ = ["RECIPES", "recipe_view"]

log = logging.getLogger(__name__)

#: the recipes a diagnosis can be made after
RECIPES = ("dfq",)


def recipe_view(graph: Graph, data, spec: QuantSpec, recipe: str = "dfq",
                granularities: Sequence[str] = ("per_tensor", "per_channel"),
                ) -> Tuple[Graph, Dict[Tuple[str, str], np.ndarray]]:
    """A copy of ``graph`` after ``recipe``'s function-keeping passes, and ``{(layer, granularity): bias}`` from its
    bias correction for each granularity (see the module docstring). ``data``: the calibration set."""
    from ..passes import CorrectBias
    from ..recipes import dfq

    if recipe not in RECIPES:
        raise QfrewriteError(f"diagnose can look at the graph after the recipe(s) {', '.join(RECIPES)}; "
                             f"got {recipe!r}")
    passes = list(dfq(spec=spec, quantize=False))
    work = graph.copy()
    ctx = Context(data=data, spec=spec)
    for p in passes:
        if isinstance(p, CorrectBias):
            continue
        if p.run(work, ctx).modified:
            ctx.invalidate()
    biases: Dict[Tuple[str, str], np.ndarray] = {}
    for g in granularities:
        corrected = work.copy()
        CorrectBias(weights=g).run(corrected, Context(data=data, spec=spec))
        for node in corrected.find(*WEIGHTED_OPS):
            if node.bias is not None:
                biases[node.name, g] = np.asarray(node.bias.const, np.float32)
    log.info("diagnosing the graph after %s: %s (CorrectBias applied with each quantized kernel)", recipe,
             ", ".join(p.name for p in passes if not isinstance(p, CorrectBias)))
    return work, biases
