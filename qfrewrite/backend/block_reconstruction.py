"""Block reconstruction: the rounding of a block's kernels trained on the block's output (AdaRound's soft rounding,
Nagel et al. 2020, on blocks as in BRECQ, Li et al. 2021), in TensorFlow.

A layer-wise rounding (:mod:`qfrewrite.numerics.rounding`) lowers each layer's own output error for the float inputs
it would see; at 4 bits what remains is how the layers' errors compound through the nonlinearities that follow them.
Here a **block** is a segment of the graph that reads a single value (:func:`qfrewrite.ir.single_input_segments`: a
residual block is never cut inside), and its kernels are rounded together for its output:

* each kernel becomes ``nlo + step * clip(base + h(V), 0, n)`` on its fixed grid
  (:func:`qfrewrite.quant.weights.kernel_grid`), with ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
  (``zeta = 1.1``, ``gamma = -0.1``), ``base`` the floor of the float kernel's code, and ``V`` initialised at the
  codes the layer-wise rounding chose (``h = 0.96`` or ``0.04``; where that rounding moved a weight more than one
  step from its float value, ``base`` follows its code);
* ``V`` is trained with Adam on
  ``mean_{images, positions} sum_channels (block_q(x_q) - block_f(x_f))^2 + lam * sum (1 - |2h - 1|^beta)``,
  where ``x_q`` is the block's input in the rounded model (the blocks before it already reconstructed),
  ``block_f(x_f)`` the float model's output of the same block on the same images (so a block also compensates the
  error it receives), ``lam = 0.01``, and ``beta`` annealed from 20 to 2 after the first fifth of the steps
  (without the regulariser there): the regulariser drives every ``h`` to 0 or 1;
* the hard rounding (``V >= 0``) is kept only when it lowers the block's output error on the images it was trained
  on; otherwise the block keeps the layer-wise rounding.

The activations stay float (the block reconstruction runs before the activations are quantized: weight-only
reconstruction, as in BRECQ's 4-bit weight results). The kernels end on their grid, so fake quantization leaves
them unchanged.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..ir import FakeQuantAttrs, Graph, Node, set_kernel, single_input_segments
from ..quant.weights import kernel_grid
from .tf_lowering import _tf, lower_node

__all__ = ["BlockResult", "reconstruct_blocks", "ZETA", "GAMMA"]

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1
_INIT = 2.0  # |V| at the start: h(2) = 0.957, inside the rectified sigmoid's slope
_WARM_UP = 0.2
_LAMBDA = 0.01
_BETA = (20.0, 2.0)
_EVAL_BATCH = 32


@dataclass
class BlockResult:
    """One block: its weighted layers, its output error (mean over images of the squared error summed over the
    output) with the layer-wise rounding and with the reconstructed one, which it kept, and its seconds."""

    layers: List[str]
    layerwise_error: float
    reconstructed_error: float
    kept: bool
    seconds: float

    def as_dict(self) -> Dict:
        return {"layers": self.layers, "layerwise_error": self.layerwise_error,
                "reconstructed_error": self.reconstructed_error, "kept": self.kept,
                "seconds": round(self.seconds, 2)}


def _run(nodes: Sequence[Node], x, kernels: Mapping[str, object]):
    """The segment ``nodes`` on input tensor ``x``, ``kernels`` (by node name) replacing those nodes' kernels."""
    tf = _tf()
    env: Dict[str, object] = {}
    for node in nodes:
        args = [tf.constant(v.const) if v.is_const else env.get(v.name, x) for v in node.inputs]
        env[node.output.name] = lower_node(node, args, kernel=kernels.get(node.name))
    return env[nodes[-1].output.name]


def _apply(nodes: Sequence[Node], x: np.ndarray, kernels: Mapping[str, object], reference: Optional[np.ndarray] = None):
    """The segment's output on every image of ``x`` (float32) and, with ``reference``, its mean squared error
    (summed over the output, averaged over the images)."""
    tf = _tf()
    out, err = None, 0.0
    for s in range(0, len(x), _EVAL_BATCH):
        part = _run(nodes, tf.constant(x[s:s + _EVAL_BATCH]), kernels).numpy()
        if out is None:
            out = np.empty((len(x),) + part.shape[1:], np.float32)  # filled in place: no list of parts to join
        out[s:s + len(part)] = part
        if reference is not None:
            err += float(np.sum((part.astype(np.float64) - reference[s:s + len(part)]) ** 2))
    return out, (None if reference is None else err / len(x))


class _SoftKernels:
    """The trainable rounding of one block's kernels."""

    def __init__(self, layers: Sequence[Node], float_kernels: Mapping[str, np.ndarray],
                 grids: Mapping[str, FakeQuantAttrs]):
        tf = _tf()
        self.names = [n.name for n in layers]
        self.grid, self.v = {}, {}
        for node in layers:
            nlo, step, n = kernel_grid(node, grids[node.name])
            codes = np.clip(np.round((node.weight.const - nlo) / step), 0, n)  # the layer-wise rounding's codes
            base = np.floor((float_kernels[node.name] - nlo) / step)
            base = np.where(codes > base + 1, codes - 1, np.where(codes < base, codes, base))
            self.grid[node.name] = (nlo, step, base, float(n))
            self.v[node.name] = tf.Variable(np.where(codes > base, _INIT, -_INIT).astype(np.float32))

    def h(self, name: str):
        tf = _tf()
        return tf.clip_by_value(tf.sigmoid(self.v[name]) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def kernels(self) -> Dict[str, object]:
        """The soft kernels (TF tensors), differentiable in ``V``."""
        tf = _tf()
        out = {}
        for k in self.names:
            nlo, step, base, n = (tf.constant(a, tf.float32) for a in self.grid[k])
            out[k] = nlo + tf.clip_by_value(base + self.h(k), 0.0, n) * step
        return out

    def hard_kernels(self) -> Dict[str, np.ndarray]:
        """The rounding ``V >= 0`` decides, as float32 grid values computed like the layer-wise rounding's
        (``code * step + nlo`` in float64), so that an unchanged code gives a bit-identical kernel."""
        out = {}
        for k in self.names:
            nlo, step, base, n = self.grid[k]
            codes = np.clip(base + (self.v[k].numpy() >= 0), 0, n)
            out[k] = (codes * step + nlo).astype(np.float32)
        return out

    def regulariser(self, beta):
        tf = _tf()
        return tf.add_n([tf.reduce_sum(1.0 - tf.pow(tf.abs(2.0 * self.h(k) - 1.0), beta)) for k in self.names])


def _train(nodes: Sequence[Node], soft: _SoftKernels, xq: np.ndarray, yf: np.ndarray, iterations: int,
           batch: int, lr: float, seed: int) -> None:
    tf = _tf()
    variables = [soft.v[k] for k in soft.names]
    opt = tf.keras.optimizers.Adam(lr)

    @tf.function
    def step(x, y, beta, lam):
        with tf.GradientTape() as tape:
            out = _run(nodes, x, soft.kernels())
            axes = list(range(1, len(out.shape) - 1))
            err = tf.reduce_sum(tf.square(out - y), axis=-1)
            rec = tf.reduce_mean(tf.reduce_mean(err, axis=axes) if axes else err)
            loss = rec + lam * soft.regulariser(beta)
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))

    rng = np.random.default_rng(seed)
    size = min(batch, len(xq))
    for it in range(iterations):
        idx = rng.choice(len(xq), size, replace=False)
        progress = it / iterations
        if progress < _WARM_UP:
            beta, lam = _BETA[0], 0.0
        else:
            beta = _BETA[0] - (_BETA[0] - _BETA[1]) * (progress - _WARM_UP) / (1.0 - _WARM_UP)
            lam = _LAMBDA
        step(tf.constant(xq[idx]), tf.constant(yf[idx]), tf.constant(beta, tf.float32), tf.constant(lam, tf.float32))


def reconstruct_blocks(graph: Graph, reference: Graph, x: np.ndarray, grids: Mapping[str, FakeQuantAttrs],
                       iterations: int = 500, batch: int = 32, lr: float = 3e-2, min_layers: int = 3,
                       progress: bool = True) -> Optional[List[BlockResult]]:
    """Reconstruct the rounding of ``graph``'s kernels named in ``grids`` (already on those grids, by a layer-wise
    rounding) block by block against ``reference`` (the same graph with its float kernels and biases), on the
    images ``x`` (NHWC float32), in place: see the module docstring. Blocks hold at least ``min_layers`` weighted
    layers; ``progress`` shows a bar that counts them. Returns one :class:`BlockResult` per block that holds a
    rounded kernel, or ``None`` when the graph cannot be cut into single-input blocks (more than one input or
    output: nothing is changed)."""
    from tqdm.auto import tqdm

    segments = single_input_segments(graph, min_layers)
    if segments is None:
        return None
    float_kernels = {name: reference.node(name).weight.const.astype(np.float64) for name in grids}
    xq = np.asarray(x, np.float32)
    xf = xq
    results: List[BlockResult] = []
    bar = tqdm(segments, desc="block reconstruction", unit="block", leave=False, disable=not progress or None)
    for index, (_, nodes) in enumerate(bar):
        t0 = time.perf_counter()
        ref_nodes = [reference.node(n.name) for n in nodes]
        yf, _ = _apply(ref_nodes, xf, {})
        layers = [n for n in nodes if n.name in grids]
        if not layers:
            xq, xf = _apply(nodes, xq, {})[0], yf
            continue
        soft = _SoftKernels(layers, float_kernels, grids)
        _, e_layerwise = _apply(nodes, xq, {}, yf)  # its output is made again if kept: one array less held
        _train(nodes, soft, xq, yf, iterations, batch, lr, seed=index)
        hard = soft.hard_kernels()
        out, e_rec = _apply(nodes, xq, hard, yf)
        kept = e_rec < e_layerwise
        if kept:
            for node in layers:
                set_kernel(graph, node, hard[node.name], "block reconstruction")
        else:
            del out
            out, _ = _apply(nodes, xq, {})
        xq, xf = out, yf
        results.append(BlockResult([n.name for n in layers], e_layerwise, e_rec, bool(kept),
                                   time.perf_counter() - t0))
        log.debug("block %d (%s): output error %.4g with layer-wise rounding, %.4g reconstructed (%s)", index,
                  ", ".join(n.name for n in layers), e_layerwise, e_rec, "kept" if kept else "not kept")
    bar.close()
    return results
