"""Empirical bias correction for weight quantization (Nagel et al., arXiv 1906.04721, section 4.3; maths in
:mod:`qfrewrite.numerics.bias`).

Quantizing a layer's kernel ``W -> W_q`` shifts the expectation of each output channel by ``E[conv(x, W_q - W)]``.
For every Conv2D, DepthwiseConv2D and Dense layer the pass runs the float graph on the calibration data, feeds each
layer's float input ``x`` through the same layer with kernel ``W_q - W`` and no bias, averages per output channel,
and subtracts that mean from the bias. Running the real layer includes the zero-padded borders exactly (the
closed form ``(W_q - W) E[x]`` misses them).

``W_q`` is exactly the weight quantization :class:`InsertFakeQuant` will apply: a kernel that already carries
``node.weight_quant`` uses it; otherwise the pass builds it from the same options (``weights="per_tensor"`` or
``"per_channel"``, ``bits``, ``method``) with the same function InsertFakeQuant uses. Run it after every pass that
changes weights and before InsertFakeQuant, with the same options.

``mode="sequential"`` also removes the mean error that quantized layers upstream pass on: layer by layer in
topological order, the graph up to the layer is run with every kernel before it fake-quantized (and already
corrected) and the layer's bias shifted by ``E[y_q] - E[y]`` of its output, ``E[y]`` from the float graph. This
costs one run of the data through the graph up to each layer (about ``layers / 2`` full passes).

Not exact (the float function changes by design); the pass manager reports the drift. Left alone: layers whose
kernel quantizes without error.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import numpy as np

from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import FakeQuantAttrs, Graph, GlobalMeanAttrs, Node, Op
from qfrewrite.numerics.quantize import fake_quant_np
from qfrewrite.pass_infra import Context, Pass, PassResult

from ._activations import iterate_taps
from ._layers import LAYER_OPS, set_bias

__all__ = ["CorrectBias", "weight_attrs", "quantized_kernel"]

log = logging.getLogger(__name__)

_GRANULARITY = ("per_tensor", "per_channel")
_MODES = ("layer", "sequential")


def weight_attrs(node: Node, weights: str, bits: int = 8, method: Optional[str] = None) -> FakeQuantAttrs:
    """The weight fake-quantization InsertFakeQuant applies to ``node`` with these options."""
    if node.weight_quant is not None:
        return node.weight_quant
    try:
        from qfrewrite.quant.weights import weight_quant_attrs
    except ImportError:
        from qfrewrite.numerics.quantize import symmetric_weight_attrs

        return symmetric_weight_attrs(node, per_channel=(weights == "per_channel"), bits=bits)
    kwargs = {} if method is None else {"method": method}
    return weight_quant_attrs(node, weights, bits=bits, **kwargs)


def quantized_kernel(node: Node, fq: FakeQuantAttrs) -> np.ndarray:
    """``node``'s kernel after fake quantization with ``fq`` (per-channel ranges on the output channels)."""
    k = node.weight.const
    if len(fq.lo) == 1 and fq.axis is None:
        return fake_quant_np(k, fq.lo[0], fq.hi[0], fq.bits, fq.narrow_range)
    lo, hi = np.asarray(fq.lo), np.asarray(fq.hi)
    if node.op is Op.DEPTHWISE_CONV2D:
        kh, kw, c, m = k.shape
        return fake_quant_np(k.reshape(kh, kw, c * m), lo, hi, fq.bits, fq.narrow_range).reshape(k.shape)
    return fake_quant_np(k, lo, hi, fq.bits, fq.narrow_range)


def _delta_graph(node: Node, delta: np.ndarray) -> Graph:
    """A one-layer graph: ``node`` with kernel ``delta``, no bias, followed by a spatial mean."""
    g = Graph(f"{node.name}/delta")
    x = g.add_input("x", node.inputs[0].shape)
    y = g.add_node(node.op, [x, g.const(delta)], node.attrs).output
    if len(y.shape) == 4:
        y = g.add_node(Op.GLOBAL_MEAN, [y], GlobalMeanAttrs(keepdims=False)).output
    g.outputs = [y]
    return g


class CorrectBias(Pass):
    """Subtract the expected output error of the quantized kernels from the biases."""

    exact = False

    def __init__(self, weights: str = "per_tensor", bits: int = 8, method: Optional[str] = None, chunk: int = 8,
                 mode: str = "layer"):
        if mode not in _MODES:
            raise QfrewriteError(f"CorrectBias mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        if weights not in _GRANULARITY:
            raise QfrewriteError(f"CorrectBias weights must be one of {_GRANULARITY}, got {weights!r}")
        if not 2 <= int(bits) <= 16:
            raise QfrewriteError(f"bits must be in 2..16, got {bits}")
        self.weights, self.bits, self.method, self.chunk = weights, int(bits), method, int(chunk)

    def __repr__(self) -> str:
        return f"CorrectBias(weights={self.weights!r}, bits={self.bits}, mode={self.mode!r})"

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        from qfrewrite.backend.executor import Executor

        ctx.require_data(self.name)
        if self.mode == "sequential":
            return self._run_sequential(graph, ctx)
        layers = [n for n in graph.find(*LAYER_OPS)]
        jobs = {}
        for node in layers:
            fq = weight_attrs(node, self.weights, self.bits, self.method)
            delta = quantized_kernel(node, fq).astype(np.float64) - node.weight.const.astype(np.float64)
            if not np.any(delta):
                continue
            jobs[node.name] = (node, Executor(_delta_graph(node, delta.astype(np.float32))))
        if not jobs:
            return PassResult(graph, False, {"corrected": 0, "reason": "no kernel changes under quantization"})
        inputs = sorted({node.inputs[0].name for node, _ in jobs.values()})
        sums: Dict[str, np.ndarray] = {}
        count = 0
        for taps in iterate_taps(graph, ctx, inputs, self.name, self.chunk):
            count += len(next(iter(taps.values())))
            for name, (node, ex) in jobs.items():
                y = np.asarray(ex(taps[node.inputs[0].name])[0], np.float64)
                s = y.reshape(len(y), -1).sum(0)
                sums[name] = s if name not in sums else sums[name] + s
        shifts = {}
        for name, (node, _) in jobs.items():
            shift = sums[name] / count
            base = node.bias.const.astype(np.float64) if node.bias is not None else 0.0
            set_bias(graph, node, base - shift, "corrected")
            shifts[name] = float(np.max(np.abs(shift)))
        graph.remove_unused()
        worst = max(shifts, key=shifts.get)
        stats = {"corrected": len(shifts), "weights": self.weights, "bits": self.bits, "images": count,
                 "largest_shift": {worst: shifts[worst]}, "max_abs_shift": shifts}
        return PassResult(graph, True, stats)

    def _run_sequential(self, graph: Graph, ctx: Context) -> PassResult:
        from qfrewrite.backend.executor import Executor

        from ._activations import channel_moments

        layers = graph.find(*LAYER_OPS)
        attrs = {n.name: weight_attrs(n, self.weights, self.bits, self.method) for n in layers}
        if not any(np.any(quantized_kernel(n, attrs[n.name]) != n.weight.const) for n in layers):
            return PassResult(graph, False, {"corrected": 0, "reason": "no kernel changes under quantization"})
        ref = channel_moments(graph, ctx, [n.output.name for n in layers])
        work = graph.copy()
        for n in work.find(*LAYER_OPS):
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
        return PassResult(graph, True, {"corrected": len(shifts), "mode": "sequential", "weights": self.weights,
                                        "bits": self.bits, "largest_shift": {worst: shifts[worst]},
                                        "max_abs_shift": shifts})
