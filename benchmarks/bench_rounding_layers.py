"""Where 4-bit weights lose accuracy: learned rounding with only some layer classes at W4 and the rest at W8.

For a ../shared model, the float graph after ``recipes.dfq``'s function-keeping passes (FoldBatchNorm,
FoldDeadChannels, CrossLayerEqualization) is copied once per configuration; every weighted layer gets its
``weight_quant`` (per channel, min/max range) at the bits its class is given, ``LearnedRounding`` rounds each kernel
on that grid (it honours a layer's ``weight_quant``) and corrects its bias, and ``InsertFakeQuant`` quantizes the
activations (int8). The layer classes, in topological order of the weighted layers: ``first`` (the first one),
``depthwise``, ``pointwise`` (1x1 convs; any other conv counts here too), ``classifier`` (the last one).

The input-patch moments LearnedRounding needs are gathered once on the calibration images and handed to every
copy (:meth:`Context.put`: the copies hold the same float function, so the moments are the same). Scores are of the
simulated int8 graph on the evaluation images (disjoint from calibration): top-1, top-1 agreement with the float
graph, and the output SQNR against the float logits (dB: ``sum f^2 / sum (q - f)^2``), which is far less noisy than
top-1 on 500 images (one image is 0.2 point).

    python benchmarks/bench_rounding_layers.py --models torchvision_v2 --json benchmarks/results/rounding_layers.json

Prints a Markdown table and writes ``--json``.
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

from benchmarks.common import MODELS, load_shared_model, report_rows, shared_images_present  # noqa: E402

CLASSES = ("first", "depthwise", "pointwise", "classifier")

#: name -> the classes at 4 bits (every other class at 8)
CONFIGS = {
    "all W8": (),
    "all W4": CLASSES,
    "first W4": ("first",),
    "depthwise W4": ("depthwise",),
    "pointwise W4": ("pointwise",),
    "classifier W4": ("classifier",),
    "W4, first and depthwise W8": ("pointwise", "classifier"),
    "W4, first and classifier W8": ("depthwise", "pointwise"),
}


def layer_classes(graph) -> Dict[str, str]:
    """Each weighted layer's class (see the module docstring)."""
    from qfrewrite.ir import WEIGHTED_OPS, layer_kind

    nodes = [n for n in graph.topological_order() if n.op in WEIGHTED_OPS and n.weight is not None
             and n.weight.const is not None]
    out = {}
    for i, n in enumerate(nodes):
        if i == 0:
            out[n.name] = "first"
        elif i == len(nodes) - 1:
            out[n.name] = "classifier"
        elif layer_kind(n) == "depthwise":
            out[n.name] = "depthwise"
        else:
            out[n.name] = "pointwise"
    return out


def _logits(graph, images, quantize: bool, batch: int = 50) -> np.ndarray:
    from qfrewrite.backend.executor import Executor

    ex = Executor(graph, quantize=quantize)
    return np.concatenate([np.asarray(ex(images.preprocess(images.images[s:s + batch]))[0]).reshape(
        min(batch, len(images) - s), -1) for s in range(0, len(images), batch)])


def run(models, configs, n_calib: int, n_eval: int, rounding: str) -> List[Dict]:
    from qfrewrite import recipes
    from qfrewrite.analysis.patch_moments import PatchMoments, gather_patch_moments
    from qfrewrite.ir import WEIGHTED_OPS
    from qfrewrite.pass_infra import Context
    from qfrewrite.passes import CorrectBias, InsertFakeQuant, LearnedRounding
    from qfrewrite.quant.weights import weight_quant_attrs
    from qfrewrite.spec import QuantSpec

    rows: List[Dict] = []
    for name in models:
        graph, offset, calib, evals = load_shared_model(name, n_calib, n_eval)
        spec = QuantSpec(weights="per_channel")
        view = graph.copy()
        ctx = Context(data=calib, spec=spec)
        for p in recipes.dfq(spec=spec, quantize=False):
            if not isinstance(p, (CorrectBias, LearnedRounding)) and p.run(view, ctx).modified:
                ctx.invalidate()
        classes = layer_classes(view)
        ref = _logits(view, evals, quantize=False)
        float_top1 = 100.0 * float(np.mean(ref.argmax(-1) - offset == evals.labels))
        t0 = time.perf_counter()
        moments = gather_patch_moments(view, calib, progress=False) if rounding == "learned" else None
        moments_s = time.perf_counter() - t0
        print(f"{name}: float top-1 {float_top1:.1f}; input moments {moments_s:.0f} s; layers "
              + ", ".join(f"{c} {list(classes.values()).count(c)}" for c in CLASSES), flush=True)
        for label in configs:
            at4 = set(CONFIGS[label])
            t0 = time.perf_counter()
            g = view.copy()
            qctx = Context(data=calib, spec=spec)
            for n in g.find(*WEIGHTED_OPS):
                if n.name in classes:
                    n.weight_quant = weight_quant_attrs(n, "per_channel", "minmax", 4 if classes[n.name] in at4 else 8)
            if rounding == "learned":
                qctx.put(PatchMoments(sorted(classes)), g, moments)
                LearnedRounding().run(g, qctx)
            else:
                CorrectBias().run(g, qctx)
            InsertFakeQuant().run(g, qctx)
            q = _logits(g, evals, quantize=True)
            row = {"model": name, "config": label, "w4_classes": sorted(at4), "rounding": rounding,
                   "float_top1": float_top1, "top1": 100.0 * float(np.mean(q.argmax(-1) - offset == evals.labels)),
                   "agreement": 100.0 * float(np.mean(q.argmax(-1) == ref.argmax(-1))),
                   "sqnr_db": float(10 * np.log10(np.sum(ref ** 2) / np.sum((q - ref) ** 2))),
                   "seconds": time.perf_counter() - t0, "calib": len(calib), "eval": len(evals)}
            rows.append(row)
            print(f"{name} {label} {rounding}: top-1 {row['top1']:.1f} (float {float_top1:.1f}), agreement "
                  f"{row['agreement']:.1f}, output SQNR {row['sqnr_db']:.2f} dB, {row['seconds']:.0f} s", flush=True)
    return rows


def table(rows: List[Dict]) -> str:
    out = ["| model | W4 layers (rest W8) | rounding | float top-1 | top-1 | - float | agreement | output SQNR dB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['config']} | {r['rounding']} | {r['float_top1']:.1f} | {r['top1']:.1f} | "
                   f"{r['top1'] - r['float_top1']:+.1f} | {r['agreement']:.1f} | {r['sqnr_db']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["torchvision_v2"], choices=list(MODELS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--rounding", default="learned", choices=["learned", "nearest"],
                    help="nearest: nearest rounding with CorrectBias")
    ap.add_argument("--calib", type=int, default=500, help="calibration images (even positions)")
    ap.add_argument("--eval", type=int, default=500, help="evaluation images (odd positions)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not shared_images_present():
        return 2
    rows = run(args.models, args.configs, args.calib, args.eval, args.rounding)
    return report_rows(rows, table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
