"""TFLite importer: a float ``.tflite`` (float32, or float16 weights) -> the NHWC IR.

For a model whose training files are lost, the flatbuffer is all there is; everything after the importer works on
it as on any other source.

1. :func:`~.tflite_reader.read_tflite` parses and checks the file (schema, buffers). A quantized model (int8 or
   uint8 tensors with scales: a fully integer model, or int8 weights with float activations) is refused with
   :class:`~qfrewrite.errors.QuantizedModelError`: requantizing it compounds its rounding error; ``qfrewrite
   diagnose`` reads such a file (:mod:`qfrewrite.analysis.tflite_int8`).
2. outputs: the subgraph's outputs, or the tensors named by ``outputs``; input: the subgraph's input, or the tensor
   named by ``inputs``. Operators on the data path between them (parameters such as a reshape target are not
   traversed) are converted in file order (TFLite stores operators topologically) by :mod:`.tflite_ops`; an
   operator the IR lacks raises :class:`UnsupportedOpError` naming the op, its output tensor and the file.
3. the output shape of every converted operator is checked against the shape the file stores (batch aside);
   chained clamps are merged (:func:`~.tflite_ops.merge_clips`), zero pads folded into the convolutions that read
   them (:func:`~.tflite_ops.fold_pads`) and the graph is verified.

The batch dim is opened (``None``; files store 1); ``input_shape`` (NHWC) fills dims the file leaves open (-1 in its
shape signature) and may not contradict a fixed one. ``graph.meta``: ``source``, ``format`` = ``"tflite"``,
``input_layout`` = ``"NHWC"``, ``input_names``, ``output_names``, ``source_batch``, ``weights_dtype``
(``"float32"`` or ``"float16"``) and ``batchnorm_folded_in_source`` = True: the converter folds every BatchNorm
into the layer before it, so no BatchNorm scale is known and none can be blamed for an outlier channel.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence, Set, Union

from ..errors import ModelLoadError, QuantizedModelError, VerificationError, one_line
from ..ir import Graph, verify
from .tflite_ops import CONVERTERS, PARAM_INPUTS, SUPPORTED_TFLITE_OPS, Builder, fold_pads, merge_clips
from .tflite_reader import TFLiteFile, read_tflite

__all__ = ["load_tflite", "tflite_to_graph", "refuse_quantized", "SUPPORTED_TFLITE_OPS"]

log = logging.getLogger(__name__)

Names = Optional[Union[str, Sequence[str]]]


def refuse_quantized(f: TFLiteFile) -> None:
    """Raise :class:`QuantizedModelError` when the file holds quantized tensors."""
    quantized = f.quantized_tensors()
    if not quantized:
        return
    types = sorted({f.type_name(i).lower() for i in quantized})
    produced = {t for op in f.operators for t in f.op_outputs(op)}
    activations = [i for i in quantized if i in produced]
    kind = (f"a quantized TFLite model ({'/'.join(types)} activations and weights)" if activations
            else f"a TFLite model with {'/'.join(types)} weights")
    raise QuantizedModelError(
        f"{f.source}: {kind}; rewriting it would requantize values that were already rounded, which compounds "
        f"their error and loses accuracy. Quantize the float model it came from instead (its Keras, SavedModel or "
        f"ONNX file, or a float .tflite: 'qfrewrite convert FLOAT_MODEL -o OUT.tflite --data DIR'); "
        f"'qfrewrite diagnose {f.source}' reports this file's scales and the levels its channels use")


def _as_list(names: Names) -> Optional[List[str]]:
    if names is None:
        return None
    return [names] if isinstance(names, str) else [str(n) for n in names]


def _tensor(f: TFLiteFile, name: str, what: str) -> int:
    names = {f.name(i): i for i in range(len(f.tensors))}
    if name in names:
        return names[name]
    if name.isdigit() and int(name) < len(f.tensors):
        return int(name)
    raise ModelLoadError(f"{f.source}: no tensor named {name!r} for {what}")


def _data_operators(f: TFLiteFile, outputs: List[int], inputs: Set[int]) -> Set[int]:
    """Indices of the operators the outputs need as data (parameters are not traversed)."""
    needed: Set[int] = set()
    stack = list(outputs)
    seen: Set[int] = set()
    while stack:
        t = stack.pop()
        if t in seen or t in inputs or t < 0 or f.is_const(t):
            continue
        seen.add(t)
        p = f.producer(t)
        if p is None:
            continue
        needed.add(p)
        name = f.op_name(f.operators[p])
        ins = f.op_inputs(f.operators[p])
        params = set(PARAM_INPUTS[name](len(ins))) if name in PARAM_INPUTS else set()
        stack.extend(t2 for k, t2 in enumerate(ins) if k not in params)
    return needed


def _input_shape(f: TFLiteFile, tensor: int, input_shape) -> tuple:
    if f.type_name(tensor) != "FLOAT32":
        raise ModelLoadError(f"{f.source}: input {f.name(tensor)!r} is {f.type_name(tensor).lower()}; only float32 "
                             "inputs are supported")
    sig = list(f.shape_signature(tensor))
    shape = [None if d < 0 else d for d in sig]
    if input_shape is not None:
        user = [None if d is None or int(d) < 0 else int(d) for d in input_shape]
        if len(user) != len(shape):
            raise ModelLoadError(f"{f.source}: input_shape {tuple(user)} has rank {len(user)}, input "
                                 f"{f.name(tensor)!r} has shape {tuple(sig)}")
        for k in range(1, len(shape)):
            if shape[k] is None:
                shape[k] = user[k]
            elif user[k] is not None and user[k] != shape[k]:
                raise ModelLoadError(f"{f.source}: input_shape {tuple(user)} contradicts the fixed shape "
                                     f"{tuple(sig)} of input {f.name(tensor)!r} (dim {k})")
    if not shape:
        raise ModelLoadError(f"{f.source}: input {f.name(tensor)!r} is a scalar; an image input is needed")
    shape[0] = None
    if any(d is None for d in shape[1:]):
        raise ModelLoadError(f"{f.source}: input {f.name(tensor)!r} has open dims {tuple(sig)}; give input_shape "
                             "(NHWC) to fix them")
    return tuple(shape)


def _check_shape(b: Builder, index: int, value) -> None:
    """The IR output shape agrees with the stored one (batch aside, and where the file's signature is fixed)."""
    out = b.output(index)
    stored, sig = b.f.shape(out), b.f.shape_signature(out)
    got = value.shape
    if len(got) != len(stored) or any(g is not None and s >= 0 and g != d
                                      for g, d, s in zip(got[1:], stored[1:], sig[1:])):
        raise ModelLoadError(f"{b.f.source}: operator {index} ({b.f.op_name(b.f.operators[index])}) gives shape "
                             f"{got} in the IR, the file stores {stored} for {b.f.name(out)!r}: the file is "
                             "inconsistent")


def tflite_to_graph(f: TFLiteFile, inputs: Names = None, outputs: Names = None, input_shape=None) -> Graph:
    """Map a parsed TFLite file to an IR graph (the steps are listed in the module docstring)."""
    refuse_quantized(f)
    source = f.source
    outs = [_tensor(f, n, "outputs") for n in _as_list(outputs)] if outputs is not None else \
        [int(t) for t in f.subgraph.outputs]
    ins = [_tensor(f, n, "inputs") for n in _as_list(inputs)] if inputs is not None else \
        [int(t) for t in f.subgraph.inputs]
    for t in outs:
        if f.is_const(t):
            raise ModelLoadError(f"{source}: output {f.name(t)!r} is a constant (it does not depend on the inputs)")
    needed = _data_operators(f, outs, set(ins))
    reached = {t for p in needed for t in f.op_inputs(f.operators[p])} | set(outs)
    ins = [t for t in ins if t in reached]
    graph = Graph(Path(source).stem or "tflite_model")
    b = Builder(f, graph)
    for t in ins:
        b.env[t] = graph.add_input(f.name(t), _input_shape(f, t, input_shape if len(ins) == 1 else None))
    order = sorted(needed)
    for p in order:
        name = f.op_name(f.operators[p])
        if name not in CONVERTERS:
            raise b.unsupported(p, "on the path from the input to the outputs")
    for p in order:
        name = f.op_name(f.operators[p])
        try:
            value = CONVERTERS[name](b, p)
        except VerificationError as exc:
            raise ModelLoadError(f"{source}: operator {p} ({name}) does not fit its inputs: {exc}") from None
        except (ValueError, IndexError, TypeError, KeyError) as exc:  # constants that break the op's rules
            log.debug("converting operator %d failed", p, exc_info=True)
            raise ModelLoadError(f"{source}: operator {p} ({name}, output {f.name(b.output(p))!r}) cannot be "
                                 f"imported: {one_line(exc)}") from None
        _check_shape(b, p, value)
        b.env[b.output(p)] = value
    missing = [f.name(t) for t in outs if t not in b.env]
    if missing:
        raise ModelLoadError(f"{source}: outputs {missing} are not computed from the input")
    graph.outputs = [b.env[t] for t in outs]
    graph.remove_unused()
    merged, pads = merge_clips(graph), fold_pads(graph)
    try:
        verify(graph)
    except VerificationError as exc:
        raise ModelLoadError(f"{source}: the imported graph is inconsistent: {exc}") from None
    fp16 = f.float16_weights()
    graph.meta.update(source=source, format="tflite", input_layout="NHWC", input_names=[f.name(t) for t in ins],
                      output_names=[f.name(t) for t in outs], source_batch=b.file_batch(ins[0]) if ins else None,
                      weights_dtype="float16" if fp16 else "float32", batchnorm_folded_in_source=True)
    log.info("imported %s: %d of %d operators used, %d IR nodes %s, %d float16 weights, %d clamps merged, %d pads "
             "folded", source, len(needed), len(f.operators), len(graph), graph.op_counts(), fp16, merged, pads)
    return graph


def load_tflite(path: Union[str, os.PathLike], inputs: Names = None, outputs: Names = None,
                input_shape=None) -> Graph:
    """Import the float TFLite file at ``path`` (only read) into a new NHWC :class:`Graph`."""
    return tflite_to_graph(read_tflite(path), inputs=inputs, outputs=outputs, input_shape=input_shape)
