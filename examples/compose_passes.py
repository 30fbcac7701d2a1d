"""Compose your own pipeline: passes are plain objects, the manager verifies after each one and reports.

    python examples/compose_passes.py [MODEL] [IMAGE_DIR]
"""
import argparse
import logging

import qfrewrite
from qfrewrite.contracts import Property
from qfrewrite.demo.run import DEMO_IMAGES, DEMO_MODEL
from qfrewrite.images import ImageFolder
from qfrewrite.ir import Op
from qfrewrite.passes import (CorrectBias, CrossLayerEqualization, FoldBatchNorm, FoldDeadChannels,
                              InsertFakeQuant)


class CountDepthwise(qfrewrite.Pass):
    """A pass of your own: counts depthwise convs and changes nothing (modified=False, with the reason)."""

    exact = True
    requires = frozenset({Property.BN_FOLDED})  # the manager refuses a list that runs it before FoldBatchNorm

    def run(self, graph, ctx):
        return qfrewrite.PassResult(graph, False, {"depthwise": len(graph.find(Op.DEPTHWISE_CONV2D))},
                                    [qfrewrite.Skip(None, "counts only")])


ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default=str(DEMO_MODEL))
ap.add_argument("images", nargs="?", default=str(DEMO_IMAGES))
args = ap.parse_args()
logging.basicConfig(level=logging.WARNING)

# CorrectBias takes its weight options from the pipeline's spec: it corrects exactly the per-tensor weights that
# InsertFakeQuant applies. Giving CorrectBias(weights="per_channel") here would be refused before any work.
passes = [FoldBatchNorm(), CountDepthwise(), FoldDeadChannels(), CrossLayerEqualization(clip="exact"),
          CorrectBias(), InsertFakeQuant(weights="per_tensor", activations="mse")]
result = qfrewrite.rewrite(args.model, passes=passes, data=ImageFolder(args.images, preprocess="inception"))
print(f"spec: {result.spec.describe()}")
print(result.report)
for entry in result.report.passes:
    if entry.drift:
        print(f"{entry.name}: output SQNR {entry.drift['sqnr_db']:.1f} dB vs the graph before it")
