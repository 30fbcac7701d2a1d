"""Read an ONNX model for import: check it, cut it to the chosen inputs/outputs, fix open input dimensions and fold
every all-constant subgraph.

Steps (all on a copy; the caller's file is only read):

1. ``onnx.load`` + ``onnx.checker.check_model``; any failure (corrupt, truncated, missing external data) becomes a
   :class:`ModelLoadError` naming the file.
2. ``inputs`` / ``outputs`` (tensor names, or node names meaning the node's first output) cut the graph with
   onnx-graphsurgeon; shapes of new inputs come from ONNX shape inference.
3. ``input_shape`` (in the model's own layout) fixes open dimensions of the input; its batch entry is ignored (the
   IR's batch stays open). Every non-batch dimension must then be static.
4. onnx-graphsurgeon's ``fold_constants`` (with shape folding) evaluates every subgraph that depends only on
   constants and static shapes with onnxruntime: PyTorch's Shape/Gather/Concat/ConstantOfShape/Slice/Transpose/Cast
   chains that compute Pad amounts and reshape targets become constants.

The batch dimension. A model with a static batch is folded at that batch. A model with an open batch is folded at
batch 2; when it holds ``Shape``/``Size`` ops, a second fold at batch 3 tells which entries of a folded parameter
(typically a Reshape target ``[batch, -1]``) follow the batch: :meth:`FoldedModel.param` returns those entries marked
in a mask, and refuses a parameter that depends on the batch in any other way.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ModelLoadError

__all__ = ["FoldedModel", "read_onnx", "BATCH_PROBES"]

log = logging.getLogger(__name__)

#: batch sizes at which a model with an open batch is folded (two, to see which folded values follow the batch)
BATCH_PROBES = (2, 3)
_SHAPE_OPS = frozenset({"Shape", "Size"})


@contextlib.contextmanager
def _quiet_graphsurgeon():
    """onnx-graphsurgeon prints its warnings to stdout, and the onnxruntime sessions it folds with warn about
    optimisations they skip: keep both out of the user's output while we fold. (onnxruntime has no getter for its
    default log severity; it is set back to its default, warnings.)"""
    import onnxruntime as ort
    from onnx_graphsurgeon.logger import G_LOGGER

    old = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.CRITICAL
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        G_LOGGER.severity = old
        ort.set_default_logger_severity(2)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _load_checked(path: Path):
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, missing external data, OSError ...
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        try:  # outputs written without a shape fail the checker, yet are valid once shapes are inferred
            onnx.checker.check_model(onnx.shape_inference.infer_shapes(model))
        except Exception:
            raise ModelLoadError(f"{path}: invalid or truncated ONNX model ({_first_line(exc)})") from None
    if not model.graph.node:
        raise ModelLoadError(f"{path}: the ONNX graph holds no nodes")
    return model


def _dims(vi) -> List[Union[int, str, None]]:
    """The dimensions of a ValueInfoProto: int, a symbolic name, or None."""
    out: List[Union[int, str, None]] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _set_dims(vi, dims: Sequence[Union[int, str, None]]) -> None:
    shape = vi.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        nd = shape.dim.add()
        if isinstance(d, int):
            nd.dim_value = d
        elif isinstance(d, str):
            nd.dim_param = d


def _opset(model) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ModelLoadError("the model imports no version of the default ONNX domain")


def _cut(model, path: Path, inputs: Optional[Sequence[str]], outputs: Optional[Sequence[str]]):
    """Re-root the graph at the named tensors (or nodes' first outputs)."""
    import onnx
    import onnx_graphsurgeon as gs

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:
        raise ModelLoadError(f"{path}: ONNX shape inference failed ({_first_line(exc)})") from None
    with _quiet_graphsurgeon():
        g = gs.import_onnx(inferred)
    tensors = g.tensors()
    by_node = {n.name: n.outputs[0] for n in g.nodes if n.name and n.outputs}

    def pick(names, what):
        names = [names] if isinstance(names, str) else list(names)
        out = []
        for name in names:
            t = tensors.get(name) or by_node.get(name)
            if t is None:
                close = sorted(n for n in list(tensors) + list(by_node) if name.lower() in n.lower())[:8]
                hint = f"; similar names: {', '.join(close)}" if close else ""
                raise ModelLoadError(f"{path}: no tensor or node named {name!r} for {what}{hint}")
            if isinstance(t, gs.Constant):
                raise ModelLoadError(f"{path}: {name!r} is a constant, not a tensor computed from the inputs")
            if t.dtype is None:
                t.dtype = np.float32
            out.append(t)
        return out

    if inputs is not None:
        new_inputs = pick(inputs, "inputs")
        for t in new_inputs:
            t.inputs.clear()  # detach from its producer: the tensor becomes a graph input
        g.inputs = new_inputs
    if outputs is not None:
        g.outputs = pick(outputs, "outputs")
    g.cleanup(remove_unused_graph_inputs=True).toposort()
    with _quiet_graphsurgeon():
        cut = gs.export_onnx(g, do_type_check=False)
    cut.ir_version = model.ir_version
    del cut.graph.value_info[:]  # re-inferred after the input shapes are fixed
    return cut


def _fix_input_shapes(model, path: Path, input_shape) -> Dict[str, List[Union[int, str, None]]]:
    """Apply ``input_shape`` (one shape for a one-input model, or ``{name: shape}``); return the source dims."""
    inits = {i.name for i in model.graph.initializer}
    real = [vi for vi in model.graph.input if vi.name not in inits]
    if not real:
        raise ModelLoadError(f"{path}: the graph has no input")
    shapes: Dict[str, Sequence] = {}
    if input_shape is not None:
        if isinstance(input_shape, dict):
            shapes = dict(input_shape)
            unknown = set(shapes) - {vi.name for vi in real}
            if unknown:
                raise ModelLoadError(f"{path}: input_shape names unknown inputs {sorted(unknown)}; "
                                     f"inputs are {[vi.name for vi in real]}")
        elif len(real) == 1:
            shapes = {real[0].name: input_shape}
        else:
            raise ModelLoadError(f"{path}: the model has {len(real)} inputs; give input_shape as {{name: shape}}")
    source: Dict[str, List[Union[int, str, None]]] = {}
    for vi in real:
        dims = _dims(vi)
        if vi.type.tensor_type.elem_type != 1:  # FLOAT
            raise ModelLoadError(f"{path}: input {vi.name!r} is not float32 (ONNX element type "
                                 f"{vi.type.tensor_type.elem_type}); only float32 inputs are supported")
        given = shapes.get(vi.name)
        if given is not None:
            given = list(given)
            if len(given) != len(dims):
                raise ModelLoadError(f"{path}: input_shape {tuple(given)} has rank {len(given)}, input "
                                     f"{vi.name!r} has rank {len(dims)} ({dims})")
            for i in range(1, len(dims)):
                g_i = given[i]
                if g_i is None or (isinstance(g_i, int) and g_i < 0):
                    continue
                if isinstance(dims[i], int) and dims[i] != int(g_i):
                    raise ModelLoadError(f"{path}: input_shape {tuple(given)} contradicts the static dimension "
                                         f"{i} = {dims[i]} of input {vi.name!r} {dims}")
                dims[i] = int(g_i)
        open_dims = [i for i in range(1, len(dims)) if not isinstance(dims[i], int) or dims[i] <= 0]
        if open_dims:
            raise ModelLoadError(f"{path}: input {vi.name!r} has open dimensions {open_dims} in shape {dims}; "
                                 "give input_shape= (--input-shape) in the model's own layout (e.g. (1, 3, 224, 224) "
                                 "for NCHW)")
        if not dims:
            raise ModelLoadError(f"{path}: input {vi.name!r} is a scalar; image models take a batch of tensors")
        source[vi.name] = list(dims)
        _set_dims(vi, dims)
    return source


def _fold(model, batch: int, path: Path):
    """A copy of ``model`` with every input's batch set to ``batch``, shapes inferred and constants folded."""
    import onnx
    import onnx_graphsurgeon as gs

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name not in inits:
            dims = _dims(vi)
            if not isinstance(dims[0], int) or dims[0] <= 0:
                dims[0] = batch
            _set_dims(vi, dims)
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception as exc:
        raise ModelLoadError(f"{path}: ONNX shape inference failed ({_first_line(exc)})") from None
    with _quiet_graphsurgeon():
        g = gs.import_onnx(m)
        g.fold_constants(fold_shapes=True)
        g.cleanup(remove_unused_graph_inputs=False).toposort()
    return g


@dataclass
class FoldedModel:
    """The folded onnx-graphsurgeon graph of a model, with what the importer needs to know about it."""

    graph: object  # onnx_graphsurgeon.Graph
    opset: int
    path: Path
    input_dims: Dict[str, List[Union[int, str, None]]]  # as in the source, after input_shape
    #: the same model folded at the second probe batch (only for an open batch with Shape/Size ops)
    probe: Optional[object] = None

    @property
    def static_batch(self) -> Optional[int]:
        b = {d[0] for d in self.input_dims.values() if d}
        return next(iter(b)) if len(b) == 1 and isinstance(next(iter(b)), int) and next(iter(b)) > 0 else None

    def param(self, tensor) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """A folded parameter: ``(values, follows_batch)``, or ``None`` when it is not a constant.

        ``follows_batch`` is a boolean mask of the entries equal to the batch size (``values`` holds the folded
        number there). Entries that change with the batch other than as the batch itself make it ``None``.
        """
        import onnx_graphsurgeon as gs

        if isinstance(tensor, gs.Constant):
            values = np.asarray(tensor.values)
            if self.static_batch is not None or self.probe is None:
                return values, np.zeros(values.shape, bool)
        if self.probe is None:
            return None
        other = self.probe.tensors().get(tensor.name)
        if not isinstance(tensor, gs.Constant) or not isinstance(other, gs.Constant):
            return None
        a, b = np.asarray(tensor.values), np.asarray(other.values)
        if a.shape != b.shape:
            return None
        follows = (a == BATCH_PROBES[0]) & (b == BATCH_PROBES[1])
        if np.any((a != b) & ~follows):
            return None
        return a, follows


def read_onnx(path: Union[str, os.PathLike], inputs=None, outputs=None, input_shape=None) -> FoldedModel:
    """Load, check, cut, fix and fold the ONNX model at ``path``."""
    path = Path(path)
    model = _load_checked(path)
    opset = _opset(model)
    if inputs is not None or outputs is not None:
        model = _cut(model, path, inputs, outputs)
    input_dims = _fix_input_shapes(model, path, input_shape)
    batches = {d[0] for d in input_dims.values()}
    static = next(iter(batches)) if len(batches) == 1 and isinstance(next(iter(batches)), int) else None
    if static is not None and static > 0:
        return FoldedModel(_fold(model, static, path), opset, path, input_dims)
    folded = _fold(model, BATCH_PROBES[0], path)
    probe = None
    if any(n.op_type in _SHAPE_OPS for n in model.graph.node):
        probe = _fold(model, BATCH_PROBES[1], path)
    log.debug("folded %s: %d nodes left", path, len(folded.nodes))
    return FoldedModel(folded, opset, path, input_dims, probe)
