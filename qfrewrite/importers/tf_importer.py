"""TensorFlow importers: a TF1 frozen GraphDef (``.pb``) or a TF2 SavedModel folder -> IR :class:`Graph`.

Both end in :func:`graphdef_to_graph`, which works on a frozen GraphDef:

1. outputs: the nodes or tensors named by ``outputs`` (TF-slim's ImageNet logits are
   ``MobilenetV1/Logits/SpatialSqueeze``), else the graph's single sink (several sinks: an error listing them);
   inputs: the placeholders named by ``inputs`` (a ``PlaceholderWithDefault`` may be named), else the
   ``Placeholder`` nodes the outputs depend on. Nodes the outputs do not need (another head) are ignored.
2. constants: ``Const`` nodes and every stateless op whose inputs are all constant; their values are folded
   (computed shapes, ``rsqrt(variance + eps)``) and never become IR nodes. Identities are looked through.
3. BatchNorm: ``FusedBatchNorm*`` maps directly; the unfused ``x * (rsqrt(var + eps) * gamma) + (beta - mean * inv)``
   arithmetic (TF-slim, Keras 3) is recognised as one BatchNorm with its eps (:mod:`._tf_batchnorm`), named after
   the scope of its parameters (``MobilenetV1/Conv2d_0/BatchNorm``).
4. every remaining op on the path from the inputs to the outputs is converted by :mod:`._tf_ops` (an op the IR
   lacks raises :class:`UnsupportedOpError` naming node, op and the supported list); ``BiasAdd`` after a layer
   becomes its bias.

The layout stays NHWC. The batch dim of every input is opened (``None``) even where the file fixes it (the TF-slim
``.pb`` has ``[1, 224, 224, 3]``), so batched execution works; ``input_shape`` (NHWC, its batch entry ignored)
fills dims the source leaves open and may not contradict a fixed one. The caller's file is only read.
"""
from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import ModelLoadError, VerificationError, one_line
from ..ir import BatchNormAttrs, Graph, Op, Value, verify
from ._tf_batchnorm import ADD_OPS, UnfusedBatchNorm, match_unfused_batchnorm
from ._tf_ops import CONVERTERS, PARAM_INPUTS, Builder, fuse_biases
from ._tf_view import PLACEHOLDER_OPS, GraphDefView, Ref, parse_ref, tensor_name

__all__ = ["load_graphdef", "load_saved_model", "parse_graphdef", "graphdef_to_graph"]

log = logging.getLogger(__name__)

Names = Optional[Union[str, Sequence[str]]]
InputShape = Optional[Union[Sequence[Optional[int]], Mapping[str, Sequence[Optional[int]]]]]


def _tf():
    import tensorflow as tf

    return tf


def _as_list(names: Names) -> Optional[List[str]]:
    if names is None:
        return None
    return [names] if isinstance(names, str) else [str(n) for n in names]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- GraphDef ---------------------------------------------------------------------------------------------------------
def parse_graphdef(data: bytes, source: str):
    """Parse a binary GraphDef; a corrupt or truncated file gives :class:`ModelLoadError`, never a protobuf trace."""
    tf = _tf()
    gd = tf.compat.v1.GraphDef()
    try:
        gd.ParseFromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise ModelLoadError(f"{source}: not a valid binary TensorFlow GraphDef (corrupt or truncated file?): "
                             f"{_first_line(exc)}") from None
    return gd


def load_graphdef(path: Union[str, os.PathLike], inputs: Names = None, outputs: Names = None,
                  input_shape: InputShape = None) -> Graph:
    """Import a TF1 frozen GraphDef ``.pb`` file (see the module docstring for ``inputs``/``outputs``)."""
    path = Path(path)
    if path.name == "saved_model.pb" and path.parent.joinpath("variables").is_dir():
        log.info("%s is the graph of a SavedModel: loading the folder %s", path, path.parent)
        return load_saved_model(path.parent, inputs=inputs, outputs=outputs, input_shape=input_shape)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    gd = parse_graphdef(data, str(path))
    return graphdef_to_graph(gd, inputs=inputs, outputs=outputs, input_shape=input_shape, source=str(path),
                             fmt="graphdef", name=path.stem)


def _choose_outputs(view: GraphDefView, outputs: Optional[List[str]]) -> List[Ref]:
    if outputs is None:
        sinks = view.sinks()
        if len(sinks) != 1:
            what = "no node" if not sinks else f"{len(sinks)} sink nodes: {', '.join(sinks)}"
            raise ModelLoadError(f"{view.source}: the graph has {what}; name the wanted output node(s) with "
                                 "outputs=[...]")
        return [(sinks[0], 0)]
    refs = []
    for o in outputs:
        ref = parse_ref(o)
        if ref[0] not in view.nodes:
            close = difflib.get_close_matches(ref[0], list(view.nodes), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; the graph's sinks: {', '.join(view.sinks())}"
            raise ModelLoadError(f"{view.source}: no node named {ref[0]!r} for outputs{hint}")
        refs.append(ref)
    return refs


def _choose_inputs(view: GraphDefView, inputs: Optional[List[str]], out_refs: List[Ref]) -> List[str]:
    if inputs is not None:
        names = []
        for i in inputs:
            name = parse_ref(i)[0]
            if name not in view.nodes:
                raise ModelLoadError(f"{view.source}: no node named {name!r} for inputs")
            if view.nodes[name].op not in PLACEHOLDER_OPS:
                raise ModelLoadError(f"{view.source}: input {name!r} is a {view.nodes[name].op}; name a Placeholder "
                                     "or PlaceholderWithDefault")
            names.append(name)
        view.inputs = set(names)
        reached = set(view.ancestors(r[0] for r in out_refs))
        for name in names:
            if name not in reached:
                raise ModelLoadError(f"{view.source}: the outputs {[r[0] for r in out_refs]} do not depend on input "
                                     f"{name!r}")
        return names
    reached = set(view.ancestors(r[0] for r in out_refs))
    names = [n.name for n in view.graph_def.node if n.name in reached and n.op == "Placeholder"]
    if not names:
        raise ModelLoadError(f"{view.source}: the outputs {[r[0] for r in out_refs]} depend on no Placeholder")
    view.inputs = set(names)
    return names


def _input_shapes(view: GraphDefView, names: List[str], input_shape: InputShape) -> Dict[str, tuple]:
    """NHWC shapes of the inputs with the batch dim open and ``input_shape`` filling open dims."""
    if input_shape is not None and not isinstance(input_shape, Mapping):
        if len(names) != 1:
            raise ModelLoadError(f"{view.source}: the graph has {len(names)} inputs {names}; give input_shape as "
                                 "a dict {input name: shape}")
        input_shape = {names[0]: input_shape}
    wanted = dict(input_shape or {})
    unknown = set(wanted) - set(names)
    if unknown:
        raise ModelLoadError(f"{view.source}: input_shape names {sorted(unknown)}, which are not inputs {names}")
    shapes = {}
    for name in names:
        dtype = view.attr(name, "dtype")
        if dtype is not None and dtype != _tf().float32.as_datatype_enum:
            raise ModelLoadError(f"{view.source}: input {name!r} has dtype {_tf().as_dtype(dtype).name}; only "
                                 "float32 inputs are supported")
        proto = view.attr(name, "shape")
        shape = None
        if proto is not None and not proto.unknown_rank:
            shape = [d.size if d.size >= 0 else None for d in proto.dim]
        user = wanted.get(name)
        if user is not None:
            user = [None if d is None or int(d) < 0 else int(d) for d in user]
            if shape is None:
                shape = list(user)
            elif len(user) != len(shape):
                raise ModelLoadError(f"{view.source}: input_shape {tuple(user)} has rank {len(user)}, input {name!r} "
                                     f"has shape {tuple(shape)}")
            else:
                for i in range(1, len(shape)):
                    if shape[i] is None:
                        shape[i] = user[i]
                    elif user[i] is not None and user[i] != shape[i]:
                        raise ModelLoadError(f"{view.source}: input_shape {tuple(user)} contradicts the fixed shape "
                                             f"{tuple(shape)} of input {name!r} (dim {i})")
        if shape is None or len(shape) == 0:
            raise ModelLoadError(f"{view.source}: input {name!r} has no known rank; give input_shape (NHWC)")
        shape[0] = None
        if any(d is None for d in shape[1:]):
            raise ModelLoadError(f"{view.source}: input {name!r} has open dims {tuple(shape)}; give input_shape "
                                 "(NHWC) to fix them")
        shapes[name] = tuple(shape)
    return shapes


def _data_nodes(view: GraphDefView, out_refs: List[Ref], constant) -> set:
    """Non-constant nodes on the data path from the inputs to the outputs (parameters are not traversed)."""
    seen = set()
    stack = [view.resolve(r)[0] for r in out_refs]
    while stack:
        name = stack.pop()
        if name in seen or name in view.inputs or name in constant:
            continue
        seen.add(name)
        op = view.nodes[name].op
        ins = view.data_inputs(name)
        params = set(PARAM_INPUTS[op](len(ins))) if op in PARAM_INPUTS else set()
        for i, ref in enumerate(ins):
            if i not in params:
                stack.append(view.resolve(ref)[0])
    return seen


def _emit_batchnorm(b: Builder, m: UnfusedBatchNorm) -> Value:
    """A BatchNorm node for a recognised pattern, or ``Mul``/``Add`` when its values do not fit a BatchNorm."""
    x = b.env.get(m.x)
    if x is None:
        raise ModelLoadError(f"{b.view.source}: node {m.mul!r} reads {m.x[0]!r}, which was not imported")
    c = x.shape[-1]
    leaves = list(m.variance_terms) + [r for r in (m.gamma, m.mean, m.beta) if r is not None]
    vals = b.view.values(leaves)

    def vec(ref):
        v = np.asarray(vals[ref], np.float32)
        if v.size == 1:
            return np.full(c, v.reshape(-1)[0], np.float32)
        if v.size == c and v.shape[-1] == c:
            return v.reshape(c)
        return None

    eps = 0.0
    if len(m.variance_terms) == 1:
        var = vec(m.variance_terms[0])
    else:
        t0, t1 = m.variance_terms
        e = 1 if vals[t1].size == 1 else 0 if vals[t0].size == 1 else None
        var = None if e is None else vec(m.variance_terms[1 - e])
        eps = float(np.asarray(vals[m.variance_terms[e]]).reshape(-1)[0]) if e is not None else float("nan")
    gamma = vec(m.gamma) if m.gamma is not None else np.ones(c, np.float32)
    beta = vec(m.beta) if m.beta is not None else np.zeros(c, np.float32)
    mean = vec(m.mean)
    if c is None or any(v is None for v in (var, gamma, beta, mean)) or not (np.isfinite(eps) and eps >= 0):
        log.info("%s: batch-norm-like arithmetic with values that do not fit a BatchNorm; kept as Mul/Add", m.add)
        y = b.add(Op.MUL, [x, b.const(b.view.value(m.inv), m.inv[0])], name=m.mul, source=m.mul)
        return b.add(Op.ADD, [y, b.const(b.view.value(m.shift), m.shift[0])], source=m.add)
    params = [b.const(v, f"{m.scope}/{what}") for v, what in
              ((gamma, "gamma"), (beta, "beta"), (mean, "moving_mean"), (var, "moving_variance"))]
    return b.add(Op.BATCH_NORM, [x] + params, BatchNormAttrs(eps), name=m.scope, source=m.add,
                 source_name=m.scope, source_op="batch norm arithmetic", source_nodes=[m.mul, m.add])


def graphdef_to_graph(graph_def, inputs: Names = None, outputs: Names = None, input_shape: InputShape = None,
                      source: str = "<GraphDef>", fmt: str = "graphdef", name: str = "graph",
                      output_names: Optional[List[str]] = None) -> Graph:
    """Map a frozen GraphDef to an IR graph (the steps are listed in the module docstring)."""
    view = GraphDefView(graph_def, source)
    out_refs = _choose_outputs(view, _as_list(outputs))
    in_names = _choose_inputs(view, _as_list(inputs), out_refs)
    order = view.ancestors(r[0] for r in out_refs)
    constant = view.constant_nodes(order)
    for ref in out_refs:
        if view.resolve(ref)[0] in constant:
            raise ModelLoadError(f"{source}: output {ref[0]!r} is a constant (it does not depend on the inputs)")
    data = _data_nodes(view, out_refs, constant)

    readers: Dict[str, int] = {}
    for n in data:
        for ref in view.data_inputs(n):
            r = view.resolve(ref)[0]
            readers[r] = readers.get(r, 0) + 1
    keep = {view.resolve(r)[0] for r in out_refs}
    matches: Dict[str, UnfusedBatchNorm] = {}
    for n in order:
        if n in data and view.nodes[n].op in ADD_OPS:
            m = match_unfused_batchnorm(view, n, constant, keep)
            if m is not None and readers.get(m.mul, 0) == 1:
                matches[n] = m
    absorbed = {m.mul for m in matches.values()}
    todo = [n for n in order if n in data and n not in absorbed]
    for n in todo:
        op = view.nodes[n].op
        if op == "Placeholder":
            raise ModelLoadError(f"{source}: the outputs depend on placeholder {n!r}, which is not among the inputs "
                                 f"{in_names}")
        if n not in matches and op not in CONVERTERS:
            raise Builder(view, Graph(), constant, None).unsupported(n, "on the path from the inputs to the outputs")

    shapes = _input_shapes(view, in_names, input_shape)
    first = view.attr(in_names[0], "shape")
    source_batch = None
    if first is not None and not first.unknown_rank and len(first.dim) and first.dim[0].size >= 0:
        source_batch = int(first.dim[0].size)
    graph = Graph(name)
    b = Builder(view, graph, constant, source_batch)
    for n in in_names:
        b.env[(n, 0)] = graph.add_input(n, shapes[n])
    # prefetch every constant the converters will read, so computed ones are folded in a single TF run
    wanted = [view.resolve(ref) for n in todo if n not in matches for ref in view.data_inputs(n)]
    wanted = [r for r in wanted if r[0] in constant and view.nodes[r[0]].op != "Const"]
    if wanted:
        view.values(sorted(set(wanted)))
    for n in todo:
        op = view.nodes[n].op
        try:
            b.env[(n, 0)] = _emit_batchnorm(b, matches[n]) if n in matches else CONVERTERS[op](b, n)
        except VerificationError as exc:
            raise ModelLoadError(f"{source}: node {n!r} ({op}) does not fit its inputs: {exc}") from None
        except (ValueError, IndexError, TypeError, KeyError) as exc:  # constants that break the op's rules
            log.debug("converting node %s failed", n, exc_info=True)
            raise ModelLoadError(f"{source}: node {n!r} ({op}) cannot be imported: "
                                 f"{one_line(exc)}") from None
    outs = []
    for ref in out_refs:
        r = view.resolve(ref)
        if r not in b.env:
            raise ModelLoadError(f"{source}: output {tensor_name(ref)!r} is output {r[1]} of {r[0]!r}; only the "
                                 "first output of an op can be a graph output")
        outs.append(b.env[r])
    graph.outputs = outs
    fused = fuse_biases(graph)
    try:
        verify(graph)
    except VerificationError as exc:
        raise ModelLoadError(f"{source}: the imported graph is inconsistent: {exc}") from None
    graph.meta.update(source=source, format=fmt, input_layout="NHWC", input_names=list(in_names),
                      output_names=list(output_names) if output_names else [tensor_name(r) if r[1] else r[0]
                                                                             for r in out_refs],
                      source_batch=source_batch)
    log.info("imported %s: %d of %d GraphDef nodes used, %d IR nodes %s, %d unfused BatchNorms recognised, "
             "%d biases fused", source, len(order), len(view.nodes), len(graph), graph.op_counts(), len(matches),
             fused)
    return graph


# -- SavedModel -------------------------------------------------------------------------------------------------------
def load_saved_model(path: Union[str, os.PathLike], inputs: Names = None, outputs: Names = None,
                     input_shape: InputShape = None) -> Graph:
    """Import a TF2 SavedModel folder: pick its serving signature, freeze it and map the frozen GraphDef.

    The signature is ``serving_default``, else the only one. ``inputs``/``outputs`` name signature keys (e.g.
    ``output_0``) or nodes/tensors of the frozen graph; ``input_shape`` may be keyed by signature input names.
    """
    tf = _tf()
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: a SavedModel is a folder holding saved_model.pb")
    try:
        obj = tf.saved_model.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load the SavedModel (corrupt or incomplete?): {_first_line(exc)}") \
            from None
    sigs = dict(getattr(obj, "signatures", {}) or {})
    if not sigs:
        raise ModelLoadError(f"{path}: the SavedModel has no signatures; save it with model.export(...) or "
                             "tf.saved_model.save(..., signatures=...)")
    if "serving_default" in sigs:
        key = "serving_default"
    elif len(sigs) == 1:
        key = next(iter(sigs))
    else:
        raise ModelLoadError(f"{path}: several signatures {sorted(sigs)} and no serving_default")
    fn = sigs[key]
    try:
        frozen = convert_variables_to_constants_v2(fn)
    except Exception as exc:
        raise ModelLoadError(f"{path}: freezing signature {key!r} failed: {_first_line(exc)}") from None
    gd = frozen.graph.as_graph_def()

    placeholders = [t.op.name for t in frozen.inputs if t.dtype != tf.resource]
    kw = fn.structured_input_signature[1] if len(fn.structured_input_signature) > 1 else {}
    in_map = dict(zip(sorted(kw), placeholders)) if len(kw) == len(placeholders) else {}
    structured = fn.structured_outputs
    keys = sorted(structured) if isinstance(structured, Mapping) else []  # tf.nest orders a dict by sorted keys
    if len(keys) != len(frozen.outputs):
        keys = [f"output_{i}" for i in range(len(frozen.outputs))]
    out_map = {k: t.name for k, t in zip(keys, frozen.outputs)}

    ins = _as_list(inputs)
    ins = [in_map.get(i, i) for i in ins] if ins is not None else placeholders
    outs = _as_list(outputs)
    if outs is None:
        out_names, outs = list(out_map), list(out_map.values())
    else:
        out_names, outs = list(outs), [out_map.get(o, o) for o in outs]
    if isinstance(input_shape, Mapping):
        input_shape = {in_map.get(k, k): v for k, v in input_shape.items()}
    log.info("SavedModel %s: signature %r, inputs %s, outputs %s", path, key, ins, outs)
    graph = graphdef_to_graph(gd, inputs=ins, outputs=outs, input_shape=input_shape, source=str(path),
                              fmt="savedmodel", name=path.name, output_names=out_names)
    graph.meta["signature"] = key
    return graph
