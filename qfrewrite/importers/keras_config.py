"""Read a Keras model config (Keras 2 or Keras 3 spelling) into a small, format-free description.

A functional model config lists layers, each with the calls ("inbound nodes") that feed it; a call names its input
tensors as ``(layer, node_index, tensor_index)``. The two Keras generations spell this differently:

* Keras 2 (``tf.keras`` 2.x, ``.h5`` files it wrote): ``inbound_nodes = [[["conv1", 0, 0, {kwargs}], ...], ...]``
  (one list per call; constant operands of ``TFOpLambda`` layers appear as ``["_CONSTANT_VALUE", -1, value, {}]`` or
  in the kwargs); input shapes as ``batch_input_shape``.
* Keras 3: ``inbound_nodes = [{"args": [...], "kwargs": {...}}, ...]`` where tensors are
  ``{"class_name": "__keras_tensor__", "config": {"keras_history": [layer, node, tensor]}}`` anywhere inside the
  args (an ``Add`` layer gets one list of tensors, an ``ops.add`` node gets a tensor and a number); input shapes as
  ``batch_shape``; keras ops used on tensors (``x + 3.0``) are entries whose ``module`` is ``keras.src.ops.*``.

A ``Sequential`` model (either spelling) becomes the same description with a chain of calls. Nested models
(``Functional``/``Model``/``Sequential`` entries holding ``layers``) are parsed recursively into :class:`ModelSpec`.
Nothing here touches weights or builds graph nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ModelLoadError

__all__ = ["Ref", "Call", "LayerSpec", "ModelSpec", "parse_model_config", "MODEL_CLASSES"]

#: class names of configs that hold a whole (possibly nested) model
MODEL_CLASSES = frozenset({"Functional", "Model", "Sequential"})


@dataclass(frozen=True)
class Ref:
    """One tensor of the model: output ``tensor`` of call ``node`` of layer ``layer``."""

    layer: str
    node: int = 0
    tensor: int = 0


@dataclass
class Call:
    """One call of a layer. ``args`` keeps the positional structure (a :class:`Ref`, a list of them, or a constant)."""

    args: List[Any]
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def refs(self) -> List[Ref]:
        """Every input tensor of the call, in order (positional first, then keyword)."""
        out: List[Ref] = []
        _collect_refs(self.args, out)
        _collect_refs(list(self.kwargs.values()), out)
        return out


@dataclass
class LayerSpec:
    name: str
    class_name: str
    config: Dict[str, Any]
    calls: List[Call]
    module: str = ""
    #: a nested model's own description
    model: Optional["ModelSpec"] = None

    @property
    def is_op(self) -> bool:
        """A Keras 3 operation on tensors (``keras.ops``), not a layer."""
        return self.module.startswith("keras.src.ops") or self.module.startswith("keras.ops")


@dataclass
class ModelSpec:
    name: str
    layers: List[LayerSpec]
    inputs: List[Ref]
    outputs: List[Ref]
    #: declared input shapes (batch included) by input layer name, as far as the config tells
    input_shapes: Dict[str, Tuple[Optional[int], ...]]

    def layer(self, name: str) -> LayerSpec:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)


def _collect_refs(obj, out: List[Ref]) -> None:
    if isinstance(obj, Ref):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _collect_refs(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _collect_refs(o, out)


def _history(h) -> Ref:
    return Ref(str(h[0]), int(h[1]) if len(h) > 1 else 0, int(h[2]) if len(h) > 2 else 0)


def _k3_value(obj):
    """Replace Keras 3 tensor markers by :class:`Ref` inside a call's args/kwargs."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            return _history(obj["config"]["keras_history"])
        return {k: _k3_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_k3_value(v) for v in obj]
    return obj


def _is_k2_entry(e) -> bool:
    return isinstance(e, (list, tuple)) and len(e) >= 3 and isinstance(e[0], str)


def _k2_value(obj):
    """Keras 2 kwargs may hold tensors as ``[layer, node, tensor]`` triples."""
    if _is_k2_entry(obj) and isinstance(obj[1], int) and isinstance(obj[2], int) and obj[0] != "_CONSTANT_VALUE":
        return Ref(obj[0], obj[1], obj[2])
    if isinstance(obj, dict):
        return {k: _k2_value(v) for k, v in obj.items()}
    return obj


def _parse_call(node) -> Call:
    if isinstance(node, dict):  # Keras 3
        return Call(args=_k3_value(list(node.get("args", []))), kwargs=_k3_value(dict(node.get("kwargs", {}))))
    if isinstance(node, (list, tuple)):  # Keras 2: a list of [layer, node, tensor, kwargs] entries
        args: List[Any] = []
        kwargs: Dict[str, Any] = {}
        for e in node:
            if not _is_k2_entry(e):
                raise ValueError(f"unreadable inbound node entry {e!r}")
            if e[0] == "_CONSTANT_VALUE":
                args.append(e[2])
            else:
                args.append(Ref(e[0], int(e[1]), int(e[2])))
            if len(e) > 3 and isinstance(e[3], dict):
                kwargs.update({k: _k2_value(v) for k, v in e[3].items()})
        if len(args) > 1 and all(isinstance(a, Ref) for a in args):
            args = [args]  # a merge layer (Add, Concatenate ...) takes one list of tensors
        return Call(args=args, kwargs=kwargs)
    raise ValueError(f"unreadable inbound node {node!r}")


def _refs(lst, what: str) -> List[Ref]:
    if not lst:
        return []
    if isinstance(lst[0], str):  # Keras 3 writes a single tensor unwrapped
        lst = [lst]
    out = []
    for e in lst:
        if isinstance(e, dict) and e.get("class_name") == "__keras_tensor__":
            out.append(_history(e["config"]["keras_history"]))
        elif isinstance(e, (list, tuple)) and e and isinstance(e[0], str):
            out.append(_history(e))
        else:
            raise ValueError(f"unreadable {what} entry {e!r}")
    return out


def _batch_shape(cfg: Dict[str, Any]) -> Optional[Tuple[Optional[int], ...]]:
    for key in ("batch_shape", "batch_input_shape"):
        if cfg.get(key) is not None:
            return tuple(None if d is None else int(d) for d in cfg[key])
    return None


def _layer_name(entry: Dict[str, Any]) -> str:
    name = entry.get("name") or entry.get("config", {}).get("name")
    if not name:
        raise ValueError(f"a {entry.get('class_name', '?')} layer has no name")
    return str(name)


def _nested(entry: Dict[str, Any]) -> Optional["ModelSpec"]:
    if entry.get("class_name") in MODEL_CLASSES and isinstance(entry.get("config"), dict) \
            and "layers" in entry["config"]:
        return parse_model_config(entry)
    return None


def _parse_functional(name: str, cfg: Dict[str, Any]) -> ModelSpec:
    layers: List[LayerSpec] = []
    shapes: Dict[str, Tuple[Optional[int], ...]] = {}
    for entry in cfg["layers"]:
        lname = _layer_name(entry)
        lcfg = entry.get("config", {}) or {}
        calls = [_parse_call(n) for n in entry.get("inbound_nodes", []) or []]
        if entry["class_name"] == "InputLayer":
            shape = _batch_shape(lcfg)
            if shape is not None:
                shapes[lname] = shape
        layers.append(LayerSpec(lname, entry["class_name"], lcfg, calls, str(entry.get("module") or ""),
                                _nested(entry)))
    return ModelSpec(name, layers, _refs(cfg.get("input_layers", []), "input_layers"),
                     _refs(cfg.get("output_layers", []), "output_layers"), shapes)


def _parse_sequential(name: str, cfg: Dict[str, Any]) -> ModelSpec:
    entries = list(cfg["layers"])
    in_name = f"{name}_input"
    shape = None
    if entries and entries[0].get("class_name") == "InputLayer":
        first = entries.pop(0)
        in_name = _layer_name(first)
        shape = _batch_shape(first.get("config", {}) or {})
    if shape is None and entries:
        shape = _batch_shape(entries[0].get("config", {}) or {})
    if shape is None and entries and _nested(entries[0]) is not None:  # a backbone model as the first layer
        inner = _nested(entries[0])
        shape = inner.input_shapes.get(inner.inputs[0].layer) if inner.inputs else None
    if shape is None and cfg.get("build_input_shape") is not None:
        shape = tuple(None if d is None else int(d) for d in cfg["build_input_shape"])
    layers = [LayerSpec(in_name, "InputLayer", {"batch_shape": list(shape) if shape else None}, [])]
    prev = Ref(in_name)
    for entry in entries:
        lname = _layer_name(entry)
        layers.append(LayerSpec(lname, entry["class_name"], entry.get("config", {}) or {}, [Call(args=[prev])],
                                str(entry.get("module") or ""), _nested(entry)))
        prev = Ref(lname)
    return ModelSpec(name, layers, [Ref(in_name)], [prev], {in_name: shape} if shape else {})


def parse_model_config(model_config: Dict[str, Any]) -> ModelSpec:
    """Parse ``{"class_name": ..., "config": {...}}`` of a functional or sequential model (either Keras spelling).

    Raises :class:`ModelLoadError` for other model classes (subclassed models have no usable config) and
    ``ValueError``/``KeyError`` for malformed configs (the caller names the file).
    """
    cls = model_config.get("class_name")
    cfg = model_config.get("config")
    if not isinstance(cfg, dict) or "layers" not in cfg:
        name = cfg.get("name") if isinstance(cfg, dict) else None
        raise ModelLoadError(f"model {name or '?'!r} of class {cls!r} has no layer list in its config: only "
                             "functional and sequential Keras models can be imported (a subclassed model has no "
                             "graph to read)")
    name = str(cfg.get("name") or model_config.get("name") or "model")
    if cls == "Sequential" or ("input_layers" not in cfg and "output_layers" not in cfg):
        return _parse_sequential(name, cfg)
    return _parse_functional(name, cfg)
