"""What every imported graph must satisfy before a pass sees it, checked once for every importer by
:func:`check_imported`:

* **finite weights**: a constant holding NaN or Inf cannot be quantized (:func:`check_finite_weights`);
* **BatchNorm statistics**: one value per channel in each parameter. Inference BatchNorm computes
  ``(x - m) / sqrt(v + eps)``; a negative variance (or a negative or non-finite epsilon) is not a statistic any
  training produced, and makes the source compute NaN where ``v + eps < 0``. Such a model is refused naming the layer
  and channels (:func:`check_batchnorm_statistics`); a zero variance is legal (the folding maths handles
  ``v + eps == 0``);
* **one image input**: the passes, calibration and emitters take one input tensor; a model with several (or none)
  is refused at load with the list of its inputs (:func:`check_single_input`);
* **shapes**: a layer whose static output shape has an empty or negative dimension (a 3x3 VALID convolution of a
  1x1 input) is refused naming it, before TensorFlow meets it (:func:`check_shapes`);
* **memory**: the working set of one image (:func:`qfrewrite.resources.activation_bytes`) must fit in the machine's
  memory; an absurd input shape is refused with the estimate (:func:`check_memory`).

Each raises :class:`~qfrewrite.errors.ModelLoadError` prefixed by the source file.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import ModelLoadError
from ..ir import Graph, Op
from ..resources import activation_bytes, require_memory

__all__ = ["check_imported", "check_finite_weights", "check_batchnorm_statistics", "check_single_input",
           "check_shapes", "check_memory"]

#: BatchNorm inputs after x: gamma, beta, moving mean, moving variance
_BN_PARAMS = ("gamma", "beta", "moving mean", "moving variance")
_BN_VARIANCE = 4


def _where(source) -> str:
    return f"{source}: " if isinstance(source, (str, os.PathLike)) else ""


def _channels(idx: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:limit])
    return shown + (f" ... (+{len(idx) - limit})" if len(idx) > limit else "")


def check_imported(graph: Graph, source=None) -> None:
    """The checks of the module docstring: one input, shapes, finite weights, BatchNorm statistics, memory."""
    check_single_input(graph, source)
    check_shapes(graph, source)
    check_finite_weights(graph, source)
    check_batchnorm_statistics(graph, source)
    check_memory(graph, source)


def check_finite_weights(graph: Graph, source=None) -> None:
    """Raise :class:`ModelLoadError` naming the first layers whose weights hold NaN or Inf."""
    bad = []
    for node in graph.topological_order():
        for v in node.inputs:
            if v.is_const and not np.all(np.isfinite(v.const)):
                bad.append(f"{node.source_name} ({node.op.value}, {int(np.sum(~np.isfinite(v.const)))} "
                           f"non-finite values in {v.name})")
                break
    if bad:
        raise ModelLoadError(f"{_where(source)}weights hold NaN or Inf in {len(bad)} layer(s): {'; '.join(bad[:5])}"
                             f"{' ...' if len(bad) > 5 else ''}; such a model cannot be quantized")


def check_batchnorm_statistics(graph: Graph, source=None) -> None:
    """Raise :class:`ModelLoadError` for a BatchNorm whose parameters do not have one value per channel, or with a
    negative variance or a negative/non-finite epsilon."""
    bad = []
    for node in graph.find(Op.BATCH_NORM):
        channels = node.inputs[0].shape[-1] if node.inputs[0].shape else None
        for what, v in zip(_BN_PARAMS, node.inputs[1:]):
            if channels is not None and v.is_const and v.const.size != channels:
                raise ModelLoadError(f"{_where(source)}BatchNorm {node.source_name!r}: its {what} has "
                                     f"{v.const.size} values for {channels} channels")
        eps = float(node.attrs.epsilon)
        if not np.isfinite(eps) or eps < 0:
            bad.append(f"{node.source_name} (epsilon {eps:g})")
            continue
        if len(node.inputs) <= _BN_VARIANCE or not node.inputs[_BN_VARIANCE].is_const:
            continue
        var = np.asarray(node.inputs[_BN_VARIANCE].const, np.float64).reshape(-1)
        neg = np.flatnonzero(var < 0)
        if neg.size:
            bad.append(f"{node.source_name} (variance {var[neg[0]]:.3g} in channel {_channels(neg)})")
    if bad:
        raise ModelLoadError(f"{_where(source)}BatchNorm statistics that no training produces in {len(bad)} "
                             f"layer(s): {'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; a variance must be "
                             f"zero or more and epsilon finite and zero or more: re-export the model")


def check_single_input(graph: Graph, source=None) -> None:
    """Raise :class:`ModelLoadError` unless the graph has exactly one input."""
    if len(graph.inputs) == 1:
        return
    if not graph.inputs:
        raise ModelLoadError(f"{_where(source)}the model has no input (its outputs are constants); qfrewrite "
                             f"supports models with one image input")
    names = ", ".join(f"{v.name!r} {tuple(v.shape)}" for v in graph.inputs)
    raise ModelLoadError(f"{_where(source)}the model has {len(graph.inputs)} inputs ({names}, shapes in NHWC); "
                         f"qfrewrite supports models with one image input (inputs= can start the graph at one "
                         f"tensor computed from them)")


def check_shapes(graph: Graph, source=None) -> None:
    """Raise :class:`ModelLoadError` at the first layer whose output has a dimension below 1."""
    for node in graph.topological_order():
        shape = tuple(node.output.shape)
        if any(d is not None and d < 1 for d in shape[1:]):
            seen = ", ".join(str(tuple(v.shape)) for v in node.inputs if not v.is_const)
            raise ModelLoadError(f"{_where(source)}layer {node.source_name!r} ({node.op.value}) would give an output "
                                 f"of shape {shape} from input {seen} (NHWC): the input is too small for it; give a "
                                 f"larger input shape")


def check_memory(graph: Graph, source=None) -> None:
    """Raise :class:`ModelLoadError` when one image's working set exceeds the machine's memory."""
    need, where = activation_bytes(graph)
    shape = tuple(graph.inputs[0].shape) if graph.inputs else ()
    require_memory(need, f"{_where(source)}input shape {shape} (NHWC): one image at layer {where!r}",
                   ModelLoadError, "give a smaller input shape (--input-shape / input_shape=)")
