"""Round every kernel to its quantization grid on the calibration data, minimising each layer's output error
(learned rounding), instead of to the nearest grid value.

**Objective.** For each Conv2D, DepthwiseConv2D and Dense layer, with its input patches ``x`` over the calibration
data (:mod:`qfrewrite.analysis.patch_moments`: one pass over the data, the cost then independent of the number of
images), the quantized kernel ``Q`` minimises the mean squared output error ``sum_r (q_r - w_r) H (q_r - w_r)^T``
on the grid of exactly the weight quantization InsertFakeQuant will apply (the layer's ``weight_quant`` when set,
else :func:`qfrewrite.quant.weights.planned_weight_quant` from the pipeline's
:class:`~qfrewrite.spec.QuantSpec`: ``weights`` granularity, ``weight_bits`` 2..8, ``weight_method``). With
``correct_bias=True`` (the default) the layer's bias then absorbs the mean output error, ``b -= (Q - W) E[x]``
(exact: the layer is linear, zero padding included), and ``H`` is the covariance of the patches; otherwise
``H = E[x x^T]``.

**Algorithm** (:mod:`qfrewrite.numerics.rounding`): GPTQ (column-wise optimal brain quantization updates, columns in
order of decreasing input energy), then coordinate-descent sweeps that move single weights one grid step when that
lowers the error; each output channel keeps nearest rounding when the result does not lower its error, so no layer
is worse than nearest rounding on the calibration data (with block reconstruction, the guarantee is the block's:
its output error is never above the layer-wise rounding's). The inputs are the float graph's (each layer is rounded
for the inputs it sees in float, all layers from the same one pass).

**Block reconstruction** (``blocks``; by default on below 8 weight bits, where a layer-wise objective leaves most
of the loss: how the layers' errors compound through the activations that follow them). After the layer-wise
rounding, the graph is cut into blocks that read a single value (a residual block is never cut inside, at least
three weighted layers each), and each block's kernels are rounded together for the block's output, AdaRound's soft
rounding trained on it (:mod:`qfrewrite.backend.block_reconstruction`: ``block_iterations`` Adam steps of 32 of the
first ``block_images`` calibration images, the block fed the rounded model's input and compared with the float
model's output, so it also compensates what the blocks before it lost). A block keeps the result only when it
lowers the block's output error on those images; otherwise it keeps the layer-wise rounding. The activations stay
float (weight-only reconstruction). While :class:`SelectBest` compares candidates it is left out
(:meth:`defers_while_compared`): layer-wise rounding ranks them, and the kept pipeline runs again in full.
``stats["blocks"]`` gives each block's layers, output error with the layer-wise and with the reconstructed rounding,
which it kept, and its seconds.

The kernel is replaced by its grid values and ``weight_quant`` set, so InsertFakeQuant and the emitters store
exactly these codes (fake quantization of a grid value is the value itself).

A layer whose ``weight_quant`` is set keeps it, bits included, so layers can be given different weight bits (W4
for some classes of layers, W8 for the rest: ``benchmarks/bench_rounding_layers.py``).

``stats["layers"]`` gives each layer's output SQNR (dB: output variance over mean squared error, on the
calibration data) with nearest rounding and with the chosen rounding, its weight bits, and the output channels that
kept the learned rounding; ``stats["mean_gain_db"]`` the mean gain. Not exact (it quantizes the kernels); the pass manager reports
the drift. Contract: needs data; ensures ``WEIGHTS_ROUNDED``, ``BIAS_CORRECTED`` (with ``correct_bias``) and
``WEIGHTS_FINAL``; must run before anything that makes the weights final (CorrectBias: with the kernels on their
grid it has nothing left to correct) and before quantization. Left alone: a graph whose kernels all lie on their
grid already.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from tqdm.auto import tqdm

from qfrewrite.analysis.patch_moments import Patches, gather_patch_moments, patch_moments
from qfrewrite.contracts import Contract, Property
from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import (WEIGHTED_OPS, FakeQuantAttrs, Graph, Node, layer_kind, set_bias, set_kernel,
                          single_input_segments)
from qfrewrite.numerics.kernels import as_rows, from_rows
from qfrewrite.numerics.metrics import power_ratio_db
from qfrewrite.numerics.rounding import Grid, round_rows, row_errors
from qfrewrite.pass_infra import COMPARING, Context, Pass, PassResult, Skip
from qfrewrite.quant.weights import (GRANULARITIES, WEIGHT_METHODS, kernel_grid, planned_weight_quant,
                                     quantized_kernel)
from qfrewrite.spec import QuantSpec

__all__ = ["LearnedRounding"]

log = logging.getLogger(__name__)

_INPUTS = ("quantized", "float")


def _grid(node: Node, fq: FakeQuantAttrs, rows_shape) -> Grid:
    """The per-row grids of ``fq`` (:func:`~qfrewrite.quant.weights.kernel_grid`) shaped for
    :func:`~qfrewrite.numerics.kernels.as_rows`'s layout."""
    nlo, step, n = kernel_grid(node, fq)
    shape = (1,) if len(fq.lo) == 1 else rows_shape[:-1] + (1,)  # (R, 1) or (C, M, 1): channel c*M+m is row (c, m)
    return Grid(nlo.reshape(shape), step.reshape(shape), n)


class LearnedRounding(Pass):
    """Round kernels to their grid minimising each layer's output error on the calibration data (GPTQ + descent)."""

    exact = False
    needs_data = True
    spec_options = {"weights": "weights", "bits": "weight_bits", "method": "weight_method"}

    def __init__(self, weights: Optional[str] = None, bits: Optional[int] = None, method: Optional[str] = None,
                 correct_bias: bool = True, inputs: str = "float", damping: float = 0.01, sweeps: int = 2,
                 blocks: Optional[bool] = None, block_iterations: int = 500, block_images: int = 256):
        if weights is not None and weights not in GRANULARITIES:
            raise QfrewriteError(f"LearnedRounding weights must be one of {GRANULARITIES}, got {weights!r}")
        if method is not None and method not in WEIGHT_METHODS:
            raise QfrewriteError(f"LearnedRounding method must be one of {WEIGHT_METHODS}, got {method!r}")
        if bits is not None and not 2 <= int(bits) <= 8:
            raise QfrewriteError(f"LearnedRounding bits (weight bits) must be in 2..8, got {bits}")
        if inputs not in _INPUTS:
            raise QfrewriteError(f"LearnedRounding inputs must be one of {_INPUTS}, got {inputs!r}")
        if not damping > 0:
            raise QfrewriteError(f"LearnedRounding damping must be positive, got {damping}")
        self.weights, self.method = weights, method
        self.bits = None if bits is None else int(bits)
        self.correct_bias, self.damping, self.sweeps = bool(correct_bias), float(damping), int(sweeps)
        self.inputs = inputs
        if blocks not in (None, True, False):
            raise QfrewriteError(f"LearnedRounding blocks must be None (below 8 weight bits), True or False, "
                                 f"got {blocks!r}")
        if int(block_iterations) < 1 or int(block_images) < 2:
            raise QfrewriteError(f"LearnedRounding needs block_iterations >= 1 and block_images >= 2, got "
                                 f"{block_iterations} and {block_images}")
        self.blocks, self.block_iterations, self.block_images = blocks, int(block_iterations), int(block_images)

    def contract(self, spec: QuantSpec) -> Contract:
        ensures = {Property.WEIGHTS_ROUNDED, Property.WEIGHTS_FINAL}
        if self.correct_bias:
            ensures.add(Property.BIAS_CORRECTED)
        return Contract(frozenset(), frozenset(ensures), frozenset({Property.QUANTIZED, Property.WEIGHTS_FINAL}))

    def __repr__(self) -> str:
        opts = [f"{k}={getattr(self, k)!r}" for k in ("weights", "bits", "method") if getattr(self, k) is not None]
        if not self.correct_bias:
            opts.append("correct_bias=False")
        if self.blocks is not None:
            opts.append(f"blocks={self.blocks}")
        return f"LearnedRounding({', '.join(opts)})"

    def _round_layer(self, graph: Graph, node: Node, fq: FakeQuantAttrs, p: Patches) -> Dict:
        kind = layer_kind(node)
        w = as_rows(node.weight.const.astype(np.float64), kind)
        grid = _grid(node, fq, w.shape)
        centred = self.correct_bias
        h = p.second_moment(centered=centred)
        paired = p.cross is not None
        cross = p.cross_moment(centered=centred) if paired else None
        ref = p.ref_second_moment(centered=centred) if paired else None
        q, e_near, e_chosen, learned = round_rows(w, h, grid, self.damping, self.sweeps, cross, ref)
        signal = float(row_errors(w, p.ref_second_moment(True) if paired else p.second_moment(True)).sum())
        set_kernel(graph, node, from_rows(q, node.weight.const.shape, kind), "rounded")
        node.weight_quant = fq
        if self.correct_bias:
            ref_mean = p.ref_mean if paired else p.mean
            # the quantized layer's mean output equals the float one: b' = b + w E[x_f] - q E[x]
            shift = (np.einsum("...rk,...k->...r", q, p.mean)
                     - np.einsum("...rk,...k->...r", w, ref_mean)).reshape(-1)  # depthwise: (C, M) -> c*M+m
            base = node.bias.const.astype(np.float64) if node.bias is not None else 0.0
            set_bias(graph, node, base - shift, "rounded")
        near_db, chosen_db = power_ratio_db(signal, e_near.sum()), power_ratio_db(signal, e_chosen.sum())
        return {"nearest_sqnr_db": near_db, "learned_sqnr_db": chosen_db, "bits": int(fq.bits),
                "learned_channels": int(learned.sum()), "channels": int(learned.size)}

    def _moments(self, graph: Graph, ctx: Context, planned: Dict) -> Iterator[Tuple[List[str], Dict[str, Patches]]]:
        """``(layers, their patch moments)`` in the order they are to be rounded: all at once from the float graph
        (``inputs="float"``), or one layer at a time in topological order, each gathered after the layers before it
        were rounded, against the float graph as it came in (``inputs="quantized"``: one pass over the data per
        layer; a layer compensates only errors that are final, so layers cannot share a pass)."""
        if self.inputs == "float":
            yield list(planned), patch_moments(graph, ctx, sorted(planned))
            return
        reference = graph.copy()
        order = [n.name for n in graph.topological_order() if n.name in planned]
        groups = [[name] for name in order]
        progress = tqdm(total=len(groups), desc="learned rounding", unit="pass", leave=False,
                        disable=len(groups) < 2 or None)
        with progress:
            for group in groups:
                yield group, gather_patch_moments(graph, ctx.data, group, reference=reference, quantize=True,
                                                  progress=False)
                progress.update(1)

    def _blocks_for(self, bits: int) -> bool:
        """Whether block reconstruction runs for kernels of ``bits`` (the fewest a layer has): ``blocks`` when
        stated, else below 8 bits."""
        return self.blocks if self.blocks is not None else bits < 8

    def defers_while_compared(self, spec: QuantSpec) -> bool:
        """Block reconstruction is left out while candidates are compared: layer-wise rounding ranks them, and the
        kept one is reconstructed once."""
        return self._blocks_for(self.bits if self.bits is not None else spec.resolved().weight_bits)

    def _reconstruct(self, graph: Graph, reference: Graph, ctx: Context, planned: Dict):
        """Block reconstruction (:mod:`qfrewrite.backend.block_reconstruction`) of the layer-wise rounding, on the
        first ``block_images`` calibration images; ``None`` when the graph cannot be cut into blocks."""
        from qfrewrite.backend.block_reconstruction import reconstruct_blocks

        if single_input_segments(graph) is None:
            return None
        first = ctx.data.subset(slice(0, self.block_images))
        grids = {name: fq for name, (_, fq) in planned.items()}
        return reconstruct_blocks(graph, reference, np.concatenate(list(first.batches())), grids,
                                  iterations=self.block_iterations)

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        ctx.require_data(self.name)
        weights, method, bits = (self.option(ctx, "weights"), self.option(ctx, "method"),
                                 self.option(ctx, "bits"))
        planned, skipped = {}, []
        for node in graph.find(*WEIGHTED_OPS):
            if node.weight is None or node.weight.const is None:
                skipped.append(Skip(node.name, "the kernel is not a constant"))
                continue
            fq = planned_weight_quant(node, weights, method, bits)
            if np.array_equal(quantized_kernel(node, fq), node.weight.const.astype(np.float32)):
                skipped.append(Skip(node.name, "the kernel lies on its quantization grid already"))
                continue
            planned[node.name] = (node, fq)
        if not planned:
            return PassResult(graph, False, {"rounded": 0}, skipped + [Skip(None, "no kernel to round")])
        by_blocks = self._blocks_for(min(fq.bits for _, fq in planned.values()))
        deferred = by_blocks and bool(ctx.options.get(COMPARING))
        by_blocks = by_blocks and not deferred
        reference = graph.copy() if by_blocks else None
        layers: Dict[str, Dict] = {}
        for group, moments in self._moments(graph, ctx, planned):
            for name in group:
                node, fq = planned[name]
                layers[name] = self._round_layer(graph, node, fq, moments[name])
                log.debug("%s: output SQNR %.2f dB with nearest rounding, %.2f dB learned", name,
                          layers[name]["nearest_sqnr_db"], layers[name]["learned_sqnr_db"])
        blocks = self._reconstruct(graph, reference, ctx, planned) if by_blocks else None
        graph.remove_unused()
        gains = [v["learned_sqnr_db"] - v["nearest_sqnr_db"] for v in layers.values()
                 if np.isfinite(v["learned_sqnr_db"]) and np.isfinite(v["nearest_sqnr_db"])]
        stats = {"rounded": len(layers), "weights": weights, "bits": bits, "method": method, "inputs": self.inputs,
                 "images": len(ctx.data), "bias_corrected": self.correct_bias,
                 "mean_gain_db": float(np.mean(gains)) if gains else 0.0, "layers": layers}
        if blocks is not None:
            stats["blocks"] = [b.as_dict() for b in blocks]
            stats["block_seconds"] = round(sum(b.seconds for b in blocks), 2)
            log.info("block reconstruction: %d of %d blocks kept it, %.0f s", sum(b.kept for b in blocks),
                     len(blocks), stats["block_seconds"])
        elif deferred:
            stats["blocks_deferred"] = True
            skipped.append(Skip(None, "block reconstruction left out while candidate pipelines are compared"))
        elif by_blocks:
            skipped.append(Skip(None, "block reconstruction needs a graph with one input and one output; "
                                      "the layer-wise rounding is kept"))
        log.info("learned rounding: %d layers, output SQNR %+.2f dB on average over nearest rounding (W%d %s)",
                 len(layers), stats["mean_gain_db"], bits, weights)
        return PassResult(graph, True, stats, skipped)
