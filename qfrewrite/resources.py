"""Memory estimates, so that a job too large for the machine is refused at the start with the figure it needs
instead of failing half-way with ``MemoryError`` (or the kernel's OOM killer).

* :func:`activation_bytes`: the working set of one pass through a graph, per image: for every node, its non-constant
  inputs plus its output (float32); the largest of these is a lower bound of what running, calibrating or emitting
  the graph needs for one image. Values with open dimensions are left out.
* :func:`require_memory`: raise the given error type when an estimate exceeds the machine's physical memory (not the
  memory free right now: the check refuses what can never fit, not what is tight).
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Tuple, Type

import numpy as np

__all__ = ["physical_memory", "format_bytes", "activation_bytes", "require_memory"]

log = logging.getLogger(__name__)

_FLOAT32 = 4


def physical_memory() -> Optional[int]:
    """Bytes of physical memory, or ``None`` where the platform does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _value_bytes(v) -> Optional[int]:
    dims = v.shape[1:] if len(v.shape) else ()
    if any(d is None for d in dims):
        return None
    return int(np.prod([int(d) for d in dims], dtype=np.float64)) * _FLOAT32


def activation_bytes(graph) -> Tuple[int, Optional[str]]:
    """``(bytes, node name)``: the largest per-image working set of one node (its data inputs and its output)."""
    best, where = 0, None
    for v in graph.inputs:
        b = _value_bytes(v) or 0
        if b > best:
            best, where = b, v.name
    for node in graph.topological_order():
        total = 0
        for v in list(node.inputs) + [node.output]:
            if not v.is_const:
                total += _value_bytes(v) or 0
        if total > best:
            best, where = total, node.source_name
    return best, where


def require_memory(need: int, what: str, error: Type[Exception], hint: str = "") -> None:
    """Raise ``error`` when ``need`` bytes exceed the physical memory; ``what`` says what needs them."""
    have = physical_memory()
    if have is None or need <= have:
        return
    raise error(f"{what} needs about {format_bytes(need)} of memory, more than this machine's "
                f"{format_bytes(have)}{'; ' + hint if hint else ''}")
