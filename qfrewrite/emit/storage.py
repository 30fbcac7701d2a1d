"""How an emitted file stores its kernels: per layer the integer type, the number of weights and the bytes they take,
read back from the TFLite flatbuffer or the ONNX model itself.

A TFLite kernel is the weight input (input 1) of CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED; its bytes are its
buffer's (INT4: two codes a byte). An ONNX kernel is the weight input of a Conv or Gemm: the initializer a
DequantizeLinear reads, or the float initializer itself; its bytes are the initializer's data. ``weights`` bytes is
what the same kernels take as int8, so ``int8_bytes - bytes`` is the saving of a narrower storage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Union

import numpy as np

__all__ = ["KernelStorage", "StorageSummary", "tflite_kernels", "onnx_kernels", "summarize"]

_TFLITE_KERNEL_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@dataclass(frozen=True)
class KernelStorage:
    """One stored kernel: its tensor's name, storage type (``int4``, ``int8``, ``float32`` ...), weights, bytes."""

    name: str
    dtype: str
    weights: int
    bytes: int


@dataclass(frozen=True)
class StorageSummary:
    """The kernels of one file: their storage types, their bytes, their bytes at int8, and the file's size."""

    dtypes: tuple
    kernel_bytes: int
    int8_bytes: int
    file_bytes: int

    def to_dict(self) -> Dict[str, object]:
        return {"dtypes": list(self.dtypes), "kernel_bytes": self.kernel_bytes, "int8_bytes": self.int8_bytes,
                "file_bytes": self.file_bytes}


def tflite_kernels(flatbuffer: bytes) -> List[KernelStorage]:
    """The kernels of a TFLite flatbuffer, in operator order."""
    from ..importers.tflite_reader import parse_tflite

    f = parse_tflite(bytes(flatbuffer))
    out = []
    for op in f.operators:
        if f.op_name(op) not in _TFLITE_KERNEL_OPS:
            continue
        t = f.op_inputs(op)[1]
        buf = f.model.buffers[f.tensors[t].buffer]
        size = len(buf.data) if buf.data is not None and len(buf.data) else int(buf.size or 0)
        out.append(KernelStorage(f.name(t), f.type_name(t).lower(), int(np.prod(f.shape(t), dtype=np.int64)), size))
    return out


def onnx_kernels(model) -> List[KernelStorage]:
    """The kernels of an ONNX ``ModelProto``, in node order."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 2:
            continue
        init = inits.get(dequantized.get(n.input[1], n.input[1]))
        if init is None:
            continue
        weights = int(np.prod(init.dims, dtype=np.int64))
        size = len(init.raw_data) if init.raw_data else numpy_helper.to_array(init).nbytes
        out.append(KernelStorage(init.name, TensorProto.DataType.Name(init.data_type).lower(), weights, size))
    return out


def summarize(kernels: List[KernelStorage], file_bytes: Union[int, bytes]) -> StorageSummary:
    """The :class:`StorageSummary` of a file's kernels (``file_bytes``: its size or its bytes)."""
    size = file_bytes if isinstance(file_bytes, int) else len(file_bytes)
    return StorageSummary(tuple(sorted({k.dtype for k in kernels})), sum(k.bytes for k in kernels),
                          sum(k.weights for k in kernels), size)
