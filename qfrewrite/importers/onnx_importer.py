"""ONNX importer: an ONNX model (PyTorch, paddle2onnx, tf2onnx exports) -> the NHWC IR.

1. :func:`~.onnx_reader.read_onnx` checks the file, cuts it to ``inputs``/``outputs``, fixes open input dimensions
   from ``input_shape`` (NCHW for NCHW models) and folds every all-constant subgraph.
2. Nodes that compute data (reached from the outputs through data inputs, not through parameter inputs such as a
   Reshape target) are converted in topological order by :mod:`.onnx_ops`; layouts: :mod:`.onnx_layout`.
   A rank-4 input is NCHW unless every reader is a Transpose to NCHW (then the model takes NHWC and the Transpose is
   a free change of view).
3. Spelled-out activations are recognised: ``x * Clip(x + 3, 0, 6) / 6`` (any operand order, Div or Mul by 1/6)
   and ``x * HardSigmoid(x)`` become HardSwish, ``Clip(x + 3, 0, 6) / 6`` HardSigmoid
   (:mod:`.activation_patterns`).
4. The graph is verified; ``graph.meta`` holds ``source``, ``format`` = ``"onnx"``, ``input_layout`` (``"NCHW"``, or
   ``"NHWC"`` for the Transpose case), ``input_name``/``input_names``, ``output_names``, ``opset`` and
   ``output_layouts`` (``"NCHW"`` for a rank-4 output that the IR holds as NHWC, else ``"same"``).

Errors: a corrupt, truncated or invalid file -> :class:`ModelLoadError` naming it; a node whose initializers break
its op's rules (a Conv bias longer than its output channels) -> :class:`ModelLoadError` naming the node; an ONNX op or
op form the IR cannot express -> :class:`UnsupportedOpError` naming the node, the op, why, and the supported ops.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Sequence, Set, Union

from ..errors import ModelLoadError, UnsupportedOpError, VerificationError, one_line
from ..ir import Graph, Op, Value, sole_reader, verify
from .activation_patterns import fuse_hard_activations
from .onnx_layout import FLAT_CHW, NCHW, NHWC_TO_NCHW, SAME, Held
from .onnx_ops import CONVERTERS, PARAM_INPUTS, SUPPORTED_ONNX_OPS, Builder
from .onnx_reader import FoldedModel, read_onnx

__all__ = ["load_onnx", "SUPPORTED_ONNX_OPS"]

log = logging.getLogger(__name__)


def _data_nodes(folded: FoldedModel) -> Set[int]:
    """ids of the nodes whose outputs the graph outputs need as data (not only as folded parameters)."""
    needed: Set[int] = set()
    stack = [t for t in folded.graph.outputs]
    seen: Set[str] = set()
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        for node in t.inputs:  # producers (at most one)
            if id(node) in needed:
                continue
            needed.add(id(node))
            params = PARAM_INPUTS.get(node.op, ())
            stack.extend(inp for i, inp in enumerate(node.inputs) if i not in params and inp.name)
    return needed


def _input_layout(var) -> str:
    readers = list(var.outputs)
    if readers and all(n.op == "Transpose" and tuple(n.attrs.get("perm", ())) == NHWC_TO_NCHW for n in readers):
        return SAME
    return NCHW


def _add_inputs(b: Builder, folded: FoldedModel) -> Dict[str, str]:
    layouts = {}
    for var in folded.graph.inputs:
        dims = folded.input_dims.get(var.name)
        if dims is None:  # an input the outputs do not need
            continue
        rest = [int(d) for d in dims[1:]]
        layout = _input_layout(var) if len(dims) == 4 else SAME
        shape = (None, rest[1], rest[2], rest[0]) if layout == NCHW else (None, *rest)
        v = b.graph.add_input(var.name, shape)
        b.env[var.name] = Held(v, layout)
        layouts[var.name] = "NCHW" if layout == NCHW else ("NHWC" if len(dims) == 4 else "same")
    return layouts


def _scalar(v: Value) -> Optional[float]:
    return float(v.const.reshape(-1)[0]) if v.is_const and v.const.size == 1 else None


def _reassociate_hard_swish(graph: Graph) -> int:
    """``Mul(Mul(x, Clip(0,6)(Add(x, 3))), 1/6)`` -> ``Mul(x, Mul(Clip(...), 1/6))``, the form the activation
    patterns recognise. Returns the number of products rewritten."""
    count = 0
    for outer in graph.find(Op.MUL):
        if outer.graph is not graph:
            continue
        a, k = outer.inputs
        if _scalar(a) is not None:
            a, k = k, a
        if _scalar(k) is None or abs(_scalar(k) - 1.0 / 6.0) > 1e-6 or a.producer is None:
            continue
        inner = a.producer
        if inner.op is not Op.MUL or sole_reader(a) is not outer:
            continue
        for xi in (0, 1):
            x, clip_v = inner.inputs[xi], inner.inputs[1 - xi]
            clip = clip_v.producer
            if clip is None or clip.op is not Op.CLIP or not clip.attrs.is_relu6:
                continue
            add = clip.inputs[0].producer
            if add is None or add.op is not Op.ADD or x not in add.inputs:
                continue
            scaled = graph.add_node(Op.MUL, [clip_v, k], name=outer.name + "/scale", meta=dict(outer.meta))
            prod = graph.add_node(Op.MUL, [x, scaled.output], name=outer.name + "/product", meta=dict(outer.meta))
            outer.output.replace_all_uses_with(prod.output)
            count += 1
            break
    if count:
        graph.remove_unused()
    return count


def load_onnx(path: Union[str, os.PathLike], inputs: Optional[Sequence[str]] = None,
              outputs: Optional[Sequence[str]] = None, input_shape=None) -> Graph:
    """Import the ONNX model at ``path`` into a new NHWC :class:`Graph` (the file is only read).

    ``inputs``/``outputs``: tensor or node names to cut the model at. ``input_shape``: the input's shape in the
    model's own layout (NCHW), fixing open dimensions; ``{name: shape}`` for several inputs. The batch stays open.
    """
    folded = read_onnx(path, inputs=inputs, outputs=outputs, input_shape=input_shape)
    source = str(path)
    g = folded.graph
    graph = Graph(os.path.splitext(os.path.basename(source))[0] or "onnx_model")
    b = Builder(folded, graph)
    input_layouts = _add_inputs(b, folded)
    needed = _data_nodes(folded)
    for node in g.nodes:
        if id(node) not in needed:
            continue
        conv = CONVERTERS.get(node.op)
        if conv is None or (node.domain not in ("", "ai.onnx", None)):
            raise UnsupportedOpError(node.name or node.op, node.op if not node.domain else f"{node.domain}.{node.op}",
                                     SUPPORTED_ONNX_OPS, source=source)
        try:
            conv(b, node)
        except (ValueError, IndexError, TypeError, KeyError) as exc:  # initializers that break the op's rules
            log.debug("converting %s failed", node.name, exc_info=True)
            raise ModelLoadError(f"{source}: node {node.name or node.op!r} ({node.op}) cannot be imported: "
                                 f"{one_line(exc)}") from None
    outs, layouts = [], []
    for t in g.outputs:
        held = b.env.get(t.name)
        if held is None:
            raise ModelLoadError(f"{source}: output {t.name!r} is a constant or is not computed from the inputs")
        if held.layout == FLAT_CHW:
            producer = held.value.producer
            raise UnsupportedOpError(producer.source_name if producer else t.name, "Flatten", SUPPORTED_ONNX_OPS,
                                     source=source, detail=f"output {t.name!r} is an NCHW tensor flattened in "
                                     "channel-major order; the IR flattens NHWC (add the layer that reads it)")
        outs.append(held.value)
        layouts.append("NCHW" if held.layout == NCHW else "same")
    graph.outputs = outs
    graph.remove_unused()
    reassociated = _reassociate_hard_swish(graph)
    counts = fuse_hard_activations(graph)
    try:
        verify(graph)
    except VerificationError as exc:
        raise ModelLoadError(f"{source}: the imported graph is inconsistent: {exc}") from None
    in_names = [v.name for v in graph.inputs]
    graph.meta.update({
        "source": source, "format": "onnx", "opset": folded.opset,
        "input_layout": next(iter(input_layouts.values())) if len(set(input_layouts.values())) == 1 else "mixed",
        "input_layouts": input_layouts, "input_name": in_names[0] if in_names else None, "input_names": in_names,
        "output_names": [t.name for t in g.outputs], "output_layouts": layouts,
        "activations_recognised": counts,
    })
    if reassociated:
        log.debug("%s: %d spelled-out hard-swish products reassociated", source, reassociated)
    log.info("imported %s: %d nodes %s", source, len(graph), graph.op_counts())
    return graph
