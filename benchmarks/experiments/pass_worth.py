"""What dfq's passes are worth at one weight granularity, on both halves of the ../shared images: TFLite top-1 and
top-1 agreement with float of ``plain``, FoldDeadChannels alone ("fdc"), FoldDeadChannels + CorrectBias ("cb") and
``recipes.dfq()`` itself, calibrated on the 500 even-position images and scored in LiteRT on the 500 odd-position
ones, then the other way round (``--splits even odd``). Beside each variant: the images on which it and ``plain``
differ in being right, as ``+gained / -lost`` (of those lost, how many the float model gets wrong itself).

    python benchmarks/experiments/pass_worth.py --weights per_channel --models torchvision_v2 efficientnet_lite0
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

import qfrewrite  # noqa: E402
from benchmarks.bench_passes import predictions_tflite  # noqa: E402
from benchmarks.bench_recipes import float_predictions  # noqa: E402
from benchmarks.common import MODELS, load_shared_model  # noqa: E402
from qfrewrite import recipes  # noqa: E402
from qfrewrite.passes import CorrectBias, FoldBatchNorm, FoldDeadChannels, InsertFakeQuant  # noqa: E402
from qfrewrite.recipes import Recipe  # noqa: E402
from qfrewrite.spec import QuantSpec  # noqa: E402


def variants(weights: str):
    spec = QuantSpec(weights=weights)
    return {"plain": recipes.plain(weights=weights),
            "fdc": Recipe("fdc", [FoldBatchNorm(), FoldDeadChannels(), InsertFakeQuant()], spec),
            "cb": Recipe("cb", [FoldBatchNorm(), FoldDeadChannels(), CorrectBias(), InsertFakeQuant()], spec),
            "dfq": recipes.dfq(weights=weights)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="per_channel", choices=["per_channel", "per_tensor"])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--splits", nargs="+", default=["even", "odd"], choices=["even", "odd"])
    ap.add_argument("--variants", nargs="+", default=["plain", "fdc", "cb", "dfq"])
    args = ap.parse_args(argv)
    for name in args.models:
        graph, offset, even, odd = load_shared_model(name, 500, 500)
        for split in args.splits:
            calib, evals = (even, odd) if split == "even" else (odd, even)
            reference = float_predictions(graph, evals)
            labels = evals.labels
            print(f"{name} {args.weights} calibrated on {split}: float top-1 "
                  f"{100 * np.mean(reference - offset == labels):.1f}", flush=True)
            right = {}
            recipes_by_name = variants(args.weights)
            for key in args.variants:
                recipe = recipes_by_name[key]
                t0 = time.perf_counter()
                preds = predictions_tflite(qfrewrite.rewrite(graph, recipe, data=calib).to_tflite(), evals)
                right[key] = preds - offset == labels
                line = (f"  {key}: top-1 {100 * right[key].mean():.1f}, agreement with float "
                        f"{100 * np.mean(preds == reference):.1f}")
                if key != "plain" and "plain" in right:
                    gained, lost = right[key] & ~right["plain"], right["plain"] & ~right[key]
                    line += (f", against plain +{gained.sum()} / -{lost.sum()} (float wrong on "
                             f"{np.sum(lost & (reference - offset != labels))} of those lost)")
                print(f"{line} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
