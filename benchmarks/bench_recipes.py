"""dfq and plain against TensorFlow's own post-training quantization, in one run: accuracy, conversion time, latency.

For each model and weight granularity, the three int8 TFLite models are made from the same imported float graph
and the same calibration images (the even positions of the class-sorted ../shared image folder; evaluation images
are the odd positions, disjoint):

* ``tf_ptq``: TensorFlow's converter with a representative dataset (``benchmarks.bench_ptq.tf_ptq``) from the
  FoldBatchNorm'd float function; per-tensor weights with ``_experimental_disable_per_channel``;
* ``plain``: ``rewrite(graph, recipes.plain(weights=...), data).to_tflite()``;
* ``dfq``: the same with ``recipes.dfq(weights=...)``.

Measured, each as a ratio to ``tf_ptq`` in the same run:

* **conversion time**: wall time from the imported graph and the decoded images to the ``.tflite`` bytes (image
  decoding excluded for all; their normalisation included for all: TF PTQ's representative dataset normalises
  them batch by batch inside its timed conversion, as the rewrites read them), the three pipelines interleaved,
  ``--time-rounds`` rounds, the median per pipeline;
* **latency**: LiteRT with XNNPACK, batch 1, at each of ``--threads``, the models of one model and granularity and
  TF PTQ's per-channel model timed in interleaved rounds (:func:`interleaved_latency`): each round builds every
  interpreter afresh, times the median of ``--invokes`` invocations of each in turn (the order rotated from round
  to round) and divides each by the reference's; the figure is the median of ``--rounds`` such ratios. In the
  per-channel group, ``tf_ptq`` is TF PTQ's per-channel file timed against a second interpreter of itself: that
  row is the measurement's noise floor;
* **op counts** of each file beside TF PTQ's;
* **top-1** of each file in LiteRT on the evaluation images, and its **agreement with float**: the share of the
  evaluation images on which its top class is the float model's (the float graph run by the reference executor),
  the steadier figure where two int8 models differ by a few images of top-1.

    python benchmarks/bench_recipes.py                      # the four ../shared models, 500 + 500 images
    python benchmarks/bench_recipes.py --models torchvision_v2 --calib 200 --eval 200 --skip latency

Prints Markdown tables and writes ``--json``.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MODELS, load_shared_model, shared_images_present, write_rows  # noqa: E402

log = logging.getLogger("bench_recipes")

METHODS = ("tf_ptq", "plain", "dfq")


def convert_once(method: str, graph, calib_set, granularity: str) -> bytes:
    """One pipeline from the imported graph and the decoded calibration images (``calib_set``) to TFLite bytes."""
    import qfrewrite
    from qfrewrite import recipes
    from qfrewrite.passes import FoldBatchNorm

    from benchmarks.bench_ptq import tf_ptq

    if method == "tf_ptq":
        folded = qfrewrite.rewrite(graph, [FoldBatchNorm()], stats=False, verify=False).graph
        return tf_ptq(folded, calib_set, granularity == "per_channel")
    recipe = getattr(recipes, method)(weights=granularity)
    return qfrewrite.rewrite(graph, recipe, data=calib_set).to_tflite()


def accuracy(flatbuffer: bytes, evals, offset: int, float_preds) -> Dict[str, float]:
    """Top-1 (%) of a TFLite file on the evaluation images and its top-1 agreement (%) with the float model."""
    from benchmarks.bench_passes import predictions_tflite

    preds = predictions_tflite(flatbuffer, evals)
    return {"top1": 100.0 * float(np.mean(preds - offset == evals.labels)),
            "agreement": 100.0 * float(np.mean(preds == float_preds))}


def float_predictions(graph, evals) -> np.ndarray:
    """The float model's arg-max class on each evaluation image (reference executor, BatchNorm folded)."""
    import qfrewrite
    from qfrewrite.backend.executor import run_graph
    from qfrewrite.passes import FoldBatchNorm

    folded = qfrewrite.rewrite(graph, [FoldBatchNorm()], stats=False, verify=False).graph
    return np.concatenate([run_graph(folded, b)[0].reshape(len(b), -1).argmax(axis=1) for b in evals.batches()])


def interleaved_latency(models: Dict[str, bytes], reference: bytes, threads: int, rounds: int,
                        invokes: int) -> Dict[str, Dict[str, float]]:
    """``{model: {"seconds": s, "ratio": r}}``: each model's median invoke time over ``rounds`` and the median over
    the rounds of its time divided by ``reference``'s in the same round.

    Paired per round, so that a slow stretch of a shared machine slows both sides of a ratio. Every round builds
    each interpreter afresh (an interpreter keeps its memory placement: two interpreters of one file differed by
    up to 4%, steadily, when built once) and rotates the order in which they are timed."""
    from benchmarks.bench_latency import median_invoke, ready_interpreter

    keys = [*models, "__reference__"]
    files = {**models, "__reference__": reference}
    times: Dict[str, List[float]] = {k: [] for k in keys}
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        its = {k: ready_interpreter(files[k], threads) for k in order}
        for k in order:
            times[k].append(median_invoke(its[k], invokes))
        del its
    ref = times["__reference__"]
    return {k: {"seconds": statistics.median(times[k]),
                "ratio": statistics.median(a / b for a, b in zip(times[k], ref))} for k in models}


def op_counts(flatbuffer: bytes) -> Dict[str, int]:
    from qfrewrite.tflite_inspect import inspect_tflite

    return inspect_tflite(flatbuffer).op_counts()


def run(models, granularities, n_calib: int, n_eval: int, threads, rounds: int, invokes: int, time_rounds: int,
        skip, save=None, warmup: bool = True) -> List[Dict]:
    rows: List[Dict] = []
    for name in models:
        graph, offset, calib, evals = load_shared_model(name, n_calib, n_eval)
        files: Dict[tuple, bytes] = {}
        seconds: Dict[tuple, List[float]] = {}
        if warmup:  # the first conversions of a process pay for TensorFlow's and LiteRT's start-up: not timed
            few = calib.subset(slice(0, 32))
            for method in METHODS:
                convert_once(method, graph, few, granularities[0])
            warmup = False
        for r in range(time_rounds):
            for gran in granularities:
                for method in METHODS:
                    t0 = time.perf_counter()
                    fb = convert_once(method, graph, calib, gran)
                    seconds.setdefault((method, gran), []).append(time.perf_counter() - t0)
                    files[(method, gran)] = fb
                    if save is not None:
                        from qfrewrite.io_utils import atomic_write_bytes

                        save.mkdir(parents=True, exist_ok=True)
                        atomic_write_bytes(save / f"{name}.{gran}.{method}.tflite", fb)
                    log.info("%s %s %s: %.1f s", name, gran, method, seconds[(method, gran)][-1])
        if "accuracy" not in skip:
            float_preds = float_predictions(graph, evals)
            float_top1 = 100.0 * float(np.mean(float_preds - offset == evals.labels))
            print(f"{name} float: top-1 {float_top1:.1f}", flush=True)
        for gran in granularities:
            base = statistics.median(seconds[("tf_ptq", gran)])
            for method in METHODS:
                fb = files[(method, gran)]
                sec = statistics.median(seconds[(method, gran)])
                row = {"model": name, "granularity": gran, "method": method, "seconds": sec,
                       "time_ratio": sec / base, "ops": op_counts(fb), "size": len(fb),
                       "calib": len(calib), "eval": len(evals)}
                if "accuracy" not in skip:
                    row.update(accuracy(fb, evals, offset, float_preds))
                    row["float_top1"] = float_top1
                rows.append(row)
                print(f"{name} {gran} {method}: {sec:.1f} s ({sec / base:.2f}x TF PTQ)"
                      + (f", top-1 {row['top1']:.1f}, agreement with float {row['agreement']:.1f}"
                         if "top1" in row else ""), flush=True)
        if "latency" not in skip:
            for gran in granularities:
                group = {m: files[(m, gran)] for m in METHODS}
                reference = files.get(("tf_ptq", "per_channel"), group["tf_ptq"])
                for t in threads:
                    lat = interleaved_latency(group, reference, t, rounds, invokes)
                    for method in METHODS:
                        row = next(r for r in rows if r["model"] == name and r["granularity"] == gran
                                   and r["method"] == method)
                        row.setdefault("latency_ms", {})[t] = lat[method]["seconds"] * 1e3
                        row.setdefault("latency_ratio", {})[t] = lat[method]["ratio"]
                    print(f"{name} {gran} {t} thread(s): " + _latency_text(lat), flush=True)
    return rows


def latency_only(folder: Path, models, granularities, threads, rounds: int, invokes: int) -> int:
    """The latency A/B alone, on the files a ``--save`` run kept."""
    out = ["| model | weights | threads | " + " | ".join(f"{m} / TF PTQ PC" for m in METHODS) + " |",
           "|---|---|---|" + "---|" * len(METHODS)]
    for name in models:
        for gran in granularities:
            group = {m: (folder / f"{name}.{gran}.{m}.tflite").read_bytes() for m in METHODS}
            pc = folder / f"{name}.per_channel.tf_ptq.tflite"
            reference = pc.read_bytes() if pc.exists() else group["tf_ptq"]
            for t in threads:
                lat = interleaved_latency(group, reference, t, rounds, invokes)
                print(f"{name} {gran} {t} thread(s): " + _latency_text(lat), flush=True)
                out.append(f"| {name} | {gran} | {t} | " + " | ".join(f"{lat[m]['ratio']:.3f}" for m in METHODS)
                           + " |")
    print("\n".join(out))
    return 0


def _latency_text(lat: Dict[str, Dict[str, float]]) -> str:
    return ", ".join(f"{m} {v['seconds'] * 1e3:.2f} ms ({v['ratio']:.3f}x)" for m, v in lat.items())


def _ops_text(ops: Dict[str, int], ref: Dict[str, int]) -> str:
    differ = {k: ops.get(k, 0) for k in sorted(set(ops) | set(ref)) if ops.get(k, 0) != ref.get(k, 0)}
    return "same as TF PTQ" if not differ else ", ".join(f"{k} {v} (TF PTQ {ref.get(k, 0)})"
                                                         for k, v in differ.items())


def tables(rows: List[Dict], threads) -> str:
    out = ["| model | weights | method | top-1 % (float) | agreement with float % | conversion s | time / TF PTQ | "
           + "".join(f"latency {t}T / TF PTQ PC | " for t in threads) + "ops beside TF PTQ's |",
           "|---|---|---|---|---|---|---|" + "---|" * len(threads) + "---|"]
    for r in rows:
        ref = next(x for x in rows if x["model"] == r["model"] and x["granularity"] == r["granularity"]
                   and x["method"] == "tf_ptq")
        lat = "".join((f"{r['latency_ratio'][t]:.3f}" if "latency_ratio" in r else "") + " | " for t in threads)
        top = f"{r['top1']:.1f} ({r['float_top1']:.1f})" if "top1" in r else ""
        agree = f"{r['agreement']:.1f}" if "agreement" in r else ""
        out.append(f"| {r['model']} | {r['granularity']} | {r['method']} | {top} | {agree} | {r['seconds']:.1f} | "
                   f"{r['time_ratio']:.2f} | {lat}{_ops_text(r['ops'], ref['ops'])} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--granularity", nargs="+", default=["per_channel", "per_tensor"],
                    choices=["per_channel", "per_tensor"])
    ap.add_argument("--calib", type=int, default=500, help="calibration images (even positions)")
    ap.add_argument("--eval", type=int, default=500, help="evaluation images (odd positions)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=31, help="interleaved latency rounds")
    ap.add_argument("--invokes", type=int, default=50, help="invocations per model and round")
    ap.add_argument("--time-rounds", type=int, default=1, help="interleaved conversion-time rounds")
    ap.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "latency"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--save", type=Path, default=None, help="folder to keep the .tflite files in")
    ap.add_argument("--latency-only", type=Path, default=None, metavar="DIR",
                    help="time the files a --save run kept in DIR (no conversion)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not shared_images_present():
        return 2
    if args.latency_only:
        return latency_only(args.latency_only, args.models, args.granularity, args.threads, args.rounds,
                            args.invokes)
    rows = run(args.models, args.granularity, args.calib, args.eval, args.threads, args.rounds, args.invokes,
               args.time_rounds, args.skip, args.save)
    print(tables(rows, [] if "latency" in args.skip else args.threads))
    if args.json:
        write_rows(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
