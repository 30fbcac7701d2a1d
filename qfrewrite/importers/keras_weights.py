"""Weights of Keras layers by name, from a live model object or from an HDF5 weights group.

A layer is addressed by its path of names from the top model: ``("conv1",)`` or, inside a nested model,
``("mobilenet_1.00_224", "conv1")``. Each source returns ``{attribute: array}`` where the attribute is the last part
of the variable's name without the ``:0`` suffix (``kernel``, ``depthwise_kernel``, ``bias``, ``gamma``,
``moving_mean`` ...). Arrays are float32 copies: the caller's model and file are never written.

HDF5 (``model_weights`` of a full-model file, Keras 2 or Keras 3 legacy format): the group of a top-level layer
lists ``weight_names`` such as ``conv1/kernel:0`` (Keras 2) or ``seq/c1/kernel`` (Keras 3), and the array sits at
``group[weight_name]``. A nested model's group holds the variables of all its layers; a layer's are those whose
second-to-last name part is the layer's name (and, where that is ambiguous, whose name also contains the enclosing
model names).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..errors import ModelLoadError

__all__ = ["ObjectWeights", "H5Weights"]


def _split(name: str) -> Tuple[str, ...]:
    name = name.decode("utf8") if isinstance(name, bytes) else str(name)
    parts = name.split("/")
    parts[-1] = parts[-1].split(":")[0]
    return tuple(parts)


class ObjectWeights:
    """Weights read from a built Keras model object (Keras 3 or tf_keras)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, path: Sequence[str]) -> Dict[str, np.ndarray]:
        obj = self.model
        for name in path:
            try:
                obj = obj.get_layer(name)
            except Exception as exc:  # Keras raises ValueError with its own wording
                raise ModelLoadError(f"model {self.model.name!r}: no layer {'/'.join(path)!r} to read weights from "
                                     f"({exc})") from None
        out: Dict[str, np.ndarray] = {}
        for v in obj.weights:
            attr = _split(getattr(v, "path", None) or v.name)[-1]
            if attr in out:
                raise ModelLoadError(f"layer {'/'.join(path)!r} has two weights named {attr!r}")
            out[attr] = np.array(np.asarray(v.numpy() if hasattr(v, "numpy") else v), dtype=np.float32, copy=True)
        return out


class H5Weights:
    """Weights read from the ``model_weights`` group of a Keras full-model HDF5 file."""

    def __init__(self, group, source: str):
        self.group = group
        self.source = source

    def _names(self, layer: str) -> List[str]:
        try:
            if layer not in self.group:
                return []
            names = self.group[layer].attrs.get("weight_names", [])
        except Exception as exc:  # h5py raises OSError/KeyError on damaged groups
            raise ModelLoadError(f"{self.source}: cannot read the weights of layer {layer!r} ({exc})") from None
        return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names]

    def _read(self, layer: str, wname: str) -> np.ndarray:
        try:
            return np.array(self.group[layer][wname], dtype=np.float32)
        except Exception as exc:  # h5py raises KeyError/OSError on missing or damaged datasets
            raise ModelLoadError(f"{self.source}: cannot read weight {wname!r} of layer {layer!r} ({exc})") from None

    def __call__(self, path: Sequence[str]) -> Dict[str, np.ndarray]:
        top = path[0]
        names = self._names(top)
        out: Dict[str, np.ndarray] = {}
        if len(path) == 1:
            for n in names:
                out[_split(n)[-1]] = self._read(top, n)
            return out
        layer, enclosing = path[-1], path[1:-1]
        by_attr: Dict[str, List[str]] = {}
        for n in names:
            parts = _split(n)
            if len(parts) >= 2 and parts[-2] == layer:
                by_attr.setdefault(parts[-1], []).append(n)
        for attr, cands in by_attr.items():
            if len(cands) > 1:
                cands = [c for c in cands if all(e in _split(c)[:-2] for e in enclosing)] or cands
            if len(cands) > 1:
                raise ModelLoadError(f"{self.source}: weight {attr!r} of layer {'/'.join(path)!r} is ambiguous "
                                     f"({', '.join(cands)})")
            out[attr] = self._read(top, cands[0])
        return out
