"""Importers: every supported source becomes one IR :class:`~qfrewrite.ir.Graph` (NHWC).

:func:`load` picks the importer from the object or the file:

* a :class:`Graph` (copied), a Keras model object, ``.keras`` / ``.h5`` / ``.hdf5`` files -> Keras importer;
* ``.onnx`` -> ONNX importer;
* ``.pb`` (a frozen GraphDef) -> GraphDef importer; a folder holding ``saved_model.pb`` -> SavedModel importer;
* ``.tflite`` (float32, or float16 weights) -> TFLite importer; a quantized ``.tflite`` is refused
  (:class:`~qfrewrite.errors.QuantizedModelError`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import ModelLoadError
from ..ir import Graph
from .checks import check_finite_weights, check_imported

__all__ = ["load", "SUPPORTED_SOURCES", "check_finite_weights"]

log = logging.getLogger(__name__)

SUPPORTED_SOURCES = (
    "Keras model object, .keras, .h5/.hdf5; ONNX .onnx; TF frozen GraphDef .pb; TF SavedModel folder; "
    "float TFLite .tflite"
)


def _is_keras_object(obj) -> bool:
    """A Keras model, including a user's own subclass of ``keras.Model`` (any class in its MRO from Keras)."""
    mods = [getattr(c, "__module__", "") or "" for c in type(obj).__mro__]
    return hasattr(obj, "layers") and any(m.split(".")[0] in ("keras", "tf_keras", "tensorflow") for m in mods)


def load(source, inputs: Optional[Sequence[str]] = None, outputs: Optional[Sequence[str]] = None,
         input_shape: Optional[Sequence[Optional[int]]] = None) -> Graph:
    """Import ``source`` into a new :class:`Graph`; the caller's model object or file is never changed.

    ``inputs``/``outputs`` name nodes or tensors where the source has several or the wanted one is inside;
    ``input_shape`` (in the source's own layout) fixes dimensions the source leaves open. The imported graph is
    checked (:mod:`.checks`: one input, finite weights, BatchNorm statistics, memory for one image).
    """
    if isinstance(source, Graph):
        return source.copy()
    graph = _import(source, inputs, outputs, input_shape)
    check_imported(graph, source)
    return graph


def _import(source, inputs, outputs, input_shape) -> Graph:
    if _is_keras_object(source):
        from .keras_importer import load_keras

        return load_keras(source, input_shape=input_shape, outputs=outputs)
    if not isinstance(source, (str, os.PathLike)):
        raise ModelLoadError(f"cannot load a {type(source).__name__}: expected {SUPPORTED_SOURCES}")
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    if not path.is_dir() and not path.is_file():  # a pipe or a device would be read for ever
        raise ModelLoadError(f"{path}: not a regular file or folder; supported: {SUPPORTED_SOURCES}")
    suffix = path.suffix.lower()
    if path.is_dir():
        if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
            from .tf_importer import load_saved_model

            return load_saved_model(path, inputs=inputs, outputs=outputs, input_shape=input_shape)
        raise ModelLoadError(f"{path}: a folder but not a TF SavedModel (no saved_model.pb); "
                             f"supported: {SUPPORTED_SOURCES}")
    if suffix in (".keras", ".h5", ".hdf5"):
        from .keras_importer import load_keras

        return load_keras(path, input_shape=input_shape, outputs=outputs)
    if suffix == ".onnx":
        from .onnx_importer import load_onnx

        return load_onnx(path, inputs=inputs, outputs=outputs, input_shape=input_shape)
    if suffix == ".pb":
        from .tf_importer import load_graphdef

        return load_graphdef(path, inputs=inputs, outputs=outputs, input_shape=input_shape)
    if suffix == ".tflite":
        from .tflite_importer import load_tflite

        return load_tflite(path, inputs=inputs, outputs=outputs, input_shape=input_shape)
    raise ModelLoadError(f"{path}: unknown model format {suffix or '(no extension)'}; supported: {SUPPORTED_SOURCES}")
