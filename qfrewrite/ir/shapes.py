"""Static shape inference for the IR (NHWC). ``None`` stands for an unknown (usually batch) dimension."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

from ..errors import VerificationError
from .ops import Op

__all__ = ["infer_output_shape", "same_pads", "broadcast_shapes", "resolve_pads"]

Shape = Tuple[Optional[int], ...]


def same_pads(size: Optional[int], kernel: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """TensorFlow's SAME padding (extra pixel at the end) for one spatial dim of known ``size``."""
    if size is None:
        raise VerificationError("SAME padding needs a known spatial size")
    eff = (kernel - 1) * dilation + 1
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + eff - size, 0)
    return total // 2, total - total // 2


def resolve_pads(padding, in_hw: Sequence[Optional[int]], kernel: Sequence[int], strides, dilations=(1, 1)):
    """Explicit ``((t, b), (l, r))`` pads for any padding spelling."""
    if padding == "VALID":
        return (0, 0), (0, 0)
    if padding == "SAME":
        return tuple(same_pads(in_hw[i], kernel[i], strides[i], dilations[i]) for i in range(2))
    return tuple(tuple(int(p) for p in pair) for pair in padding)


def _conv_out(size, kernel, stride, dilation, pads):
    if size is None:
        return None
    eff = (kernel - 1) * dilation + 1
    return (size + pads[0] + pads[1] - eff) // stride + 1


def _same_out(size, stride):
    """SAME padding's output size, ``ceil(size / stride)``, also for an unknown (``None``) size."""
    return None if size is None else math.ceil(size / stride)


def broadcast_shapes(a: Shape, b: Shape) -> Shape:
    """numpy broadcasting with ``None`` treated as unknown."""
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x == 1:
            out.append(y)
        elif y == 1 or y is None:
            out.append(x)
        elif x is None:
            out.append(y)
        elif x == y:
            out.append(x)
        else:
            raise VerificationError(f"shapes {a} and {b} do not broadcast")
    return tuple(out)


def _spatial(op_name, shape):
    if len(shape) != 4:
        raise VerificationError(f"{op_name} expects a rank-4 NHWC input, got shape {shape}")
    return shape


def infer_output_shape(node) -> Shape:
    """The output shape of ``node`` from its input shapes and attributes."""
    op, a = node.op, node.attrs
    ins = [v.shape for v in node.inputs]
    x = ins[0] if ins else ()
    if op in (Op.CONV2D, Op.DEPTHWISE_CONV2D):
        n, h, w, c = _spatial(op.value, x)
        k = node.inputs[1].const
        if k is None or k.ndim != 4:
            raise VerificationError(f"{node.name}: kernel must be a constant rank-4 tensor")
        kh, kw = k.shape[:2]
        if c is not None and k.shape[2] != c:
            raise VerificationError(f"{node.name}: kernel has {k.shape[2]} input channels, input has {c}")
        cout = k.shape[3] if op is Op.CONV2D else k.shape[2] * k.shape[3]
        if a.padding == "SAME":
            return (n, _same_out(h, a.strides[0]), _same_out(w, a.strides[1]), cout)
        pads = resolve_pads(a.padding, (h, w), (kh, kw), a.strides, a.dilations)
        return (n, _conv_out(h, kh, a.strides[0], a.dilations[0], pads[0]),
                _conv_out(w, kw, a.strides[1], a.dilations[1], pads[1]), cout)
    if op is Op.DENSE:
        k = node.inputs[1].const
        if x[-1] is not None and k.shape[0] != x[-1]:
            raise VerificationError(f"{node.name}: kernel has {k.shape[0]} inputs, input has {x[-1]}")
        return tuple(x[:-1]) + (k.shape[1],)
    if op is Op.PAD:
        n, h, w, c = _spatial(op.value, x)
        (t, b), (l, r) = a.pads
        return (n, None if h is None else h + t + b, None if w is None else w + l + r, c)
    if op in (Op.AVG_POOL, Op.MAX_POOL):
        n, h, w, c = _spatial(op.value, x)
        if a.padding == "SAME":
            return (n, _same_out(h, a.strides[0]), _same_out(w, a.strides[1]), c)
        pads = resolve_pads(a.padding, (h, w), a.kernel, a.strides)
        return (n, _conv_out(h, a.kernel[0], a.strides[0], 1, pads[0]),
                _conv_out(w, a.kernel[1], a.strides[1], 1, pads[1]), c)
    if op is Op.GLOBAL_MEAN:
        n, h, w, c = _spatial(op.value, x)
        return (n, 1, 1, c) if a.keepdims else (n, c)
    if op is Op.RESHAPE:
        target = list(a.shape)
        if -1 in target:
            known = [d for d in x[1:]]
            if all(d is not None for d in known):
                total = int(np.prod(known)) if known else 1
                rest = int(np.prod([d for d in target if d != -1])) if len(target) > 1 else 1
                target[target.index(-1)] = total // max(rest, 1)
            else:
                target[target.index(-1)] = None
        return (x[0],) + tuple(target)
    if op is Op.FLATTEN:
        rest = x[1:]
        return (x[0], int(np.prod(rest)) if all(d is not None for d in rest) else None)
    if op in (Op.ADD, Op.MUL, Op.MINIMUM):
        return broadcast_shapes(ins[0], ins[1])
    if op is Op.CONCAT:
        axis = a.axis % len(x)
        total = 0
        for s in ins:
            if len(s) != len(x):
                raise VerificationError(f"{node.name}: Concat inputs of different rank")
            if s[axis] is None:
                total = None
                break
            total += s[axis]
        return tuple(x[:axis]) + (total,) + tuple(x[axis + 1:])
    # element-wise single-input ops and BatchNorm, Normalize, FakeQuant, Softmax
    return tuple(x)
