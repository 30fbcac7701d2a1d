"""A read-only view of a TensorFlow GraphDef for the importers.

It answers the questions the mapper asks and never edits the caller's GraphDef:

* tensor references: ``"name"``, ``"name:k"`` (output ``k``) and ``"^name"`` (a control input, ignored: a frozen
  inference graph computes the same without them);
* identities: ``Identity``/``StopGradient``/``Snapshot`` (the ``/read`` of TF-slim variables, Keras'
  ``ReadVariableOp`` after freezing), ``IdentityN`` and a ``PlaceholderWithDefault`` that is not a chosen input
  are looked through by :meth:`GraphDefView.resolve`;
* which nodes the wanted outputs need (:meth:`ancestors`), in topological order, and which of them are
  constant: a ``Const``, or a stateless op whose data inputs are all constant;
* the values of constant tensors: a ``Const`` is read from its proto, any other constant subexpression (computed
  shapes, ``rsqrt(variance + eps)``...) is folded by running just that subgraph in TensorFlow once.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import networkx as nx
import numpy as np

from ..errors import ModelLoadError

__all__ = ["Ref", "parse_ref", "tensor_name", "GraphDefView", "IDENTITY_OPS", "PLACEHOLDER_OPS"]

log = logging.getLogger(__name__)

Ref = Tuple[str, int]

IDENTITY_OPS = frozenset({"Identity", "StopGradient", "Snapshot"})
PLACEHOLDER_OPS = frozenset({"Placeholder", "PlaceholderWithDefault"})
#: nodes that never carry data: not candidates for a graph's default outputs
_NON_DATA_OPS = frozenset({"Const", "NoOp", "Assert", "SaveV2", "RestoreV2", "Placeholder", "PlaceholderWithDefault",
                           "VarHandleOp", "VariableV2", "Variable", "AssignVariableOp", "Assign"})


def parse_ref(ref: str) -> Ref:
    """``"name:k"`` -> ``("name", k)``; ``"name"`` -> ``("name", 0)``."""
    name, sep, idx = ref.rpartition(":")
    if sep and idx.isdigit():
        return name, int(idx)
    return ref, 0


def tensor_name(ref: Ref) -> str:
    return f"{ref[0]}:{ref[1]}"


def _tf():
    import tensorflow as tf

    return tf


def _is_stateful(op: str) -> bool:
    """True for ops whose value may change between runs (variables, random ops) or that TensorFlow does not know."""
    try:
        from tensorflow.python.framework import op_def_registry
    except ImportError:  # pragma: no cover - private module moved; be conservative about what is constant
        return op not in ("Const",)
    op_def = op_def_registry.get(op)
    return op_def is None or op_def.is_stateful


class GraphDefView:
    """Nodes of a GraphDef by name, with reference resolution, reachability, constness and constant values.

    ``inputs``: names of the nodes that become graph inputs (never looked through, never constant).
    ``source`` names the file in error messages.
    """

    def __init__(self, graph_def, source: str, inputs: Iterable[str] = ()):
        self.graph_def = graph_def
        self.source = source
        self.nodes = {}
        for n in graph_def.node:
            if n.name in self.nodes:
                raise ModelLoadError(f"{source}: the GraphDef has two nodes named {n.name!r}")
            self.nodes[n.name] = n
        if not self.nodes:
            raise ModelLoadError(f"{source}: the GraphDef holds no nodes (empty, truncated, or not a frozen GraphDef)")
        for n in graph_def.node:
            for r in n.input:
                name = r[1:] if r.startswith("^") else parse_ref(r)[0]
                if name not in self.nodes:
                    raise ModelLoadError(f"{source}: node {n.name!r} reads {r!r}, which is not in the GraphDef "
                                         "(truncated or incomplete file?)")
        self.inputs: Set[str] = set(inputs)
        self._values: Dict[Ref, np.ndarray] = {}
        self._const: Optional[Set[str]] = None

    # -- structure ----------------------------------------------------------------------------------------------
    def data_inputs(self, name: str) -> List[Ref]:
        """The data (non-control) inputs of node ``name``, in order."""
        return [parse_ref(r) for r in self.nodes[name].input if not r.startswith("^")]

    def resolve(self, ref: Ref) -> Ref:
        """Follow identities back to the producing tensor (a chosen input is never looked through)."""
        seen = set()
        while True:
            name, idx = ref
            if ref in seen:
                raise ModelLoadError(f"{self.source}: identity cycle through {name!r}")
            seen.add(ref)
            node = self.nodes[name]
            if name in self.inputs:
                return ref
            if node.op in IDENTITY_OPS or node.op == "PlaceholderWithDefault":
                ins = self.data_inputs(name)
                if not ins:
                    return ref
                ref = ins[0]
            elif node.op == "IdentityN":
                ref = self.data_inputs(name)[idx]
            else:
                return ref

    def ancestors(self, targets: Iterable[str]) -> List[str]:
        """Every node the ``targets`` depend on through data inputs (stopping at chosen inputs), topologically
        sorted (inputs first); raises :class:`ModelLoadError` on a cycle (TF1 while loops)."""
        seen: Set[str] = set()
        stack = list(targets)
        dig = nx.DiGraph()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            dig.add_node(name)
            if name in self.inputs:
                continue
            for src, _ in self.data_inputs(name):
                dig.add_edge(src, name)
                stack.append(src)
        try:
            return list(nx.topological_sort(dig))
        except nx.NetworkXUnfeasible:
            raise ModelLoadError(f"{self.source}: the graph has a cycle (TF1 control flow such as while loops is "
                                 "not supported)") from None

    def constant_nodes(self, order: Sequence[str]) -> Set[str]:
        """The nodes of ``order`` (topologically sorted) whose outputs are constants."""
        const: Set[str] = set()
        for name in order:
            node = self.nodes[name]
            if name in self.inputs or node.op == "Placeholder":
                continue
            if node.op == "Const":
                const.add(name)
            elif not _is_stateful(node.op) and all(src in const for src, _ in self.data_inputs(name)):
                const.add(name)
        return const

    def sinks(self) -> List[str]:
        """Nodes whose outputs nobody reads and that depend on a placeholder: a graph's natural outputs."""
        consumed = {parse_ref(r)[0] for n in self.graph_def.node for r in n.input if not r.startswith("^")}
        order = self.ancestors([n.name for n in self.graph_def.node])
        fed: Set[str] = set()
        for name in order:
            node = self.nodes[name]
            if node.op in PLACEHOLDER_OPS or any(src in fed for src, _ in self.data_inputs(name)):
                fed.add(name)
        return [n.name for n in self.graph_def.node
                if n.name not in consumed and n.op not in _NON_DATA_OPS and n.name in fed]

    def consumer_count(self, name: str, among: Iterable[str]) -> int:
        """How many data inputs of the nodes ``among`` read any output of ``name``."""
        return sum(1 for m in among for src, _ in self.data_inputs(m) if src == name)

    def attr(self, name: str, key: str, default=None):
        """A node attribute as a Python value (str, int, float, bool, list of ints/strings, DType enum)."""
        node = self.nodes[name]
        if key not in node.attr:
            return default
        a = node.attr[key]
        kind = a.WhichOneof("value")
        if kind == "s":
            return a.s.decode("utf-8", "replace")
        if kind in ("i", "f", "b", "type"):
            return getattr(a, kind)
        if kind == "list":
            if a.list.i:
                return list(a.list.i)
            if a.list.s:
                return [s.decode("utf-8", "replace") for s in a.list.s]
            if a.list.f:
                return list(a.list.f)
            return []
        if kind == "shape":
            return a.shape
        return default

    # -- constant values ----------------------------------------------------------------------------------------
    def values(self, refs: Iterable[Ref]) -> Dict[Ref, np.ndarray]:
        """Values of constant tensors (resolved through identities); computed ones are folded in one TF run."""
        tf = _tf()
        want = [self.resolve(r) for r in refs]
        todo = []
        for ref in want:
            if ref in self._values:
                continue
            node = self.nodes[ref[0]]
            if node.op == "Const":
                try:
                    self._values[ref] = tf.make_ndarray(node.attr["value"].tensor)
                except Exception as exc:
                    raise ModelLoadError(f"{self.source}: constant {ref[0]!r} cannot be read: {exc}") from None
            else:
                todo.append(ref)
        if todo:
            self._fold(sorted(set(todo)))
        return {r: self._values[self.resolve(r)] for r in refs}

    def value(self, ref: Ref) -> np.ndarray:
        return self.values([ref])[ref]

    def _fold(self, refs: List[Ref]) -> None:
        """Run the constant subgraph computing ``refs`` in TensorFlow (no placeholders are involved)."""
        tf = _tf()
        names = self.ancestors(r[0] for r in refs)
        gd = self.subgraph(names)
        log.debug("folding %d constant tensors through %d nodes", len(refs), len(names))
        graph = tf.Graph()
        try:
            with graph.as_default():
                tf.import_graph_def(gd, name="")
            with tf.compat.v1.Session(graph=graph) as sess:
                out = sess.run([tensor_name(r) for r in refs])
        except Exception as exc:  # TF raises many types with long C++ traces; keep the first line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{self.source}: folding the constant subexpressions {[r[0] for r in refs][:5]} "
                                 f"failed: {first}") from None
        for r, v in zip(refs, out):
            self._values[r] = np.asarray(v)

    def subgraph(self, names: Iterable[str], placeholders: Optional[Dict[str, Sequence[Optional[int]]]] = None):
        """A new GraphDef holding copies of ``names`` without control inputs; ``placeholders`` turns the named
        nodes into float32 Placeholders of the given shapes (``None`` = open)."""
        tf = _tf()
        gd = tf.compat.v1.GraphDef()
        gd.versions.CopyFrom(self.graph_def.versions)
        gd.library.CopyFrom(self.graph_def.library)
        for name in names:
            node = gd.node.add()
            src = self.nodes[name]
            if placeholders and name in placeholders:
                node.name, node.op = name, "Placeholder"
                node.attr["dtype"].type = tf.float32.as_datatype_enum
                shape = tf.TensorShape(list(placeholders[name]))
                node.attr["shape"].shape.CopyFrom(shape.as_proto())
                continue
            node.CopyFrom(src)
            del node.input[:]
            node.input.extend(r for r in src.input if not r.startswith("^"))
        return gd

    def static_shapes(self, refs: Sequence[Ref], input_shapes: Dict[str, Sequence[Optional[int]]]):
        """TensorFlow's static shapes of ``refs`` when the inputs have ``input_shapes`` (``None`` = open)."""
        tf = _tf()
        names = self.ancestors(r[0] for r in refs)
        gd = self.subgraph(names, placeholders={k: v for k, v in input_shapes.items() if k in set(names)})
        graph = tf.Graph()
        try:
            with graph.as_default():
                tf.import_graph_def(gd, name="")
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{self.source}: TensorFlow cannot import the graph: {first}") from None
        out = []
        for r in refs:
            shape = graph.get_tensor_by_name(tensor_name(r)).shape
            out.append(None if shape.rank is None else tuple(shape.as_list()))
        return out
