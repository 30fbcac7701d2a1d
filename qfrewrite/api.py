"""The public entry points: :func:`load` and :func:`rewrite`, and the :class:`Result` they give."""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence, Union

from .data import as_calibration_set
from .importers import load
from .ir import Graph
from .pass_infra import Context, Pass, PassManager
from .report import Report

__all__ = ["load", "rewrite", "Result"]

log = logging.getLogger(__name__)


class Result:
    """A rewritten graph with its report; emits TFLite, ONNX and Keras models."""

    def __init__(self, graph: Graph, report: Report, context: Optional[Context] = None):
        self.graph = graph
        self.report = report
        self.context = context

    def to_tflite(self, path: Optional[Union[str, os.PathLike]] = None, quantized: Optional[bool] = None,
                  io_dtype: str = "float32") -> bytes:
        """Write a TFLite flatbuffer (fully int8 when the graph carries FakeQuant, else float); returns its bytes."""
        from .emit.tflite import emit_tflite

        return emit_tflite(self.graph, path, quantized=quantized, io_dtype=io_dtype)

    def to_onnx(self, path: Optional[Union[str, os.PathLike]] = None, quantized: Optional[bool] = None):
        """Write an ONNX model (float, or QDQ when the graph carries FakeQuant); returns the ``onnx.ModelProto``."""
        from .emit.onnx_emitter import emit_onnx

        return emit_onnx(self.graph, path, quantized=quantized)

    def to_keras(self):
        """A float Keras model of the graph (for fine-tuning in TensorFlow before quantizing)."""
        from .emit.keras_emitter import emit_keras

        return emit_keras(self.graph)

    def __repr__(self) -> str:
        return f"<Result {self.graph!r}, {len(self.report)} passes>"


def rewrite(model, passes: Optional[Sequence[Pass]] = None, data=None, *, inputs=None, outputs=None,
            input_shape=None, preprocess=None, limit: Optional[int] = None, batch_size: int = 32,
            verify: bool = True, stats: bool = True) -> Result:
    """Import ``model`` (a Keras model, a path, or a Graph from :func:`load`), run ``passes`` and return a Result.

    ``data``: calibration data (an image folder, a numpy array in the source model's own input layout, or an
    iterable of such batches). ``preprocess``: a preset name or ``(mean, std)`` for image folders.
    The caller's model or file is never modified.
    """
    graph = load(model, inputs=inputs, outputs=outputs, input_shape=input_shape)
    ctx = Context(data=as_calibration_set(data, graph, batch_size=batch_size, preprocess=preprocess, limit=limit))
    ctx.report = Report(source=graph.meta.get("source"))
    pm = PassManager(list(passes or []), verify_each=verify, stats="default" if stats else None)
    result = pm.run(graph, ctx)
    return Result(result.graph, ctx.report, ctx)
