"""MobileNetV3 (hard-swish, squeeze-excite, hard-sigmoid gates) through the recipes, nearest and learned rounding.

No pretrained MobileNetV3 is in ../shared, so the benchmark builds Keras's ``MobileNetV3Small`` and
``MobileNetV3Large`` architectures (``weights=None``, logits out) with non-trivial BatchNorm statistics (each BN's
moving mean, variance, gamma and beta drawn at random, ``tests.keras_models.randomize_bn``, fixed seed), feeds them
the ../shared images (0..255, the models rescale themselves; calibration at the even positions, evaluation at the
odd ones) and judges each int8 model against its own float model on the evaluation images: output SQNR (dB) and
top-1 agreement with float (with random weights the float model's top-1 takes few distinct classes, which the run
prints: agreement then says little and the SQNR is the measure), in the simulation and in the emitted TFLite file;
and each layer of the file against
the simulation (``qfrewrite.tflite_inspect.layer_agreement``: the share of values within one step, the worst
difference in steps).

    python benchmarks/bench_v3.py --calib 200 --eval 100
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import SHARED, report_rows, shared_images_present, split_images  # noqa: E402

ARCHS = ("MobileNetV3Small", "MobileNetV3Large")


def build(arch: str, size: int, seed: int):
    import keras

    from tests.keras_models import randomize_bn

    m = getattr(keras.applications, arch)(input_shape=(size, size, 3), weights=None, classifier_activation=None,
                                          include_preprocessing=True)
    randomize_bn(m, np.random.default_rng(seed))
    return m


def run(archs, size: int, granularities, roundings, recipes_: List[str], n_calib: int, n_eval: int,
        n_layer_check: int, seed: int) -> List[Dict]:
    import qfrewrite
    from qfrewrite import recipes
    from qfrewrite.backend.executor import Executor
    from qfrewrite.evaluate import predict
    from qfrewrite.images import ImageFolder
    from qfrewrite.numerics.metrics import output_drift
    from qfrewrite.tflite_inspect import layer_agreement

    rows = []
    for arch in archs:
        graph = qfrewrite.load(build(arch, size, seed))
        images = ImageFolder(SHARED / "images" / "imagenet_sample", preprocess="raw", progress=False).read(graph)
        calib, evals = split_images(images, n_calib, n_eval)
        x = np.concatenate(list(evals.batches()))
        reference = Executor(graph)(x)
        classes = len(np.unique(reference[0].reshape(len(x), -1).argmax(-1)))
        print(f"{arch}: the float model's top-1 takes {classes} distinct classes on {len(x)} images", flush=True)
        for recipe in recipes_:
            for gran in granularities:
                for rounding in roundings:
                    t0 = time.perf_counter()
                    res = qfrewrite.rewrite(graph, getattr(recipes, recipe)(weights=gran, rounding=rounding),
                                            data=calib, stats=False)
                    fb = res.to_tflite()
                    sec = time.perf_counter() - t0
                    sim = output_drift(reference, Executor(res.graph, quantize=True)(x))
                    file = output_drift(reference, [predict(fb, x)])
                    layers = layer_agreement(res.graph, fb, x[:n_layer_check])
                    worst = min(layers.values(), key=lambda a: a["within_1_lsb"])
                    row = {"arch": arch, "float_classes": classes, "recipe": recipe, "granularity": gran, "rounding": rounding,
                           "sim_sqnr_db": sim["sqnr_db"], "sim_top1_agreement": sim["top1_agreement"],
                           "tflite_sqnr_db": file["sqnr_db"], "tflite_top1_agreement": file["top1_agreement"],
                           "layers_checked": len(layers), "worst_layer_within_1_step": worst["within_1_lsb"],
                           "worst_layer_max_steps": max(a["max_lsb"] for a in layers.values()), "seconds": sec}
                    rows.append(row)
                    print(f"{arch} {recipe} {gran} {rounding}: SQNR {row['sim_sqnr_db']:.2f} dB sim / "
                          f"{row['tflite_sqnr_db']:.2f} dB file, top-1 agreement {100 * row['sim_top1_agreement']:.1f}"
                          f" / {100 * row['tflite_top1_agreement']:.1f}%, {len(layers)} layers: worst "
                          f"{100 * row['worst_layer_within_1_step']:.1f}% within 1 step, {sec:.0f} s", flush=True)
    return rows


def table(rows) -> str:
    out = ["| architecture | recipe | weights | rounding | SQNR dB (sim / file) | top-1 agreement % (sim / file) | "
           "layers: worst within 1 step | s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['arch']} | {r['recipe']} | {r['granularity']} | {r['rounding']} | "
                   f"{r['sim_sqnr_db']:.2f} / {r['tflite_sqnr_db']:.2f} | {100 * r['sim_top1_agreement']:.1f} / "
                   f"{100 * r['tflite_top1_agreement']:.1f} | {100 * r['worst_layer_within_1_step']:.1f}% of "
                   f"{r['layers_checked']} | {r['seconds']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--granularity", nargs="+", default=["per_tensor", "per_channel"],
                    choices=["per_channel", "per_tensor"])
    ap.add_argument("--rounding", nargs="+", default=["nearest", "learned"], choices=["nearest", "learned"])
    ap.add_argument("--recipes", nargs="+", default=["plain", "dfq"], choices=["plain", "dfq"])
    ap.add_argument("--calib", type=int, default=200)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--layer-check", type=int, default=4, help="images for the layer-by-layer file check")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not shared_images_present("images"):
        return 2
    rows = run(args.archs, args.size, args.granularity, args.rounding, args.recipes, args.calib, args.eval,
               args.layer_check, args.seed)
    return report_rows(rows, table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
