"""Small Keras 3 models for importer/emitter tests, and a writer of Keras 2 style full-model ``.h5`` files.

Keras 2 (``tf_keras``) is not a dependency, so :func:`write_keras2_h5` writes what ``tf.keras`` 2.x's
``model.save("x.h5")`` writes for a functional model: the ``model_config`` JSON in Keras 2 spelling
(``batch_input_shape``, ``[[["layer", 0, 0, {}]]]`` inbound nodes, ``groups`` on DepthwiseConv2D, ``TFOpLambda``
for arithmetic on tensors, ``axis: [3]`` on BatchNormalization) and a ``model_weights`` group whose variables are
named ``layer/attr:0`` (``depthwise_kernel`` for DepthwiseConv2D), trainable weights before moving statistics.
"""
from __future__ import annotations

import json

import numpy as np

KERAS2_FUNCTIONS = {"Add": "__operators__.add", "Multiply": "math.multiply", "Subtract": "math.subtract",
                    "TrueDivide": "math.truediv", "Divide": "math.truediv"}


def randomize_bn(model, rng) -> None:
    """Give every BatchNormalization layer (nested ones too) random statistics, so folding really changes weights."""
    import keras

    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            ws = []
            if layer.scale:
                ws.append(rng.uniform(0.5, 1.5, n))
            if layer.center:
                ws.append(rng.normal(0, 0.2, n))
            ws += [rng.normal(0, 0.2, n), rng.uniform(0.5, 2.0, n)]
            layer.set_weights([w.astype(np.float32) for w in ws])


def mobilenet_v3_small(hw: int, seed: int = 3):
    """Keras's MobileNetV3Small (alpha 0.75, logits out, inputs 0..255) at ``hw`` x ``hw`` with random BatchNorm
    statistics (:func:`randomize_bn` with ``seed``)."""
    import keras

    m = keras.applications.MobileNetV3Small(input_shape=(hw, hw, 3), alpha=0.75, weights=None,
                                            classifier_activation=None, include_preprocessing=True)
    randomize_bn(m, np.random.default_rng(seed))
    return m


def zoo_model(hw=16):
    """A functional model touching most supported layer classes (including Keras 3 ops on tensors)."""
    import keras
    from keras import layers as L

    x_in = keras.Input((hw, hw, 3), name="image")
    x = L.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(x_in)
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)
    x = L.ZeroPadding2D(((0, 1), (0, 1)), name="dw_pad")(x)
    x = L.DepthwiseConv2D(3, strides=2, padding="valid", use_bias=False, name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.ReLU(name="dw_relu")(x)
    a = L.SeparableConv2D(8, 3, padding="same", activation="relu", name="sep")(x)
    b = L.Conv2D(8, 1, activation="relu6", name="pw")(x)
    x = L.Add(name="branch_add")([a, b])
    s = L.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    s = L.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = L.Conv2D(8, 1, name="se_expand")(s)
    s = L.ReLU(6.0, name="se_relu6")(s + 3.0) * (1.0 / 6.0)  # MobileNetV3's hard sigmoid
    x = L.Multiply(name="se_mul")([x, s])
    x = L.Activation("hard_swish", name="hswish")(x)
    x = L.Multiply(name="hswish_k2")([x, L.ReLU(6.0, name="hs_relu6")(x + 3.0) * (1.0 / 6.0)])  # Keras 2's spelling
    y = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw2")(x)
    y = L.Activation("sigmoid", name="sig")(y)
    x = L.Concatenate(name="concat")([x, y])
    x = L.AveragePooling2D(2, padding="same", name="avg")(x)
    x = L.MaxPooling2D(1, name="max")(x)
    x = L.Normalization(mean=0.1, variance=2.0, name="norm")(x)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(12, activation="swish", name="fc1")(x)
    x = L.Dropout(0.3, name="drop")(x)
    x = L.Dense(6, name="logits")(x)
    x = L.Reshape((2, 3), name="reshape")(x)
    x = L.Softmax(name="probs")(x)
    return keras.Model(x_in, x, name="zoo")


def mobilenet_block_model(hw=16):
    """A MobileNetV1-like functional model with the layer kinds of the real Keras 2 file (and a TFOpLambda)."""
    import keras
    from keras import layers as L

    x_in = keras.Input((hw, hw, 3), name="input_1")
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv1")(x_in)
    x = L.BatchNormalization(name="conv1_bn")(x)
    x = L.ReLU(6.0, name="conv1_relu")(x)
    x = L.ZeroPadding2D(((0, 1), (0, 1)), name="conv_pad_2")(x)
    x = L.DepthwiseConv2D(3, strides=2, padding="valid", use_bias=False, name="conv_dw_2")(x)
    x = L.BatchNormalization(name="conv_dw_2_bn")(x)
    x = L.ReLU(6.0, name="conv_dw_2_relu")(x)
    x = L.Conv2D(16, 1, use_bias=False, name="conv_pw_2")(x)
    x = L.BatchNormalization(name="conv_pw_2_bn")(x)
    x = L.ReLU(6.0, name="conv_pw_2_relu")(x)
    x = x * 0.5 + 0.25  # two TFOpLambda layers in a Keras 2 file
    x = L.GlobalAveragePooling2D(keepdims=True, name="global_average_pooling2d")(x)
    x = L.Dropout(1e-3, name="dropout")(x)
    x = L.Conv2D(10, 1, padding="same", name="conv_preds")(x)
    x = L.Reshape((10,), name="reshape_2")(x)
    x = L.Activation("softmax", name="predictions")(x)
    return keras.Model(x_in, x, name="mobilenet_tiny")


# -- Keras 2 file writer ---------------------------------------------------------------------------------------------
def _k2_node(node):
    """Keras 3 ``{"args": [...], "kwargs": {...}}`` -> Keras 2 ``[[layer, node, tensor, kwargs], ...]``."""
    entries, consts = [], []

    def walk(a):
        if isinstance(a, dict) and a.get("class_name") == "__keras_tensor__":
            h = a["config"]["keras_history"]
            entries.append([h[0], h[1], h[2], {}])
        elif isinstance(a, (list, tuple)):
            for e in a:
                walk(e)
        elif isinstance(a, (int, float)):
            consts.append(a)

    walk(node["args"])
    if consts:
        entries[0][3] = {"y": consts[0], "name": None}
    return entries


def _k2_layer(entry):
    cls, cfg = entry["class_name"], dict(entry["config"])
    cfg["dtype"] = "float32"
    if cls == "InputLayer":
        cfg["batch_input_shape"] = cfg.pop("batch_shape")
        for k in ("optional",):
            cfg.pop(k, None)
    if cls == "DepthwiseConv2D":
        cfg["groups"] = 1  # what tf.keras 2.x wrote, and what Keras 3 refuses
    if cls == "BatchNormalization":
        cfg["axis"] = [3]
    if entry.get("module", "").startswith("keras.src.ops"):
        cfg = {"name": entry["name"], "trainable": True, "dtype": "float32",
               "function": KERAS2_FUNCTIONS[cls]}
        cls = "TFOpLambda"
    return {"class_name": cls, "config": cfg, "name": entry["name"],
            "inbound_nodes": [_k2_node(n) for n in entry.get("inbound_nodes", [])]}


def _weight_items(layer):
    """``[(attr, array)]`` of a Keras 3 layer, in Keras 2 order and naming."""
    import keras

    items = []
    for v in layer.trainable_weights + layer.non_trainable_weights:
        attr = v.path.split("/")[-1]
        if isinstance(layer, keras.layers.DepthwiseConv2D) and attr == "kernel":
            attr = "depthwise_kernel"
        items.append((attr, np.asarray(v.numpy(), np.float32)))
    return items


def write_keras2_h5(model, path, keras_version="2.8.0") -> None:
    """Write ``model`` (a Keras 3 functional model without nested models) as a Keras 2 full-model HDF5 file."""
    import h5py

    cfg = model.get_config()
    k2 = {"class_name": "Functional", "config": {
        "name": cfg["name"],
        "layers": [_k2_layer(e) for e in cfg["layers"]],
        "input_layers": [list(cfg["input_layers"])] if isinstance(cfg["input_layers"][0], str)
        else cfg["input_layers"],
        "output_layers": [list(cfg["output_layers"])] if isinstance(cfg["output_layers"][0], str)
        else cfg["output_layers"],
    }}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = keras_version
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(k2)
        g = f.create_group("model_weights")
        names = []
        for op in model.operations:
            if not hasattr(op, "weights"):
                continue
            names.append(op.name)
            lg = g.create_group(op.name)
            wnames = []
            for attr, arr in _weight_items(op):
                wname = f"{op.name}/{attr}:0"
                lg.create_dataset(wname, data=arr)
                wnames.append(wname.encode("utf8"))
            lg.attrs["weight_names"] = wnames
        g.attrs["layer_names"] = [n.encode("utf8") for n in names]
