"""qfrewrite's int8 TFLite against TensorFlow's own post-training integer quantization, on the ../shared models.

For every model and weight granularity (per-channel, per-tensor) both pipelines start from the same imported float
graph and the same preprocessed calibration images:

* **qfrewrite**: ``rewrite(graph, [FoldBatchNorm(), InsertFakeQuant(weights=...)], data=calib)`` then
  ``Result.to_tflite`` (fully integer, checked);
* **TF PTQ**: the graph's float ``tf.function`` (built from constants) through ``TFLiteConverter`` with
  ``optimizations=[DEFAULT]``, a ``representative_dataset`` of the calibration images and int8-only builtins;
  per-tensor weights with ``converter._experimental_disable_per_channel = True``.

Both int8 models are scored in LiteRT on evaluation images disjoint from the calibration images (the folder is sorted
by class; calibration takes the even positions, evaluation the odd ones), against labels and against the float
graph's outputs. The wall time of each calibrate-and-emit pipeline is measured in the same process (image decoding
excluded from both) and reported as a ratio to TF PTQ's. ``--rss`` also calibrates MobileNetV2 on ``--rss-images``
images in a child process and reports its peak resident memory.

    python benchmarks/bench_ptq.py --models keras_v1_025 torchvision_v2 --calib 100 --eval 200
    python benchmarks/bench_ptq.py --rss --rss-images 1000 --models

Prints a markdown table; ``--json`` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MODELS, SHARED, add_output_options, output_dir, ready, split_images  # noqa: E402

log = logging.getLogger("bench_ptq")


def tf_ptq(graph, calib, per_channel: bool) -> bytes:
    """TensorFlow's post-training full-integer quantization of the graph's float function; ``calib``: an NHWC array
    or a calibration set, whose batches are then normalised as the converter asks for them (one image at a time)."""
    import tensorflow as tf

    from qfrewrite.emit.tflite import concrete_function

    cf = concrete_function(graph, batch=1, quantize=False)
    conv = tf.lite.TFLiteConverter.from_concrete_functions([cf], tf.Module())
    conv.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative():
        for batch in (calib.batches() if hasattr(calib, "batches") else [calib]):
            for i in range(len(batch)):
                yield [batch[i:i + 1]]

    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if not per_channel:
        conv._experimental_disable_per_channel = True
    return conv.convert()


def qfrewrite_ptq(graph, calib, weights: str, activations: str, path: Path):
    import qfrewrite
    from qfrewrite.passes import FoldBatchNorm, InsertFakeQuant

    res = qfrewrite.rewrite(graph, passes=[FoldBatchNorm(), InsertFakeQuant(weights=weights, activations=activations)],
                            data=calib, stats=False)
    res.to_tflite(path)
    return res


def run(models: List[str], n_calib: int, n_eval: int, granularities: List[str], activations: str,
        out_dir: Path) -> List[Dict]:
    import qfrewrite
    from qfrewrite.evaluate import evaluate, predict
    from qfrewrite.images import ImageFolder
    from qfrewrite.tflite_inspect import assert_fully_integer

    rows = []
    for name in models:
        spec = MODELS[name]
        graph = qfrewrite.load(SHARED / spec["file"], **spec.get("load", {}))
        images = ImageFolder(SHARED / "images" / "imagenet_sample", preprocess=spec["preprocess"],
                             limit=2 * max(n_calib, n_eval), progress=False).read(graph)
        calib_set, eval_set = split_images(images, n_calib, n_eval)
        calib = np.concatenate(list(calib_set.batches()))
        ref = predict(graph, np.concatenate(list(eval_set.batches())))
        fl = evaluate(graph, eval_set)
        log.info("%s float: %s", name, fl)
        rows.append({"model": name, "method": "float", "granularity": "-", "top1": fl.top1, "top5": fl.top5,
                     "sqnr_db": None, "agreement": None, "seconds": None, "ratio": None,
                     "calib": len(calib), "eval": len(eval_set)})
        for gran in granularities:
            per_channel = gran == "per_channel"
            path = out_dir / f"{name}_{gran}_qfrewrite.tflite"
            t0 = time.perf_counter()
            qfrewrite_ptq(graph, calib_set, gran, activations, path)
            t_q = time.perf_counter() - t0
            assert_fully_integer(str(path))
            t0 = time.perf_counter()
            fb = tf_ptq(graph, calib, per_channel)
            t_tf = time.perf_counter() - t0
            tf_path = out_dir / f"{name}_{gran}_tf.tflite"
            tf_path.write_bytes(fb)
            for method, p, sec in (("qfrewrite", path, t_q), ("tf_ptq", tf_path, t_tf)):
                r = evaluate(str(p), eval_set, reference=ref)
                rows.append({"model": name, "method": method, "granularity": gran, "top1": r.top1, "top5": r.top5,
                             "sqnr_db": r.sqnr_db, "agreement": r.top1_agreement, "seconds": sec,
                             "ratio": sec / t_tf, "calib": len(calib), "eval": len(eval_set)})
                log.info("%s %s %s: %s in %.1f s", name, gran, method, r, sec)
    return rows


def calibration_rss(model: str, n: int) -> Dict:
    """Peak RSS (GB) of a child process that reads ``n`` images and runs FoldBatchNorm + InsertFakeQuant.

    Read from the child's ``VmHWM`` (its own address space): ``ru_maxrss`` of a child started from a large process
    also counts the parent's pages at the fork."""
    code = (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from benchmarks.common import MODELS, SHARED\n"
        "import qfrewrite\n"
        "from qfrewrite.images import ImageFolder\n"
        "from qfrewrite.passes import FoldBatchNorm, InsertFakeQuant\n"
        "spec = MODELS[%r]\n"
        "g = qfrewrite.load(SHARED / spec['file'], **spec.get('load', {}))\n"
        "data = ImageFolder(SHARED / 'images' / 'imagenet_sample', preprocess=spec['preprocess'], limit=%d,"
        " progress=False)\n"
        "t = time.perf_counter()\n"
        "qfrewrite.rewrite(g, passes=[FoldBatchNorm(), InsertFakeQuant()], data=data, stats=False)\n"
        "print('SECONDS', time.perf_counter() - t)\n"
        "print('RSS_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
        % (str(REPO), model, n))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    vals = dict(line.split() for line in out.splitlines() if line.startswith(("SECONDS", "RSS_KB")))
    return {"model": model, "images": n, "peak_rss_gb": int(vals["RSS_KB"]) / 1e6, "seconds": float(vals["SECONDS"])}


def table(rows: List[Dict]) -> str:
    def f(v, fmt, scale=1.0):
        return "" if v is None else fmt.format(scale * v)

    lines = ["| model | method | weights | top-1 % | top-5 % | SQNR dB | top-1 agree % | pipeline s | time / TF PTQ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['granularity']} | {f(r['top1'], '{:.1f}', 100)}"
                     f" | {f(r['top5'], '{:.1f}', 100)} | {f(r['sqnr_db'], '{:.1f}')} | "
                     f"{f(r['agreement'], '{:.1f}', 100)} | {f(r['seconds'], '{:.1f}')} | "
                     f"{f(r['ratio'], '{:.2f}')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--calib", type=int, default=100, help="calibration images (even positions)")
    ap.add_argument("--eval", type=int, default=200, help="evaluation images (odd positions)")
    ap.add_argument("--granularity", nargs="+", default=["per_channel", "per_tensor"],
                    choices=["per_channel", "per_tensor"])
    ap.add_argument("--activations", default="mse", choices=["mse", "minmax", "percentile", "kl"])
    ap.add_argument("--rss", action="store_true", help="also measure calibration peak RSS of MobileNetV2")
    ap.add_argument("--rss-images", type=int, default=1000)
    add_output_options(ap)
    args = ap.parse_args(argv)
    if not ready(log):
        return 1
    with output_dir(args.out_dir) as out_dir:
        rows = run(args.models, args.calib, args.eval, args.granularity, args.activations, out_dir)
    print(table(rows))
    result = {"rows": rows}
    if args.rss:
        rss = calibration_rss("torchvision_v2", args.rss_images)
        print(f"\ncalibration of torchvision_v2 on {rss['images']} images: peak RSS {rss['peak_rss_gb']:.2f} GB, "
              f"{rss['seconds']:.1f} s")
        result["rss"] = rss
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
