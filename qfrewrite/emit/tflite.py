"""TFLite emission: IR -> ``tf.function`` built from constants -> TensorFlow's TFLite converter -> flatbuffer.

The function is traced with a fixed batch (1 by default), so the converter folds every shape computation.
A float graph gives a float model. A graph holding FakeQuant nodes (and ``weight_quant`` on its kernels) gives a
fully integer model: the converter honours every FakeQuant range exactly (scale and zero point) when run with
``optimizations=[DEFAULT]`` and no representative dataset. ``InsertFakeQuant`` places the FakeQuant nodes where the
converter needs them; the written int8 model is read back (:mod:`qfrewrite.tflite_inspect`) and an
:class:`EmitError` names any op left in float (``check=False`` skips this).

Weights of fewer than 8 bits (``weight_quant.bits``). Measured with TensorFlow 2.21.0 and LiteRT (ai-edge-litert)
2.3.0 on a graph of CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED layers, per channel and per tensor: the converter
writes the kernel of a symmetric narrow-range weight FakeQuant of 2 to 4 bits as an **INT4** tensor (two codes a
byte, codes in ``[-7, 7]``), and of 5 to 8 bits as INT8 (``[-127, 127]``); no converter flag is needed (none of the
``_experimental`` options is set), and LiteRT runs all three ops with INT4 kernels (with and without its XNNPACK
delegate), their outputs equal to the simulation as the 8-bit model's are (within one output step). The converter
always uses the whole storage grid: it re-rounds an ``n``-bit grid onto 15 (INT4) or 255 (INT8) levels spanning the
FakeQuant's range, which keeps a 2-, 4- or 8-bit grid exactly (its levels divide the storage's) but moved the weights
of a 3-bit grid by up to 1/21 of their range and of a 5-bit grid by up to 1/272. So before conversion every kernel
whose grid is not its storage's own (3, 5, 6, 7 bits) is replaced by its fake-quantized values with a FakeQuant of
the storage's width whose range :func:`~qfrewrite.numerics.qdq.embedding_absmax` widens until the ``n``-bit grid is a
subset of its grid: every kernel then holds exactly the IR's fake-quantized weights (a 3-bit grid is the INT4 codes
``{0, +-2, +-4, +-6}``, a 5-bit one the INT8 codes ``8k``, ``|k| <= 15``). Only the INT4 storage of 2 to 4 bits
saves space (the kernels take half the bytes); 5 to 7 bits in INT8 save none. Asymmetric or wide-range weight
quantization is passed to the converter as it is.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Union

import numpy as np

from ..errors import EmitError
from ..io_utils import atomic_write_bytes
from ..ir import FakeQuantAttrs, Graph, Op
from ..backend.tf_lowering import lower
from ..numerics.qdq import embedding_absmax, symmetric_levels, weight_storage_bits

__all__ = ["emit_tflite", "concrete_function", "is_quantized_graph", "weights_on_storage_grids"]

log = logging.getLogger(__name__)

IO_DTYPES = ("float32", "int8", "uint8")


def is_quantized_graph(graph: Graph) -> bool:
    """True when the graph carries FakeQuant nodes (activations) or quantized kernels."""
    return any(n.op is Op.FAKE_QUANT or n.weight_quant is not None for n in graph)


def weights_on_storage_grids(graph: Graph) -> Graph:
    """``graph``, or a copy of it in which every kernel with a symmetric narrow-range ``bits``-bit weight grid that is
    not its storage's own (3, 5, 6, 7 bits; storage :func:`~qfrewrite.numerics.qdq.weight_storage_bits`) holds its
    fake-quantized values, with a ``weight_quant`` of the storage's width whose range is widened
    (:func:`~qfrewrite.numerics.qdq.embedding_absmax`) so that every ``bits``-bit level is one of its levels.

    The copy computes the same function (the storage fake quantization maps each fake-quantized weight to itself, to
    float32 rounding), and the converter, which stores the storage grid of the FakeQuant's range, keeps it exactly.
    """
    from ..quant.weights import quantized_kernel

    def needs(fq: FakeQuantAttrs) -> bool:
        if fq is None or not fq.narrow_range or fq.bits > 8 or any(lo != -hi for lo, hi in zip(fq.lo, fq.hi)):
            return False
        return symmetric_levels(weight_storage_bits(fq.bits)) % symmetric_levels(fq.bits) != 0

    if not any(needs(n.weight_quant) for n in graph):
        return graph
    out = graph.copy()
    for node in out:
        fq = node.weight_quant
        if not needs(fq):
            continue
        storage = weight_storage_bits(fq.bits)
        absmax = embedding_absmax(np.asarray(fq.hi, np.float64), fq.bits, storage)
        kernel = out.const(quantized_kernel(node, fq), node.weight.name + "/fake_quantized")
        node.set_input(1, kernel)
        node.weight_quant = FakeQuantAttrs(lo=tuple(float(-a) for a in absmax), hi=tuple(float(a) for a in absmax),
                                           bits=storage, narrow_range=True, axis=fq.axis)
    return out


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
    cf = concrete_function(weights_on_storage_grids(graph) if quantized else graph, batch=batch, quantize=quantized)
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
