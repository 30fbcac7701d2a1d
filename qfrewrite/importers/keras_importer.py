"""Keras importer: functional and sequential Keras models (objects, ``.keras``, ``.h5``) -> IR graph.

Sources:

* a model object (Keras 3, which is ``tf.keras`` in TF >= 2.16, or ``tf_keras``): its ``get_config()`` gives the
  layer graph, its layers give the weights;
* a ``.keras`` file (Keras 3's own zip format): loaded by Keras 3, then read as an object;
* an ``.h5``/``.hdf5`` full-model file, written by Keras 2 or Keras 3: read directly with h5py, the layer graph from
  the file's ``model_config`` JSON and the weights from its ``model_weights`` group. Keras 3 itself refuses many
  Keras 2 files (for instance ``DepthwiseConv2D`` configs carrying ``groups``), so the file is not handed to Keras.

The layer graph (:mod:`.keras_config`) is walked call by call; each layer becomes IR nodes (:mod:`.keras_layers`),
named after the layer. Layers of a nested model (a pretrained backbone inside a model with a new head, Functional or
Sequential) are flattened into the one graph, their node names prefixed with the nested model's name
(``"mobilenet_1.00_224/conv1"``); ``node.meta`` records ``source_name`` (the layer's own name), ``source_class`` and,
for nested layers, ``source_model``. Hard-sigmoid / hard-swish written as elementary ops are then recognised
(:mod:`.activation_patterns`).

``graph.meta``: ``source`` (the path, or the model's name), ``format`` = ``"keras"``, ``input_layout`` = ``"NHWC"``,
``output_names`` (layer names), ``keras_version`` (of the file, when it says), ``activations_recognised``.

Nothing here writes to the caller's file or model object.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ModelLoadError, UnsupportedOpError, VerificationError, one_line
from ..ir import Graph, Value, verify
from .activation_patterns import fuse_hard_activations
from .keras_config import MODEL_CLASSES, LayerSpec, ModelSpec, Ref, parse_model_config
from .keras_layers import LayerCall, convert_layer
from .keras_weights import H5Weights, ObjectWeights

__all__ = ["load_keras"]

log = logging.getLogger(__name__)

Shape = Tuple[Optional[int], ...]


def _decode(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf8")
    if isinstance(v, np.ndarray):
        return _decode(v.item())
    return str(v)


def _major(version: str, default: int) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return default


class _Builder:
    """Walks a :class:`ModelSpec` and adds its layers' nodes to one graph."""

    def __init__(self, graph: Graph, weights, keras_major: int, source: str):
        self.graph = graph
        self.weights = weights
        self.keras_major = keras_major
        self.source = source
        #: full layer name -> the value of its first call's output (what ``outputs=`` can pick)
        self.layer_values: Dict[str, Value] = {}

    def _resolve(self, obj, env: Dict[Ref, Value]):
        if isinstance(obj, Ref):
            return env[obj]
        if isinstance(obj, list):
            return [self._resolve(o, env) for o in obj]
        if isinstance(obj, dict):
            return {k: self._resolve(v, env) for k, v in obj.items()}
        return obj

    def build(self, spec: ModelSpec, prefix: Tuple[str, ...], bound: Optional[List[Value]],
              input_shapes: Optional[List[Shape]] = None) -> List[Value]:
        env: Dict[Ref, Value] = {}
        if bound is not None and len(bound) != len(spec.inputs):
            raise ModelLoadError(f"{self.source}: nested model {'/'.join(prefix)!r} takes {len(spec.inputs)} inputs, "
                                 f"called with {len(bound)}")
        for i, ref in enumerate(spec.inputs):
            if bound is not None:
                env[ref] = bound[i]
            else:
                env[ref] = self.graph.add_input(ref.layer, input_shapes[i])
            self.layer_values.setdefault("/".join(prefix + (ref.layer,)), env[ref])
        pending = [(layer, k) for layer in spec.layers if layer.class_name != "InputLayer"
                   for k in range(len(layer.calls))]
        while pending:
            rest = []
            for layer, k in pending:
                if all(r in env for r in layer.calls[k].refs()):
                    self._call(layer, k, prefix, env)
                else:
                    rest.append((layer, k))
            if len(rest) == len(pending):
                missing = sorted({r.layer for l, k in rest for r in l.calls[k].refs() if r not in env})
                raise ModelLoadError(f"{self.source}: layers {', '.join(l.name for l, _ in rest[:5])} read tensors "
                                     f"that no layer produces (from {', '.join(missing[:5])})")
            pending = rest
        try:
            return [env[r] for r in spec.outputs]
        except KeyError as exc:
            raise ModelLoadError(f"{self.source}: model {spec.name!r} names output {exc.args[0]} that no layer "
                                 "produces") from None

    def _call(self, layer: LayerSpec, k: int, prefix: Tuple[str, ...], env: Dict[Ref, Value]) -> None:
        call = layer.calls[k]
        full = "/".join(prefix + (layer.name,))
        inputs = [env[r] for r in call.refs()]
        if layer.class_name in MODEL_CLASSES and layer.model is not None:
            outs = self.build(layer.model, prefix + (layer.name,), inputs)
        else:
            meta: Dict[str, Any] = {"source_name": layer.name, "source_class": layer.class_name}
            if prefix:
                meta["source_model"] = "/".join(prefix)
            path = prefix + (layer.name,)
            c = LayerCall(graph=self.graph, layer=layer, name=full, inputs=inputs,
                          args=self._resolve(call.args, env), kwargs=self._resolve(call.kwargs, env),
                          weights_fn=lambda: self.weights(path), keras_major=self.keras_major, source=self.source,
                          meta=meta)
            try:
                outs = [convert_layer(c)]
            except VerificationError as exc:
                raise ModelLoadError(f"{self.source}: layer {full!r} ({layer.class_name}): {exc}") from None
            except (ValueError, IndexError, TypeError, KeyError) as exc:  # weights that do not fit the layer
                log.debug("converting layer %s failed", full, exc_info=True)
                raise ModelLoadError(f"{self.source}: layer {full!r} ({layer.class_name}) cannot be imported: "
                                     f"{one_line(exc)}") from None
        for i, v in enumerate(outs):
            env[Ref(layer.name, k, i)] = v
        if k == 0:
            self.layer_values.setdefault(full, outs[0])


def _merge_shape(declared: Optional[Shape], given: Optional[Sequence[Optional[int]]], name: str, source: str) -> Shape:
    if given is not None:
        given = tuple(None if d is None else int(d) for d in given)
        if declared is not None and len(given) == len(declared) - 1:
            given = (None,) + given
        if declared is None:
            declared = given if len(given) == 4 else (None,) + given
        if len(given) != len(declared):
            raise ModelLoadError(f"{source}: input_shape {given} does not fit input {name!r} of shape {declared}")
        merged = []
        for d, g in zip(declared, given):
            if d is not None and g is not None and d != g:
                raise ModelLoadError(f"{source}: input_shape {given} conflicts with input {name!r} of shape "
                                     f"{declared}")
            merged.append(d if d is not None else g)
        declared = tuple(merged)
    if declared is None:
        raise ModelLoadError(f"{source}: the shape of input {name!r} is unknown (an unbuilt Sequential model?); "
                             "pass input_shape=(H, W, C)")
    return (None,) + tuple(declared[1:])  # any batch size


def _input_shapes(spec: ModelSpec, input_shape, source: str) -> List[Shape]:
    names = [r.layer for r in spec.inputs]
    givens: List[Optional[Sequence]] = [None] * len(names)
    if input_shape is not None:
        if len(names) == 1:
            givens = [input_shape]
        elif len(input_shape) == len(names) and all(isinstance(s, (list, tuple)) for s in input_shape):
            givens = list(input_shape)
        else:
            raise ModelLoadError(f"{source}: the model has {len(names)} inputs; give input_shape as one shape each")
    return [_merge_shape(spec.input_shapes.get(n), g, n, source) for n, g in zip(names, givens)]


def _pick_outputs(builder: _Builder, names: Sequence[str], source: str) -> List[Value]:
    out = []
    for name in names:
        if name in builder.layer_values:
            out.append(builder.layer_values[name])
            continue
        hits = [k for k in builder.layer_values if k.split("/")[-1] == name]
        if len(hits) == 1:
            out.append(builder.layer_values[hits[0]])
            continue
        if hits:
            raise ModelLoadError(f"{source}: output layer {name!r} is ambiguous: {', '.join(hits)}")
        close = difflib.get_close_matches(name, list(builder.layer_values), n=5)
        raise ModelLoadError(f"{source}: no layer named {name!r} to use as output"
                             + (f" (close: {', '.join(close)})" if close else ""))
    return out


def _build_graph(spec: ModelSpec, weights, keras_major: int, source: str, input_shape, outputs) -> Graph:
    graph = Graph(spec.name)
    builder = _Builder(graph, weights, keras_major, source)
    try:
        outs = builder.build(spec, (), None, _input_shapes(spec, input_shape, source))
    except (ModelLoadError, UnsupportedOpError):
        raise
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise ModelLoadError(f"{source}: malformed model config ({type(exc).__name__}: {exc})") from None
    if outputs is not None:
        names = [outputs] if isinstance(outputs, str) else list(outputs)
        outs = _pick_outputs(builder, names, source)
        out_names = names
    else:
        out_names = [r.layer for r in spec.outputs]
    graph.outputs = list(outs)
    graph.remove_unused()
    counts = fuse_hard_activations(graph)
    try:
        verify(graph)
    except VerificationError as exc:
        raise ModelLoadError(f"{source}: the imported graph is inconsistent: {exc}") from None
    graph.meta.update({"source": source, "format": "keras", "input_layout": "NHWC", "output_names": out_names,
                       "activations_recognised": counts})
    log.info("imported %s: %d nodes %s", source, len(graph), graph.op_counts())
    return graph


# -- sources -------------------------------------------------------------------------------------------------------
def _from_object(model, input_shape, outputs, source: Optional[str] = None) -> Graph:
    source = source or str(getattr(model, "name", type(model).__name__))
    try:
        cfg = model.get_config()
    except Exception as exc:  # subclassed models raise NotImplementedError, others their own errors
        raise ModelLoadError(f"model {source!r} ({type(model).__name__}) has no readable config ({exc}): only "
                             "functional and sequential Keras models can be imported") from None
    if not isinstance(cfg, dict) or "layers" not in cfg:
        raise ModelLoadError(f"model {source!r} ({type(model).__name__}) has no layer graph in its config (a "
                             "subclassed model?): only functional and sequential Keras models can be imported")
    spec = parse_model_config({"class_name": type(model).__name__, "config": cfg})
    major = 2 if type(model).__module__.startswith("tf_keras") else 3
    graph = _build_graph(spec, ObjectWeights(model), major, source, input_shape, outputs)
    return graph


def _from_keras_file(path: Path, input_shape, outputs) -> Graph:
    import keras

    try:
        model = keras.saving.load_model(str(path), compile=False)
    except Exception as exc:  # Keras raises zipfile/JSON/ValueError/TypeError for damaged or foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: cannot read this .keras file ({type(exc).__name__}: {first})") from None
    return _from_object(model, input_shape, outputs, source=str(path))


def _from_h5(path: Path, input_shape, outputs) -> Graph:
    import h5py

    try:
        f = h5py.File(str(path), "r")
    except Exception as exc:  # OSError for truncated/corrupt files
        raise ModelLoadError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        try:
            if "model_config" not in f.attrs:
                raise ModelLoadError(f"{path}: the file holds no model_config (a weights-only file?); build the "
                                     "model in Keras, load these weights into it and pass the model object")
            config = json.loads(_decode(f.attrs["model_config"]))
            version = _decode(f.attrs.get("keras_version", "")) if "keras_version" in f.attrs else ""
            group = f["model_weights"] if "model_weights" in f else f
            spec = parse_model_config(config)
        except ModelLoadError:
            raise
        except Exception as exc:  # damaged attributes or JSON
            raise ModelLoadError(f"{path}: corrupt Keras HDF5 file ({type(exc).__name__}: {exc})") from None
        graph = _build_graph(spec, H5Weights(group, str(path)), _major(version, 2), str(path), input_shape, outputs)
    if version:
        graph.meta["keras_version"] = version
    return graph


def load_keras(source: Union[str, os.PathLike, Any], input_shape: Optional[Sequence[Optional[int]]] = None,
               outputs: Optional[Sequence[str]] = None) -> Graph:
    """Import a Keras model (object, ``.keras`` or ``.h5``/``.hdf5`` path) into a new IR graph.

    ``input_shape``: NHWC shape (with or without the batch) filling dimensions the model leaves open.
    ``outputs``: layer names whose outputs become the graph outputs (for instance the logits layer before a softmax);
    a nested layer is named ``"model/layer"`` or by its own name when that is unique.

    Raises :class:`ModelLoadError` for missing, corrupt or unreadable files and :class:`UnsupportedOpError` naming
    the first layer the IR cannot represent.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such file")
        if path.suffix.lower() == ".keras":
            return _from_keras_file(path, input_shape, outputs)
        return _from_h5(path, input_shape, outputs)
    if not hasattr(source, "get_config") or not hasattr(source, "layers"):
        raise ModelLoadError(f"cannot import a {type(source).__name__} as a Keras model")
    return _from_object(source, input_shape, outputs)
