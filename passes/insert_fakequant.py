"""Insert fake quantization: calibrated FakeQuant nodes on activations and ``weight_quant`` on every kernel, placed
where TensorFlow's TFLite converter materialises int8 tensors, so that :meth:`Result.to_tflite` writes a fully
integer model whose ranges are exactly the ones chosen here.

**Weights.** Every Conv2D / DepthwiseConv2D / Dense kernel without ``weight_quant`` gets
:func:`qfrewrite.quant.weights.weight_quant_attrs` (symmetric narrow range, ``weights`` granularity,
``weight_method``); the kernel stays float. A kernel that already carries ``weight_quant`` keeps it. The converter
stores a bias as int32 codes of step ``s_in * s_w``: a channel whose weights are near zero (a dead channel) but
whose bias is not would overflow, so its weight range is widened until ``|b| / (s_in * s_w) <= 2**30``; its
weights are then (near) zero codes, which changes the output by far less than one output step
(``stats["bias_fit_channels"]``).
With per-channel weights a Dense on ``(N, C)`` is rewritten as ``Reshape(1, 1, C) -> Conv2D 1x1 -> Reshape(C_out)``
and a Dense on ``(N, H, W, C)`` as a Conv2D 1x1 (exact; the converter rejects per-channel MatMul weights); a Dense on
another rank keeps per-tensor weights, with a warning. Ops that TensorFlow lowers to several element-wise ops with
no int8 kernel of their own are spelled out in the IR (exact) so that every intermediate tensor gets a range:
``BatchNorm`` left unfolded and ``Normalize`` as ``Mul`` + ``Add`` with constant operands, ``HardSigmoid`` as
``Add(3)``, ``Clip(0, 6)``, ``Mul(1/6)``. (``HardSwish`` and ``Sigmoid`` have int8 kernels.)

**Activations.** A FakeQuant goes on

* every graph input (range: observed min/max);
* the output of every op that the converter materialises, **after** the activation it fuses: a Conv2D /
  DepthwiseConv2D / Dense / Add whose only reader is ``Relu`` or ``Clip(0, 6)`` / ``Clip(0, None)`` gets no FakeQuant
  of its own; the activation's output gets it (a FakeQuant between a conv and its ReLU6 is silently dropped by the
  converter);
* Add, Mul, Minimum, Concat, GlobalMean, Normalize-derived Mul/Add, HardSwish, non-fusable Clip/Relu;
* Softmax and Sigmoid outputs with the fixed int8 range ``[0, 255/256]`` the TFLite kernels require;
* not on Pad, MaxPool, AveragePool, Reshape, Flatten: TFLite runs them at their input's scale.

``Minimum`` with a constant operand (a per-channel clip) and ``Concat`` run in int8 with their inputs at the
output's scale (the converter imposes it): an input read by nothing else takes the output's range (for the clip
exact, as the clipped values lie inside; for Concat the output range is the union of the inputs').

Activation ranges come from one streaming pass of the observers (:mod:`qfrewrite.quant.observers`) and the chosen
method (``activations``: ``mse`` default, ``minmax``, ``percentile``, ``kl``); graph inputs and outputs always use
min/max (clipping the extreme logits would merge the top classes). Every range has an integer zero point.

**Options** are statements of the pipeline's :class:`~qfrewrite.spec.QuantSpec`: ``weights`` (granularity),
``weight_method``, ``bits`` (activation bits) and ``activations`` (range method) given here must agree with every
other pass's; the ones left out come from the spec, so CorrectBias and this pass always apply the same ``W_q``.

Not exact (the pass manager reports the drift of the simulated int8 function). Needs calibration data
(:class:`~qfrewrite.errors.DataError` otherwise). A graph that already holds FakeQuant nodes is left alone
(``modified=False`` with the reason). Contract: ensures ``QUANTIZED`` and ``WEIGHTS_FINAL``; with
``rounding="learned"`` in the spec it requires ``WEIGHTS_ROUNDED`` (a rounding pass before it).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import numpy as np

from qfrewrite.contracts import Contract, Property
from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import (WEIGHTED_OPS, ClipAttrs, ConvAttrs, FakeQuantAttrs, Graph, Op, ReshapeAttrs, bn_affine, const_operand, is_graph_output, sole_reader)
from qfrewrite.numerics.ranges import ACTIVATION_METHODS
from qfrewrite.pass_infra import Context, Pass, PassResult, Skip
from qfrewrite.quant.observers import ActivationStats, activation_stats, cached_activation_stats
from qfrewrite.quant.points import SAME_SCALE_OPS as _SAME_SCALE
from qfrewrite.quant.points import output_sources as _output_sources
from qfrewrite.quant.points import quantization_points
from qfrewrite.quant.ranges import activation_range
from qfrewrite.quant.weights import GRANULARITIES, WEIGHT_METHODS, weight_quant_attrs
from qfrewrite.spec import QuantSpec

__all__ = ["InsertFakeQuant", "quantization_points"]

log = logging.getLogger(__name__)

#: ops with a fixed int8 output range
_FIXED_OUTPUT = (Op.SOFTMAX, Op.SIGMOID)
#: the largest int32 bias code allowed (half of int32's range: headroom for the accumulator)
_BIAS_LIMIT = 2.0 ** 30


class InsertFakeQuant(Pass):
    """Calibrate and insert FakeQuant on activations and weight fake-quantization on every kernel."""

    exact = False
    needs_data = True
    ensures = frozenset({Property.QUANTIZED, Property.WEIGHTS_FINAL})
    spec_options = {"weights": "weights", "activations": "activations", "bits": "activation_bits",
                    "weight_method": "weight_method"}

    def __init__(self, weights: Optional[str] = None, activations: Optional[str] = None, bits: Optional[int] = None,
                 weight_method: Optional[str] = None, percentile: float = 99.99, saturation_weight: float = 1.0):
        if weights is not None and weights not in GRANULARITIES:
            raise QfrewriteError(f"InsertFakeQuant weights must be one of {GRANULARITIES}, got {weights!r}")
        if activations is not None and activations not in ACTIVATION_METHODS:
            raise QfrewriteError(f"InsertFakeQuant activations must be one of {ACTIVATION_METHODS}, "
                                 f"got {activations!r}")
        if weight_method is not None and weight_method not in WEIGHT_METHODS:
            raise QfrewriteError(f"InsertFakeQuant weight_method must be one of {WEIGHT_METHODS}, "
                                 f"got {weight_method!r}")
        if bits is not None and int(bits) != 8:
            raise QfrewriteError(f"InsertFakeQuant supports bits=8 (the TFLite int8 kernels), got {bits}")
        self.weights, self.activations = weights, activations
        self.bits = None if bits is None else int(bits)
        self.weight_method, self.percentile = weight_method, float(percentile)
        self.saturation_weight = float(saturation_weight)

    def contract(self, spec: QuantSpec) -> Contract:
        c = super().contract(spec)
        if spec.rounding == "learned":
            c = Contract(c.requires | {Property.WEIGHTS_ROUNDED}, c.ensures, c.forbids)
        return c

    def __repr__(self) -> str:
        opts = [f"{k}={getattr(self, k)!r}" for k in ("weights", "activations", "bits", "weight_method")
                if getattr(self, k) is not None]
        return f"InsertFakeQuant({', '.join(opts)})"

    # -- exact structural rewrites -------------------------------------------------------------------------------
    def _dense_as_conv(self, graph: Graph, weights: str, method: str, bits: int,
                       aliases: Dict[str, str]) -> List[str]:
        """Dense layers with per-channel weights as 1x1 convs; ``aliases`` gets each new value's name mapped to the
        existing value that holds the same numbers (so that statistics observed before carry over)."""
        done = []
        for node in graph.find(Op.DENSE):
            wq = node.weight_quant
            if (wq is None and weights != "per_channel") or (wq is not None and not wq.per_channel):
                continue
            x = node.inputs[0]
            if len(x.shape) not in (2, 4):
                log.warning("Dense %s on a rank-%d input keeps per-tensor weights (per-channel needs a 1x1 conv)",
                            node.name, len(x.shape))
                node.weight_quant = weight_quant_attrs(node, "per_tensor", method, bits)
                continue
            c, out = node.weight.const.shape
            y = x
            if len(x.shape) == 2:
                y = graph.add_node(Op.RESHAPE, [x], ReshapeAttrs((1, 1, c)), name=node.name + "/to_nhwc").output
            ins = [y, graph.const(node.weight.const.reshape(1, 1, c, out), name=node.name + "/kernel_1x1")]
            if node.bias is not None:
                ins.append(node.bias)
            conv = graph.add_node(Op.CONV2D, ins, ConvAttrs(), name=node.name + "/as_conv",
                                  meta={**node.meta, "source_name": node.source_name, "from_dense": True})
            conv.weight_quant = node.weight_quant
            conv.folded_bn = node.folded_bn
            y = conv.output
            if len(x.shape) == 2:
                aliases[ins[0].name] = x.name
                aliases[conv.output.name] = node.output.name
                y = graph.add_node(Op.RESHAPE, [y], ReshapeAttrs((out,)), name=node.name + "/flatten").output
            aliases[y.name] = node.output.name
            node.output.replace_all_uses_with(y)
            graph.remove_node(node)
            done.append(node.name)
        return done

    def _affine_as_mul_add(self, graph: Graph) -> List[str]:
        done = []
        for node in graph.find(Op.BATCH_NORM, Op.NORMALIZE):
            c = node.inputs[0].shape[-1]
            if node.op is Op.BATCH_NORM:
                scale, shift, _ = bn_affine(node)
            else:
                scale = np.asarray(node.attrs.scale, np.float64)
                shift = np.asarray(node.attrs.offset, np.float64)
                if c is not None:
                    scale, shift = np.broadcast_to(scale, (c,)), np.broadcast_to(shift, (c,))
            y = node.inputs[0]
            if not np.all(scale == 1.0):
                y = graph.add_node(Op.MUL, [y, graph.const(scale, name=node.name + "/scale")],
                                   name=node.name + "/mul").output
            if not np.all(shift == 0.0) or y is node.inputs[0]:
                y = graph.add_node(Op.ADD, [y, graph.const(shift, name=node.name + "/shift")],
                                   name=node.name + "/add").output
            node.output.replace_all_uses_with(y)
            graph.remove_node(node)
            done.append(node.name)
        return done

    def _fit_biases(self, graph: Graph) -> Dict[str, List[int]]:
        """Widen weight ranges whose int32 bias would overflow; returns ``{layer: [channels]}``."""
        out: Dict[str, List[int]] = {}
        for node in graph.find(*WEIGHTED_OPS):
            fq, bias = node.weight_quant, node.bias
            v = node.inputs[0]
            while v.producer is not None and v.producer.op in _SAME_SCALE:
                v = v.producer.inputs[0]
            if fq is None or bias is None or v.producer is None or v.producer.op is not Op.FAKE_QUANT:
                continue
            a = v.producer.attrs
            s_in = (a.hi[0] - a.lo[0]) / (2 ** a.bits - 1)
            levels = 2 ** (fq.bits - 1) - 1
            absmax = np.asarray(fq.hi, np.float64)
            b = np.abs(bias.const.astype(np.float64))
            need = b / (s_in * _BIAS_LIMIT) * levels  # the absmax that keeps |b / (s_in * s_w)| <= limit
            need = need if len(absmax) == len(b) else np.array([need.max()])
            grow = need > absmax
            if grow.any():
                absmax = np.maximum(absmax, need)
                node.weight_quant = FakeQuantAttrs(lo=tuple(float(-m) for m in absmax),
                                                   hi=tuple(float(m) for m in absmax), bits=fq.bits,
                                                   narrow_range=fq.narrow_range, axis=fq.axis)
                out[node.name] = np.flatnonzero(grow).tolist()
        return out

    def _hard_sigmoid_as_ops(self, graph: Graph) -> List[str]:
        """``HardSigmoid(x) = Clip(x + 3, 0, 6) * (1/6)`` as Add, Clip, Mul (exact), each output quantizable."""
        done = []
        for node in graph.find(Op.HARD_SIGMOID):
            x = node.inputs[0]
            c = x.shape[-1]
            three = np.full(c, 3.0) if c is not None else np.float32(3.0)
            sixth = np.full(c, 1.0 / 6.0) if c is not None else np.float32(1.0 / 6.0)
            y = graph.add_node(Op.ADD, [x, graph.const(three, name=node.name + "/three")], name=node.name + "/add")
            y = graph.add_node(Op.CLIP, [y.output], ClipAttrs(0.0, 6.0), name=node.name + "/relu6")
            y = graph.add_node(Op.MUL, [y.output, graph.const(sixth, name=node.name + "/sixth")],
                               name=node.name + "/mul")
            node.output.replace_all_uses_with(y.output)
            graph.remove_node(node)
            done.append(node.name)
        return done

    # -- the pass ------------------------------------------------------------------------------------------------
    def run(self, graph: Graph, ctx: Context) -> PassResult:
        if graph.find(Op.FAKE_QUANT):
            return PassResult(graph, False, {}, [Skip(None, "the graph already holds FakeQuant nodes")])
        ctx.require_data(self.name)
        weights, method = self.option(ctx, "weights"), self.option(ctx, "weight_method")
        bits, activations = self.option(ctx, "bits"), self.option(ctx, "activations")
        weight_bits = ctx.spec.weight_bits
        stats: Dict = {"weights": weights, "activations": activations, "bits": bits}
        rewritten = self._affine_as_mul_add(graph) + self._hard_sigmoid_as_ops(graph)
        if rewritten:
            log.info("rewrote %d BatchNorm/Normalize/HardSigmoid nodes as Mul/Add/Clip (run FoldBatchNorm first to "
                     "fold BatchNorm into the layers)", len(rewritten))
            stats["rewritten_as_elementwise"] = rewritten
        every = ActivationStats(None)
        observed_before = cached_activation_stats(graph, ctx)
        aliases: Dict[str, str] = {}
        dense = self._dense_as_conv(graph, weights, method, weight_bits, aliases)
        if dense:
            stats["dense_as_conv"] = dense
        if rewritten or dense:
            ctx.invalidate()
            if observed_before is not None and not rewritten:  # the 1x1 convs compute what the Dense layers did
                carried = dict(observed_before)
                carried.update({new: observed_before[old] for new, old in aliases.items() if old in observed_before})
                ctx.put(every, graph, carried)

        # weights
        n_weights = 0
        for node in graph.find(*WEIGHTED_OPS):
            if node.weight_quant is None:
                node.weight_quant = weight_quant_attrs(node, weights, method, weight_bits)
                n_weights += 1

        # activations
        points = quantization_points(graph)
        observed = activation_stats(graph, ctx, points)
        inputs = {v.name for v in graph.inputs}
        outputs = _output_sources(graph)
        ranges: Dict[str, Tuple[float, float]] = {}
        for name in points:
            producer = graph.value(name).producer
            if producer is not None and producer.op in _FIXED_OUTPUT:
                q = 2.0 ** bits
                ranges[name] = (0.0, (q - 1.0) / q)
                continue
            how = "minmax" if (name in inputs or name in outputs) else activations
            ranges[name] = activation_range(observed[name], how, bits, percentile=self.percentile,
                                            saturation_weight=self.saturation_weight)
        # ops that TFLite runs with their inputs at the output's scale: the inputs take the output's range
        for node in graph.find(Op.MINIMUM, Op.CONCAT):
            if node.op is Op.MINIMUM:
                x, _ = const_operand(node)
                tied = [] if x is None else [x]
            else:
                tied = [v for v in node.inputs if not v.is_const]
            for x in tied:
                if x.name in ranges and node.output.name in ranges and sole_reader(x) is node:
                    ranges[x.name] = ranges[node.output.name]
        for name in points:
            v = graph.value(name)
            lo, hi = ranges[name]
            base = v.producer.name if v.producer is not None else v.name
            attrs = FakeQuantAttrs(lo=(float(lo),), hi=(float(hi),), bits=bits, narrow_range=False, axis=None)
            users = v.uses()
            fq = graph.add_node(Op.FAKE_QUANT, [v], attrs, name=f"{base}/fake_quant")
            for node, i in users:
                node.set_input(i, fq.output)
            if is_graph_output(v):
                graph.outputs = [fq.output if o is v else o for o in graph.outputs]
        widened = self._fit_biases(graph)
        if widened:
            stats["bias_fit_channels"] = widened
            log.info("weight ranges widened so that int32 biases do not overflow: %s", widened)
        stats.update({"fake_quant_nodes": len(points), "weight_quant": n_weights,
                      "ranges": {n: [float(a), float(b)] for n, (a, b) in ranges.items()},
                      "images": len(ctx.data)})
        return PassResult(graph, True, stats)
