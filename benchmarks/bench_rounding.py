"""Learned rounding against nearest rounding: top-1 of the int8 TFLite files at W8 and W4, per channel and per
tensor, with each pipeline's time, beside the float model.

For each model, the same imported graph and the same calibration images (the even positions of the class-sorted
../shared image folder; evaluation images are the odd positions, disjoint) go through
``recipes.<recipe>(weights=..., weight_bits=..., rounding=...)`` (``--recipe dfq`` by default) and
``Result.to_tflite()``; the file is run in LiteRT on the evaluation images. ``seconds`` is the wall time from the
imported graph and decoded images to the ``.tflite`` bytes; the learned-rounding pass's own time is given too, and
the process's peak resident memory so far (the decoded images included).

    python benchmarks/bench_rounding.py                                  # four models, 500 + 500 images
    python benchmarks/bench_rounding.py --models torchvision_v2 --bits 4 --granularity per_channel

Prints a Markdown table and writes ``--json``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MODELS, load_shared_model, report_rows, shared_images_present  # noqa: E402

log = logging.getLogger("bench_rounding")


def _peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pass_seconds(report, name: str) -> float:
    return sum(p.seconds for p in report.passes if p.name.split(" > ")[-1] == name)


def run(models, granularities, bits_list, roundings, recipe: str, n_calib: int, n_eval: int) -> List[Dict]:
    import qfrewrite
    from qfrewrite import recipes

    from benchmarks.bench_passes import top1, top1_tflite

    rows: List[Dict] = []
    for name in models:
        graph, offset, calib, evals = load_shared_model(name, n_calib, n_eval)
        float_top1 = top1(graph, evals, offset, quantize=False)
        print(f"{name}: float top-1 {float_top1:.1f}", flush=True)
        for bits in bits_list:
            for gran in granularities:
                for rounding in roundings:
                    t0 = time.perf_counter()
                    res = qfrewrite.rewrite(graph, getattr(recipes, recipe)(weights=gran, weight_bits=bits,
                                                                           rounding=rounding), data=calib)
                    fb = res.to_tflite()
                    sec = time.perf_counter() - t0
                    row = {"model": name, "granularity": gran, "bits": bits, "rounding": rounding,
                           "recipe": recipe, "float_top1": float_top1, "top1": top1_tflite(fb, evals, offset),
                           "seconds": sec, "rounding_seconds": _pass_seconds(res.report, "LearnedRounding"),
                           "calib": len(calib), "eval": len(evals), "size": len(fb),
                           "peak_rss_mib": _peak_rss_mib()}
                    rows.append(row)
                    print(f"{name} W{bits} {gran} {rounding}: top-1 {row['top1']:.1f} (float {float_top1:.1f}), "
                          f"{sec:.1f} s, peak memory so far {row['peak_rss_mib']:.0f} MiB", flush=True)
    return rows


def table(rows: List[Dict]) -> str:
    out = ["| model | weights | bits | float top-1 | nearest | learned | learned - float | time nearest / "
           "learned s |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["granularity"], r["bits"]) for r in rows},
                  key=lambda k: (list(MODELS).index(k[0]), -k[2], k[1]))
    for model, gran, bits in keys:
        by = {r["rounding"]: r for r in rows if (r["model"], r["granularity"], r["bits"]) == (model, gran, bits)}
        f = next(iter(by.values()))["float_top1"]
        near, learned = by.get("nearest"), by.get("learned")
        cell = lambda r: f"{r['top1']:.1f}" if r else ""  # noqa: E731
        diff = f"{learned['top1'] - f:+.1f}" if learned else ""
        secs = " / ".join(f"{r['seconds']:.0f}" if r else "-" for r in (near, learned))
        out.append(f"| {model} | {gran} | W{bits} | {f:.1f} | {cell(near)} | {cell(learned)} | {diff} | {secs} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--granularity", nargs="+", default=["per_channel", "per_tensor"],
                    choices=["per_channel", "per_tensor"])
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 4], help="weight bits")
    ap.add_argument("--rounding", nargs="+", default=["nearest", "learned"], choices=["nearest", "learned"])
    ap.add_argument("--recipe", default="dfq", choices=["dfq", "plain"])
    ap.add_argument("--calib", type=int, default=500, help="calibration images (even positions)")
    ap.add_argument("--eval", type=int, default=500, help="evaluation images (odd positions)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not shared_images_present():
        return 2
    rows = run(args.models, args.granularity, args.bits, args.rounding, args.recipe, args.calib, args.eval)
    return report_rows(rows, table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
