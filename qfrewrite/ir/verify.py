"""Graph invariants, checked by the pass manager after every pass.

1. every node's inputs belong to the graph (no dangling use of a removed value);
2. one producer per value, and use lists agree with node inputs;
3. the graph is acyclic (a topological order exists) and every output is produced or is an input;
4. kernels and biases are constants of the right rank, and stored shapes equal re-inferred shapes.
"""
from __future__ import annotations

from typing import List

import networkx as nx
import numpy as np

from ..errors import VerificationError
from .graph import Graph
from .ops import WEIGHTED_OPS
from .shapes import infer_output_shape

__all__ = ["verify"]


def _compatible(a, b) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def verify(graph: Graph) -> None:
    """Raise :class:`VerificationError` listing every broken invariant; return ``None`` when the graph is sound."""
    problems: List[str] = []
    producers = {}
    for node in graph._nodes.values():
        for i, v in enumerate(node.inputs):
            if v.graph is not graph or graph._values.get(v.name) is not v:
                problems.append(f"{node.name} input {i} ({v.name}) is not a value of the graph (dangling use)")
            if (node, i) not in v._uses:
                problems.append(f"{node.name} input {i} ({v.name}) is missing from the value's use list")
            if v.producer is not None and v.producer.name not in graph._nodes:
                problems.append(f"{node.name} reads {v.name}, produced by removed node {v.producer.name}")
        for out in node.outputs:
            if out.name in producers:
                problems.append(f"value {out.name} has two producers: {producers[out.name]} and {node.name}")
            producers[out.name] = node.name
            if out.producer is not node:
                problems.append(f"value {out.name} does not name {node.name} as producer")
        if node.op in WEIGHTED_OPS:
            k = node.inputs[1] if len(node.inputs) > 1 else None
            if k is None or not k.is_const:
                problems.append(f"{node.name}: {node.op.value} kernel must be a constant")
            b = node.bias
            if b is not None and (not b.is_const or b.const.ndim != 1 or b.const.shape[0] != node.output.shape[-1]):
                problems.append(f"{node.name}: bias must be a constant vector of {node.output.shape[-1]}")
            fb, c = node.folded_bn, node.output.shape[-1]
            if fb is not None and c is not None and np.asarray(fb.scale).shape != (c,):
                problems.append(f"{node.name}: folded BatchNorm {fb.name} holds {np.asarray(fb.scale).shape} scales "
                                f"for {c} output channels")
    for v in graph._values.values():
        for node, i in v._uses:
            if node.graph is not graph:
                problems.append(f"{v.name} is used by removed node {node.name}")
            elif node.inputs[i] is not v:
                problems.append(f"{v.name} lists a use by {node.name}[{i}] that reads another value")
    if not nx.is_directed_acyclic_graph(graph._nx):
        problems.append("the graph has a cycle")
    for out in graph.outputs:
        if out.producer is None and out not in graph.inputs:
            problems.append(f"graph output {out.name} is not produced by any node")
        elif out.producer is not None and out.producer.name not in graph._nodes:
            problems.append(f"graph output {out.name} is produced by removed node {out.producer.name}")
    if not problems:
        for node in graph.topological_order():
            try:
                shape = infer_output_shape(node)
            except VerificationError as exc:
                problems.append(f"{node.name}: {exc}")
                continue
            except Exception as exc:  # a malformed node must be reported, not crash the verifier
                problems.append(f"{node.name}: shape inference failed: {exc}")
                continue
            if not _compatible(shape, node.output.shape):
                problems.append(f"{node.name}: output shape {node.output.shape} but inputs give {shape}")
    if problems:
        raise VerificationError("graph verification failed:\n  " + "\n  ".join(problems))
