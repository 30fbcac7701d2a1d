"""Top-1 of the recipes on the real models in ../shared: float, and int8 per-tensor / per-channel for each recipe.

Calibration and evaluation images are disjoint (``benchmarks.common.split_images``: calibration from the even
positions of the class-sorted folder, evaluation from the odd ones). The int8 accuracy is that of
the simulated int8 graph (weights and activations fake-quantized exactly as the emitted TFLite model holds them);
``--tflite`` also emits each int8 model and scores it in LiteRT.

    python benchmarks/bench_passes.py                  # three models, recipes plain/dfq, both granularities, TF PTQ
    python benchmarks/bench_passes.py --models tf_slim_v1 --recipes dfq --granularity per_tensor --eval 200

``--tf-ptq`` adds TensorFlow's own post-training integer quantization of the same float graph with the same
calibration images (``benchmarks.bench_ptq.tf_ptq``), scored in LiteRT. Writes a markdown table to stdout and, with
``--out``, the rows as JSON.
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

from benchmarks.common import MODELS, SHARED, split_images  # noqa: E402

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


def top1_tflite(flatbuffer: bytes, images, offset: int) -> float:
    """Top-1 (%) of a TFLite model run image by image in LiteRT."""
    return 100.0 * float(np.mean(predictions_tflite(flatbuffer, images) - offset == images.labels))


def predictions_tflite(flatbuffer: bytes, images) -> np.ndarray:
    """The arg-max class index of a TFLite model on each image, run image by image in LiteRT."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=flatbuffer)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    preds = np.empty(len(images), np.int64)
    for i in range(len(images)):
        x = images.preprocess(images.images[i:i + 1])
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(inp["dtype"])
        it.set_tensor(inp["index"], x)
        it.invoke()
        preds[i] = int(it.get_tensor(out["index"]).reshape(-1).argmax())
    return preds


def run(models, recipe_names, granularities, n_calib: int, n_eval: int, activations: Optional[str],
        tflite: bool, tf_ptq: bool) -> List[Dict]:
    import qfrewrite
    from qfrewrite import recipes
    from qfrewrite.images import ImageFolder

    rows = []
    for name in models:
        spec = MODELS[name]
        path = SHARED / spec["file"]
        if not path.exists():
            log.warning("%s: %s is absent, skipped", name, path)
            continue
        graph = qfrewrite.load(path, **spec.get("load", {}))
        offset = 1 if graph.outputs[0].shape[-1] == 1001 else 0  # TF-slim: index 0 is the background class
        allimg = ImageFolder(SHARED / "images" / "imagenet_sample", preprocess=spec["preprocess"],
                             progress=False).read(graph)
        calib, evals = split_images(allimg, n_calib, n_eval)
        t0 = time.time()
        f32 = top1(graph, evals, offset, quantize=False)
        rows.append({"model": name, "recipe": "float", "granularity": "-", "top1": f32, "delta": 0.0,
                     "seconds": time.time() - t0, "calib": len(calib), "eval": len(evals)})
        print(f"{name}: float {f32:.2f} on {len(evals)} images", flush=True)
        for gran in granularities:
            if tf_ptq:
                from benchmarks.bench_ptq import tf_ptq as tf_ptq_model

                t0 = time.time()
                fb = tf_ptq_model(graph, np.concatenate(list(calib.batches())), gran == "per_channel")
                row = {"model": name, "recipe": "tf_ptq", "granularity": gran, "top1": top1_tflite(fb, evals, offset)}
                row["delta"] = row["top1"] - f32
                row["seconds"] = time.time() - t0
                rows.append(row)
                print(f"{name}: TF PTQ {gran} {row['top1']:.2f} ({row['delta']:+.2f})", flush=True)
            for recipe in recipe_names:
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
                    row["tflite_top1"] = top1_tflite(result.to_tflite(quantized=True), evals, offset)
                row["seconds"] = time.time() - t0
                rows.append(row)
                print(f"{name}: {recipe} {gran} int8 {row['top1']:.2f} ({row['delta']:+.2f})", flush=True)
    return rows


def table(rows: List[Dict]) -> str:
    lines = ["| model | recipe | weights | int8 top-1 | vs float | float after rewrite | TFLite int8 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        tfl = f"{r['tflite_top1']:.2f}" if "tflite_top1" in r else ""
        fl = f"{r['float_after_rewrite']:.2f}" if "float_after_rewrite" in r else ""
        delta = "" if r["recipe"] == "float" else f"{r['delta']:+.2f}"
        lines.append(f"| {r['model']} | {r['recipe']} | {r['granularity']} | {r['top1']:.2f} | {delta} | {fl} | "
                     f"{tfl} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(MODELS))
    ap.add_argument("--recipes", nargs="+", default=["plain", "dfq"], choices=RECIPES)
    ap.add_argument("--granularity", nargs="+", default=["per_tensor", "per_channel"],
                    choices=["per_tensor", "per_channel"])
    ap.add_argument("--calib", type=int, default=200, help="calibration images (even positions)")
    ap.add_argument("--eval", type=int, default=500, help="evaluation images (odd positions, at most 500)")
    ap.add_argument("--activations", default=None, help="InsertFakeQuant activation range method (default: its own)")
    ap.add_argument("--tflite", action="store_true", help="also emit each int8 model and score it in LiteRT")
    ap.add_argument("--tf-ptq", action="store_true", help="add TensorFlow's post-training quantization")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = run(args.models, args.recipes, args.granularity, args.calib, args.eval, args.activations, args.tflite,
               args.tf_ptq)
    print(table(rows))
    if args.out:
        from qfrewrite.io_utils import atomic_write_bytes

        atomic_write_bytes(args.out, json.dumps(rows, indent=2).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
