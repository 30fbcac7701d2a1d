"""The IR: a :class:`Graph` of :class:`Node` objects connected through :class:`Value` objects.

A :class:`Value` is a tensor: a graph input, a node output, or a constant holding a numpy array (weights). It knows
its producer and its uses, so passes never touch the networkx graph that backs ordering and reachability.
Edits go through the typed API here: :meth:`Graph.add_node`, :meth:`Node.set_input`,
:meth:`Value.replace_all_uses_with` and :meth:`Graph.remove_node`, which refuses to leave a dangling use.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import networkx as nx
import numpy as np

from ..errors import GraphError
from .ops import ATTRS_FOR, WEIGHTED_OPS, Op
from .shapes import infer_output_shape

__all__ = ["Value", "Node", "Graph", "FoldedBatchNorm"]


@dataclass(frozen=True)
class FoldedBatchNorm:
    """A BatchNorm folded into a layer: its source ``name`` and, per output channel, the ``scale``
    ``gamma / sqrt(var + eps)`` it multiplied the kernel by.

    Invariant, kept by every pass that rescales output channels (:func:`qfrewrite.ir.edit.record_output_scaling`):
    ``scale[c]`` is the factor that folding and every later rescaling of output channel ``c`` multiplied it by, so
    output channel ``c`` of the kernel is its pre-BatchNorm weights (as later edits left them on the input side) times
    ``scale[c]``. Scaling a depthwise kernel's input channel ``i`` scales its output channels ``i*M .. i*M+M-1``, so
    that counts as an output rescaling; scaling a regular conv's input channels does not. Analyses read it to tell
    whether a BatchNorm scale explains an outlier channel; RemoveDepthwiseBNReLU6 divides it out again.
    """

    name: str
    scale: np.ndarray

    def rescaled(self, factor) -> "FoldedBatchNorm":
        """The record after output channel ``c`` was multiplied by ``factor[c]``."""
        return FoldedBatchNorm(self.name, np.asarray(self.scale, np.float64) * np.asarray(factor, np.float64))


class Value:
    """A tensor in the graph. ``const`` holds the array for constants (weights, biases), else ``None``."""

    def __init__(self, name: str, shape: Sequence[Optional[int]], const: Optional[np.ndarray] = None,
                 dtype: str = "float32"):
        self.name = name
        self.shape: Tuple[Optional[int], ...] = tuple(None if d is None else int(d) for d in shape)
        self.const = const
        self.dtype = dtype
        self.producer: Optional[Node] = None
        self._uses: List[Tuple[Node, int]] = []
        self.graph: Optional[Graph] = None

    @property
    def is_const(self) -> bool:
        return self.const is not None

    def uses(self) -> List[Tuple["Node", int]]:
        """``(consumer, input index)`` pairs, in insertion order."""
        return list(self._uses)

    def consumers(self) -> List["Node"]:
        seen, out = set(), []
        for n, _ in self._uses:
            if id(n) not in seen:
                seen.add(id(n))
                out.append(n)
        return out

    def replace_all_uses_with(self, other: "Value") -> None:
        """Make every consumer of this value (and the graph outputs) read ``other`` instead."""
        if other is self:
            return
        for node, idx in self.uses():
            node.set_input(idx, other)
        g = self.graph
        if g is not None:
            g.outputs = [other if v is self else v for v in g.outputs]

    def set_const(self, array: np.ndarray) -> None:
        """Replace a constant's array (shape may change only for constants)."""
        if not self.is_const:
            raise GraphError(f"{self.name} is not a constant")
        self.const = np.ascontiguousarray(array, dtype=np.float32)
        self.shape = tuple(self.const.shape)

    def __repr__(self) -> str:
        kind = "const" if self.is_const else "value"
        return f"<{kind} {self.name} {self.shape}>"


class Node:
    """One operation. ``attrs`` is the typed attribute dataclass of its :class:`Op`."""

    def __init__(self, name: str, op: Op, attrs: Any = None, meta: Optional[Dict[str, Any]] = None):
        self.name = name
        self.op = Op(op)
        self.attrs = attrs if attrs is not None else ATTRS_FOR[self.op]()
        if not isinstance(self.attrs, ATTRS_FOR[self.op]):
            raise GraphError(f"{name}: {self.op.value} takes {ATTRS_FOR[self.op].__name__}, got {type(self.attrs).__name__}")
        self._inputs: List[Value] = []
        self.outputs: List[Value] = []
        self.graph: Optional[Graph] = None
        #: free-form provenance: source layer name, source op, etc.
        self.meta: Dict[str, Any] = dict(meta or {})
        #: fake quantization applied to the kernel (a ``FakeQuantAttrs``) when the graph is emitted or simulated;
        #: the kernel itself stays the float constant so every pass keeps working on real weights.
        self.weight_quant = None
        #: the BatchNorm folded into this layer's kernel, if any (weighted layers only)
        self.folded_bn: Optional[FoldedBatchNorm] = None

    # -- inputs -------------------------------------------------------------------------------------------------
    @property
    def inputs(self) -> Tuple[Value, ...]:
        return tuple(self._inputs)

    @property
    def output(self) -> Value:
        return self.outputs[0]

    @property
    def weight(self) -> Optional[Value]:
        """The constant kernel of Conv2D/DepthwiseConv2D/Dense, else ``None``."""
        if self.op in WEIGHTED_OPS:
            return self._inputs[1]
        return None

    @property
    def bias(self) -> Optional[Value]:
        if self.op in WEIGHTED_OPS and len(self._inputs) > 2:
            return self._inputs[2]
        return None

    @property
    def source_name(self) -> str:
        """The layer/node name in the source model."""
        return self.meta.get("source_name", self.name)

    def set_input(self, index: int, value: Value) -> None:
        old = self._inputs[index]
        old._uses.remove((self, index))
        self._inputs[index] = value
        value._uses.append((self, index))
        if self.graph is not None:
            self.graph._relink(self)

    def append_input(self, value: Value) -> None:
        self._inputs.append(value)
        value._uses.append((self, len(self._inputs) - 1))
        if self.graph is not None:
            self.graph._relink(self)

    def __repr__(self) -> str:
        return f"<{self.op.value} {self.name}>"


class Graph:
    """A dataflow graph in NHWC layout, backed by a networkx ``DiGraph`` over node names."""

    def __init__(self, name: str = "graph"):
        self.name = name
        self.inputs: List[Value] = []
        self.outputs: List[Value] = []
        self._nx = nx.DiGraph()
        self._nodes: Dict[str, Node] = {}
        self._values: Dict[str, Value] = {}
        #: provenance: ``source`` (path), ``format`` ("keras", "onnx", "graphdef", "savedmodel"),
        #: ``input_layout`` ("NHWC" or "NCHW"), ``output_names`` (as in the source) ...
        self.meta: Dict[str, Any] = {}
        self._counter = itertools.count()
        self._seq: Dict[str, int] = {}
        self._seq_counter = itertools.count()

    # -- naming -------------------------------------------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        name = base
        while name in self._nodes or name in self._values:
            name = f"{base}_{next(self._counter)}"
        return name

    # -- building -----------------------------------------------------------------------------------------------
    def add_input(self, name: str, shape: Sequence[Optional[int]]) -> Value:
        v = Value(self.unique_name(name), shape)
        self._register_value(v)
        self.inputs.append(v)
        return v

    def const(self, array, name: str = "const") -> Value:
        """A constant value holding ``array`` as float32."""
        arr = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
        v = Value(self.unique_name(name), arr.shape, const=arr)
        self._register_value(v)
        return v

    def add_node(self, op: Op, inputs: Sequence[Value], attrs: Any = None, name: Optional[str] = None,
                 meta: Optional[Dict[str, Any]] = None, shape: Optional[Sequence[Optional[int]]] = None) -> Node:
        """Add a single-output node and return it; its output shape is inferred unless given."""
        op = Op(op)
        node = Node(self.unique_name(name or op.value.lower()), op, attrs, meta)
        for v in inputs:
            if v.graph is not self:
                raise GraphError(f"{node.name}: input {v.name} belongs to another graph")
        node.graph = self
        self._nodes[node.name] = node
        self._seq[node.name] = next(self._seq_counter)
        self._nx.add_node(node.name)
        for i, v in enumerate(inputs):
            node._inputs.append(v)
            v._uses.append((node, i))
        out_shape = tuple(shape) if shape is not None else infer_output_shape(node)
        out = Value(self.unique_name(node.name + ":0"), out_shape)
        out.producer = node
        self._register_value(out)
        node.outputs.append(out)
        self._relink(node)
        return node

    def _register_value(self, v: Value) -> None:
        v.graph = self
        self._values[v.name] = v

    def _relink(self, node: Node) -> None:
        """Recompute the networkx in-edges of ``node`` from its inputs."""
        for pred in list(self._nx.predecessors(node.name)):
            self._nx.remove_edge(pred, node.name)
        for v in node._inputs:
            if v.producer is not None:
                self._nx.add_edge(v.producer.name, node.name)

    # -- removal ------------------------------------------------------------------------------------------------
    def remove_node(self, node: Node) -> None:
        """Remove ``node``; refuses while any of its outputs is used or is a graph output."""
        for out in node.outputs:
            if out._uses:
                users = ", ".join(n.name for n, _ in out._uses)
                raise GraphError(f"cannot remove {node.name}: its output {out.name} is used by {users}")
            if self.is_output(out):
                raise GraphError(f"cannot remove {node.name}: its output {out.name} is a graph output")
        for i, v in enumerate(node._inputs):
            v._uses.remove((node, i))
        node._inputs = []
        for out in node.outputs:
            self._values.pop(out.name, None)
            out.producer = None
        self._nx.remove_node(node.name)
        del self._nodes[node.name]
        self._seq.pop(node.name, None)
        node.graph = None

    def bypass(self, node: Node, keep: Optional[Value] = None) -> None:
        """Remove a single-input-single-output node, routing its consumers to its (first) input."""
        keep = keep if keep is not None else node.inputs[0]
        node.output.replace_all_uses_with(keep)
        self.remove_node(node)

    def remove_unused(self) -> int:
        """Drop nodes whose outputs nobody uses and unreferenced constants. Returns the number of nodes removed."""
        removed = 0
        changed = True
        while changed:
            changed = False
            for node in list(reversed(self.topological_order())):
                outs = node.outputs
                if all(not o._uses for o in outs) and not any(self.is_output(o) for o in outs):
                    self.remove_node(node)
                    removed += 1
                    changed = True
        for name, v in list(self._values.items()):
            if v.is_const and not v._uses:
                del self._values[name]
        return removed

    # -- queries ------------------------------------------------------------------------------------------------
    @property
    def nodes(self) -> List[Node]:
        """All nodes in topological order."""
        return self.topological_order()

    def node(self, name: str) -> Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise GraphError(f"no node named {name!r}") from None

    def value(self, name: str) -> Value:
        try:
            return self._values[name]
        except KeyError:
            raise GraphError(f"no value named {name!r}") from None

    def values(self) -> List[Value]:
        return list(self._values.values())

    def topological_order(self) -> List[Node]:
        # insertion order as tie-break keeps printing stable
        order = nx.lexicographical_topological_sort(self._nx, key=self._seq.__getitem__)
        return [self._nodes[n] for n in order]

    def is_output(self, value: Value) -> bool:
        """True when ``value`` is one of this graph's outputs."""
        return any(value is o for o in self.outputs)

    def find(self, *ops: Op) -> List[Node]:
        """Nodes of the given ops, in topological order."""
        wanted = {Op(o) for o in ops}
        return [n for n in self.topological_order() if n.op in wanted]

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.topological_order())

    def op_counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for n in self._nodes.values():
            counts[n.op.value] = counts.get(n.op.value, 0) + 1
        return dict(sorted(counts.items()))

    def nx_graph(self) -> nx.DiGraph:
        """A read-only view of the networkx graph (node names as keys) for reachability queries."""
        return self._nx.copy(as_view=True)

    # -- copying ------------------------------------------------------------------------------------------------
    def copy(self) -> "Graph":
        """A deep copy: edits to the copy never reach this graph (constants are copied too).

        Built node by node in topological order (``copy.deepcopy`` recurses along the value/use links and exceeds
        Python's recursion limit on graphs of a real network's size).
        """
        g = Graph(self.name)
        g.meta = copy.deepcopy(self.meta)
        vmap: Dict[int, Value] = {}

        def cv(v: Value) -> Value:
            nv = vmap.get(id(v))
            if nv is None:
                nv = Value(v.name, v.shape, None if v.const is None else v.const.copy(), v.dtype)
                g._register_value(nv)
                vmap[id(v)] = nv
            return nv

        g.inputs = [cv(v) for v in self.inputs]
        for v in self._values.values():
            if v.is_const:
                cv(v)
        for node in self.topological_order():
            n = Node(node.name, node.op, node.attrs, copy.deepcopy(node.meta))
            n.weight_quant = node.weight_quant
            n.folded_bn = node.folded_bn
            for k, val in node.__dict__.items():  # attributes added to a node after construction
                if k not in n.__dict__:
                    setattr(n, k, copy.deepcopy(val))
            n.graph = g
            g._nodes[n.name] = n
            g._seq[n.name] = self._seq[node.name]
            g._nx.add_node(n.name)
            for i, v in enumerate(node._inputs):
                nv = cv(v)
                n._inputs.append(nv)
                nv._uses.append((n, i))
            for out in node.outputs:
                no = cv(out)
                no.producer = n
                n.outputs.append(no)
            g._relink(n)
        g.outputs = [cv(v) for v in self.outputs]
        g._seq_counter = itertools.count(max(self._seq.values(), default=-1) + 1)
        return g

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self)} nodes, inputs {[v.shape for v in self.inputs]}>"

    def summary(self) -> str:
        lines = [repr(self)]
        for n in self.topological_order():
            ins = ", ".join(v.name for v in n.inputs if not v.is_const)
            lines.append(f"  {n.name}: {n.op.value}({ins}) -> {n.output.shape}")
        return "\n".join(lines)
