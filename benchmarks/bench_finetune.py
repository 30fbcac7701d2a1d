"""Recovery of the Qualcomm architecture by distillation (``qfrewrite.finetune``), then per-tensor int8.

For each model: the student (``recipes.qualcomm(quantize=False)`` of it, see :mod:`qfrewrite.finetune`) is distilled
from the model itself on the even positions of the class-sorted ../shared image folder (no labels used); after
every epoch its float top-1 is measured on the odd positions (disjoint, labelled), with the training minutes. At
the end the fine-tuned model (the epoch of lowest held-back loss, ``keep="best"``) goes back through ``rewrite`` and
is quantized per tensor with ``plain`` and ``dfq`` (calibrated on the training images), beside ``plain`` and
``dfq`` on the original model; all int8 models are scored in LiteRT on the evaluation images.

    python benchmarks/bench_finetune.py                                   # Keras MobileNetV1 0.25, 30 minutes
    python benchmarks/bench_finetune.py --minutes 5 --train 200 --eval 200
    python benchmarks/bench_finetune.py --models torchvision_v2 --loss mse

Prints Markdown tables and writes ``--json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MODELS, SHARED, add_output_options, output_dir, ready, split_images  # noqa: E402

log = logging.getLogger("bench_finetune")


def float_top1(keras_model, evals, offset: int, batch_size: int = 50) -> float:
    """Top-1 (%) of a Keras model (inference mode) on an ImageSet."""
    hits, images = 0, evals.images
    for s in range(0, len(evals), batch_size):
        y = np.asarray(keras_model(evals.preprocess(images[s:s + batch_size]), training=False))
        hits += int(np.sum(y.reshape(len(y), -1).argmax(-1) - offset == evals.labels[s:s + batch_size]))
    return 100.0 * hits / len(evals)


def int8_top1(model, calib, evals, offset: int, recipe: str) -> float:
    import qfrewrite
    from qfrewrite import recipes

    from benchmarks.bench_passes import top1_tflite

    result = qfrewrite.rewrite(model, getattr(recipes, recipe)(weights="per_tensor"), data=calib)
    return top1_tflite(result.to_tflite(), evals, offset)


def run_model(name: str, args, out: Path) -> Dict:
    import qfrewrite
    from qfrewrite.finetune import finetune
    from qfrewrite.images import ImageFolder

    spec = MODELS[name]
    path = SHARED / spec["file"]
    graph = qfrewrite.load(path, **spec.get("load", {}))
    offset = 1 if graph.outputs[0].shape[-1] == 1001 else 0
    folder = SHARED / "images" / "imagenet_sample"
    images = ImageFolder(folder, preprocess=spec["preprocess"], progress=False).read(graph)
    calib, evals = split_images(images, args.train, args.eval)
    row: Dict = {"model": name, "train_images": len(calib), "eval_images": len(evals), "loss": args.loss,
                 "init": args.init, "lr": args.lr, "mixup": args.mixup, "epochs_asked": args.epochs,
                 "minutes_asked": args.minutes}
    row["float_original"] = float_top1(qfrewrite.rewrite(graph, []).to_keras(), evals, offset)
    curve: List[Dict] = []

    def on_epoch(record, model):
        top1 = float_top1(model, evals, offset)
        curve.append({**record.to_dict(), "minutes": record.seconds / 60, "float_top1": top1})
        log.info("%s epoch %d: %.1f min, loss %s, held-back loss %.4f, agreement %.1f%%, float top-1 %.1f%%",
                 name, record.epoch, record.seconds / 60, "-" if record.loss is None else f"{record.loss:.4f}",
                 record.held_loss, 100 * record.agreement, top1)

    with tempfile.TemporaryDirectory() as tmp:
        train_dir = Path(tmp) / "train"
        train_dir.mkdir()
        for f in calib.files:  # the training images: the same files as the calibration subset
            os.symlink(f, train_dir / f.name)
        saved = out / f"{name}_finetuned.keras"
        t0 = time.perf_counter()
        res = finetune(path, train_dir, saved, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       loss=args.loss, temperature=args.temperature, mixup=args.mixup, init=args.init,
                       preprocess=spec["preprocess"],
                       max_minutes=args.minutes, progress=not args.no_progress, on_epoch=on_epoch)
        row["wall_minutes"] = (time.perf_counter() - t0) / 60
    row["curve"] = curve
    row["settings"] = res.settings
    row["kept_epoch"] = res.kept_epoch  # the saved model: the epoch of lowest held-back loss (finetune keep="best")
    row["float_finetuned"] = next(c["float_top1"] for c in curve if c["epoch"] == res.kept_epoch)
    for recipe in ("plain", "dfq"):
        row[f"int8_{recipe}_finetuned"] = int8_top1(saved, calib, evals, offset, recipe)
        row[f"int8_{recipe}_original"] = int8_top1(graph, calib, evals, offset, recipe)
    return row


def print_tables(rows: List[Dict]) -> None:
    for row in rows:
        print(f"\n### {row['model']}: recovery ({row['train_images']} training images, {row['eval_images']} "
              f"evaluation images, loss {row['loss']}, init {row['init']}, lr {row['lr']}, "
              f"mixup {row.get('mixup', 0)})\n")
        print(f"original float top-1: {row['float_original']:.1f}%\n")
        print("| epoch | minutes | loss | held-back loss | held-back agreement % | float top-1 % |")
        print("| --- | --- | --- | --- | --- | --- |")
        for c in row["curve"]:
            loss = "-" if c["loss"] is None else f"{c['loss']:.4f}"
            kept = " (kept)" if c["epoch"] == row.get("kept_epoch") else ""
            print(f"| {c['epoch']}{kept} | {c['minutes']:.1f} | {loss} | {c['held_loss']:.4f} | "
                  f"{100 * c['agreement']:.1f} | {c['float_top1']:.1f} |")
        print("\n| model | float | int8 plain (per-tensor) | int8 dfq (per-tensor) |")
        print("| --- | --- | --- | --- |")
        print(f"| original | {row['float_original']:.1f} | {row['int8_plain_original']:.1f} | "
              f"{row['int8_dfq_original']:.1f} |")
        print(f"| fine-tuned Qualcomm | {row['float_finetuned']:.1f} | {row['int8_plain_finetuned']:.1f} | "
              f"{row['int8_dfq_finetuned']:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["keras_v1_025"], choices=sorted(MODELS))
    ap.add_argument("--train", type=int, default=500, help="training images (even positions)")
    ap.add_argument("--eval", type=int, default=500, help="evaluation images (odd positions)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--minutes", type=float, default=30.0, help="stop after the epoch that passes this time")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--loss", choices=["kl", "mse"], default="kl")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--mixup", type=float, default=0.0, help="Beta parameter of the mixup (0: none)")
    ap.add_argument("--init", choices=["refit", "match", "identity"], default="refit")
    ap.add_argument("--no-progress", action="store_true")
    add_output_options(ap)
    args = ap.parse_args(argv)
    if not ready(log):
        return 0
    with output_dir(args.out_dir) as out:
        rows = [run_model(m, args, out) for m in args.models]
    print_tables(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
