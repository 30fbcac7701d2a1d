"""A float ``.tflite`` as the source: does quantizing it give what quantizing the original model gives?

For every ../shared model:

1. the original is imported and written to a float ``.tflite`` by TensorFlow's converter (``Result.to_tflite``);
2. **round trip**: the ``.tflite`` is read back (``qfrewrite.load``) and re-emitted; the largest difference of the
   outputs, relative to the largest output, is reported between the original graph and the file, and between the
   file and its re-emission (LiteRT), on the evaluation images;
3. **accuracy**: ``qfrewrite.convert.convert`` (recipe dfq, per-channel weights: the command line's defaults) runs
   once from the original model and once from the ``.tflite``, on the same preprocessed calibration images (even
   positions of the sorted folder), and both int8 files are scored in LiteRT on the evaluation images (odd
   positions);
4. ``--control``: instead of 1-3, the noise floor of that comparison: ``convert`` from the original, and from the
   original with every weight moved by one float32 ulp in a random direction (the size of the differences between
   BatchNorm folded by ``FoldBatchNorm`` and by the converter), scored the same way;
5. ``--diagnose``: the wall time of ``diagnose`` on the int8 file made from the ``.tflite`` (the stored-scales
   report), against ``diagnose`` of the float ``.tflite`` in the same run.

    python benchmarks/bench_tflite_source.py --calib 200 --eval 200
    python benchmarks/bench_tflite_source.py --models torchvision_v2 --diagnose
    python benchmarks/bench_tflite_source.py --control --calib 200 --eval 500

Prints markdown tables; ``--json`` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MODELS, SHARED, add_output_options, output_dir, ready, split_images  # noqa: E402

log = logging.getLogger("bench_tflite_source")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def run(models: List[str], n_calib: int, n_eval: int, out_dir: Path, with_diagnose: bool) -> List[Dict]:
    import qfrewrite
    from qfrewrite.convert import convert
    from qfrewrite.diagnose import diagnose
    from qfrewrite.evaluate import evaluate, predict
    from qfrewrite.images import ImageFolder

    rows = []
    for name in models:
        spec = MODELS[name]
        original = qfrewrite.load(SHARED / spec["file"], **spec.get("load", {}))
        float_tflite = out_dir / f"{name}_float.tflite"
        qfrewrite.rewrite(original, passes=[], stats=False).to_tflite(float_tflite)
        from_file = qfrewrite.load(float_tflite)
        images = ImageFolder(SHARED / "images" / "imagenet_sample", preprocess=spec["preprocess"],
                             limit=2 * max(n_calib, n_eval), progress=False).read(original)
        calib, evals = split_images(images, n_calib, n_eval)
        x_eval = np.concatenate(list(evals.batches()))
        y_orig = predict(original, x_eval)
        y_file = predict(str(float_tflite), x_eval)
        reemitted = out_dir / f"{name}_reemitted.tflite"
        qfrewrite.rewrite(from_file, passes=[], stats=False).to_tflite(reemitted)
        y_re = predict(str(reemitted), x_eval)
        row = {"model": name, "calib": len(calib), "eval": len(evals),
               "rel_original_vs_file": _rel(y_orig, y_file), "rel_file_vs_reemitted": _rel(y_file, y_re),
               "rel_file_vs_imported": _rel(y_file, predict(from_file, x_eval)),
               "top1_float_original": evaluate(original, evals).top1,
               "top1_float_tflite": evaluate(str(float_tflite), evals).top1}
        for tag, source in (("original", SHARED / spec["file"]), ("tflite", float_tflite)):
            out = out_dir / f"{name}_int8_from_{tag}.tflite"
            load_opts = spec.get("load", {}) if tag == "original" else {}
            t0 = time.perf_counter()
            convert(source, out, calib, holdout=0, progress=False, **load_opts)
            row[f"seconds_{tag}"] = time.perf_counter() - t0
            r = evaluate(str(out), evals, reference=y_orig)
            row[f"top1_int8_{tag}"] = r.top1
            row[f"agreement_{tag}"] = r.top1_agreement
            log.info("%s int8 from %s: %s", name, tag, r)
        if with_diagnose:
            t0 = time.perf_counter()
            diagnose(out_dir / f"{name}_int8_from_tflite.tflite")
            row["diagnose_int8_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            diagnose(float_tflite)
            row["diagnose_float_s"] = time.perf_counter() - t0
        rows.append(row)
        log.info("%s: %s", name, row)
    return rows


def _one_ulp(graph, seed: int = 0):
    """A copy of ``graph`` with every constant moved by one float32 ulp, up or down at random (zeros stay zero: an
    all-zero channel is a fact the passes act on, not a rounding)."""
    g = graph.copy()
    rng = np.random.default_rng(seed)
    for v in g.values():
        if v.is_const and v.const.dtype == np.float32 and v.const.size > 1:
            up = rng.random(v.const.shape) < 0.5
            moved = np.where(up, np.nextafter(v.const, np.float32(np.inf)),
                             np.nextafter(v.const, np.float32(-np.inf)))
            v.set_const(np.where(v.const == 0, v.const, moved))
    return g


def control(models: List[str], n_calib: int, n_eval: int, out_dir: Path) -> List[Dict]:
    import qfrewrite
    from qfrewrite.convert import convert
    from qfrewrite.evaluate import evaluate, predict
    from qfrewrite.images import ImageFolder

    rows = []
    for name in models:
        spec = MODELS[name]
        original = qfrewrite.load(SHARED / spec["file"], **spec.get("load", {}))
        images = ImageFolder(SHARED / "images" / "imagenet_sample", preprocess=spec["preprocess"],
                             limit=2 * max(n_calib, n_eval), progress=False).read(original)
        calib, evals = split_images(images, n_calib, n_eval)
        y_orig = predict(original, np.concatenate(list(evals.batches())))
        row = {"model": name, "calib": len(calib), "eval": len(evals)}
        for tag, graph in (("original", original), ("one_ulp", _one_ulp(original))):
            out = out_dir / f"{name}_int8_{tag}.tflite"
            convert(graph, out, calib, holdout=0, progress=False)
            row[f"top1_int8_{tag}"] = evaluate(str(out), evals, reference=y_orig).top1
        rows.append(row)
        log.info("%s: %s", name, row)
    return rows


def control_table(rows: List[Dict]) -> str:
    lines = ["| model | calib / eval | dfq int8 top-1 % from original | from original, weights moved 1 ulp | "
             "difference (points) |", "|---|---|---|---|---|"]
    for r in rows:
        d = 100 * (r["top1_int8_one_ulp"] - r["top1_int8_original"])
        lines.append(f"| {r['model']} | {r['calib']} / {r['eval']} | {100 * r['top1_int8_original']:.1f} | "
                     f"{100 * r['top1_int8_one_ulp']:.1f} | {d:+.1f} |")
    return "\n".join(lines)


def tables(rows: List[Dict]) -> str:
    lines = ["| model | original vs .tflite (rel) | .tflite vs imported graph (rel) | .tflite vs re-emitted (rel) |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['rel_original_vs_file']:.2e} | {r['rel_file_vs_imported']:.2e} | "
                     f"{r['rel_file_vs_reemitted']:.2e} |")
    lines += ["", "| model | calib / eval | float top-1 % (original / .tflite) | dfq int8 top-1 % from original | "
                  "from .tflite | difference (points) | convert s (original / .tflite) |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = 100 * (r["top1_int8_tflite"] - r["top1_int8_original"])
        lines.append(f"| {r['model']} | {r['calib']} / {r['eval']} | {100 * r['top1_float_original']:.1f} / "
                     f"{100 * r['top1_float_tflite']:.1f} | {100 * r['top1_int8_original']:.1f} | "
                     f"{100 * r['top1_int8_tflite']:.1f} | {d:+.1f} | {r['seconds_original']:.0f} / "
                     f"{r['seconds_tflite']:.0f} |")
    if any("diagnose_int8_s" in r for r in rows):
        lines += ["", "| model | diagnose int8 .tflite s | diagnose float .tflite s | ratio |", "|---|---|---|---|"]
        for r in rows:
            if "diagnose_int8_s" in r:
                lines.append(f"| {r['model']} | {r['diagnose_int8_s']:.2f} | {r['diagnose_float_s']:.2f} | "
                             f"{r['diagnose_int8_s'] / r['diagnose_float_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--calib", type=int, default=200, help="calibration images (even positions)")
    ap.add_argument("--eval", type=int, default=200, help="evaluation images (odd positions)")
    ap.add_argument("--control", action="store_true", help="only the one-ulp noise floor of the comparison")
    ap.add_argument("--diagnose", action="store_true", help="also time diagnose of the int8 and float files")
    add_output_options(ap)
    args = ap.parse_args(argv)
    if not ready(log):
        return 1
    with output_dir(args.out_dir) as out_dir:
        if args.control:
            rows = control(args.models, args.calib, args.eval, out_dir)
        else:
            rows = run(args.models, args.calib, args.eval, out_dir, args.diagnose)
    print(control_table(rows) if args.control else tables(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
