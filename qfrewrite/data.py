"""Calibration data as a :class:`CalibrationSet` of NHWC float32 batches.

:func:`qfrewrite.calibration.as_calibration_set` turns anything a user passes as ``data=`` into one. Accepted:

* an image folder (a path, or a :class:`qfrewrite.images.ImageFolder` for options), read by :mod:`qfrewrite.images`
  with the chosen preprocessing preset;
* a numpy array in the source model's own input layout (``graph.meta["input_layout"]``: NCHW for ONNX models, NHWC
  otherwise), cut into batches of ``batch_size``;
* an iterable of such batches;
* an existing :class:`CalibrationSet`.

``limit`` keeps the first ``limit`` images. Every form is checked against the model input (rank, channels, size) and
for NaN/Inf, with a :class:`DataError` naming the data and the expected shape.
"""
from __future__ import annotations

import logging
from typing import Iterator, List, Optional, Sequence

import numpy as np

from .errors import DataError

__all__ = ["CalibrationSet", "to_nhwc", "positive_limit", "holdout_indices"]

log = logging.getLogger(__name__)


def to_nhwc(x: np.ndarray, layout: str) -> np.ndarray:
    """Convert a batch from ``layout`` ("NCHW"/"NHWC") to NHWC."""
    x = np.asarray(x)
    if x.ndim == 4 and layout == "NCHW":
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return x


class CalibrationSet:
    """A re-iterable sequence of NHWC float32 batches for a single-input model.

    Subclasses (image sets) may produce batches lazily by overriding :meth:`batches`, ``__len__``,
    :attr:`num_batches` and :meth:`drift_batch`.
    """

    def __init__(self, batches: Sequence[np.ndarray], name: str = "data", limit: Optional[int] = None):
        self._batches = [np.asarray(b, np.float32) for b in batches]
        self.name = name
        if limit is not None:
            self._batches = _truncate(self._batches, limit)
        if not self._batches or sum(len(b) for b in self._batches) == 0:
            raise DataError(f"calibration data {name!r} is empty")
        for b in self._batches:
            if b.ndim == 0:
                raise DataError(f"calibration data {name!r} holds a scalar where a batch (N, ...) is expected")
            if not np.all(np.isfinite(b)):
                raise DataError(f"calibration data {name!r} holds NaN or Inf values")

    def batches(self) -> Iterator[np.ndarray]:
        return iter(self._batches)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.batches()

    def __len__(self) -> int:
        return sum(len(b) for b in self._batches)

    @property
    def num_batches(self) -> int:
        return len(self._batches)

    def drift_batch(self, max_items: int = 16) -> List[np.ndarray]:
        """The inputs (a list with one array) used to measure a pass's output drift."""
        return [self._batches[0][:max_items]]

    def subset(self, index) -> "CalibrationSet":
        """The items at ``index`` (a slice or integer array) as a new set, in batches of the first batch's size."""
        x = np.concatenate(self._batches)
        idx = np.arange(len(x))[index]
        size = max(1, len(self._batches[0]))
        return CalibrationSet([x[idx[s:s + size]] for s in range(0, len(idx), size)], name=self.name)

    def check_fits(self, graph) -> None:
        """Raise :class:`DataError` when the batches do not fit the graph's input shape."""
        want = graph.inputs[0].shape
        first = next(iter(self.batches()))
        shapes = {tuple(b.shape[1:]) for b in self._batches} if type(self) is CalibrationSet else set()
        if len(shapes) > 1:
            raise DataError(f"calibration data {self.name!r} has batches of different shapes {sorted(shapes)}")
        b = first
        if b.ndim != len(want) or any(w is not None and w != s for w, s in zip(want[1:], b.shape[1:])):
            layout = graph.meta.get("input_layout", "NHWC")
            hint = ""
            if b.ndim == 4 and len(want) == 4 and tuple(b.shape[1:]) != tuple(want[1:]):
                hint = (f"; arrays are read in the source model's own layout ({layout}"
                        + (", i.e. (N, C, H, W)" if layout == "NCHW" else ", i.e. (N, H, W, C)") + ")")
            raise DataError(
                f"calibration data {self.name!r} has batches of shape {b.shape} (after conversion to NHWC from "
                f"{layout}); the model input {graph.inputs[0].name!r} expects {tuple(want)} in NHWC{hint}")


def _truncate(batches: List[np.ndarray], limit: int) -> List[np.ndarray]:
    out, left = [], positive_limit(limit)
    for b in batches:
        if left <= 0:
            break
        out.append(b[:left])
        left -= len(out[-1])
    return out


def positive_limit(limit) -> int:
    """``limit`` as a positive int, or a :class:`DataError`."""
    if int(limit) < 1:
        raise DataError(f"data limit must be a positive number of images, got {limit}")
    return int(limit)


def holdout_indices(n: int, holdout: int):
    """Indices ``(kept, held_back)`` of ``n`` items with ``holdout`` evenly spaced items held back (at most
    ``n - 1``)."""
    holdout = int(max(0, min(holdout, n - 1)))
    if holdout == 0:
        return np.arange(n), np.arange(0)
    held = np.unique(np.linspace(0, n - 1, holdout).round().astype(int))
    mask = np.ones(n, bool)
    mask[held] = False
    return np.flatnonzero(mask), held
