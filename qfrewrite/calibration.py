"""Anything a user passes as ``data=`` (an image folder, an array, batches) as a :class:`~qfrewrite.data.CalibrationSet`
that fits the model (see :mod:`qfrewrite.data` for what is accepted and checked)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .data import CalibrationSet, positive_limit, to_nhwc
from .errors import DataError
from .images import ImageFolder, load_image_folder

__all__ = ["as_calibration_set"]


def as_calibration_set(data, graph, batch_size: int = 32, preprocess=None,
                       limit: Optional[int] = None) -> Optional[CalibrationSet]:
    """Turn ``data`` into a :class:`CalibrationSet` that fits ``graph`` (``None`` stays ``None``)."""
    if data is None:
        return None
    if isinstance(data, CalibrationSet):
        data.check_fits(graph)
        return data
    layout = graph.meta.get("input_layout", "NHWC")
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__") or isinstance(data, ImageFolder):
        if isinstance(data, bytes):
            data = data.decode()
        cs = load_image_folder(data, graph, preprocess=preprocess, batch_size=batch_size, limit=limit)
        cs.check_fits(graph)
        return cs
    if isinstance(data, np.ndarray):
        if not np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_:
            raise DataError(f"calibration array has dtype {data.dtype}; give numbers (float or integer pixels)")
        if data.ndim == 0:
            raise DataError("calibration data is a scalar; give an array of images (N, ...)")
        if limit is not None:
            data = data[:positive_limit(limit)]
        x = to_nhwc(data.astype(np.float32, copy=False), layout)
        cs = CalibrationSet([x[i:i + batch_size] for i in range(0, len(x), batch_size)], name="array")
    else:
        try:
            batches = []
            for b in data:
                batches.append(to_nhwc(np.asarray(b, np.float32), layout))
                if limit is not None and sum(len(x) for x in batches) >= positive_limit(limit):
                    break
        except (TypeError, ValueError) as exc:
            raise DataError(f"unsupported calibration data of type {type(data).__name__} ({exc}): give an image "
                            "folder, a numpy array or an iterable of numpy batches") from None
        cs = CalibrationSet(batches, name="batches", limit=limit)
    cs.check_fits(graph)
    return cs
