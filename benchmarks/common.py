"""Helpers shared by the benchmarks: the ../shared models and a disjoint calibration/evaluation split."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QFREWRITE_SHARED", REPO.parent / "shared"))

#: name -> file under ../shared, load() options, preprocessing preset (as in ../shared/MANIFEST.md)
MODELS = {
    "keras_v1_025": {"file": "models/keras_mobilenet_v1_0.25_224.h5", "preprocess": "inception"},
    "tf_slim_v1": {"file": "models/tf_mobilenet_v1_1.0_224_frozen.pb", "preprocess": "inception",
                   "load": {"outputs": ["MobilenetV1/Logits/SpatialSqueeze"]}},
    "torchvision_v2": {"file": "models/torchvision_mobilenet_v2.onnx", "preprocess": "torch"},
    "efficientnet_lite0": {"file": "models/efficientnet_lite0.onnx", "preprocess": "efficientnet-lite"},
}


def shared_images_present(what: str = "models and images") -> bool:
    """True when ../shared holds the image folder; False, said on stderr, otherwise."""
    if (SHARED / "images" / "imagenet_sample").exists():
        return True
    print(f"the benchmark needs {SHARED} ({what}); set QFREWRITE_SHARED", file=sys.stderr)
    return False


def load_shared_model(name: str, n_calib: int, n_eval: int):
    """``(graph, label offset, calibration ImageSet, evaluation ImageSet)`` of ../shared model ``name`` (see
    :data:`MODELS`): the imported graph, 1 when its classifier has a background class (1001 outputs) else 0, and the
    :func:`split_images` halves of the image folder, decoded with the model's preprocessing."""
    import qfrewrite
    from qfrewrite.images import ImageFolder

    spec = MODELS[name]
    graph = qfrewrite.load(SHARED / spec["file"], **spec.get("load", {}))
    offset = 1 if graph.outputs[0].shape[-1] == 1001 else 0
    images = ImageFolder(SHARED / "images" / "imagenet_sample", preprocess=spec["preprocess"],
                         progress=False).read(graph)
    return (graph, offset, *split_images(images, n_calib, n_eval))


def write_rows(rows, path) -> None:
    """The benchmark's rows as JSON at ``path``, atomically."""
    import json

    from qfrewrite.io_utils import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(rows, indent=2).encode())


def report_rows(rows, table, path) -> int:
    """The end of a benchmark run: the rows printed as ``table(rows)`` (Markdown) and, with ``path``, written as JSON
    (:func:`write_rows`); returns the exit status 0."""
    print(table(rows))
    if path:
        write_rows(rows, path)
    return 0


def split_images(images, n_calib: int, n_eval: int):
    """Disjoint subsets of an ImageSet: calibration from the even positions, evaluation from the odd ones (the
    folder is sorted by class, so both spread over the classes)."""
    calib = images.subset(slice(0, None, 2)).subset(slice(0, n_calib))
    evals = images.subset(slice(1, None, 2)).subset(slice(0, n_eval))
    return calib, evals


def add_output_options(ap) -> None:
    """``--out-dir`` (keep the .tflite files) and ``--json`` (the rows as JSON)."""
    ap.add_argument("--out-dir", help="keep the .tflite files here (default: a temporary folder)")
    ap.add_argument("--json", help="write the rows as JSON here")


def ready(log: logging.Logger) -> bool:
    """Logging set up for a benchmark run (warnings, and ``log``'s progress lines); False, said on stderr, when
    ../shared is absent."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if not SHARED.exists():
        print(f"{SHARED} is absent: nothing to benchmark", file=sys.stderr)
        return False
    return True


@contextlib.contextmanager
def output_dir(path: Optional[str]) -> Iterator[Path]:
    """``path`` (created), or a temporary folder removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(path) if path else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        yield out
