"""Read an emitted TFLite flatbuffer back: its tensors (type, scale, zero point), its ops, and whether it is fully
integer.

Read through LiteRT's interpreter (``ai_edge_litert``: tensor details and op details), so no schema package is
needed. A model is **fully integer** when every op other than the boundary ``QUANTIZE`` (float input -> int8) and
``DEQUANTIZE`` (int8 -> float output) reads and writes only integer tensors: int8 (or uint8/int16) activations and
weights, int32 biases and shape operands; a ``DEQUANTIZE`` feeding anything but a model output, or a float tensor
inside, makes it not fully integer.

:func:`layer_agreement` compares every quantized tensor of the file with the FakeQuant simulation of the IR, each
layer fed the int8 model's own inputs so that rounding differences do not accumulate.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import EmitError
from .native_log import quiet_native_stderr

__all__ = ["TensorInfo", "OpInfo", "ModelInfo", "inspect_tflite", "assert_fully_integer", "float_ops",
           "interpreter", "tensors_for_node", "layer_agreement"]

_INTEGER = (np.int8, np.uint8, np.int16, np.int32, np.int64)


@dataclass
class TensorInfo:
    index: int
    name: str
    dtype: type
    shape: Tuple[int, ...]
    scales: np.ndarray
    zero_points: np.ndarray
    quantized_dimension: int

    @property
    def is_integer(self) -> bool:
        return self.dtype in _INTEGER

    @property
    def scale(self) -> float:
        return float(self.scales[0]) if len(self.scales) else 0.0

    @property
    def zero_point(self) -> int:
        return int(self.zero_points[0]) if len(self.zero_points) else 0

    def range(self) -> Tuple[float, float]:
        """The real range ``[(qmin - z) * s, (qmax - z) * s]`` of a per-tensor quantized tensor."""
        info = np.iinfo(self.dtype)
        return (info.min - self.zero_point) * self.scale, (info.max - self.zero_point) * self.scale


@dataclass
class OpInfo:
    index: int
    name: str
    inputs: Tuple[int, ...]
    outputs: Tuple[int, ...]


@dataclass
class ModelInfo:
    tensors: Dict[int, TensorInfo]
    ops: List[OpInfo]
    inputs: List[int]
    outputs: List[int]

    def op_counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for op in self.ops:
            out[op.name] = out.get(op.name, 0) + 1
        return dict(sorted(out.items()))

    def producers(self) -> Dict[int, OpInfo]:
        return {t: op for op in self.ops for t in op.outputs}

    def activation_tensors(self) -> List[TensorInfo]:
        """Tensors produced by an op (not constants), excluding the model's float I/O."""
        produced = {t for op in self.ops for t in op.outputs}
        return [self.tensors[i] for i in sorted(produced)]


def interpreter(model: Union[str, os.PathLike, bytes], num_threads: int = 1, delegates: bool = True):
    """A LiteRT interpreter with tensors allocated for a model path or flatbuffer bytes.

    ``delegates=False`` keeps LiteRT's default delegate (XNNPACK) out, so that op details list the model's own ops.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kw = {} if delegates else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    try:
        if isinstance(model, (bytes, bytearray)):
            it = Interpreter(model_content=bytes(model), num_threads=num_threads, **kw)
        else:
            if not os.path.isfile(model):
                raise EmitError(f"{model}: no such TFLite file")
            it = Interpreter(model_path=str(model), num_threads=num_threads, **kw)
        with quiet_native_stderr():  # LiteRT announces its XNNPACK delegate on the first allocation
            it.allocate_tensors()
    except EmitError:
        raise
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError with long messages
        where = "flatbuffer" if isinstance(model, (bytes, bytearray)) else str(model)
        msg = str(exc).strip().splitlines()
        raise EmitError(f"{where} is not a readable TFLite model: {msg[0] if msg else type(exc).__name__}") from None
    return it


def inspect_tflite(model: Union[str, os.PathLike, bytes]) -> ModelInfo:
    """Tensors and ops of a TFLite model (path or bytes)."""
    it = interpreter(model, delegates=False)
    tensors = {}
    for d in it.get_tensor_details():
        qp = d.get("quantization_parameters", {})
        tensors[d["index"]] = TensorInfo(d["index"], d["name"], np.dtype(d["dtype"]).type, tuple(d["shape"]),
                                         np.asarray(qp.get("scales", []), np.float64),
                                         np.asarray(qp.get("zero_points", []), np.int64),
                                         int(qp.get("quantized_dimension", 0)))
    ops = [OpInfo(d["index"], d["op_name"], tuple(int(i) for i in d["inputs"] if i >= 0),
                  tuple(int(i) for i in d["outputs"] if i >= 0)) for d in it._get_ops_details()]
    return ModelInfo(tensors, ops, [d["index"] for d in it.get_input_details()],
                     [d["index"] for d in it.get_output_details()])


def tensors_for_node(info: ModelInfo, node_name: str) -> List[TensorInfo]:
    """The op-produced tensors whose (fused) name carries the IR node ``node_name``.

    The lowering names every TF op under a scope of its IR node, and the converter joins the names of the ops it
    fuses with ``;``: ``"clip/Relu6;conv2d/BiasAdd;conv2d/Conv2D"`` is the output of node ``clip`` (and ``conv2d``).
    """
    from .backend.tf_lowering import _scope_name

    prefix = _scope_name(node_name) + "/"
    return [t for t in info.activation_tensors() if any(part.startswith(prefix) for part in t.name.split(";"))]


def float_ops(info: ModelInfo) -> List[str]:
    """Descriptions of every op that computes in float inside the model (empty for a fully integer model)."""
    problems = []
    model_inputs, model_outputs = set(info.inputs), set(info.outputs)
    for op in info.ops:
        ins = [info.tensors[i] for i in op.inputs]
        outs = [info.tensors[i] for i in op.outputs]
        if op.name == "QUANTIZE" and all(t.index in model_inputs or t.is_integer for t in ins) \
                and all(t.is_integer for t in outs):
            continue
        if op.name == "DEQUANTIZE" and all(t.is_integer for t in ins) and all(t.index in model_outputs
                                                                               for t in outs):
            continue
        bad = [t for t in ins + outs if not t.is_integer]
        if bad:
            problems.append(f"{op.name} #{op.index}: float tensors " + ", ".join(f"{t.name!r} ({t.dtype.__name__})"
                                                                              for t in bad))
    return problems


def assert_fully_integer(model: Union[str, os.PathLike, bytes, ModelInfo],
                         io_dtype: Optional[str] = None) -> ModelInfo:
    """Raise :class:`EmitError` unless the model is fully integer (and its I/O has ``io_dtype``, when given)."""
    info = model if isinstance(model, ModelInfo) else inspect_tflite(model)
    problems = float_ops(info)
    weights = [t for op in info.ops if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
               for t in (info.tensors[i] for i in op.inputs[1:2])]
    problems += [f"weight {t.name!r} is {t.dtype.__name__}, not int8" for t in weights if t.dtype is not np.int8]
    biases = [t for op in info.ops if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
              for t in (info.tensors[i] for i in op.inputs[2:3])]
    problems += [f"bias {t.name!r} is {t.dtype.__name__}, not int32" for t in biases if t.dtype is not np.int32]
    if io_dtype is not None:
        want = np.dtype(io_dtype).type
        for i in info.inputs + info.outputs:
            if info.tensors[i].dtype is not want:
                problems.append(f"model I/O tensor {info.tensors[i].name!r} is {info.tensors[i].dtype.__name__}, "
                                f"expected {io_dtype}")
    if problems:
        raise EmitError("TFLite model is not fully integer: " + "; ".join(problems[:10])
                        + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
    return info


def _segment(graph, fq):
    """A graph computing FakeQuant node ``fq`` from the nearest quantized tensors before it (FakeQuant outputs or
    graph inputs), which become its inputs; returns ``(segment graph, [source values])``."""
    from .ir import Graph, Op

    nodes, sources, seen = [], [], set()
    stack = [fq.inputs[0]]
    while stack:
        v = stack.pop()
        if v.is_const or v.name in seen:
            continue
        seen.add(v.name)
        if v.producer is None or v.producer.op is Op.FAKE_QUANT:
            sources.append(v)
            continue
        nodes.append(v.producer)
        stack.extend(v.producer.inputs)
    order = {n.name: i for i, n in enumerate(graph.topological_order())}
    seg = Graph(f"{fq.name}/segment")
    env = {v.name: seg.add_input(f"in{i}", v.shape) for i, v in enumerate(sources)}
    for node in sorted(nodes, key=lambda n: order[n.name]) + [fq]:
        ins = [seg.const(v.const) if v.is_const else env[v.name] for v in node.inputs]
        new = seg.add_node(node.op, ins, node.attrs, name=node.name, shape=node.output.shape)
        new.weight_quant = node.weight_quant
        env[node.output.name] = new.output
    seg.outputs = [env[fq.output.name]]
    return seg, sources


def layer_agreement(graph, model: Union[str, os.PathLike, bytes], x: np.ndarray) -> Dict[str, Dict[str, float]]:
    """Compare every quantized tensor of an emitted int8 model with the FakeQuant simulation of the graph, layer by
    layer: each FakeQuant node's computation is run (``Executor(quantize=True)``) on the int8 model's own values of
    its inputs, so differences do not accumulate. ``x``: NHWC float inputs (fed to the model one by one).

    Returns ``{FakeQuant node: {"within_1_lsb": fraction, "max_lsb": max |difference| / scale}}`` over the values
    of every image; tensors the model does not hold (fused away) are left out.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from .backend.executor import Executor
    from .ir import Op

    info = inspect_tflite(model)
    kw = {"model_content": bytes(model)} if isinstance(model, (bytes, bytearray)) else {"model_path": str(model)}
    it = Interpreter(experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES, **kw)
    it.allocate_tensors()
    inp = it.get_input_details()[0]

    def tensor_of(fq_node) -> Optional[TensorInfo]:
        names = [fq_node.name] + ([fq_node.inputs[0].producer.name] if fq_node.inputs[0].producer else [])
        for n in names:
            found = [t for t in tensors_for_node(info, n) if t.dtype is np.int8]
            if found:
                return found[0]
        if fq_node.inputs[0].producer is None:  # the graph input: the QUANTIZE output, or an int8 model input
            q = [op for op in info.ops if op.name == "QUANTIZE" and info.inputs[0] in op.inputs]
            return info.tensors[q[0].outputs[0]] if q else info.tensors[info.inputs[0]]
        return None

    fqs = graph.find(Op.FAKE_QUANT)
    tensors = {fq.name: tensor_of(fq) for fq in fqs}
    producers = {fq.output.name: fq for fq in fqs}
    segments = {}
    for fq in fqs:
        if fq.inputs[0].producer is None or tensors[fq.name] is None:
            continue
        seg, sources = _segment(graph, fq)
        if all(tensors[producers[v.name].name] is not None for v in sources if v.name in producers) and \
                all(v.name in producers for v in sources):
            segments[fq.name] = (Executor(seg, quantize=True), sources)
    diffs: Dict[str, List[np.ndarray]] = {n: [] for n in segments}

    def real(t: TensorInfo) -> np.ndarray:
        return (it.get_tensor(t.index).astype(np.float32) - t.zero_point) * t.scale

    for i in range(len(x)):
        xi = np.asarray(x[i:i + 1], np.float32)
        if inp["dtype"] != np.float32:
            s, z = inp["quantization"]
            lim = np.iinfo(inp["dtype"])
            xi = np.clip(np.round(xi / s + z), lim.min, lim.max)
        it.set_tensor(inp["index"], xi.astype(inp["dtype"]))
        it.invoke()
        for name, (ex, sources) in segments.items():
            args = [real(tensors[producers[v.name].name]).reshape(1, *v.shape[1:]) for v in sources]
            want = ex(*args)[0]
            t = tensors[name]
            got = real(t).reshape(want.shape)
            diffs[name].append(np.abs(got - want).ravel() / t.scale)
    out = {}
    for name, parts in diffs.items():
        d = np.concatenate(parts) if parts else np.zeros(0)
        out[name] = {"within_1_lsb": float(np.mean(d <= 1.01)) if d.size else 1.0,
                     "max_lsb": float(d.max()) if d.size else 0.0}
    return out
