"""One command for every benchmark on the ../shared models; writes a Markdown table and a PNG chart.

    python benchmarks/run_all.py [--calib 200] [--eval 500] [--models ...] [--out benchmarks/results]

1. Accuracy (``bench_passes``): for each model, float, then each recipe (plain, dfq, qualcomm) with per-tensor and
   per-channel weights (the FakeQuant simulation and the emitted TFLite int8 model scored in LiteRT), with
   TensorFlow's own post-training integer quantization beside them. Calibration and evaluation images are disjoint.
2. Pipeline time (``bench_ptq``): the wall time of qfrewrite's calibrate-and-emit pipeline (plain recipe) as a ratio
   to TensorFlow's PTQ on the same images, in the same run.
3. Latency (``bench_latency``): float TFLite vs the int8 models of the plain and dfq recipes in the LiteRT interpreter,
   1 and 2 threads (dfq's exact equalization adds per-channel MINIMUM ops: this shows what they cost).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import bench_latency, bench_passes, bench_ptq  # noqa: E402
from benchmarks.common import MODELS, SHARED  # noqa: E402


def accuracy_markdown(rows) -> str:
    """Models as rows, methods as columns: TFLite int8 top-1 (the simulation's where no TFLite score)."""
    cols = [("float", "-"), ("tf_ptq", "per_tensor"), ("plain", "per_tensor"), ("dfq", "per_tensor"),
            ("qualcomm", "per_tensor"), ("tf_ptq", "per_channel"), ("plain", "per_channel"), ("dfq", "per_channel"),
            ("qualcomm", "per_channel")]
    names = {"-": "", "per_tensor": " PT", "per_channel": " PC"}
    head = "| model | " + " | ".join(f"{r}{names[g]}" for r, g in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for recipe, gran in cols:
            match = [r for r in rows if r["model"] == model and r["recipe"] == recipe and r["granularity"] == gran]
            if not match:
                cells.append("")
                continue
            r = match[0]
            top1 = r.get("tflite_top1", r["top1"])
            cells.append(f"{top1:.1f}" if recipe == "float" else f"{top1:.1f} ({top1 - (r['top1'] - r['delta']):+.1f})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(dict.fromkeys(r["model"] for r in rows))
    series = [("float", "-"), ("tf_ptq", "per_tensor"), ("plain", "per_tensor"), ("dfq", "per_tensor"),
              ("tf_ptq", "per_channel"), ("plain", "per_channel"), ("dfq", "per_channel")]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(series)
    for k, (recipe, gran) in enumerate(series):
        vals = []
        for m in models:
            match = [r for r in rows if r["model"] == m and r["recipe"] == recipe and r["granularity"] == gran]
            vals.append(match[0].get("tflite_top1", match[0]["top1"]) if match else np.nan)
        ax.bar(np.arange(len(models)) + k * width, vals, width,
               label=recipe if gran == "-" else f"{recipe} {gran.replace('_', '-')}")
    ax.set_xticks(np.arange(len(models)) + width * (len(series) - 1) / 2, models)
    ax.set_ylabel("top-1 % (held-out images)")
    ax.set_title("int8 TFLite top-1 by recipe and weight granularity")
    ax.legend(ncol=7, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_rows(models, calib_n: int, tmp: Path):
    import qfrewrite
    from qfrewrite import recipes
    from qfrewrite.images import ImageFolder
    from qfrewrite.passes import FoldBatchNorm

    rows = []
    for name in models:
        spec = MODELS[name]
        graph = qfrewrite.load(SHARED / spec["file"], **spec.get("load", {}))
        images = ImageFolder(SHARED / "images" / "imagenet_sample", preprocess=spec["preprocess"],
                             limit=2 * calib_n, progress=False).read(graph)
        calib = images.subset(slice(0, None, 2))
        paths = [tmp / f"{name}_float.tflite"]
        qfrewrite.rewrite(graph, passes=[FoldBatchNorm()], stats=False).to_tflite(paths[0])
        for recipe in ("plain", "dfq"):
            p = tmp / f"{name}_{recipe}_int8.tflite"
            qfrewrite.rewrite(graph, passes=getattr(recipes, recipe)(weights="per_channel"), data=calib,
                              stats=False).to_tflite(p)
            paths.append(p)
        for r in bench_latency.bench([str(p) for p in paths], runs=50):
            rows.append({**r, "model": name})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--recipes", nargs="+", default=["plain", "dfq", "qualcomm"])
    ap.add_argument("--calib", type=int, default=200, help="calibration images (even positions of the folder)")
    ap.add_argument("--eval", type=int, default=500, help="evaluation images (odd positions)")
    ap.add_argument("--timing-calib", type=int, default=100, help="calibration images for the pipeline timing")
    ap.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "timing", "latency"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if not (SHARED / "images" / "imagenet_sample").exists():
        print(f"the benchmark needs {SHARED} (models and images); set QFREWRITE_SHARED", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"calib": args.calib, "eval": args.eval, "date": time.strftime("%Y-%m-%d")}
    md = [f"# qfrewrite benchmarks ({doc['date']})", ""]
    if "accuracy" not in args.skip:
        rows = bench_passes.run(args.models, args.recipes, ["per_tensor", "per_channel"], args.calib, args.eval,
                                None, tflite=True, tf_ptq=True)
        doc["accuracy"] = rows
        md += [f"## Top-1 % of the int8 TFLite models ({args.eval} evaluation images, {args.calib} calibration "
               f"images, disjoint; in brackets: change against float)", "",
               "PT: per-tensor weights, PC: per-channel weights; tf_ptq: TensorFlow's converter with a "
               "representative dataset.", "", accuracy_markdown(rows), "",
               "All rows (sim: FakeQuant simulation in the reference executor):", "", bench_passes.table(rows), ""]
        chart(rows, args.out / "results.png")
    if "timing" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_ptq.run(args.models, args.timing_calib, 100, ["per_channel", "per_tensor"], "mse",
                                 Path(tmp))
        doc["timing"] = rows
        md += ["## Calibrate-and-emit wall time against TensorFlow's PTQ (plain recipe, same images, same run)", "",
               bench_ptq.table(rows), ""]
    if "latency" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            rows = latency_rows(args.models, 50, Path(tmp))
        doc["latency"] = rows
        md += ["## LiteRT latency, float vs int8 (median of 50 runs, batch 1)", "",
               "| model | file | threads | ms | speed-up vs float |", "|---|---|---|---|---|"]
        for r in rows:
            md.append(f"| {r['model']} | {r['file']} | {r['threads']} | {r['ms']:.2f} | {r['speedup_vs_first']:.2f} |")
        md.append("")
    (args.out / "results.md").write_text("\n".join(md))
    (args.out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    print("\n".join(md))
    print(f"wrote {args.out / 'results.md'}" + ("" if "accuracy" in args.skip else f" and {args.out / 'results.png'}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
