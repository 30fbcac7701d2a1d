"""Cross-layer equalization of consecutive layers (Nagel et al., arXiv 1906.04721; maths in
:mod:`qfrewrite.numerics.equalization`).

For layer 1 feeding layer 2 through a single-reader chain of positively homogeneous ops (``Relu``, ``Clip(0, hi)``,
per-channel ``Minimum``, zero ``Pad``, pools, ``GlobalMean``, channel-keeping reshapes:
:func:`qfrewrite.ir.is_positively_homogeneous` with rescaled bounds), output channel ``i`` of layer 1 (weights and
bias) is divided by ``s_i`` and input channel ``i`` of layer 2 multiplied by ``s_i``, ``s_i = sqrt(r1_i / r2_i)``.
Pairs: depthwise -> pointwise, pointwise -> depthwise, conv -> depthwise, conv -> conv, conv -> (pool) -> classifier.
Every pair is equalized in turn and the sweep repeated until no scale moves by more than ``tol`` (relative) or
``max_iter`` sweeps have run: chains of layers share their middle layer.

ReLU6 is not positively homogeneous: ``ReLU6(x) / s = min(ReLU(x / s), 6 / s)``. Three ways through a
``Clip(0, hi)``:

* ``clip="fused"`` (the default): the clip stays as it is, so the int8 model keeps the activation fused into the
  layer (XNNPACK fuses only scalar clamps), and the scales are constrained so that it stays exact on everything the
  calibration data shows: a channel whose pre-clip maximum ``m_i`` reaches ``hi`` keeps ``s_i = 1``, every other
  channel keeps ``s_i >= m_i / hi`` (its scaled values never reach the clip). *Exact* then means: equal on every
  calibration input; on other inputs the function differs only where a channel exceeds the largest value the
  calibration data showed it. Without data ``m_i`` is the interval bound of the pre-activation, a proof for every
  input. No rescaling that keeps one scalar clip can do better for a channel whose clip binds: exactness forces
  ``clip_i / s_i`` to be the same for all such channels of a tensor.
* ``clip="exact"`` rewrites ``Clip(0, hi)`` as ``Relu`` + ``Minimum`` with the per-channel constant ``hi / s`` (the
  float function is unchanged for every input). The int8 MINIMUM with a per-channel constant has no XNNPACK kernel:
  it runs in TFLite's reference kernel and splits the delegated graph (MobileNetV1/V2 with 27-35 of them ran
  1.10x slower on 1 thread and 1.41-1.48x on 2). It equalizes the channels whose clip binds too, which per-tensor
  weights on MobileNetV1 need (Keras MobileNetV1 0.25 per-tensor, 200 calibration / 500 evaluation images,
  simulated int8 top-1 of dfq without the comparison: 59.8 exact, 46.2 fused).
* ``clip="relu"`` rewrites it as ``Relu`` (not exact: the function changes wherever an activation exceeded ``hi``;
  on TF-slim MobileNetV1 ReLU6 -> ReLU everywhere cost 13 points of float top-1).

``clip=None`` takes the choice for the pipeline's quantization spec (:func:`clip_for`: ``"fused"`` for every target).

Activation guard (``act_guard=True``): dividing channel ``i`` by ``s_i < 1`` multiplies its activations by
``1/s_i``, which can widen the per-tensor activation range of the tensor between the layers (on TF-slim MobileNetV1
unguarded scales down to 0.017 took int8 top-1 from 33% to 24%). With the guard, the cumulative scale of channel ``i``
stays ``>= a_i / max_j a_j`` where ``a_i`` is the channel's largest magnitude on the calibration data (or, without
data, the chain's clip ``hi`` where it has one), so no channel leaves the tensor's current range.

Never scaled: dead and constant channels (static analysis, weights below ``zero_tol`` of the layer's largest),
channels whose range is below ``min_range`` times their layer's median; no channel's cumulative scale over all
sweeps leaves ``[1/max_scale, max_scale]``. Left alone: pairs joined through a node with several readers (a
residual ``Add`` between them, a graph output) or through any other op; each is a skip with the reason. A layer's
:class:`~qfrewrite.ir.FoldedBatchNorm` record is divided by its scales (it stays the factor between the kernel and its
pre-BatchNorm values).

Contract: requires ``BN_FOLDED`` (a pair cannot be joined through a BatchNorm); ensures ``EQUALIZED``; cannot run
once the weights are final or quantized.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from qfrewrite.analysis.calibration_pass import map_names
from qfrewrite.analysis.constant_channels import constant_channels, value_bounds
from qfrewrite.analysis.moments import ChannelMoments, channel_moments
from qfrewrite.contracts import Property
from qfrewrite.errors import QfrewriteError
from qfrewrite.ir import (WEIGHTED_OPS, Graph, Node, Op, const_operand, is_positively_homogeneous, layer_kind,
                          record_output_scaling, set_bias, set_kernel, walk_chain)
from qfrewrite.numerics.equalization import equalization_scales
from qfrewrite.numerics.kernels import in_absmax, out_absmax, scale_in, scale_out
from qfrewrite.pass_infra import Context, Pass, PassResult, Skip
from qfrewrite.quant.observers import ActivationStats, cached_activation_stats
from qfrewrite.spec import QuantSpec

__all__ = ["CrossLayerEqualization"]

log = logging.getLogger(__name__)

_CLIPS = ("exact", "relu", "fused")


def clip_for(spec: QuantSpec) -> str:
    """How equalization treats ReLU6 under ``spec``: ``"fused"`` for every target, since both runtimes fuse only a
    scalar clip into the layer before it (TFLite's XNNPACK and ONNX Runtime's QDQ fusion)."""
    return "fused"


def _output_factors(changed) -> dict:
    """``{value: factor}``: what equalization multiplies each value by, per channel, on the calibration data (the
    fused clip keeps the function there): the values a pair's first layer produces up to its second layer, by
    ``1 / s``; every other value is unchanged."""
    factor = {}
    for p in changed:
        for v in [p.first.output.name] + [n.output.name for n in p.chain]:
            factor[v] = 1.0 / p.scale
    return factor


def _rescaled(values: dict, factor: dict) -> dict:
    """Per-value statistics (anything with ``rescaled(factor)``) of the equalized graph from those before it."""
    return {k: (v.rescaled(factor[k]) if k in factor else v) for k, v in values.items()}


def _chain_op(node: Node) -> bool:
    return is_positively_homogeneous(node, rescaling_bounds=True)


@dataclass
class _Pair:
    first: Node
    chain: List[Node]
    second: Node
    frozen: np.ndarray
    scale: Optional[np.ndarray] = None  # accumulated s
    floor: Optional[np.ndarray] = None  # lower bound of the accumulated s (activation guard)


def _between(p: "_Pair") -> List[str]:
    """The values between the two layers that get quantized: the chain's outputs, or layer 1's output."""
    return [n.output.name for n in p.chain] or [p.first.output.name]


def _relu_for(graph: Graph, node: Node) -> Node:
    return graph.add_node(Op.RELU, [node.inputs[0]], name=node.name + "/relu", meta=dict(node.meta))


class CrossLayerEqualization(Pass):
    """Equalize per-channel weight ranges of consecutive layers."""

    requires = frozenset({Property.BN_FOLDED})
    ensures = frozenset({Property.EQUALIZED})
    rescales_channels = True
    forbids = frozenset({Property.WEIGHTS_FINAL, Property.QUANTIZED})

    def __init__(self, clip: Optional[str] = None, max_iter: int = 50, tol: float = 1e-3, min_range: float = 1e-3,
                 max_scale: float = 1e3, zero_tol: float = 1e-8, act_guard: bool = True):
        if clip is not None and clip not in _CLIPS:
            raise QfrewriteError(f"CrossLayerEqualization clip must be one of {_CLIPS}, got {clip!r}")
        if not 1 <= int(max_iter) <= 10000:
            raise QfrewriteError(f"max_iter must be in 1..10000, got {max_iter}")
        self.clip, self.max_iter, self.tol = clip, int(max_iter), float(tol)
        self.min_range, self.max_scale, self.zero_tol = float(min_range), float(max_scale), float(zero_tol)
        self.act_guard = bool(act_guard)

    def _clip(self, ctx: Optional[Context]) -> str:
        return self.clip if self.clip is not None else clip_for(ctx.spec if ctx is not None else QuantSpec())

    @property
    def exact(self) -> bool:  # type: ignore[override]
        """Only ``clip="exact"`` keeps the function for every input ("fused" keeps it on the calibration data)."""
        return self._clip(None) == "exact"

    def __repr__(self) -> str:
        return (f"CrossLayerEqualization(clip={self.clip!r}, max_iter={self.max_iter}, tol={self.tol}, "
                f"act_guard={self.act_guard})")

    def _pairs(self, graph: Graph, unpaired: List[Skip]) -> List[_Pair]:
        consts = constant_channels(graph, self.zero_tol)
        pairs = []
        for layer in graph.find(Op.CONV2D, Op.DEPTHWISE_CONV2D):
            res = walk_chain(layer, _chain_op, WEIGHTED_OPS, "positively homogeneous")
            if isinstance(res, str):
                unpaired.append(Skip(layer.name, res))
                continue
            chain, second = res
            c = layer.output.shape[-1]
            frozen = np.zeros(c, bool)
            for v in [layer.output] + [n.output for n in chain]:
                if v.name in consts:
                    frozen |= consts[v.name][0]
            pairs.append(_Pair(layer, chain, second, frozen))
        return pairs

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        unpaired: List[Skip] = []
        pairs = self._pairs(graph, unpaired)
        clip = self._clip(ctx)
        if not pairs:
            return PassResult(graph, False, {"pairs": 0},
                              unpaired + [Skip(None, "no pair of layers joined by a single-reader chain")])
        moments = self._moments(graph, ctx, pairs, clip)
        observed = cached_activation_stats(graph, ctx) if clip == "fused" else None
        if self.act_guard:
            self._activation_floors(graph, moments, pairs)
        binding = self._fused_clip_floors(graph, moments, pairs) if clip == "fused" else 0
        kernels = {}
        biases = {}
        for p in pairs:
            for n in (p.first, p.second):
                kernels[n.name] = n.weight.const.astype(np.float64)
                biases[n.name] = None if n.bias is None else n.bias.const.astype(np.float64)
        sweeps, moved = 0, float("inf")
        for sweeps in range(1, self.max_iter + 1):
            moved = 0.0
            for p in pairs:
                k1, k2 = kernels[p.first.name], kernels[p.second.name]
                s = equalization_scales(out_absmax(k1, layer_kind(p.first)), in_absmax(k2, layer_kind(p.second)),
                                        self.min_range, self.max_scale, np.flatnonzero(p.frozen))
                prev = 1.0 if p.scale is None else p.scale
                s = np.clip(s, 1.0 / (self.max_scale * prev), self.max_scale / prev)
                if p.floor is not None:
                    s = np.maximum(s, p.floor / prev)
                moved = max(moved, float(np.max(np.abs(np.log(s)))))
                kernels[p.first.name], biases[p.first.name] = scale_out(k1, biases[p.first.name], s,
                                                                        layer_kind(p.first))
                kernels[p.second.name] = scale_in(k2, s, layer_kind(p.second))
                p.scale = s if p.scale is None else p.scale * s
            if moved < self.tol:
                break
        # kernels and biases were scaled in float64 throughout: rounded to float32 once, here
        changed = [p for p in pairs if np.any(np.abs(np.log(p.scale)) > 0)]
        if not changed:
            return PassResult(graph, False, {"pairs": len(pairs), "sweeps": sweeps},
                              unpaired + [Skip(None, "every channel was guarded or already equalized")])
        touched = set()
        for p in changed:
            touched.update((p.first.name, p.second.name))
        for name in touched:
            node = graph.node(name)
            set_kernel(graph, node, kernels[name], "cle")
            if biases[name] is not None:
                set_bias(graph, node, biases[name], "cle")
        converted = []
        for p in changed:
            record_output_scaling(p.first, 1.0 / p.scale)
            if p.second.op is Op.DEPTHWISE_CONV2D:  # its input channel i is its output channels i*M .. i*M+M-1
                record_output_scaling(p.second, np.repeat(p.scale, p.second.weight.const.shape[3]))
            converted += self._rescale_chain(graph, p, clip)
        graph.remove_unused()
        factor = _output_factors(changed)
        carried = [(moments[0], _rescaled(moments[1], factor))] if clip == "fused" and moments is not None else []
        if observed is not None:
            carried += self._carried_observations(observed, factor)
        scales = np.concatenate([p.scale for p in changed])
        stats = {"pairs": len(pairs), "equalized": len(changed), "sweeps": sweeps, "converged": moved < self.tol,
                 "last_move": moved, "max_scale": float(scales.max()), "min_scale": float(scales.min()),
                 "guarded_channels": int(sum(p.frozen.sum() for p in pairs)), "clip": clip,
                 "clip_bound_channels": binding,
                 "clips_rewritten": converted}
        if clip == "relu" and converted:
            stats["warning"] = (f"clip='relu': {len(converted)} ReLU6/Clip turned into ReLU; not exact wherever an "
                                f"activation exceeded its clip")
            log.warning(stats["warning"])
        if moved >= self.tol:  # in the report's stats ("converged", "last_move"): the scales are sound either way
            log.info("CrossLayerEqualization stopped after %d sweeps (last move %.3g > tol %.3g)", sweeps, moved,
                     self.tol)
        return PassResult(graph, True, stats, unpaired, carried=carried)

    @staticmethod
    def _moments(graph: Graph, ctx: Context, pairs: List[_Pair], clip: str):
        """One pass over the calibration data (``None`` without data): per-channel min/max of the values between
        the layers (a clip's output maximum equals its bound where it binds), and the mean map of every layer's
        input. The maps are for CorrectBias: the fused clip keeps the function on the calibration data, so the maps
        after equalization are these divided by the scales (:func:`_output_factors`) and need no second pass."""
        if ctx.data is None:
            return None
        names = {v for p in pairs for v in _between(p)}
        maps = set(map_names(graph)) if clip == "fused" else set()
        return ChannelMoments(names, maps=maps, stats=("min", "max")), channel_moments(
            graph, ctx, names, maps=maps, stats=("min", "max"))

    @staticmethod
    def _carried_observations(observed, factor):
        """The activation statistics of the equalized graph, when those of the graph before were cached (a shared
        calibration pass, :func:`~qfrewrite.analysis.calibration_pass.serve`): rescaled by :func:`_output_factors`
        (:meth:`~qfrewrite.quant.observers.TensorStats.rescaled`: min/max exactly, the histograms from their
        per-channel histograms); nothing when a rescaled value's histogram was kept without per-channel histograms."""
        try:
            return [(ActivationStats(None), _rescaled(observed, factor))]
        except ValueError as exc:
            log.debug("activation statistics not carried through equalization: %s", exc)
            return []

    @staticmethod
    def _activation_floors(graph: Graph, moments, pairs: List[_Pair]) -> None:
        """Per pair, the lowest cumulative scale that keeps each channel inside the tensor's range."""
        bounds = value_bounds(graph) if moments is None else {}
        moments = None if moments is None else moments[1]
        for p in pairs:
            if moments is not None:
                a = np.max([np.maximum(np.abs(moments[v].min), np.abs(moments[v].max)) for v in _between(p)],
                           axis=0)
            else:  # the tightest bound that holds for every input: a clip in the chain or the interval bounds
                c = p.frozen.shape
                his = [np.full(c, float(n.attrs.hi)) for n in p.chain if n.op is Op.CLIP and n.attrs.hi is not None]
                his += [np.broadcast_to(np.asarray(const_operand(n)[1].const, np.float64).reshape(-1), c)
                        for n in p.chain if n.op is Op.MINIMUM]
                his += [np.maximum(np.abs(bounds[v][0]), np.abs(bounds[v][1])) for v in _between(p) if v in bounds]
                if not his:
                    continue
                a = np.minimum.reduce(his).astype(np.float64)
                if not np.all(np.isfinite(a)):
                    continue
            top = float(a.max()) if a.size else 0.0
            if top > 0:
                p.floor = a / top

    @staticmethod
    def _fused_clip_floors(graph: Graph, moments, pairs: List[_Pair]) -> int:
        """Constrain the scales so that every ``Clip(0, hi)`` of a chain stays as it is (fusable) and exact on the
        calibration data: a channel whose pre-clip maximum ``m_i`` reaches ``hi`` keeps ``s_i = 1``; the others keep
        ``s_i >= m_i / hi`` so that the scaled maximum ``m_i / s_i`` stays at or below ``hi``. Without data ``m_i``
        is the interval bound of the pre-activation (a proof for every input). Returns the number of channels held
        at 1 because their clip binds."""
        clips = [(p, n) for p in pairs for n in p.chain if n.op is Op.CLIP and n.attrs.hi is not None]
        if not clips:
            return 0
        # with data: the clip's output maximum, min(m_i, hi), which equals hi exactly where the clip binds
        if moments is not None:
            top = {n.name: np.asarray(moments[1][n.output.name].max, np.float64) for _, n in clips}
        else:
            bounds = value_bounds(graph)
            top = {n.name: bounds[n.inputs[0].name][1] for _, n in clips if n.inputs[0].name in bounds}
        held = 0
        for p, n in clips:
            c = p.frozen.shape[0]
            m = top.get(n.name, np.full(c, np.inf))
            m = np.broadcast_to(np.asarray(m, np.float64), (c,))
            binds = ~(m < n.attrs.hi)  # inf / nan (no bound known) bind too
            held += int(np.sum(binds & ~p.frozen))
            p.frozen = p.frozen | binds
            need = np.where(binds, 0.0, np.maximum(m, 0.0) / n.attrs.hi)
            p.floor = need if p.floor is None else np.maximum(p.floor, need)
        return held

    def _rescale_chain(self, graph: Graph, p: _Pair, clip: str) -> List[str]:
        """Carry ``1/s`` through the chain: per-channel clips divided by ``s``."""
        s = p.scale
        converted = []
        for node in p.chain:
            if node.op is Op.MINIMUM:
                x, c = const_operand(node)
                vec = np.broadcast_to(np.asarray(c.const, np.float64).reshape(-1), s.shape) / s
                idx = [i for i, v in enumerate(node.inputs) if v is c][0]
                node.set_input(idx, graph.const(vec.astype(np.float32), name=node.name + "/clip_cle"))
            elif node.op is Op.CLIP and clip != "fused":
                hi = node.attrs.hi
                relu = _relu_for(graph, node)
                out = relu
                if hi is not None and clip == "exact":
                    out = graph.add_node(Op.MINIMUM, [relu.output, graph.const((hi / s).astype(np.float32),
                                                                                name=node.name + "/clip_cle")],
                                         name=node.name + "/min", meta=dict(node.meta))
                node.output.replace_all_uses_with(out.output)
                graph.remove_node(node)
                converted.append(node.name)
        return converted
