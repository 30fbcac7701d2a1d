"""Classification accuracy of a model on labelled images, and its agreement with a float reference.

``evaluate(model, images, labels=None, reference=None, ...)``:

* ``model``: a ``.tflite`` path or flatbuffer bytes (run by LiteRT; int8/uint8 I/O is quantized/dequantized with the
  model's own scale and zero point), a :class:`~qfrewrite.Graph` or :class:`~qfrewrite.Result` (run by the reference
  executor with FakeQuant simulated: the int8 function the graph describes), or anything :func:`qfrewrite.load`
  reads (run in float);
* ``images``: an image folder (labels from its ``labels.tsv`` unless given; ``preprocess`` a preset name or
  ``(mean, std)``, else the graph's default), an :class:`~qfrewrite.images.ImageFolder`, an
  :class:`~qfrewrite.images.ImageSet`, or a numpy array of preprocessed inputs in the source model's own layout
  (NHWC for a TFLite model; ``labels`` then needed for accuracy);
* ``reference``: another model as above, or an array of reference outputs: gives the SQNR (dB) of the outputs
  against the reference's and the top-1 agreement;
* ``label_offset``: subtracted from the arg-max before comparing with labels; ``None`` means 1 for a 1001-wide output
  (TF-slim's background class at index 0), else 0.

Top-k counts a hit when the label is among the ``k`` largest outputs. Labels that name no output of the model
(:func:`labels_misfit`) give no accuracy: ``top1``/``top5`` stay ``None`` and ``labels_note`` says why. Returns an
:class:`EvalResult`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .errors import DataError, QfrewriteError
from .numerics.metrics import sqnr_db

__all__ = ["evaluate", "EvalResult", "predict", "topk_accuracy", "sqnr_db", "labels_misfit"]

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    images: int
    top1: Optional[float] = None
    top5: Optional[float] = None
    sqnr_db: Optional[float] = None
    top1_agreement: Optional[float] = None
    label_offset: int = 0
    seconds: float = 0.0
    #: why the labels were not scored (they do not fit the model's outputs), else None
    labels_note: Optional[str] = None

    def to_dict(self):
        return asdict(self)

    def __str__(self) -> str:
        parts = [f"{self.images} images"]
        if self.top1 is not None:
            parts.append(f"top-1 {100 * self.top1:.2f}%  top-5 {100 * self.top5:.2f}%")
        if self.labels_note:
            parts.append(f"no accuracy: {self.labels_note}")
        if self.sqnr_db is not None:
            parts.append(f"SQNR {self.sqnr_db:.1f} dB  top-1 agreement {100 * self.top1_agreement:.2f}%")
        return ", ".join(parts)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1, offset: int = 0) -> float:
    """Fraction of rows whose label (after subtracting ``offset`` from the class positions) is in the top ``k``."""
    scores = np.asarray(scores).reshape(len(scores), -1)
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] - offset
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def labels_misfit(labels: np.ndarray, out_shape, offset: int = 0) -> Optional[str]:
    """Why ``labels`` cannot be scored against outputs of shape ``out_shape`` per image (``offset`` subtracted from
    the class position), or ``None`` when they fit.

    The output must be one score per class (one axis longer than 1), and class ``k`` is output ``k + offset``: a label
    outside ``0 .. width - offset - 1`` names no output (a 2-class model given ImageNet labels), and every such image
    would count as a miss.
    """
    labels = np.asarray(labels)
    shape = tuple(int(d) for d in np.atleast_1d(out_shape))
    if labels.size == 0:
        return None
    if sum(d > 1 for d in shape) > 1:
        return f"the labels do not fit the model: it gives outputs of shape {shape} per image, not one score per class"
    width = int(np.prod(shape))
    lo, hi, classes = int(labels.min()), int(labels.max()), width - int(offset)
    if lo >= 0 and hi < classes:
        return None
    shift = f" ({classes} classes after the label offset {offset})" if offset else ""
    return (f"the labels do not fit the model: class indices {lo}..{hi}, the model gives {width} scores per "
            f"image{shift}")


# -- running models ------------------------------------------------------------------------------------------------
def _is_tflite(model) -> bool:
    if isinstance(model, (bytes, bytearray)):
        return True
    return isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".tflite"


def _tflite_runner(model, num_threads: int = 2) -> Callable[[np.ndarray], np.ndarray]:
    from .tflite_inspect import interpreter

    it = interpreter(model, num_threads=num_threads)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    batch = int(inp["shape"][0]) if len(inp["shape"]) else 1

    def run(x: np.ndarray) -> np.ndarray:
        if tuple(x.shape[1:]) != tuple(inp["shape"][1:]):
            raise DataError(f"the TFLite model expects inputs of shape {tuple(inp['shape'])} (NHWC), got {x.shape}")
        if inp["dtype"] != np.float32:
            s, z = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / s + z), info.min, info.max)
        x = x.astype(inp["dtype"])
        outs = []
        for i in range(0, len(x), batch):
            xi = x[i:i + batch]
            if len(xi) < batch:  # pad the last chunk to the model's fixed batch
                xi = np.concatenate([xi, np.repeat(xi[-1:], batch - len(xi), axis=0)])
            it.set_tensor(inp["index"], xi)
            it.invoke()
            outs.append(it.get_tensor(out["index"])[:len(x) - i].copy())
        y = np.concatenate(outs)
        if out["dtype"] != np.float32:
            s, z = out["quantization"]
            y = (y.astype(np.float32) - z) * s
        return y.astype(np.float32)

    return run


def _graph_of(model):
    from .api import Result
    from .ir import Graph

    if isinstance(model, Result):
        return model.graph, True
    if isinstance(model, Graph):
        return model, True
    from .importers import load

    return load(model), False


def _loaded(model):
    """A TFLite model as given; anything else as a Graph or Result, imported once."""
    from .api import Result
    from .ir import Graph

    if _is_tflite(model) or isinstance(model, (Graph, Result)):
        return model
    return _graph_of(model)[0]


def predict(model, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Outputs of ``model`` (see the module docstring) for NHWC inputs ``x``, batch by batch."""
    if _is_tflite(model):
        run = _tflite_runner(model)
    else:
        from .backend.executor import Executor

        graph, quantize = _graph_of(model)
        ex = Executor(graph, quantize=quantize)
        run = lambda b: ex(b)[0]  # noqa: E731
    return np.concatenate([run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def _graph_for_images(model):
    """The graph to read image sizes and the default preprocessing from (None for a TFLite model)."""
    if _is_tflite(model):
        return None
    return _graph_of(model)[0]


def _image_inputs(images, model, preprocess, limit, labels):
    from .images import ImageFolder, ImageSet

    if isinstance(images, ImageSet):
        data = images if limit is None else images.subset(slice(0, int(limit)))
    elif isinstance(images, (str, os.PathLike, ImageFolder)):
        folder = images if isinstance(images, ImageFolder) else ImageFolder(images, preprocess=preprocess,
                                                                           limit=limit)
        graph = _graph_for_images(model)
        size = None
        if graph is None:
            from .tflite_inspect import interpreter

            shape = interpreter(model).get_input_details()[0]["shape"]
            size = (int(shape[1]), int(shape[2]))
        f = ImageFolder(folder.path, folder.preprocess if folder.preprocess is not None else preprocess,
                        folder.limit if folder.limit is not None else limit, folder.size or size,
                        folder.shorter_side, folder.workers, folder.progress)
        data = f.read(graph, preprocess=preprocess)
    else:
        x = np.asarray(images, np.float32)
        if limit is not None:
            x = x[:int(limit)]
        graph = _graph_for_images(model)
        if graph is not None:
            from .data import to_nhwc

            x = to_nhwc(x, graph.meta.get("input_layout", "NHWC"))
        return x, (None if labels is None else np.asarray(labels)[:len(x)])
    x = np.concatenate(list(data.batches())) if len(data) else np.zeros((0,))
    if labels is None:
        labels = data.labels
    return x, (None if labels is None else np.asarray(labels)[:len(x)])


def evaluate(model, images, labels=None, reference=None, preprocess=None, limit: Optional[int] = None,
             label_offset: Optional[int] = None, batch_size: int = 32) -> EvalResult:
    """Top-1/top-5 of ``model`` on ``images`` and, with ``reference``, SQNR and top-1 agreement (see module doc)."""
    t0 = time.perf_counter()
    model = _loaded(model)
    x, labels = _image_inputs(images, model, preprocess, limit, labels)
    if len(x) == 0:
        raise DataError("no images to evaluate")
    if labels is not None and len(labels) != len(x):
        raise DataError(f"{len(labels)} labels for {len(x)} images")
    scores = predict(model, x, batch_size)
    width = int(np.prod(scores.shape[1:]))
    offset = label_offset if label_offset is not None else (1 if width == 1001 else 0)
    res = EvalResult(images=len(x), label_offset=int(offset))
    if labels is not None:
        res.labels_note = labels_misfit(labels, scores.shape[1:], offset)
        if res.labels_note:
            log.info("no accuracy: %s", res.labels_note)
        else:
            res.top1 = topk_accuracy(scores, labels, 1, offset)
            res.top5 = topk_accuracy(scores, labels, 5, offset)
    if reference is not None:
        ref = np.asarray(reference, np.float32) if isinstance(reference, np.ndarray) else \
            predict(_loaded(reference), x, batch_size)
        ref = ref[:len(x)]
        if ref.shape != scores.shape:
            raise QfrewriteError(f"the reference gives outputs of shape {ref.shape}, the model {scores.shape}")
        res.sqnr_db = sqnr_db(ref, scores)
        res.top1_agreement = float(np.mean(np.argmax(ref.reshape(len(ref), -1), 1)
                                           == np.argmax(scores.reshape(len(scores), -1), 1)))
    res.seconds = time.perf_counter() - t0
    log.info("evaluated %s", res)
    return res
