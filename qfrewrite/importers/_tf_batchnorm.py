"""Recognise the unfused inference BatchNorm arithmetic of TF-slim, ``tf.nn.batch_normalization`` and Keras 3.

``tf.nn.batch_normalization`` (used by ``tf.contrib.layers.batch_norm``, hence by TF-slim, and by Keras 3's
BatchNormalization layer on TensorFlow) writes inference BatchNorm as::

    inv   = rsqrt(variance + eps) [* gamma]                   # constant per channel
    shift = beta - mean * inv  |  -(mean * inv)  |  (-mean) * inv    # constant per channel (no beta: Neg)
    y     = x * inv + shift

:func:`match_unfused_batchnorm` finds that shape around its final ``Add``/``AddV2``: each binary op may have its
operands in either order, identities are looked through, ``rsqrt(variance)`` without an ``eps`` addition means
``eps = 0``. The leaves (variance, eps, gamma, mean, beta) must be constant and ``x`` must not be; ``x * inv`` must be
read only by the final ``Add``. Anything else is left alone (it then imports as plain ``Mul``/``Add`` with folded
constants, which is the same function).

The match is structural; the importer checks the values (vectors of the channel count, a scalar ``eps >= 0``)
when it builds the node and falls back to ``Mul``/``Add`` when they do not fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Set, Tuple

from ._tf_view import GraphDefView, Ref

__all__ = ["UnfusedBatchNorm", "match_unfused_batchnorm", "ADD_OPS"]

ADD_OPS = frozenset({"Add", "AddV2"})


@dataclass(frozen=True)
class UnfusedBatchNorm:
    """One recognised pattern. ``variance_terms`` are the two operands of ``variance + eps`` (which one is the
    scalar eps is decided from the values) or just the variance when there is no addition."""

    add: str
    mul: str
    x: Ref
    inv: Ref
    shift: Ref
    variance_terms: Tuple[Ref, ...]
    gamma: Optional[Ref]
    mean: Ref
    beta: Optional[Ref]
    scope: str


def _operands(view: GraphDefView, name: str) -> List[Tuple[str, Ref]]:
    """``(raw input name, resolved ref)`` for each data input of ``name``."""
    node = view.nodes[name]
    raw = [r for r in node.input if not r.startswith("^")]
    return [(r, view.resolve(ref)) for r, ref in zip(raw, view.data_inputs(name))]


def _op(view: GraphDefView, ref: Ref) -> str:
    return view.nodes[ref[0]].op if ref[1] == 0 else ""


def _const_size(view: GraphDefView, ref: Ref) -> Optional[int]:
    """The element count of a ``Const`` read from its proto (no evaluation), else ``None``."""
    node = view.nodes[ref[0]]
    if node.op != "Const" or "value" not in node.attr:
        return None
    dims = node.attr["value"].tensor.tensor_shape.dim
    size = 1
    for d in dims:
        size *= d.size
    return size


def _match_inv(view: GraphDefView, inv: Ref):
    """``rsqrt(v [+ eps]) [* gamma]`` -> (variance terms, gamma, raw leaf names) or None."""
    gamma, raw = None, []
    op = _op(view, inv)
    if op == "Rsqrt":
        rsqrt = inv
    elif op == "Mul":
        ops = _operands(view, inv[0])
        if len(ops) != 2:
            return None
        for (ra, a), (rb, b) in (ops, ops[::-1]):
            if _op(view, a) == "Rsqrt":
                rsqrt, gamma = a, b
                raw.append(rb)
                break
        else:
            return None
    else:
        return None
    (rv, v), = _operands(view, rsqrt[0])[:1]
    if _op(view, v) in ADD_OPS:
        terms = _operands(view, v[0])
        if len(terms) != 2:
            return None
        # the scalar eps (often ``.../batchnorm/add/y``) does not belong to the parameters' scope
        raw.extend(r for r, t in terms if _const_size(view, t) != 1)
        return tuple(t for _, t in terms), gamma, raw
    raw.append(rv)
    return (v,), gamma, raw


def _match_shift(view: GraphDefView, shift: Ref, inv: Ref):
    """``beta - mean * inv``, ``-(mean * inv)`` or ``(-mean) * inv`` -> (mean, beta, raw leaf names) or None."""
    op = _op(view, shift)
    ops = _operands(view, shift[0]) if op in ("Sub", "Neg", "Mul") else []
    if op == "Mul" and len(ops) == 2:  # TF2's tf.nn.batch_normalization without offset
        for (_, neg), (_, other) in (ops, ops[::-1]):
            if other == inv and _op(view, neg) == "Neg":
                (rm, m), = _operands(view, neg[0])[:1]
                return m, None, [rm]
        return None
    if op == "Sub" and len(ops) == 2:
        (rbeta, beta), (_, prod) = ops
    elif op == "Neg" and len(ops) == 1:
        (rbeta, beta), (_, prod) = (None, None), ops[0]
    else:
        return None
    if _op(view, prod) != "Mul":
        return None
    factors = _operands(view, prod[0])
    if len(factors) != 2:
        return None
    for (rm, m), (_, other) in (factors, factors[::-1]):
        if other == inv:
            return m, beta, [rm] + ([rbeta] if rbeta else [])
    return None


def _scope(names: Iterable[str]) -> str:
    """The common name scope of the parameter nodes (``.../BatchNorm`` for TF-slim), ``/read`` stripped."""
    parts = []
    for n in names:
        n = n.split(":")[0]
        if n.endswith("/read"):
            n = n[: -len("/read")]
        parts.append(n.split("/")[:-1])
    if not parts:
        return ""
    common = []
    for comps in zip(*parts):
        if len(set(comps)) != 1:
            break
        common.append(comps[0])
    return "/".join(common)


def match_unfused_batchnorm(view: GraphDefView, add: str, constant: Set[str],
                            keep: Iterable[str] = ()) -> Optional[UnfusedBatchNorm]:
    """Match the pattern ending at node ``add``; ``constant`` are the constant nodes, ``keep`` the nodes that must
    stay visible (requested outputs). Returns ``None`` when the shape does not fit."""
    if view.nodes[add].op not in ADD_OPS:
        return None
    ops = _operands(view, add)
    if len(ops) != 2:
        return None
    keep = set(keep)
    for (_, prod), (_, shift) in (ops, ops[::-1]):
        if _op(view, prod) != "Mul" or prod[0] in constant or shift[0] not in constant or prod[0] in keep:
            continue
        factors = _operands(view, prod[0])
        if len(factors) != 2:
            continue
        for (_, x), (_, inv) in (factors, factors[::-1]):
            if x[0] in constant or inv[0] not in constant:
                continue
            m_inv = _match_inv(view, inv)
            m_shift = _match_shift(view, shift, inv) if m_inv else None
            if m_shift is None:
                continue
            terms, gamma, raw_inv = m_inv
            mean, beta, raw_shift = m_shift
            scope = _scope(raw_inv + raw_shift)
            if not scope:
                parent = add.rsplit("/", 1)[0] if "/" in add else add
                scope = parent[: -len("/batchnorm")] if parent.endswith("/batchnorm") else parent
            return UnfusedBatchNorm(add=add, mul=prod[0], x=x, inv=inv, shift=shift, variance_terms=terms,
                                    gamma=gamma, mean=mean, beta=beta, scope=scope)
    return None
