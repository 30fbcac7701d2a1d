"""TFLite emission: IR -> ``tf.function`` built from constants -> TensorFlow's TFLite converter -> flatbuffer.

The function is traced with a fixed batch (1 by default), so the converter folds every shape computation.
A float graph gives a float model. A graph holding FakeQuant nodes (and ``weight_quant`` on its kernels) gives a
fully integer model: the converter honours every FakeQuant range exactly (scale and zero point) when run with
``optimizations=[DEFAULT]`` and no representative dataset. ``InsertFakeQuant`` places the FakeQuant nodes where the
converter needs them; the written int8 model is read back (:mod:`qfrewrite.tflite_inspect`) and an
:class:`EmitError` names any op left in float (``check=False`` skips this).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

from ..errors import EmitError
from ..io_utils import atomic_write_bytes
from ..ir import Graph, Op
from ..backend.tf_lowering import lower

__all__ = ["emit_tflite", "concrete_function", "is_quantized_graph"]

log = logging.getLogger(__name__)

IO_DTYPES = ("float32", "int8", "uint8")


def is_quantized_graph(graph: Graph) -> bool:
    """True when the graph carries FakeQuant nodes (activations) or quantized kernels."""
    return any(n.op is Op.FAKE_QUANT or n.weight_quant is not None for n in graph)


def concrete_function(graph: Graph, batch: int = 1, quantize: bool = True):
    """A concrete ``tf.function`` of the graph with a fixed batch; every weight is a constant."""
    import tensorflow as tf

    specs = []
    for i, v in enumerate(graph.inputs):
        if any(d is None for d in v.shape[1:]):
            raise EmitError(f"input {v.name} has open dimensions {v.shape}: give input_shape= when loading "
                            "(--input-shape)")
        specs.append(tf.TensorSpec([batch, *v.shape[1:]], tf.float32, name=f"input_{i}"))

    @tf.function(input_signature=specs, autograph=False)
    def fn(*xs):
        outs = lower(graph, xs, quantize=quantize)
        return {f"output_{i}": o for i, o in enumerate(outs)}

    return fn.get_concrete_function()


def emit_tflite(graph: Graph, path: Optional[Union[str, os.PathLike]] = None, quantized: Optional[bool] = None,
                io_dtype: str = "float32", batch: int = 1, check: bool = True) -> bytes:
    """Convert ``graph`` to a TFLite flatbuffer and, with ``path``, write it atomically.

    ``quantized=None`` means: fully int8 when the graph carries FakeQuant, else float. ``io_dtype`` ("float32", "int8",
    "uint8") sets the model's input and output types of an int8 model. ``check``: verify that an int8 model is fully
    integer before writing it.
    """
    import tensorflow as tf

    if io_dtype not in IO_DTYPES:
        raise EmitError(f"io_dtype must be one of {IO_DTYPES}, got {io_dtype!r}")
    if quantized is None:
        quantized = is_quantized_graph(graph)
    if quantized and not is_quantized_graph(graph):
        raise EmitError("an int8 model needs FakeQuant ranges: run InsertFakeQuant (with calibration data) first")
    cf = concrete_function(graph, batch=batch, quantize=quantized)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([cf], tf.Module())
    if quantized:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if io_dtype != "float32":
            converter.inference_input_type = getattr(tf, io_dtype)
            converter.inference_output_type = getattr(tf, io_dtype)
    elif io_dtype != "float32":
        raise EmitError("int8/uint8 input and output types need a quantized graph")
    try:
        flatbuffer = converter.convert()
    except Exception as exc:  # the converter raises many exception types with long traces
        msg = str(exc).strip().splitlines()
        raise EmitError(f"TFLite conversion of graph {graph.name!r} failed: {msg[-1] if msg else type(exc).__name__}") \
            from exc
    if quantized and check:
        from ..tflite_inspect import assert_fully_integer

        try:
            assert_fully_integer(flatbuffer, io_dtype=io_dtype)
        except EmitError as exc:
            raise EmitError(f"graph {graph.name!r}: {exc}; every materialised tensor needs a FakeQuant range "
                            "(run InsertFakeQuant, after FoldBatchNorm)") from None
    if path is not None:
        atomic_write_bytes(path, flatbuffer)
        log.info("wrote %s (%d bytes)", path, len(flatbuffer))
    return flatbuffer
