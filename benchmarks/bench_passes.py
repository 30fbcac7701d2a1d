"""Top-1 of the recipes on the real models in ../shared: float, and int8 per-tensor / per-channel for each recipe.

Calibration and evaluation images are disjoint: calibration takes the last ``--calib`` images of the sorted folder,
evaluation the first ``--eval`` (the folder holds one image per class, sorted by class). The int8 accuracy is that of
the simulated int8 graph (weights and activations fake-quantized exactly as the emitted TFLite model holds them);
``--tflite`` also emits each int8 model and scores it in LiteRT.

    python benchmarks/bench_passes.py                              # every model, recipes plain/dfq, both granularities
    python benchmarks/bench_passes.py --models tf_slim_v1 --recipes dfq --granularity per_tensor --eval 200

Writes a markdown table to stdout and, with ``--out``, the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared"

#: name -> (file, load kwargs, preprocessing preset, label offset)
MODELS = {
    "tf_slim_v1": ("models/tf_mobilenet_v1_1.0_224_frozen.pb", {"outputs": ["MobilenetV1/Logits/SpatialSqueeze"]},
                   "inception", 1),
    "torchvision_v2": ("models/torchvision_mobilenet_v2.onnx", {}, "torch", 0),
    "keras_v1_025": ("models/keras_mobilenet_v1_0.25_224.h5", {}, "inception", 0),
    "efficientnet_lite0": ("models/efficientnet_lite0.onnx", {}, "efficientnet-lite", 0),
}
DEFAULT_MODELS = ("tf_slim_v1", "torchvision_v2", "keras_v1_025")
RECIPES = ("plain", "dfq", "qualcomm")

log = logging.getLogger("bench_passes")


def top1(graph, images, offset: int, quantize: bool, batch: int = 50) -> float:
    """Top-1 (%) of ``graph`` on an ImageSet with labels."""
    from qfrewrite.backend.executor import Executor

    ex = Executor(graph, quantize=quantize)
    hits = 0
    for s in range(0, len(images), batch):
        x = images.preprocess(images.images[s:s + batch])
        out = np.asarray(ex(x)[0])
        hits += int(np.sum(out.reshape(len(x), -1).argmax(-1) - offset == images.labels[s:s + batch]))
    return 100.0 * hits / len(images)


def top1_tflite(result, images, offset: int) -> float:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=result.to_tflite(quantized=True))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    hits = 0
    for i in range(len(images)):
        it.set_tensor(inp["index"], images.preprocess(images.images[i:i + 1]))
        it.invoke()
        hits += int(it.get_tensor(out["index"]).reshape(-1).argmax() - offset == images.labels[i])
    return 100.0 * hits / len(images)


def run(models, recipe_names, granularities, n_calib: int, n_eval: int, activations: Optional[str],
        tflite: bool) -> List[Dict]:
    import qfrewrite
    from qfrewrite import recipes
    from qfrewrite.images import ImageFolder

    rows = []
    for name in models:
        rel, kwargs, preset, offset = MODELS[name]
        path = SHARED / rel
        if not path.exists():
            log.warning("%s: %s is absent, skipped", name, path)
            continue
        graph = qfrewrite.load(path, **kwargs)
        allimg = ImageFolder(SHARED / "images" / "imagenet_sample", preprocess=preset, progress=False).read(graph)
        if n_calib + n_eval > len(allimg):
            raise SystemExit(f"--calib {n_calib} + --eval {n_eval} exceed the {len(allimg)} images")
        calib = allimg.subset(slice(len(allimg) - n_calib, None))
        evals = allimg.subset(slice(0, n_eval))
        t0 = time.time()
        f32 = top1(graph, evals, offset, quantize=False)
        rows.append({"model": name, "recipe": "float", "granularity": "-", "top1": f32, "delta": 0.0,
                     "seconds": time.time() - t0})
        print(f"{name}: float {f32:.2f}", flush=True)
        for recipe in recipe_names:
            for gran in granularities:
                t0 = time.time()
                options = {"weights": gran}
                if activations:
                    options["activations"] = activations
                result = qfrewrite.rewrite(graph, passes=getattr(recipes, recipe)(**options), data=calib,
                                           stats=False)
                row = {"model": name, "recipe": recipe, "granularity": gran,
                       "top1": top1(result.graph, evals, offset, quantize=True)}
                row["delta"] = row["top1"] - f32
                if recipe != "plain":
                    row["float_after_rewrite"] = top1(result.graph, evals, offset, quantize=False)
                if tflite:
                    row["tflite_top1"] = top1_tflite(result, evals, offset)
                row["seconds"] = time.time() - t0
                rows.append(row)
                print(f"{name}: {recipe} {gran} int8 {row['top1']:.2f} ({row['delta']:+.2f})", flush=True)
    return rows


def table(rows: List[Dict]) -> str:
    lines = ["| model | recipe | weights | int8 top-1 | vs float | TFLite int8 |", "|---|---|---|---|---|---|"]
    for r in rows:
        tfl = f"{r['tflite_top1']:.2f}" if "tflite_top1" in r else ""
        delta = "" if r["recipe"] == "float" else f"{r['delta']:+.2f}"
        lines.append(f"| {r['model']} | {r['recipe']} | {r['granularity']} | {r['top1']:.2f} | {delta} | {tfl} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(MODELS))
    ap.add_argument("--recipes", nargs="+", default=["plain", "dfq"], choices=RECIPES)
    ap.add_argument("--granularity", nargs="+", default=["per_tensor", "per_channel"],
                    choices=["per_tensor", "per_channel"])
    ap.add_argument("--calib", type=int, default=200, help="calibration images (taken from the end)")
    ap.add_argument("--eval", type=int, default=800, help="evaluation images (taken from the start)")
    ap.add_argument("--activations", default=None, help="InsertFakeQuant activation range method (default: its own)")
    ap.add_argument("--tflite", action="store_true", help="also emit each int8 model and score it in LiteRT")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = run(args.models, args.recipes, args.granularity, args.calib, args.eval, args.activations, args.tflite)
    print(table(rows))
    if args.out:
        from qfrewrite.io_utils import atomic_write_bytes

        atomic_write_bytes(args.out, json.dumps(rows, indent=2).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
