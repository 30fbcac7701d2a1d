"""What each dfq pass is worth with per-channel or per-tensor weights: TFLite top-1 of plain, FoldDeadChannels +
CorrectBias ("cb"), FoldDeadChannels + CrossLayerEqualization + CorrectBias ("cle_cb", ``recipes.dfq(compare=False,
equalize=True)``), FoldDeadChannels + CrossLayerEqualization ("cle") and ``recipes.dfq()`` itself, each calibrated on
the 500 even-position ../shared images and scored in LiteRT on the 500 odd-position ones.

    python benchmarks/experiments/per_channel_equalization.py per_channel torchvision_v2 tf_slim_v1 keras_v1_025 \\
        efficientnet_lite0

The per-channel run of this script is what ``recipes.dfq``'s default (no equalization for per-channel 8-bit nearest
rounding) rests on; its figures are quoted in the recipe's docstring and the README.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import qfrewrite  # noqa: E402
from benchmarks.bench_passes import top1_tflite  # noqa: E402
from benchmarks.common import load_shared_model  # noqa: E402
from qfrewrite import recipes  # noqa: E402
from qfrewrite.passes import (CorrectBias, CrossLayerEqualization, FoldBatchNorm, FoldDeadChannels,  # noqa: E402
                              InsertFakeQuant)
from qfrewrite.recipes import Recipe  # noqa: E402
from qfrewrite.spec import QuantSpec  # noqa: E402


def main(argv) -> int:
    gran, models = argv[0], argv[1:]
    for name in models:
        graph, offset, calib, evals = load_shared_model(name, 500, 500)
        spec = QuantSpec(weights=gran)
        variants = {
            "plain": recipes.plain(weights=gran),
            "cb": Recipe("cb", [FoldBatchNorm(), FoldDeadChannels(), CorrectBias(), InsertFakeQuant()], spec),
            "cle_cb": recipes.dfq(weights=gran, compare=False, equalize=True),
            "cle": Recipe("cle", [FoldBatchNorm(), FoldDeadChannels(), CrossLayerEqualization(), InsertFakeQuant()],
                          spec),
            "dfq": recipes.dfq(weights=gran),
        }
        for key, recipe in variants.items():
            t0 = time.perf_counter()
            fb = qfrewrite.rewrite(graph, recipe, data=calib).to_tflite()
            print(f"{name} {gran} {key}: top-1 {top1_tflite(fb, evals, offset):.1f} ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
