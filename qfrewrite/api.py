"""The public entry points: :func:`load` and :func:`rewrite`, and the :class:`Result` they give."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional, Sequence, Union

from .calibration import as_calibration_set
from .importers import load
from .instruments import default_instruments
from .ir import Graph
from .pass_infra import Context, Pass, PassManager
from .report import Report
from .spec import QuantSpec, merge_statements

__all__ = ["load", "rewrite", "Result"]

log = logging.getLogger(__name__)


class Result:
    """A rewritten graph with its report and the pipeline's resolved :class:`QuantSpec`; emits TFLite, ONNX and Keras
    models."""

    def __init__(self, graph: Graph, report: Report, context: Optional[Context] = None):
        self.graph = graph
        self.report = report
        self.context = context

    @property
    def spec(self) -> QuantSpec:
        """How the graph is (or will be) quantized: the spec the pipeline resolved."""
        return self.context.spec if self.context is not None else QuantSpec().resolved()

    def to_tflite(self, path: Optional[Union[str, os.PathLike]] = None, quantized: Optional[bool] = None,
                  io_dtype: str = "float32") -> bytes:
        """Write a TFLite flatbuffer (fully int8 when the graph carries FakeQuant, else float); returns its bytes.

        ``path`` is written atomically and may not be the source model (:class:`~qfrewrite.errors.OutputError`).
        """
        from .emit.tflite import emit_tflite

        with self._output(path, "the TFLite model") as tmp:
            flatbuffer = emit_tflite(self.graph, None, quantized=quantized, io_dtype=io_dtype)
            if tmp is not None:
                tmp.write_bytes(flatbuffer)
        return flatbuffer

    def to_onnx(self, path: Optional[Union[str, os.PathLike]] = None, quantized: Optional[bool] = None):
        """Write an ONNX model (float, or QDQ when the graph carries FakeQuant); returns the ``onnx.ModelProto``.

        ``path`` as for :meth:`to_tflite`.
        """
        from .emit.onnx_emitter import emit_onnx

        with self._output(path, "the ONNX model") as tmp:
            model = emit_onnx(self.graph, None, quantized=quantized)
            if tmp is not None:
                tmp.write_bytes(model.SerializeToString())
        return model

    def _output(self, path, what: str):
        """:func:`~qfrewrite.io_utils.one_output` for ``path`` against the source model (a no-op without a path)."""
        from .io_utils import one_output

        if path is None:
            return contextlib.nullcontext()
        return one_output(path, what, [("the source model", self.graph.meta.get("source"))])

    def to_keras(self, logits: bool = False, batchnorm_after=()):
        """A float Keras model of the graph (for fine-tuning in TensorFlow before quantizing).

        ``logits=True``: outputs that a Softmax produces are emitted as the Softmax's input (for a distillation
        loss); ``batchnorm_after``: layer names after which an identity BatchNormalization is inserted (see
        :mod:`qfrewrite.emit.keras_emitter`; :mod:`qfrewrite.finetune` chooses and initialises them).
        """
        from .emit.keras_emitter import emit_keras

        return emit_keras(self.graph, logits=logits, batchnorm_after=batchnorm_after)

    def __repr__(self) -> str:
        return f"<Result {self.graph!r}, {len(self.report)} passes>"


def rewrite(model, passes: Optional[Sequence[Pass]] = None, data=None, *, spec: Optional[QuantSpec] = None,
            inputs=None, outputs=None, input_shape=None, preprocess=None, limit: Optional[int] = None,
            batch_size: int = 32, verify: bool = True, stats: bool = True, check_contracts: bool = True) -> Result:
    """Import ``model`` (a Keras model, a path, or a Graph from :func:`load`), run ``passes`` and return a Result.

    ``data``: calibration data (an image folder, a numpy array in the source model's own input layout, or an
    iterable of such batches). ``preprocess``: a preset name or ``(mean, std)`` for image folders.
    ``spec``: how the model will be quantized (:class:`QuantSpec`; a recipe carries its own, which must agree); the
    passes' explicit options must agree with it and with one another, and fill what it leaves unstated. The pass list is checked against the passes' contracts
    before any work (:class:`~qfrewrite.errors.PipelineOrderError`; ``check_contracts=False`` skips that).
    The caller's model or file is never modified.
    """
    graph = load(model, inputs=inputs, outputs=outputs, input_shape=input_shape)
    recipe_spec = getattr(passes, "spec", None)
    if recipe_spec is not None:
        spec = merge_statements(spec, [(f"recipe {getattr(passes, 'name', '')!r}", recipe_spec)])
    pm = PassManager(list(passes or []), check_contracts=check_contracts)
    pm.check(graph, spec, has_data=data is not None)
    ctx = Context(data=as_calibration_set(data, graph, batch_size=batch_size, preprocess=preprocess, limit=limit),
                  spec=spec)
    report = Report(source=graph.meta.get("source"))
    pm.instruments = default_instruments(verify_each=verify, stats=stats, report=report)
    result = pm.run(graph, ctx)
    return Result(result.graph, report, ctx)
