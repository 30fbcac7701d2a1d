"""Compose your own pipeline: passes are plain objects, the manager verifies after each one and reports.

    python examples/compose_passes.py [MODEL] [IMAGE_DIR]
"""
import argparse
import logging

import qfrewrite
from qfrewrite.demo.run import DEMO_IMAGES, DEMO_MODEL
from qfrewrite.images import ImageFolder
from qfrewrite.ir import Op
from qfrewrite.passes import (CorrectBias, CrossLayerEqualization, FoldBatchNorm, FoldDeadChannels,
                              InsertFakeQuant)


class CountDepthwise(qfrewrite.Pass):
    """A pass of your own: counts depthwise convs and changes nothing (modified=False)."""

    exact = True

    def run(self, graph, ctx):
        return qfrewrite.PassResult(graph, False, {"depthwise": len(graph.find(Op.DEPTHWISE_CONV2D))})


ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default=str(DEMO_MODEL))
ap.add_argument("images", nargs="?", default=str(DEMO_IMAGES))
args = ap.parse_args()
logging.basicConfig(level=logging.WARNING)

passes = [FoldBatchNorm(), CountDepthwise(), FoldDeadChannels(), CrossLayerEqualization(clip="exact"),
          CorrectBias(weights="per_tensor"), InsertFakeQuant(weights="per_tensor", activations="mse")]
result = qfrewrite.rewrite(args.model, passes=passes, data=ImageFolder(args.images, preprocess="inception"))
print(result.report)
for entry in result.report.passes:
    if entry.drift:
        print(f"{entry.name}: output SQNR {entry.drift['sqnr_db']:.1f} dB vs the graph before it")
