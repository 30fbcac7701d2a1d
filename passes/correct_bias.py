"""Empirical bias correction for weight quantization (Nagel et al., arXiv 1906.04721, section 4.3; maths in
:mod:`qfrewrite.numerics.bias`).

Quantizing a layer's kernel ``W -> W_q`` shifts the expectation of each output channel by ``E[conv(x, W_q - W)]``
(the mean over images and output positions). For every Conv2D, DepthwiseConv2D and Dense layer the pass runs the
float graph once over the calibration data, keeping each layer input's mean map ``E[x]`` (per position, over the
images), and subtracts ``mean(conv(E[x], W_q - W))`` from the bias: equal to the mean error because convolution,
zero padding included, is linear (:func:`qfrewrite.numerics.bias.mean_output_shift`). The zero-padded borders are
therefore exact (the closed form ``(W_q - W) E[x]`` with a per-channel mean misses them) and the cost after the one
pass does not grow with the number of images.

``W_q`` is exactly the weight quantization :class:`InsertFakeQuant` will apply: a kernel that already carries
``node.weight_quant`` uses it; otherwise the pass builds it with the same function InsertFakeQuant uses
(:func:`qfrewrite.quant.weights.planned_weight_quant`) from the pipeline's :class:`~qfrewrite.spec.QuantSpec`
(``weights``, ``weight_bits``, ``weight_method``). Options given here explicitly (``weights``, ``bits``, ``method``)
are statements of that spec: one that disagrees with another pass's is refused before any work.

Contract: needs data; ensures ``BIAS_CORRECTED`` and ``WEIGHTS_FINAL`` (the correction holds only for these
kernels, so no later pass may change them); cannot run once the graph is quantized.

``mode="sequential"`` also removes the mean error that quantized layers upstream pass on: layer by layer in
topological order, the graph up to the layer is run with every kernel before it fake-quantized (and already
corrected) and the layer's bias shifted by ``E[y_q] - E[y]`` of its output, ``E[y]`` from the float graph. This
costs one run of the data through the graph up to each layer (about ``layers / 2`` full passes).

Activation statistics: the corrected float graph is not what the int8 model computes. With ``W_q`` and the
corrected bias a layer's output has, in expectation over the calibration data, the mean of the float layer before
the correction (that is what the correction is for), so the activations the int8 model holds are those of the graph
as it came in, not those of the corrected graph with float kernels. The pass therefore hands on the cached
activation statistics of the graph before it (:class:`~qfrewrite.quant.observers.ActivationStats`, when a shared
calibration pass or an earlier pass left them) as those of its graph, and InsertFakeQuant calibrates its ranges on
them without another pass over the data.

Not exact (the float function changes by design); the pass manager reports the drift. Left alone: layers whose
kernel quantizes without error.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import numpy as np

from qfrewrite.analysis.moments import channel_moments
from qfrewrite.backend.executor import Executor
from qfrewrite.contracts import Property
from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import WEIGHTED_OPS, Graph, Node, layer_kind, resolve_pads, set_bias
from qfrewrite.numerics.bias import mean_output_shift
from qfrewrite.pass_infra import Context, Pass, PassResult, Skip
from qfrewrite.quant.observers import ActivationStats, cached_activation_stats
from qfrewrite.quant.weights import GRANULARITIES, WEIGHT_METHODS, planned_weight_quant, quantized_kernel

__all__ = ["CorrectBias"]

log = logging.getLogger(__name__)

_MODES = ("layer", "sequential")


class CorrectBias(Pass):
    """Subtract the expected output error of the quantized kernels from the biases."""

    exact = False
    needs_data = True
    ensures = frozenset({Property.BIAS_CORRECTED, Property.WEIGHTS_FINAL})
    forbids = frozenset({Property.QUANTIZED})
    spec_options = {"weights": "weights", "bits": "weight_bits", "method": "weight_method"}

    def __init__(self, weights: Optional[str] = None, bits: Optional[int] = None, method: Optional[str] = None,
                 chunk: int = 8, mode: str = "layer"):
        if mode not in _MODES:
            raise QfrewriteError(f"CorrectBias mode must be one of {_MODES}, got {mode!r}")
        if weights is not None and weights not in GRANULARITIES:
            raise QfrewriteError(f"CorrectBias weights must be one of {GRANULARITIES}, got {weights!r}")
        if method is not None and method not in WEIGHT_METHODS:
            raise QfrewriteError(f"CorrectBias method must be one of {WEIGHT_METHODS}, got {method!r}")
        if bits is not None and not 2 <= int(bits) <= 8:
            raise QfrewriteError(f"CorrectBias bits (weight bits) must be in 2..8, got {bits}")
        self.mode = mode
        self.weights, self.method, self.chunk = weights, method, int(chunk)
        self.bits = None if bits is None else int(bits)

    def __repr__(self) -> str:
        opts = [f"{k}={getattr(self, k)!r}" for k in ("weights", "bits", "method") if getattr(self, k) is not None]
        return f"CorrectBias({', '.join(opts + [f'mode={self.mode!r}'])})"

    def _planned(self, node: Node, ctx: Context):
        return planned_weight_quant(node, self.option(ctx, "weights"), self.option(ctx, "method"),
                                    self.option(ctx, "bits"))

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        ctx.require_data(self.name)
        observed = cached_activation_stats(graph, ctx)
        result = self._run_sequential(graph, ctx) if self.mode == "sequential" else self._run_layers(graph, ctx)
        if result.modified and observed is not None:
            result.carried.append((ActivationStats(None), observed))
        return result

    def _run_layers(self, graph: Graph, ctx: Context) -> PassResult:
        deltas = {}
        for node in graph.find(*WEIGHTED_OPS):
            fq = self._planned(node, ctx)
            delta = quantized_kernel(node, fq).astype(np.float64) - node.weight.const.astype(np.float64)
            if np.any(delta):
                deltas[node.name] = (node, delta)
        if not deltas:
            return PassResult(graph, False, {"corrected": 0}, [Skip(None, "no kernel changes under quantization")])
        inputs = sorted({node.inputs[0].name for node, _ in deltas.values()})
        moments = channel_moments(graph, ctx, inputs, maps=inputs, stats=())
        shifts = {}
        for name, (node, delta) in deltas.items():
            shift = self._mean_error(node, delta, moments[node.inputs[0].name].map_mean)
            base = node.bias.const.astype(np.float64) if node.bias is not None else 0.0
            set_bias(graph, node, base - shift, "corrected")
            shifts[name] = float(np.max(np.abs(shift)))
        graph.remove_unused()
        worst = max(shifts, key=shifts.get)
        stats = {"corrected": len(shifts), "weights": self.option(ctx, "weights"), "bits": self.option(ctx, "bits"),
                 "images": len(ctx.data), "largest_shift": {worst: shifts[worst]}, "max_abs_shift": shifts}
        return PassResult(graph, True, stats)

    @staticmethod
    def _mean_error(node: Node, delta: np.ndarray, mean_map: np.ndarray) -> np.ndarray:
        """``E[conv(x, delta)]`` per output channel from the mean input map (exact: convolution is linear)."""
        kind = layer_kind(node)
        if kind == "dense":
            return mean_output_shift(delta, mean_map, kind)
        a = node.attrs
        pads = resolve_pads(a.padding, node.inputs[0].shape[1:3], delta.shape[:2], a.strides, a.dilations)
        return mean_output_shift(delta, mean_map, kind, a.strides, a.dilations, pads)

    def _run_sequential(self, graph: Graph, ctx: Context) -> PassResult:
        layers = graph.find(*WEIGHTED_OPS)
        attrs = {n.name: self._planned(n, ctx) for n in layers}
        if not any(np.any(quantized_kernel(n, attrs[n.name]) != n.weight.const) for n in layers):
            return PassResult(graph, False, {"corrected": 0}, [Skip(None, "no kernel changes under quantization")])
        ref = channel_moments(graph, ctx, [n.output.name for n in layers])
        work = graph.copy()
        for n in work.find(*WEIGHTED_OPS):
            n.weight_quant = attrs[n.name]
        shifts: Dict[str, float] = {}
        for layer in layers:
            prefix = work.copy()
            prefix.outputs = [prefix.value(layer.output.name)]
            prefix.remove_unused()
            ex = Executor(prefix, quantize=True)
            total, count = 0.0, 0
            for batch in ctx.data.batches():
                for s in range(0, len(batch), self.chunk):
                    y = np.asarray(ex(batch[s:s + self.chunk])[0], np.float64)
                    flat = y.reshape(-1, y.shape[-1])
                    total = total + flat.sum(0)
                    count += len(flat)
            err = total / count - ref[layer.output.name].mean
            node = work.node(layer.name)
            base = node.bias.const.astype(np.float64) if node.bias is not None else 0.0
            set_bias(work, node, base - err, "corrected")
            set_bias(graph, layer, base - err, "corrected")
            shifts[layer.name] = float(np.max(np.abs(err)))
        graph.remove_unused()
        worst = max(shifts, key=shifts.get)
        return PassResult(graph, True, {"corrected": len(shifts), "mode": "sequential",
                                        "weights": self.option(ctx, "weights"), "bits": self.option(ctx, "bits"),
                                        "largest_shift": {worst: shifts[worst]},
                                        "max_abs_shift": shifts})
