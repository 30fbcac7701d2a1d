"""Rounding a layer's weights to a fixed quantization grid so that the layer's *output* error is small, from the
second moments of its inputs (pure numpy).

A layer computes ``y = W x`` for each input patch ``x`` (``K`` values: the kernel taps times the input channels it
reads) and output row ``w`` of ``W``. Quantizing ``W -> Q`` changes the outputs by ``(Q - W) x``; over the
calibration data the mean squared output error of row ``r`` is

    ``e_r = d_r H d_r^T``,  ``d_r = q_r - w_r``,  ``H = E[x x^T]``   (``K x K``).

When the layer's bias absorbs the mean error (``b -= d_r E[x]``, bias correction, exact since the layer is linear),
``H`` is the covariance ``E[x x^T] - E[x] E[x]^T`` instead. Both need only the sums ``sum x`` and ``sum x x^T``
over every patch the layer reads, so the cost does not grow with the number of images once they are gathered.

**The grid** is fixed beforehand (the one InsertFakeQuant will apply): row ``r`` may take the values
``nlo_r + k * s_r`` for integer ``k`` in ``[0, n]`` (symmetric narrow range: ``n = 2**bits - 2``), with the nudged
lower bound ``nlo`` and step ``s`` of :func:`qfrewrite.numerics.quantize.nudge`.

**The algorithm** is GPTQ (Frantar et al. 2022, the Optimal Brain Quantization update applied column by column):
the columns are quantized one at a time in a fixed order; after column ``j`` is rounded to its nearest grid value,
the error it leaves, ``(w_j - q_j) / [H^-1]_jj``, is spread over the columns not yet quantized through row ``j`` of
the upper Cholesky factor of ``H^-1``, which is the least-squares optimal compensation for the remaining columns.
Columns are taken in order of decreasing ``H_jj`` (inputs with the most energy first) and processed in blocks with
lazy updates of the rest. ``H`` is damped by ``damping * mean(diag H)`` on its diagonal for the inverse (inputs that
are constant, ``H_jj = 0``, get a unit diagonal: their weights cannot change the error). The result is compared
row by row with nearest rounding on the undamped objective, and each row keeps whichever has the lower error. Then
``sweeps`` rounds of coordinate descent refine it: for each column in turn, every row moves that weight one grid
step up or down when that lowers ``d_r H d_r^T`` (the change is ``2 delta (d_r H)_j + delta^2 H_jj``, so a sweep
costs one product with ``H``). Each step only lowers the error, so no row, and hence no layer, ends worse than
nearest rounding on the calibration data.

**Inputs that are themselves quantized.** When the layer is rounded for the inputs ``x`` it will see in the
quantized model (upstream layers already rounded) while its reference output is the float model's ``w x_f``, the
error of row ``r`` is ``E[(w_r x_f - q_r x)^2] = w_r H_f w_r^T - 2 w_r C q_r^T + q_r H q_r^T`` with
``H = E[x x^T]``, ``H_f = E[x_f x_f^T]`` and ``C = E[x_f x^T]``, which is
``(q_r - t_r) H (q_r - t_r)^T`` plus a constant, for the target ``t_r = w_r C H^-1 = w_r + w_r (C - H) H^-1``:
the same problem, rounding ``t`` instead of ``w`` (the correction term damped like the inverse above), so the layer
also compensates what the layers before it lost (:func:`round_rows` with ``cross`` and ``ref``). Nearest rounding of
``w`` stays the baseline every row is compared with, on the exact error.

Rows that share one ``H`` (the output channels of a conv or dense layer) are rounded together; depthwise layers,
whose channels each read their own input channel, are a batch of small problems (``H`` per channel,
``(B, K, K)``), solved together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["Grid", "nearest", "gptq_round", "refine", "row_errors", "output_errors", "round_rows"]


@dataclass(frozen=True)
class Grid:
    """Per-row grids ``nlo + k * step``, ``k`` in ``[0, n]``; ``nlo`` and ``step`` broadcast against the rows
    (shape ``(..., R, 1)`` for a ``(..., R, K)`` weight array)."""

    nlo: np.ndarray
    step: np.ndarray
    n: int

    def codes(self, w: np.ndarray) -> np.ndarray:
        """Nearest integer codes of ``w`` (clipped to the grid)."""
        return np.clip(np.round((w - self.nlo) / self.step), 0, self.n)

    def values(self, codes: np.ndarray) -> np.ndarray:
        return codes * self.step + self.nlo


def nearest(w: np.ndarray, grid: Grid) -> np.ndarray:
    """Round-to-nearest onto ``grid``."""
    return grid.values(grid.codes(w))


def row_errors(delta: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``e_r = d_r H d_r^T`` for each row of ``delta`` ``(..., R, K)`` with ``H`` ``(..., K, K)``: ``(..., R)``."""
    return np.einsum("...rk,...kl,...rl->...r", delta, h, delta)


def output_errors(q: np.ndarray, w: np.ndarray, h: np.ndarray, cross: Optional[np.ndarray] = None,
                  ref: Optional[np.ndarray] = None) -> np.ndarray:
    """Each row's mean squared output error: ``(q - w) H (q - w)^T``, or with ``cross`` (``E[x_f x^T]``) and ``ref``
    (``E[x_f x_f^T]``) ``w H_f w^T - 2 w C q^T + q H q^T`` (see the module docstring)."""
    if cross is None:
        return row_errors(q - w, h)
    return (np.einsum("...rk,...kl,...rl->...r", w, ref, w) - 2 * np.einsum("...rk,...kl,...rl->...r", w, cross, q)
            + np.einsum("...rk,...kl,...rl->...r", q, h, q))


def _damped(h: np.ndarray, damping: float) -> np.ndarray:
    """``H`` with dead inputs (``H_jj <= 0``) given a unit diagonal, then ``damping * mean(diag H)`` added to the
    diagonal (batched over leading axes)."""
    h = np.array(h, np.float64, copy=True)
    idx = np.arange(h.shape[-1])
    diag = h[..., idx, idx]
    diag = np.where(diag <= 0, 1.0, diag)
    h[..., idx, idx] = diag + damping * diag.mean(axis=-1, keepdims=True)
    return h


def target_rows(w: np.ndarray, h: np.ndarray, cross: np.ndarray, damping: float = 0.01) -> np.ndarray:
    """``t = w + w (C - H) H^-1`` (``H`` damped): the unconstrained best rows for quantized inputs."""
    corr = np.einsum("...rk,...kl->...rl", w, cross - h)
    return w + np.swapaxes(np.linalg.solve(_damped(h, damping), np.swapaxes(corr, -1, -2)), -1, -2)


def _upper_inverse_factor(h: np.ndarray, damping: float) -> np.ndarray:
    """The upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (``U^T U``) for :func:`_damped` ``H``, batched over
    leading axes."""
    for scale in (1.0, 10.0, 100.0, 1000.0):  # more damping when H is too ill-conditioned to factor
        try:
            inv = np.linalg.inv(_damped(h, scale * damping))
            inv = 0.5 * (inv + np.swapaxes(inv, -1, -2))
            return np.swapaxes(np.linalg.cholesky(inv), -1, -2)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the input second-moment matrix could not be factored even with heavy damping")


def gptq_round(w: np.ndarray, h: np.ndarray, grid: Grid, damping: float = 0.01, block: int = 128,
               order: bool = True) -> np.ndarray:
    """GPTQ rounding of ``w`` ``(..., R, K)`` onto ``grid`` for the objective ``sum_r d_r H d_r^T`` with ``h``
    ``(..., K, K)`` (see the module docstring). Returns grid values of ``w``'s shape (float64).

    ``order``: take the columns in order of decreasing ``H_jj`` (only without leading batch axes, where one order
    serves every row).
    """
    w = np.asarray(w, np.float64)
    h = np.asarray(h, np.float64)
    k = w.shape[-1]
    perm = None
    if order and w.ndim == 2:
        perm = np.argsort(-np.diag(h), kind="stable")
        w = w[:, perm]
        h = h[np.ix_(perm, perm)]  # (per-row grids do not depend on the column order)
    u = _upper_inverse_factor(h, damping)
    work = w.copy()
    q = np.empty_like(work)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = work[..., i1:i2].copy()
        err1 = np.empty_like(w1)
        u1 = u[..., i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[..., i]
            qc = grid.values(grid.codes(col[..., None]))[..., 0]
            q[..., i1 + i] = qc
            d = u1[..., i, i][..., None]  # (..., 1): the pivot, shared by every row of a batch entry
            e = (col - qc) / d
            w1[..., i:] -= e[..., None] * u1[..., i, None, i:]
            err1[..., i] = e
        if i2 < k:
            work[..., i2:] -= err1 @ u[..., i1:i2, i2:]
    if perm is not None:
        out = np.empty_like(q)
        out[:, perm] = q
        return out
    return q


def refine(w: np.ndarray, q: np.ndarray, h: np.ndarray, grid: Grid, sweeps: int = 2) -> np.ndarray:
    """Coordinate descent on ``sum_r d_r H d_r^T`` from the grid values ``q``: each column in turn, each row's weight
    moves one step up or down when that lowers its error (see the module docstring). Returns new grid values."""
    codes = grid.codes(np.asarray(q, np.float64))
    w = np.asarray(w, np.float64)
    step = np.broadcast_to(grid.step, w.shape[:-1] + (1,))[..., 0]
    g = (grid.values(codes) - w) @ h  # (..., R, K): (d_r H)_j, kept up to date as weights move
    hjj = np.einsum("...jj->...j", h)
    for _ in range(sweeps):
        moved = False
        for j in range(w.shape[-1]):
            hj = hjj[..., j][..., None]  # (..., 1)
            up = np.where(codes[..., j] < grid.n, 2 * step * g[..., j] + step ** 2 * hj, np.inf)
            down = np.where(codes[..., j] > 0, -2 * step * g[..., j] + step ** 2 * hj, np.inf)
            go_up, go_down = (up < down) & (up < 0), (down <= up) & (down < 0)
            delta = np.where(go_up, step, 0.0) - np.where(go_down, step, 0.0)
            if not np.any(delta):
                continue
            moved = True
            codes[..., j] += np.sign(delta)
            g += delta[..., None] * h[..., j, None, :]
        if not moved:
            break
    return grid.values(codes)


def round_rows(w: np.ndarray, h: np.ndarray, grid: Grid, damping: float = 0.01, sweeps: int = 2,
               cross: Optional[np.ndarray] = None, ref: Optional[np.ndarray] = None):
    """GPTQ rounding of ``w`` ``(..., R, K)`` (of its target :func:`target_rows` when ``cross`` and ``ref`` are
    given), then ``sweeps`` of :func:`refine`, each row keeping nearest rounding of ``w`` unless that lowers its
    :func:`output_errors`.

    Returns ``(q, nearest_errors, chosen_errors, learned_rows)``: the chosen grid values, each row's error with
    nearest rounding and with the chosen rounding, and a boolean mask of the rows that kept the learned rounding.
    """
    w = np.asarray(w, np.float64)
    near = nearest(w, grid)
    e_near = output_errors(near, w, h, cross, ref)
    try:
        t = w if cross is None else target_rows(w, h, cross, damping)
        learned = gptq_round(t, h, grid, damping)
    except np.linalg.LinAlgError:
        return near, e_near, e_near, np.zeros(e_near.shape, bool)
    e_learned = output_errors(learned, w, h, cross, ref)
    q = np.where((e_learned < e_near)[..., None], learned, near)
    if sweeps:
        q = refine(t, q, h, grid, sweeps)
    e = output_errors(q, w, h, cross, ref)
    better = e < e_near
    q = np.where(better[..., None], q, near)  # (refine never raises the error; this guards float round-off)
    return q, e_near, np.where(better, e, e_near), better
