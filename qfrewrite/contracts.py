"""Pass contracts: what a pass requires of the graph, what it ensures, and what it must never run after.

A pipeline is a list of passes over one graph. The order matters (equalization before bias correction, everything
that changes weights before quantization), and so does what each pass assumes about the graph. Each pass declares
it as a :class:`Contract` of graph :class:`Property` values:

* ``requires``: must hold before the pass runs (CrossLayerEqualization pairs layers only once BatchNorm is folded);
* ``ensures``: holds after it (FoldBatchNorm ensures ``BN_FOLDED``; CorrectBias makes the weights final);
* ``forbids``: must *not* hold before it: the pass would break what an earlier pass established (a pass that changes
  weights cannot run once CorrectBias corrected the biases for them; nothing that changes the float function can
  run once InsertFakeQuant calibrated the activation ranges).

:func:`check_pipeline` walks the list with the properties the graph already has (:func:`graph_properties`: a graph
without BatchNorm is ``BN_FOLDED``) and reports every pass out of order, naming the pass that establishes what is
missing or forbidden and where it should go, before any work is done. :func:`order_passes` derives the order of a
set of passes from the same declarations (recipes and ``diagnose`` use it), keeping the given order where the
declarations leave it open. Some properties can be checked on a graph itself (:data:`CHECKS`); the pass manager also
checks those just before a pass that requires them and just after a pass that ensures them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Set

import networkx as nx

from .errors import PipelineOrderError
from .ir import Graph, Op, batchnorm_fold_target

__all__ = ["Property", "Contract", "CHECKS", "graph_properties", "check_pipeline", "order_passes"]


class Property(str, enum.Enum):
    """A fact about the graph that passes establish and rely on."""

    #: every BatchNorm that can be folded into the layer before it has been (none may be left in the graph)
    BN_FOLDED = "BatchNorm folded"
    #: constant (dead) channels folded into the next layers' biases
    DEAD_CHANNELS_FOLDED = "dead channels folded"
    #: per-channel weight ranges of consecutive layers equalized
    EQUALIZED = "layers equalized"
    #: biases corrected for the quantization error of the weights
    BIAS_CORRECTED = "biases corrected"
    #: every kernel rounded to its quantization grid on the calibration data
    WEIGHTS_ROUNDED = "weights rounded"
    #: the kernels are the ones that will be quantized: no later pass may change them
    WEIGHTS_FINAL = "weights final"
    #: FakeQuant ranges calibrated and inserted: no later pass may change the float function
    QUANTIZED = "quantized"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Contract:
    """What a pass requires, ensures and forbids (see the module docstring)."""

    requires: FrozenSet[Property] = frozenset()
    ensures: FrozenSet[Property] = frozenset()
    forbids: FrozenSet[Property] = frozenset()


def _bn_folded(graph: Graph) -> bool:
    return not any(not isinstance(batchnorm_fold_target(bn), str) for bn in graph.find(Op.BATCH_NORM))


def _quantized(graph: Graph) -> bool:
    return bool(graph.find(Op.FAKE_QUANT))


#: the properties that can be read off a graph, and how
CHECKS: Dict[Property, Callable[[Graph], bool]] = {Property.BN_FOLDED: _bn_folded, Property.QUANTIZED: _quantized}


def graph_properties(graph: Graph) -> Set[Property]:
    """The properties :data:`CHECKS` finds true of ``graph``."""
    return {p for p, check in CHECKS.items() if check(graph)}


def _names(passes: Sequence, idx: Sequence[int]) -> str:
    return ", ".join(f"{passes[i].name} (pass {i + 1})" for i in idx)


def check_pipeline(passes: Sequence, contracts: Sequence[Contract], initial: Set[Property],
                   establishers: Optional[Callable[[Property], List[str]]] = None) -> None:
    """Raise :class:`PipelineOrderError` listing every pass whose contract the order breaks.

    ``contracts[i]`` is the contract of ``passes[i]``; ``initial`` the properties the graph has before the first
    pass; ``establishers(p)`` names passes (not in the list) that ensure ``p``, for the advice.
    """
    problems: List[str] = []
    state = set(initial)
    by: Dict[Property, int] = {}
    for i, (p, c) in enumerate(zip(passes, contracts)):
        for prop in sorted(c.requires - state, key=str):
            later = [j for j in range(i + 1, len(passes)) if prop in contracts[j].ensures]
            if later:
                problems.append(f"{p.name} (pass {i + 1}) requires '{prop}', which {_names(passes, later[:1])} "
                                f"establishes: move {passes[later[0]].name} before {p.name}")
            else:
                who = establishers(prop) if establishers else []
                hint = f" ({' or '.join(who)})" if who else ""
                problems.append(f"{p.name} (pass {i + 1}) requires '{prop}': add a pass that establishes it{hint} "
                                f"before {p.name}")
        for prop in sorted(c.forbids & state, key=str):
            if prop in by:
                j = by[prop]
                problems.append(f"{p.name} (pass {i + 1}) cannot run after {_names(passes, [j])}, which made the "
                                f"graph '{prop}': move {p.name} before {passes[j].name}")
            else:
                problems.append(f"{p.name} (pass {i + 1}) cannot run on a graph that is already '{prop}'")
        for prop in c.ensures:
            by.setdefault(prop, i)
        state |= c.ensures
    if problems:
        raise PipelineOrderError("the passes are in an order that cannot work:\n  " + "\n  ".join(problems))


def order_passes(passes: Sequence, contracts: Sequence[Contract]) -> List:
    """``passes`` in an order their contracts accept: ``a`` before ``b`` when ``a`` ensures what ``b`` requires, or
    ``b`` ensures what ``a`` forbids; the given order decides where the contracts leave it open."""
    g = nx.DiGraph()
    g.add_nodes_from(range(len(passes)))
    for a, ca in enumerate(contracts):
        for b, cb in enumerate(contracts):
            if a != b and (ca.ensures & cb.requires or cb.ensures & ca.forbids):
                g.add_edge(a, b)
    try:
        order = list(nx.lexicographical_topological_sort(g))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(g)
        raise PipelineOrderError("the contracts of " + ", ".join(passes[a].name for a, _ in cycle)
                                 + " contradict one another: no order satisfies them all") from None
    return [passes[i] for i in order]
