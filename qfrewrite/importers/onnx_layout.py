"""How an ONNX tensor is held in the NHWC IR, and the layout arithmetic of constants and axes.

Three layouts:

* ``NCHW``: a rank-4 ONNX tensor ``(N, C, H, W)`` held as the IR value ``(N, H, W, C)``;
* ``SAME``: the IR value has the ONNX tensor's own shape and element order (rank 2 ``(N, C)``, or a rank-4 tensor that
  the source itself keeps in NHWC, as tf2onnx exports do before their first Transpose);
* ``FLAT_CHW``: a rank-2 ``(N, C*H*W)`` ONNX tensor (a Flatten of an NCHW tensor) held as the IR's ``(N, H*W*C)``
  flattening; ``perm[j]`` is the IR position of ONNX feature ``j``. A following Gemm/MatMul permutes its kernel rows.

The memory order of an NCHW tensor equals that of its NHWC form when ``C == 1`` or ``H * W == 1``: reshapes that
keep to such tensors (the classifier head after global pooling) are plain IR reshapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ..ir import Value

__all__ = ["NCHW", "SAME", "FLAT_CHW", "Held", "NCHW_TO_NHWC", "NHWC_TO_NCHW", "chw_flat_perm", "onnx_shape",
           "ir_axis", "const_to_ir", "same_memory_order"]

NCHW, SAME, FLAT_CHW = "NCHW", "SAME", "FLAT_CHW"
NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)


@dataclass(frozen=True)
class Held:
    """An ONNX tensor as the IR holds it."""

    value: Value
    layout: str = SAME
    perm: Optional[Tuple[int, ...]] = None  # FLAT_CHW only

    @property
    def rank(self) -> int:
        return len(self.value.shape)


def chw_flat_perm(h: int, w: int, c: int) -> Tuple[int, ...]:
    """IR (HWC) flat position of each ONNX (CHW) flat feature."""
    return tuple(np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).reshape(-1).tolist())


def onnx_shape(t: Held) -> Tuple[Optional[int], ...]:
    s = t.value.shape
    if t.layout == NCHW:
        return tuple(s[i] for i in NHWC_TO_NCHW)
    return tuple(s)


def same_memory_order(t: Held) -> bool:
    """Does the IR value hold the elements in the ONNX tensor's order (so a reshape needs no transpose)?"""
    if t.layout == SAME:
        return True
    if t.layout == NCHW:
        _, h, w, c = t.value.shape
        return c == 1 or (h is not None and w is not None and h * w == 1)
    return t.perm == tuple(range(len(t.perm)))


def ir_axis(t: Held, axis: int) -> Optional[int]:
    """The IR axis of ONNX ``axis`` (``None`` where the layout has no such single axis)."""
    rank = t.rank
    if not -rank <= axis < rank:
        return None
    axis %= rank
    if t.layout == NCHW:
        return NCHW_TO_NHWC.index(axis)
    if t.layout == FLAT_CHW:
        return axis if axis == 0 else None
    return axis


def const_to_ir(t: Held, c: np.ndarray) -> Optional[np.ndarray]:
    """An ONNX constant operand broadcast against ``t``, rearranged for the IR value; ``None`` if impossible.

    Batch-independent constants only (the batch axis of the broadcast constant must be 1). A per-channel constant of
    an NCHW tensor, shaped ``(C, 1, 1)`` or ``(1, C, 1, 1)``, becomes ``(C,)``; a scalar stays a scalar.
    """
    c = np.asarray(c, np.float32)
    if c.size == 1:
        return c.reshape(())
    rank = t.rank
    if c.ndim > rank:
        return None
    full = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if full.shape[0] != 1:
        return None
    if t.layout == NCHW:
        full = full.transpose(NCHW_TO_NHWC)
    elif t.layout == FLAT_CHW:
        k = len(t.perm)
        if full.shape[1] not in (1, k):
            return None
        flat = np.broadcast_to(full.reshape(-1), (k,))
        out = np.empty(k, np.float32)
        out[list(t.perm)] = flat
        return out
    # drop leading ones the IR value broadcasts anyway
    while full.ndim > 1 and full.shape[0] == 1:
        full = full[0]
    return np.ascontiguousarray(full)
