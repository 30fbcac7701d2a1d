"""Read a TFLite flatbuffer into numpy: its tensors, constants and operators, through the schema LiteRT ships.

The file is parsed with ``ai_edge_litert.schema_py_generated`` (the flatbuffers object API generated from TFLite's
``schema.fbs``; TensorFlow ships the same module as ``tensorflow.lite.python.schema_py_generated``), never by hand.
:func:`read_tflite` checks, before any op is looked at:

* the file identifier ``TFL3`` and that the flatbuffer parses (a truncated or corrupt file makes the generated
  reader run past its end);
* that every constant's buffer (inline, or at ``offset``/``size`` for files over 2 GiB) holds exactly
  ``prod(shape) * itemsize`` bytes and lies inside the file.

:class:`TFLiteFile` answers what the importers and the int8 report ask: an op's name (``builtin_code``, or the
deprecated byte for old files), a tensor's dtype and quantization, and a constant's value. A ``DEQUANTIZE`` of a
float16 constant (float16-weight files) reads as the float32 constant it computes.

Errors: :class:`~qfrewrite.errors.ModelLoadError` naming the file.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from ..errors import ModelLoadError, one_line

__all__ = ["TFLiteFile", "read_tflite", "schema", "Quantization", "FILE_IDENTIFIER"]

log = logging.getLogger(__name__)

FILE_IDENTIFIER = b"TFL3"


def schema():
    """The generated TFLite schema module (LiteRT's, else TensorFlow's copy of it)."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:  # pragma: no cover - LiteRT is a dependency; TensorFlow carries the same module
        from tensorflow.lite.python import schema_py_generated
    return schema_py_generated


def _enum_names(cls) -> Dict[int, str]:
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


_DTYPES = {"FLOAT32": np.float32, "FLOAT16": np.float16, "FLOAT64": np.float64, "INT32": np.int32,
           "UINT8": np.uint8, "INT64": np.int64, "INT16": np.int16, "INT8": np.int8, "BOOL": np.bool_,
           "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64}


@dataclass(frozen=True)
class Quantization:
    """A tensor's stored quantization: ``real = (q - zero_point) * scale``, per channel along ``axis`` when
    ``scale`` has more than one entry."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1


class TFLiteFile:
    """A parsed TFLite model: subgraph 0 (the main graph) with its tensors, constants and operators."""

    def __init__(self, model, data: bytes, source: str):
        s = schema()
        self.model = model
        self.data = data
        self.source = source
        self.subgraph = model.subgraphs[0]
        self.tensors = list(self.subgraph.tensors or [])
        self.operators = list(self.subgraph.operators or [])
        self._op_names = _enum_names(s.BuiltinOperator)
        self._type_names = _enum_names(s.TensorType)
        self._producer = {t: i for i, op in enumerate(self.operators) for t in self.op_outputs(op)}
        self._consts: Dict[int, Optional[np.ndarray]] = {}

    # -- operators ------------------------------------------------------------------------------------------------
    def op_name(self, op) -> str:
        """The builtin op name (``CONV_2D``) or ``CUSTOM:<code>``."""
        code = self.model.operatorCodes[op.opcodeIndex]
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))  # old files set only the byte
        name = self._op_names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
            return f"CUSTOM:{custom}"
        return name

    @staticmethod
    def op_inputs(op) -> List[int]:
        """Input tensor indices (-1 for an absent optional input)."""
        return [int(i) for i in (op.inputs if op.inputs is not None else [])]

    @staticmethod
    def op_outputs(op) -> List[int]:
        return [int(i) for i in (op.outputs if op.outputs is not None else [])]

    def producer(self, tensor: int) -> Optional[int]:
        """The index of the operator writing ``tensor``, or ``None`` (an input or a constant)."""
        return self._producer.get(tensor)

    # -- tensors --------------------------------------------------------------------------------------------------
    def name(self, tensor: int) -> str:
        n = self.tensors[tensor].name
        return n.decode() if isinstance(n, bytes) else str(n or f"tensor_{tensor}")

    def type_name(self, tensor: int) -> str:
        return self._type_names.get(int(self.tensors[tensor].type), str(self.tensors[tensor].type))

    def dtype(self, tensor: int):
        """The numpy dtype of ``tensor``, or ``None`` for types numpy has no fixed-width spelling of."""
        return _DTYPES.get(self.type_name(tensor))

    def shape(self, tensor: int) -> Tuple[int, ...]:
        s = self.tensors[tensor].shape
        return tuple(int(d) for d in (s if s is not None else []))

    def shape_signature(self, tensor: int) -> Tuple[int, ...]:
        """The shape with -1 for the dimensions the converter left open (the shape itself where none is stored)."""
        sig = self.tensors[tensor].shapeSignature
        return tuple(int(d) for d in sig) if sig is not None and len(sig) else self.shape(tensor)

    def quantization(self, tensor: int) -> Optional[Quantization]:
        """The stored scales and zero points, or ``None`` for a tensor that has none."""
        q = self.tensors[tensor].quantization
        if q is None or q.scale is None or len(q.scale) == 0:
            return None
        zp = q.zeroPoint if q.zeroPoint is not None and len(q.zeroPoint) else np.zeros(len(q.scale))
        return Quantization(np.asarray(q.scale, np.float64), np.asarray(zp, np.int64), int(q.quantizedDimension))

    def raw(self, tensor: int) -> Optional[np.ndarray]:
        """The stored value of a constant tensor in its own dtype (INT4: int8 codes), or ``None`` when the tensor has
        no data."""
        t = self.tensors[tensor]
        buf = self.model.buffers[t.buffer] if 0 < t.buffer < len(self.model.buffers) else None
        if buf is None:
            return None
        if buf.data is not None and len(buf.data):
            data = np.asarray(buf.data, np.uint8)
        elif buf.offset > 1 and buf.size:
            data = np.frombuffer(self.data, np.uint8, count=int(buf.size), offset=int(buf.offset))
        else:
            return None
        if self.type_name(tensor) == "INT4":  # two codes a byte: unpacked to int8 codes in [-8, 7]
            from ..numerics.qdq import unpack_int4

            shape = self.shape(tensor)
            return unpack_int4(data, int(np.prod(shape, dtype=np.int64))).reshape(shape)
        dtype = self.dtype(tensor)
        if dtype is None:
            raise ModelLoadError(f"{self.source}: constant tensor {self.name(tensor)!r} has type "
                                 f"{self.type_name(tensor)}, which qfrewrite does not read")
        return data.view(dtype).reshape(self.shape(tensor))

    def const(self, tensor: int) -> Optional[np.ndarray]:
        """The value of ``tensor`` when it is a constant: stored data, or a ``DEQUANTIZE`` of a float16 constant
        (float16-weight files), as float32; ``None`` for a tensor computed from the inputs."""
        if tensor in self._consts:
            return self._consts[tensor]
        value = self.raw(tensor)
        if value is None:
            p = self.producer(tensor)
            if p is not None and self.op_name(self.operators[p]) == "DEQUANTIZE":
                src = self.op_inputs(self.operators[p])[0]
                stored = self.raw(src)
                if stored is not None and stored.dtype == np.float16:
                    value = stored.astype(np.float32)
        self._consts[tensor] = value
        return value

    def is_const(self, tensor: int) -> bool:
        return self.const(tensor) is not None

    def float16_weights(self) -> int:
        """How many float16 constants are dequantized to float32 (a float16-weight file when positive)."""
        sources = [self.op_inputs(op)[0] for op in self.operators if self.op_name(op) == "DEQUANTIZE"]
        return sum(1 for t in sources if self.type_name(t) == "FLOAT16" and self.raw(t) is not None)

    def quantized_tensors(self) -> List[int]:
        """Integer tensors carrying scales (int8/uint8/int16 weights or activations) that an operator reads or
        writes: the marks of a quantized model (int8, uint8, or float with int8 weights)."""
        used = {i for op in self.operators for i in self.op_inputs(op) + self.op_outputs(op) if i >= 0}
        return [i for i in sorted(used) if self.type_name(i) in ("INT8", "UINT8", "INT16", "INT4")
                and self.quantization(i) is not None]


def _check_buffers(f: TFLiteFile) -> None:
    """Every constant's data has the bytes its shape and type need and lies inside the file."""
    for i, t in enumerate(f.tensors):
        if not 0 <= t.buffer < len(f.model.buffers):
            raise ModelLoadError(f"{f.source}: tensor {f.name(i)!r} names buffer {t.buffer}, the file has "
                                 f"{len(f.model.buffers)}: the file is corrupt")
        buf = f.model.buffers[t.buffer]
        if buf.offset > 1 and buf.offset + buf.size > len(f.data):
            raise ModelLoadError(f"{f.source}: the data of tensor {f.name(i)!r} lies past the end of the file "
                                 f"({buf.offset + buf.size} > {len(f.data)} bytes): the file is truncated")
        dtype = f.dtype(i)
        size = len(buf.data) if buf.data is not None and len(buf.data) else (buf.size if buf.offset > 1 else 0)
        if size and dtype is not None:
            need = int(np.prod(f.shape(i), dtype=np.int64)) * np.dtype(dtype).itemsize
            if size != need:
                raise ModelLoadError(f"{f.source}: constant tensor {f.name(i)!r} of shape {f.shape(i)} "
                                     f"({f.type_name(i)}) holds {size} bytes, {need} expected: the file is corrupt")


def read_tflite(path: Union[str, os.PathLike]) -> TFLiteFile:
    """Parse the TFLite file at ``path`` (only read) and check it as the module docstring says."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    return parse_tflite(data, str(path))


def parse_tflite(data: bytes, source: str = "<tflite>") -> TFLiteFile:
    """:func:`read_tflite` for bytes already in memory."""
    if len(data) < 8 or data[4:8] != FILE_IDENTIFIER:
        raise ModelLoadError(f"{source}: not a TFLite flatbuffer (no 'TFL3' file identifier at byte 4)")
    s = schema()
    try:
        model = s.ModelT.InitFromPackedBuf(bytearray(data), 0)
    except Exception as exc:  # struct.error / IndexError when the reader runs past a truncated buffer
        log.debug("parsing %s failed", source, exc_info=True)
        raise ModelLoadError(f"{source}: not a readable TFLite flatbuffer (truncated or corrupt file?): "
                             f"{one_line(exc)}") from None
    if not model.subgraphs:
        raise ModelLoadError(f"{source}: the TFLite model has no subgraph")
    f = TFLiteFile(model, data, source)
    _check_buffers(f)
    return f
