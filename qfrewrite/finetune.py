"""Fine-tune the Qualcomm architecture of a pretrained MobileNet by distillation on unlabelled images.

``recipes.qualcomm()`` (depthwise convs without BatchNorm and ReLU6, ReLU in the pointwise convs) is an architecture
for training: applied to a pretrained graph it scores 0.0-0.2% top-1. Training it straight from that graph does
not work either: without the depthwise BN and clip, activations grow layer after layer (to about 1400 by the last
pointwise conv of Keras MobileNetV1 0.25), the softmax saturates and the gradients vanish. :func:`finetune`:

1. **teacher** = the model as given (BatchNorm folded, exact), **student** = ``recipes.qualcomm(quantize=False)``
   of it, emitted to Keras with its logits as the output (:func:`~qfrewrite.emit.keras_emitter.emit_keras`,
   ``logits=True``) and a ``BatchNormalization`` after every non-depthwise layer that feeds a ReLU / ReLU6
   (:func:`normalised_layers`): the layers whose activations training must keep in range.
2. **data-driven initialisation**, layer by layer in graph order on the training images (each layer sees the
   layers before it already set). ``init="refit"`` (the default): every pointwise layer (1x1 conv, Dense: a linear
   map per position) gets the least-squares weights that map its input in the student to its output in the teacher,
   then its BN is set as for ``match``. ``init="match"``: each inserted BN gets as moving statistics the mean and
   variance of its input in the student, and as gamma / beta the standard deviation and mean of the same layer's
   pre-activation in the teacher, so each pointwise pre-activation has the teacher's per-channel first two moments.
   ``init="identity"``: the BNs only normalise (gamma 1, beta 0).
3. **distillation** with Adam on random crops (the image resized to ``shorter side = crop / 0.875`` and a random
   ``crop``-sized window taken) and horizontal flips, so a small folder serves many epochs, and optionally mixup
   (``mixup=alpha``: :func:`mix`, the teacher labelling the mixed image). ``loss="kl"``:
   ``T^2 KL(softmax(t / T) || softmax(s / T))`` on the logits ``t`` (teacher) and ``s`` (student);
   ``loss="mse"``: ``mean((s - t)^2)``. The learning rate follows a cosine from ``lr`` to 0,
   ``lr_k = lr * (1 + cos(pi * p_k)) / 2`` with progress ``p_k = max(k / K, elapsed / max_minutes)`` (step ``k`` of
   ``K = epochs * steps``): a run stopped by its time budget still anneals to 0 by its end. The default
   ``lr = 1e-4`` is measured (``benchmarks/probe_finetune.py``, Keras MobileNetV1 0.25), not a convention: at
   Adam's usual 1e-3 the distillation *diverges* from the refit initialisation (200 images: the batch loss rises
   from 2.6 to 9 within the first epoch and the held-back agreement falls from 27% to 0, the collapse the first
   benchmark showed); on 500 images, 6 epochs, held-back KL after / agreement: 1e-4 3.94 / 30%, 3e-5 4.11 / 28%,
   3e-4 with a one-epoch warm-up 4.61 / 19.5%. The BatchNorms train on batch statistics: with their statistics
   frozen (inference mode) Adam diverges at 1e-4 (200 images) and at 1e-5 ends higher (4.34 / 27.5%). Mixup
   (``alpha = 1``: 4.40 / 24.5%) and freezing the depthwise kernels did not help in these short runs.
4. after training the BN moving statistics are re-estimated on the training images (centre crops), in graph order
   (each BN's input depends on the BNs before it, already re-estimated), so the inference-mode model matches the
   batch statistics it was trained with; the moving averages Keras keeps while training lag the changing weights
   (held-back agreement 3% before the re-estimation, 26% after, in the first epoch at 1e-4).

Each epoch reports the mean training loss, the distillation loss on the held-back images (kept out of training)
and their top-1 agreement with the teacher, on a tqdm bar. ``keep="best"`` (the default) ends with the weights of
the epoch whose held-back loss is lowest, the initialised student (epoch 0) included, so training never hands back
a student with a higher held-back loss than the one it started from; ``keep="last"`` ends with the last epoch's.
The held-back loss, not the agreement, chooses: it is continuous, where the agreement on a few dozen images moves in
steps of one image (measured on torchvision MobileNetV2, 450 training images: the refit initialisation agreed with
the teacher on 50% of the held-back images and the first two epochs on 38% and 44%). The saved model is the
student with the source's own output (its Softmax put back when it had one): a standard Keras model (``.keras``
or ``.h5``, written atomically) that ``rewrite`` / ``convert`` read like any other; ``rewrite(saved,
recipes.plain())`` (or ``qualcomm()``) folds its BatchNorms, and that folded graph is what gets quantized.

Refused with a typed error: a model with more than one input or output, an input without a fixed height and width
(``input_shape=``), a graph in which ``recipes.qualcomm()`` finds no depthwise block to rewrite (not a MobileNet-style
graph), an image folder without images, fewer than two images, an output path that is not ``.keras`` / ``.h5``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError, OutputError, QfrewriteError
from .ir import WEIGHTED_OPS, Graph, Op, sole_reader

__all__ = ["finetune", "FinetuneResult", "EpochRecord", "normalised_layers", "refit_layers", "inserted_batchnorm",
           "cosine_lr", "mix", "LOSSES", "INITS", "KERAS_SUFFIXES"]

log = logging.getLogger(__name__)

LOSSES = ("kl", "mse")
INITS = ("refit", "match", "identity")
KEEPS = ("best", "last")
KERAS_SUFFIXES = (".keras", ".h5")
#: ImageNet training crops: the crop is this fraction of the resized shorter side (224 of 256)
CROP_FRACTION = 0.875
#: images used to measure the BatchNorm statistics (initialisation and the final re-estimation)
STAT_IMAGES = 256


class NotMobileNetError(QfrewriteError):
    """The model has no depthwise block that the Qualcomm architecture rewrites."""


@dataclass
class EpochRecord:
    """One epoch: ``epoch`` 0 is the initialised student before training."""

    epoch: int
    loss: Optional[float]
    agreement: float
    seconds: float
    held_loss: Optional[float] = None

    def to_dict(self) -> Dict[str, object]:
        return {"epoch": self.epoch, "loss": self.loss, "held_loss": self.held_loss, "agreement": self.agreement,
                "seconds": self.seconds}


@dataclass
class FinetuneResult:
    """The fine-tuned Keras model (the source's outputs), the history, and where it was saved."""

    model: object
    history: List[EpochRecord] = field(default_factory=list)
    path: Optional[Path] = None
    settings: Dict[str, object] = field(default_factory=dict)
    kept_epoch: int = -1

    @property
    def kept(self) -> EpochRecord:
        """The epoch whose weights the model holds."""
        return next(r for r in self.history if r.epoch == self.kept_epoch) if self.kept_epoch >= 0 \
            else self.history[-1]

    @property
    def agreement(self) -> float:
        """The held-back top-1 agreement with the teacher of the model as returned (the kept epoch)."""
        return self.kept.agreement

    def __str__(self) -> str:
        first, last, kept = self.history[0], self.history[-1], self.kept
        where = f", saved to {self.path}" if self.path else ""
        which = (f"; kept epoch {kept.epoch} (lowest held-back loss {kept.held_loss:.4f}, agreement "
                 f"{100 * kept.agreement:.1f}%)" if kept is not last and kept.held_loss is not None else "")
        return (f"held-back top-1 agreement with the teacher {100 * first.agreement:.1f}% after initialisation -> "
                f"{100 * last.agreement:.1f}% after {last.epoch} epochs ({last.seconds / 60:.1f} min){which}{where}")


# -- the student ---------------------------------------------------------------------------------------------------
def normalised_layers(graph: Graph) -> List[str]:
    """The layers after which the student gets a BatchNorm: every non-depthwise weighted layer (Conv2D, Dense) whose
    only reader is a ReLU or a ``Clip(0, hi)``, in graph order."""
    names = []
    for node in graph.topological_order():
        if node.op not in WEIGHTED_OPS or node.op is Op.DEPTHWISE_CONV2D:
            continue
        nxt = sole_reader(node.output)
        if nxt is not None and (nxt.op is Op.RELU or (nxt.op is Op.CLIP and nxt.attrs.lo == 0.0)):
            names.append(node.name)
    return names


def refit_layers(graph: Graph) -> List[str]:
    """The pointwise layers whose weights the ``refit`` initialisation solves for: Conv2D with a 1x1 kernel and
    stride 1, and Dense, in graph order (the classifier included)."""
    names = []
    for node in graph.topological_order():
        if node.op is Op.DENSE or (node.op is Op.CONV2D and node.weight.const.shape[:2] == (1, 1)
                                   and tuple(node.attrs.strides) == (1, 1)):
            names.append(node.name)
    return names


def _graphs(model, input_shape=None) -> Tuple[Graph, Graph]:
    """``(teacher, student)``: the model with BatchNorm folded, and ``recipes.qualcomm(quantize=False)`` of it."""
    from . import recipes
    from .api import load, rewrite
    from .passes import FoldBatchNorm

    graph = load(model, input_shape=input_shape)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise QfrewriteError(f"finetune needs a model with one input and one output; "
                             f"{graph.meta.get('source', graph.name)} has {len(graph.inputs)} and {len(graph.outputs)}")
    teacher = rewrite(graph, [FoldBatchNorm()], stats=False).graph
    # the pass warns that its graph must be fine-tuned before use: that is what happens here
    quiet = logging.getLogger("qfrewrite.passes.remove_depthwise_bn_relu6")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        result = rewrite(graph, recipes.qualcomm(quantize=False), stats=False)
    finally:
        quiet.setLevel(level)
    if not result.report["RemoveDepthwiseBNReLU6"].modified:
        raise NotMobileNetError(f"{graph.meta.get('source', graph.name)}: no depthwise conv followed by BatchNorm/"
                                f"ReLU6 and a pointwise conv, so there is no Qualcomm architecture to fine-tune "
                                f"(finetune trains MobileNet-style depthwise-separable graphs)")
    return teacher, result.graph


def _softmax_axis(graph: Graph) -> Optional[int]:
    prod = graph.outputs[0].producer
    return int(prod.attrs.axis) if prod is not None and prod.op is Op.SOFTMAX else None


# -- data ------------------------------------------------------------------------------------------------------------
def _read_images(data, graph: Graph, preprocess, limit):
    """The images as uint8 at ``shorter side x shorter side`` (crop / 0.875), and the preprocessing."""
    from .images import ImageFolder, ImageSet, resolve_preprocess

    shape = graph.inputs[0].shape
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        raise DataError(f"finetune needs an image model input with a fixed height and width; "
                        f"{graph.inputs[0].name!r} has shape {tuple(shape)} (give input_shape=)")
    crop = (int(shape[1]), int(shape[2]))
    big = tuple(int(round(c / CROP_FRACTION)) for c in crop)
    if isinstance(data, ImageSet):
        raise DataError("finetune reads an image folder (it crops the images itself); give its path")
    folder = data if isinstance(data, ImageFolder) else ImageFolder(data, preprocess=preprocess, limit=limit)
    folder = ImageFolder(folder.path, folder.preprocess if preprocess is None else preprocess,
                         folder.limit if limit is None else limit, size=big, shorter_side=min(big))
    if not folder.path.is_dir():
        raise DataError(f"image folder {folder.path} does not exist")
    images = folder.read(graph)
    if len(images) < 2:
        raise DataError(f"finetune needs at least two images in {folder.path} (one to train on, one held back); "
                        f"found {len(images)}")
    return images.images, resolve_preprocess(folder.preprocess, graph), crop


def _centre(images: np.ndarray, crop: Tuple[int, int]) -> np.ndarray:
    h, w = images.shape[1:3]
    top, left = int(round((h - crop[0]) / 2)), int(round((w - crop[1]) / 2))
    return images[:, top:top + crop[0], left:left + crop[1]]


def mix(x: np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Mixup of a batch: ``x_i := lam_i x_i + (1 - lam_i) x_pi(i)`` with ``lam_i ~ Beta(alpha, alpha)`` and ``pi`` a
    random permutation of the batch; ``alpha <= 0`` returns ``x``. The teacher labels the mixed image itself, so
    distillation gets new inputs from a small folder at no labelling cost."""
    if alpha <= 0 or len(x) < 2:
        return x
    lam = rng.beta(alpha, alpha, len(x)).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return lam * x + (1 - lam) * x[rng.permutation(len(x))]


def _augment(images: np.ndarray, crop: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random ``crop`` window of each image, flipped left-right with probability 1/2."""
    n, h, w = images.shape[:3]
    tops = rng.integers(0, h - crop[0] + 1, n)
    lefts = rng.integers(0, w - crop[1] + 1, n)
    flips = rng.random(n) < 0.5
    out = np.empty((n, crop[0], crop[1], images.shape[3]), images.dtype)
    for i in range(n):
        window = images[i, tops[i]:tops[i] + crop[0], lefts[i]:lefts[i] + crop[1]]
        out[i] = window[:, ::-1] if flips[i] else window
    return out


# -- BatchNorm statistics -------------------------------------------------------------------------------------------
def inserted_batchnorm(model, layer: str):
    """The BatchNormalization layer that reads the output of the emitted layer of IR node ``layer``."""
    import keras

    from .emit.keras_emitter import keras_layer_name

    out = model.get_layer(keras_layer_name(layer)).output
    for candidate in model.layers:
        if isinstance(candidate, keras.layers.BatchNormalization) and candidate.input is out:
            return candidate
    raise QfrewriteError(f"no BatchNormalization after layer {layer!r} in {model.name}")


def _moments(model, x: np.ndarray, batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of ``model``'s output over ``x`` (all axes but the last)."""
    total, total_sq, count = 0.0, 0.0, 0
    for s in range(0, len(x), batch_size):
        y = np.asarray(model(x[s:s + batch_size], training=False), np.float64)
        y = y.reshape(-1, y.shape[-1])
        total = total + y.sum(0)
        total_sq = total_sq + (y * y).sum(0)
        count += len(y)
    mean = total / count
    return mean, np.maximum(total_sq / count - mean * mean, 0.0)


def _least_squares(student_layer_input, teacher_layer_output, x: np.ndarray, batch_size: int,
                   w0: np.ndarray, b0: Optional[np.ndarray]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``[W; b]`` minimising ``sum ||X W + b - Y||^2 + lam ||[W; b] - [W0; b0]||^2`` over every position of ``x``,
    where ``X`` is the layer's input in the student and ``Y`` the same layer's output in the teacher.

    ``lam = mean(diag(X^T X)) * d / n`` (``d`` unknowns per output channel, ``n`` positions): negligible where the
    positions far outnumber the unknowns (a pointwise conv over a feature map), a pull towards the current weights
    where they do not (a classifier after global pooling sees one position per image and would otherwise
    interpolate the training images)."""
    gram, cross, n = 0.0, 0.0, 0
    with_bias = b0 is not None
    for s in range(0, len(x), batch_size):
        xs = np.asarray(student_layer_input(x[s:s + batch_size], training=False), np.float64)
        ys = np.asarray(teacher_layer_output(x[s:s + batch_size], training=False), np.float64)
        xs, ys = xs.reshape(-1, xs.shape[-1]), ys.reshape(-1, ys.shape[-1])
        if with_bias:
            xs = np.concatenate([xs, np.ones((len(xs), 1))], axis=1)
        gram = gram + xs.T @ xs
        cross = cross + xs.T @ ys
        n += len(xs)
    start = np.asarray(w0, np.float64).reshape(-1, np.shape(cross)[1])
    if with_bias:
        start = np.concatenate([start, np.asarray(b0, np.float64).reshape(1, -1)], axis=0)
    lam = max(float(np.mean(np.diag(gram))), 1e-12) * len(gram) / max(n, 1)
    w = np.linalg.solve(gram + lam * np.eye(len(gram)), cross + lam * start)
    return (w[:-1], w[-1]) if with_bias else (w, None)


def _initialise(student, teacher, student_graph: Graph, x: np.ndarray, batch_size: int, init: str) -> None:
    """Set the student's weights and inserted BatchNorms from data, layer by layer in graph order (each step sees the
    layers before it already set):

    * ``refit``: every pointwise layer (:func:`refit_layers`) gets the least-squares weights and bias that map its
      input in the student to its output in the teacher (a 1x1 conv is a linear map per position: exact least
      squares), then its BN is set as for ``match``;
    * ``match``: each inserted BN's moving mean / variance := its input's moments in the student, gamma / beta :=
      the standard deviation / mean of the same layer's output in the teacher;
    * ``identity``: only the moving statistics are measured (gamma, beta kept: the BN only normalises).
    """
    import keras

    from .emit.keras_emitter import keras_layer_name

    normalised, refit = set(normalised_layers(student_graph)), set(refit_layers(student_graph))
    for node in student_graph.topological_order():
        name = node.name
        if name not in normalised and not (init == "refit" and name in refit):
            continue
        target = None
        if init != "identity":
            target = keras.Model(teacher.input, teacher.get_layer(keras_layer_name(name)).output)
        if init == "refit" and name in refit:
            layer = student.get_layer(keras_layer_name(name))
            current = layer.get_weights()
            w, b = _least_squares(keras.Model(student.input, layer.input), target, x, batch_size, current[0],
                                  current[1] if len(current) > 1 else None)
            layer.set_weights([w.reshape(current[0].shape).astype(np.float32)]
                              + ([] if b is None else [b.astype(np.float32)]))
        if name in normalised:
            _set_batchnorm(student, name, x, batch_size, target)


def _set_batchnorm(student, name: str, x: np.ndarray, batch_size: int, target=None) -> None:
    """The BN after layer ``name``: moving mean / variance := its input's moments on ``x``; with ``target`` (the
    teacher's layer output) gamma / beta := that output's standard deviation / mean."""
    import keras

    bn = inserted_batchnorm(student, name)
    mean, var = _moments(keras.Model(student.input, bn.input), x, batch_size)
    gamma, beta = bn.gamma.numpy(), bn.beta.numpy()
    if target is not None:
        t_mean, t_var = _moments(target, x, batch_size)
        gamma, beta = np.sqrt(t_var), t_mean
    bn.set_weights([np.asarray(a, np.float32) for a in (gamma, beta, mean, var)])


def _reestimate_batchnorms(student, layers: Sequence[str], x: np.ndarray, batch_size: int) -> None:
    """Every inserted BN's moving statistics := its input's moments on ``x``, in graph order."""
    for name in layers:
        _set_batchnorm(student, name, x, batch_size)


# -- training --------------------------------------------------------------------------------------------------------
def _loss_fn(kind: str, temperature: float):
    import tensorflow as tf

    if kind == "mse":
        return lambda s, t: tf.reduce_mean(tf.square(s - t))

    def kl(s, t):
        log_p_t = tf.nn.log_softmax(t / temperature, axis=-1)
        log_p_s = tf.nn.log_softmax(s / temperature, axis=-1)
        per = tf.reduce_sum(tf.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
        return temperature ** 2 * tf.reduce_mean(per)

    return kl


def cosine_lr(lr: float, step_fraction: float, seconds: float, max_minutes: Optional[float]) -> float:
    """``lr * (1 + cos(pi * p)) / 2`` at progress ``p = max(step_fraction, seconds / (60 * max_minutes))``, clipped
    to ``[0, 1]``: the cosine reaches 0 at the last step or when the time budget runs out, whichever comes first."""
    progress = step_fraction if max_minutes is None else max(step_fraction, seconds / (60.0 * max_minutes))
    return float(lr * 0.5 * (1.0 + np.cos(np.pi * min(1.0, max(0.0, progress)))))


def _predict(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([np.asarray(model(x[s:s + batch_size], training=False))
                           for s in range(0, len(x), batch_size)])


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


def finetune(model, data, output=None, *, epochs: int = 10, batch_size: int = 32, lr: float = 1e-4,
             loss: str = "kl", temperature: float = 2.0, mixup: float = 0.0, holdout: Optional[int] = None,
             init: str = "refit", keep: str = "best",
             preprocess=None, limit: Optional[int] = None, input_shape=None, seed: int = 0,
             max_minutes: Optional[float] = None, progress: Optional[bool] = None,
             on_epoch=None) -> FinetuneResult:
    """Distil ``model`` (the teacher, as given) into its Qualcomm architecture on the images of ``data`` (a folder,
    labels not needed); see the module docstring for the method.

    ``holdout``: images kept out of training to measure the held-back loss and top-1 agreement with the teacher
    (default a tenth, at most 100); ``init``: ``"refit"``, ``"match"`` or ``"identity"``; ``keep``: ``"best"``
    (the epoch with the lowest held-back loss, epoch 0 included) or ``"last"``; ``loss``: ``"kl"``
    (``temperature``) or ``"mse"``; ``mixup``:
    the Beta parameter of :func:`mix` (0: no mixup);
    ``max_minutes``: the training time budget (wall clock from the first step, the per-epoch re-estimation,
    agreement and ``on_epoch`` included): the learning rate anneals to 0 by then and training stops at the first
    step past it (that last epoch partial); ``on_epoch(record, model)``: called after
    every epoch (and for the initialised student, epoch 0) with the source-output Keras model. ``output``: a
    ``.keras`` / ``.h5`` path, written atomically when training ends (never the source model or a file in ``data``).
    """
    import keras
    import tensorflow as tf
    from tqdm.auto import tqdm

    from .data import holdout_indices
    from .emit.keras_emitter import emit_keras
    from .images import folder_reads
    from .io_utils import OutputSet

    if loss not in LOSSES:
        raise QfrewriteError(f"finetune loss must be one of {LOSSES}, got {loss!r}")
    if init not in INITS:
        raise QfrewriteError(f"finetune init must be one of {INITS}, got {init!r}")
    if keep not in KEEPS:
        raise QfrewriteError(f"finetune keep must be one of {KEEPS}, got {keep!r}")
    if epochs < 0 or batch_size < 1 or not lr > 0 or not temperature > 0 or not mixup >= 0:
        raise QfrewriteError(f"finetune needs epochs >= 0, batch_size >= 1, lr > 0, temperature > 0 and mixup >= 0; "
                             f"got epochs={epochs}, batch_size={batch_size}, lr={lr}, temperature={temperature}, "
                             f"mixup={mixup}")
    if output is not None and Path(output).suffix.lower() not in KERAS_SUFFIXES:
        raise OutputError(f"output {output} must end in .keras or .h5 (a Keras model)")
    data_path = getattr(data, "path", data)
    with OutputSet([("the model", model if isinstance(model, (str, Path)) else None),
                    ("the images", data_path, folder_reads)]) as outs:
        out_path = outs.add(output, "the fine-tuned model") if output is not None else None
        teacher_graph, student_graph = _graphs(model, input_shape)
        images, pre, crop = _read_images(data, teacher_graph, preprocess, limit)
        n_hold = min(100, max(1, len(images) // 10)) if holdout is None else int(holdout)
        train_idx, held_idx = holdout_indices(len(images), n_hold)
        if len(train_idx) == 0 or len(held_idx) == 0:
            raise DataError(f"finetune needs images to train on and at least one held back; {len(images)} images, "
                            f"holdout {n_hold}")
        train, held = images[train_idx], pre(_centre(images[held_idx], crop))
        layers = normalised_layers(student_graph)
        teacher = emit_keras(teacher_graph, logits=True)
        student = emit_keras(student_graph, logits=True, batchnorm_after=layers)
        axis = _softmax_axis(student_graph)
        full = student if axis is None else keras.Model(
            student.input, keras.layers.Softmax(axis=axis, name="softmax_output")(student.outputs[0]),
            name=student.name)
        stat_x = pre(_centre(train[np.linspace(0, len(train) - 1, min(STAT_IMAGES, len(train))).astype(int)], crop))
        _initialise(student, teacher, student_graph, stat_x, batch_size, init)
        held_t = _predict(teacher, held, batch_size)
        loss_of = _loss_fn(loss, temperature)

        def held_back() -> Tuple[float, float]:
            """The distillation loss and the top-1 agreement of the student on the held-back images."""
            s = _predict(student, held, batch_size)
            return float(loss_of(tf.constant(s), tf.constant(held_t))), _agreement(s, held_t)

        held_loss, agreement = held_back()
        history = [EpochRecord(0, None, agreement, 0.0, held_loss)]
        best = (held_loss, 0, student.get_weights())
        log.info("finetune: %d BatchNorms in the student, %d training images, %d held back; agreement after "
                 "initialisation %.1f%%", len(layers), len(train), len(held_idx), 100 * history[0].agreement)
        if on_epoch is not None:
            on_epoch(history[0], full)

        steps = max(1, -(-len(train) // batch_size))
        total = max(1, epochs * steps)
        optimizer = keras.optimizers.Adam(lr)
        weights = student.trainable_variables

        @tf.function(reduce_retracing=True)
        def step(x):
            t = teacher(x, training=False)
            with tf.GradientTape() as tape:
                value = loss_of(student(x, training=True), t)
            optimizer.apply_gradients(zip(tape.gradient(value, weights), weights))
            return value

        rng = np.random.default_rng(seed)
        start, done = time.perf_counter(), 0
        disable = None if progress is None else not progress
        with tqdm(total=epochs * steps, desc="finetune", unit="step", disable=disable) as bar:
            for epoch in range(1, epochs + 1):
                order = rng.permutation(len(train))
                losses = []
                for s in range(0, len(order), batch_size):
                    elapsed = time.perf_counter() - start
                    if losses and max_minutes is not None and elapsed >= 60 * max_minutes:
                        break  # the time budget is spent (and the learning rate at 0): end this epoch here
                    optimizer.learning_rate.assign(cosine_lr(lr, done / total, elapsed, max_minutes))
                    x = mix(pre(_augment(train[order[s:s + batch_size]], crop, rng)), mixup, rng)
                    losses.append(float(step(tf.constant(x))))
                    done += 1
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.4f}",
                                    agree=f"{100 * history[-1].agreement:.1f}%")
                _reestimate_batchnorms(student, layers, stat_x, batch_size)
                held_loss, agreement = held_back()
                record = EpochRecord(epoch, float(np.mean(losses)), agreement, time.perf_counter() - start, held_loss)
                history.append(record)
                if held_loss < best[0]:
                    best = (held_loss, epoch, student.get_weights())
                bar.set_postfix(epoch=epoch, loss=f"{record.loss:.4f}", held=f"{record.held_loss:.4f}",
                                agree=f"{100 * record.agreement:.1f}%")
                if on_epoch is not None:
                    on_epoch(record, full)
                if max_minutes is not None and record.seconds >= 60 * max_minutes:
                    log.info("finetune: stopped in epoch %d (%.1f min >= max_minutes)", epoch,
                             record.seconds / 60)
                    break
        kept = history[-1].epoch
        if keep == "best" and best[1] != kept:
            student.set_weights(best[2])  # ``full`` shares the student's layers
            log.info("finetune: kept epoch %d (held-back loss %.4f, agreement %.1f%%) over the last, epoch %d "
                     "(%.4f, %.1f%%)", best[1], best[0], 100 * history[best[1]].agreement, kept,
                     history[-1].held_loss, 100 * history[-1].agreement)
            kept = best[1]
        if out_path is not None:
            full.save(outs.stage(out_path))
    settings = dict(epochs=epochs, batch_size=batch_size, lr=lr, loss=loss, temperature=temperature, mixup=mixup,
                    init=init, keep=keep, holdout=len(held_idx), train_images=len(train), seed=seed)
    return FinetuneResult(full, history, Path(output) if output is not None else None, settings, kept)
