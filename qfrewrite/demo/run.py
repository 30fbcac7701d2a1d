"""The bundled demo: diagnose, convert to fully int8 TFLite and compare the top-5 classes of a photo.

The model is Keras Applications MobileNet V1 (alpha 0.25, 224x224, ImageNet) saved by Keras 2 as ``.h5``; the photos
are CC-BY / public-domain (see ATTRIBUTION.md). Everything runs offline.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

__all__ = ["DEMO_DIR", "DEMO_MODEL", "DEMO_IMAGES", "class_names", "top5", "run_demo"]

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent
DEMO_MODEL = DEMO_DIR / "keras_mobilenet_v1_0.25_224.h5"
DEMO_IMAGES = DEMO_DIR / "images"
PREPROCESS = "inception"  # x / 127.5 - 1, as the model was trained


def class_names() -> List[str]:
    """The 1000 ImageNet class names in class-index order."""
    return (DEMO_DIR / "imagenet_classes.txt").read_text(encoding="utf-8").splitlines()


def top5(model, photo: Union[str, Path], size=(224, 224)) -> List[Dict[str, float]]:
    """Top-5 ``{"class", "score"}`` of ``model`` (a .tflite path or anything :func:`qfrewrite.evaluate.predict`
    runs) on one photo, resized and centre-cropped as in evaluation."""
    from ..evaluate import predict
    from ..images import load_image, resolve_preprocess

    x = resolve_preprocess(PREPROCESS)(load_image(photo, size)[None])
    scores = predict(model, x)[0].reshape(-1)
    names = class_names()
    order = np.argsort(-scores)[:5]
    return [{"class": names[i] if i < len(names) else str(i), "index": int(i), "score": float(scores[i])}
            for i in order]


def run_demo(out_dir: Union[str, Path] = "qfrewrite-demo", photo: Optional[str] = None, echo=print) -> Dict:
    """Run the demo, writing into ``out_dir``; ``echo`` prints each block (a rich console's ``print`` works).

    Its three files (float and int8 TFLite, the report) are planned before the work and written all or nothing.
    """
    from .. import rewrite
    from ..convert import convert, plan_outputs
    from ..diagnose import diagnose
    from ..images import folder_reads
    from ..io_utils import OutputSet
    from ..passes import FoldBatchNorm

    out = Path(out_dir)
    photo_path = Path(photo) if photo else DEMO_IMAGES / "grace_hopper.jpg"
    with OutputSet([("the bundled model", DEMO_MODEL), ("the bundled photos", DEMO_IMAGES, folder_reads),
                    ("the photo", photo_path)]) as outs:
        float_path = outs.add(out / "mobilenet_v1_0.25_float.tflite", "the float model")
        int8_path = plan_outputs(outs, out / "mobilenet_v1_0.25_int8.tflite")["tflite"]

        echo(f"[1/3] Diagnosis of {DEMO_MODEL.name} (per-tensor 8-bit weights, BatchNorm folded)")
        diag = diagnose(DEMO_MODEL)
        for r in diag.renderables(5):
            echo(r)

        echo(f"\n[2/3] Conversion: recipe dfq, per-channel weights, calibrated on the "
             f"{len(list(DEMO_IMAGES.glob('*.jpg')))} bundled photos")
        float_file = outs.write_bytes(float_path, rewrite(DEMO_MODEL, passes=[FoldBatchNorm()],
                                                          stats=False).to_tflite(None))
        summary = convert(DEMO_MODEL, int8_path, DEMO_IMAGES, recipe="dfq", weights="per_channel",
                          preprocess=PREPROCESS, holdout=0, output_set=outs)
        echo(str(summary))
        echo(f"float model  {float_path} ({float_file.stat().st_size / 1024:.1f} KiB)")

        echo(f"\n[3/3] Top-5 classes of {photo_path.name}")
        rows_f, rows_q = top5(float_file, photo_path), top5(outs.staged(int8_path), photo_path)
        echo(f"{'float':<40} {'int8':<40}")
        for a, b in zip(rows_f, rows_q):
            echo(f"{a['class'][:30]:<30} {a['score']:8.3f}  {b['class'][:30]:<30} {b['score']:8.3f}")
    return {"summary": summary, "float_top5": rows_f, "int8_top5": rows_q, "float_model": str(float_path),
            "int8_model": str(int8_path)}
