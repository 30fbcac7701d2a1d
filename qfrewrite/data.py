"""Calibration data: anything a user passes as ``data=`` becomes a :class:`CalibrationSet` of NHWC float32 batches.

Accepted: a numpy array in the source model's own input layout (NCHW for ONNX models, NHWC otherwise), an iterable of
such batches, or an existing :class:`CalibrationSet`. (Image folders are read by :mod:`qfrewrite.images`.)
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np

from .errors import DataError

__all__ = ["CalibrationSet", "as_calibration_set", "to_nhwc"]

log = logging.getLogger(__name__)


def to_nhwc(x: np.ndarray, layout: str) -> np.ndarray:
    """Convert a batch from ``layout`` ("NCHW"/"NHWC") to NHWC."""
    x = np.asarray(x)
    if x.ndim == 4 and layout == "NCHW":
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return x


class CalibrationSet:
    """A re-iterable sequence of NHWC float32 batches for a single-input model."""

    def __init__(self, batches: Sequence[np.ndarray], name: str = "data"):
        self._batches = [np.asarray(b, np.float32) for b in batches]
        self.name = name
        if not self._batches or sum(len(b) for b in self._batches) == 0:
            raise DataError(f"calibration data {name!r} is empty")
        for b in self._batches:
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

    def check_fits(self, graph) -> None:
        """Raise :class:`DataError` when the batches do not fit the graph's input shape."""
        want = graph.inputs[0].shape
        for b in self._batches[:1]:
            if b.ndim != len(want) or any(w is not None and w != s for w, s in zip(want[1:], b.shape[1:])):
                layout = graph.meta.get("input_layout", "NHWC")
                raise DataError(
                    f"calibration data {self.name!r} has batches of shape {b.shape} (after conversion to NHWC from "
                    f"{layout}); the model input {graph.inputs[0].name!r} expects {tuple(want)} in NHWC")


def as_calibration_set(data, graph, batch_size: int = 32, preprocess=None) -> Optional[CalibrationSet]:
    """Turn ``data`` into a :class:`CalibrationSet` that fits ``graph`` (``None`` stays ``None``)."""
    if data is None:
        return None
    if isinstance(data, CalibrationSet):
        data.check_fits(graph)
        return data
    layout = graph.meta.get("input_layout", "NHWC")
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        from .images import load_image_folder

        cs = load_image_folder(data, graph, preprocess=preprocess, batch_size=batch_size)
        cs.check_fits(graph)
        return cs
    if isinstance(data, np.ndarray):
        x = to_nhwc(data.astype(np.float32, copy=False), layout)
        cs = CalibrationSet([x[i:i + batch_size] for i in range(0, len(x), batch_size)], name="array")
    else:
        try:
            batches = [to_nhwc(np.asarray(b, np.float32), layout) for b in data]
        except TypeError:
            raise DataError(f"unsupported calibration data of type {type(data).__name__}: give an image folder, "
                            "a numpy array or an iterable of numpy batches") from None
        cs = CalibrationSet(batches, name="batches")
    cs.check_fits(graph)
    return cs
