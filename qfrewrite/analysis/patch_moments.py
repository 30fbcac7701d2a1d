"""Second moments of each weighted layer's input patches over the calibration data: what weight rounding needs
to know of the data (:mod:`qfrewrite.numerics.rounding`).

For a layer ``y = W x + b`` over its input patches ``x`` (the im2col rows: for a Conv2D the ``kh * kw * C_in``
values one output position reads, zero padding included, in the kernel's ``(kh, kw, C_in)`` order; for a Dense the
input vector, per position on an NHWC input), the analysis sums over every patch of every calibration image

* ``sum``: ``sum x`` (``(K,)``) and ``gram``: ``sum x x^T`` (``(K, K)``);
* for a DepthwiseConv2D, whose output channel ``c*M+m`` reads input channel ``c`` only, the same per input channel:
  ``sum`` ``(C, K)`` and ``gram`` ``(C, K, K)`` with ``K = kh * kw``.

The patches are formed and reduced inside the traced float function (``tf.image.extract_patches`` on the explicitly
padded input, then one matrix product per layer), ``chunk`` images a call, and accumulated in float64. The cost is
one pass over the data; the result's size does not grow with the number of images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..ir import WEIGHTED_OPS, Graph, Node, Op, layer_kind, resolve_pads
from ..pass_infra import Analysis, Context

__all__ = ["PatchMoments", "Patches", "patch_moments", "gather_patch_moments", "patch_width"]

#: float32 bytes of patches one call may form (about)
_CHUNK_BYTES = 256 * 2 ** 20


@dataclass
class Patches:
    """The input-patch moments of one layer (see the module docstring): ``sum`` and ``gram`` of its patches ``x``;
    when gathered against a reference graph (:func:`gather_patch_moments`), also ``ref_sum`` and ``ref_gram`` of
    the reference's patches ``x_f`` of the same layer and ``cross`` ``= sum x_f x^T``."""

    sum: np.ndarray
    gram: np.ndarray
    count: int
    ref_sum: Optional[np.ndarray] = None
    ref_gram: Optional[np.ndarray] = None
    cross: Optional[np.ndarray] = None

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def ref_mean(self) -> np.ndarray:
        return self.ref_sum / self.count

    def second_moment(self, centered: bool) -> np.ndarray:
        """``E[x x^T]``, or with ``centered`` the covariance ``E[x x^T] - E[x] E[x]^T`` (batched for depthwise)."""
        return _moment(self.gram, self.mean, self.mean, self.count, centered, symmetric=True)

    def ref_second_moment(self, centered: bool) -> np.ndarray:
        """The reference's ``E[x_f x_f^T]`` (centred: its covariance)."""
        return _moment(self.ref_gram, self.ref_mean, self.ref_mean, self.count, centered, symmetric=True)

    def cross_moment(self, centered: bool) -> np.ndarray:
        """``E[x_f x^T]`` (centred: ``E[x_f x^T] - E[x_f] E[x]^T``)."""
        return _moment(self.cross, self.ref_mean, self.mean, self.count, centered, symmetric=False)


def _moment(total, mean_a, mean_b, count, centered: bool, symmetric: bool) -> np.ndarray:
    h = total / count
    if centered:
        h = h - mean_a[..., :, None] * mean_b[..., None, :]
    return 0.5 * (h + np.swapaxes(h, -1, -2)) if symmetric else h


def patch_width(node: Node) -> int:
    """``K``: the values one output of ``node`` reads (per input channel for a depthwise layer)."""
    k = node.weight.const
    kind = layer_kind(node)
    if kind == "dense":
        return k.shape[0]
    if kind == "depthwise":
        return k.shape[0] * k.shape[1]
    return k.shape[0] * k.shape[1] * k.shape[2]


def _patches_per_image(node: Node) -> int:
    """Output positions of ``node`` per image (1 for a Dense on vectors)."""
    shape = node.output.shape
    return int(np.prod(shape[1:-1])) if len(shape) > 2 else 1


def _patch_rows(tf, x, node: Node):
    """The layer's input patches: ``(P, K)``, or ``(P, K, C)`` for a depthwise layer."""
    kind = layer_kind(node)
    c = node.inputs[0].shape[-1]
    if kind == "dense":
        return tf.reshape(x, [-1, c])
    kh, kw = node.weight.const.shape[:2]
    a = node.attrs
    if (kh, kw) == (1, 1) and tuple(a.strides) == (1, 1) and kind == "conv":
        return tf.reshape(x, [-1, c])
    (t, b), (l, r) = resolve_pads(a.padding, node.inputs[0].shape[1:3], (kh, kw), a.strides, a.dilations)
    if t or b or l or r:
        x = tf.pad(x, [[0, 0], [t, b], [l, r], [0, 0]])
    p = tf.image.extract_patches(x, sizes=[1, kh, kw, 1], strides=[1, *a.strides, 1], rates=[1, *a.dilations, 1],
                                 padding="VALID")
    if kind == "depthwise":
        return tf.reshape(p, [-1, kh * kw, c])
    return tf.reshape(p, [-1, kh * kw * c])


def _prefix(graph: Graph, names: Sequence[str]) -> Graph:
    """A copy of ``graph`` computing only what the values ``names`` need."""
    g = graph.copy()
    g.outputs = [g.value(n) for n in names] or list(g.outputs)
    g.remove_unused()
    return g


def _layer_nodes(graph: Graph, layers: Optional[Sequence[str]]):
    nodes = [n for n in graph.find(*WEIGHTED_OPS) if n.weight is not None and n.weight.const is not None]
    if layers is not None:
        want = set(layers)
        nodes = [n for n in nodes if n.name in want]
    for n in nodes:
        if any(d is None for d in n.inputs[0].shape[1:]):
            raise DataError(f"layer {n.name!r} reads the open shape {tuple(n.inputs[0].shape)}: give the model "
                            f"a fixed input shape (--input-shape) to gather its input statistics")
    return nodes


def gather_patch_moments(graph: Graph, data, layers: Optional[Sequence[str]] = None, reference: Optional[Graph] = None,
                         quantize: bool = False, chunk: Optional[int] = None, progress: Optional[bool] = None,
                         desc: str = "input statistics") -> Dict[str, Patches]:
    """:class:`Patches` of ``layers`` (names; default every weighted layer with a constant kernel) over ``data`` (a
    :class:`~qfrewrite.data.CalibrationSet`), in one pass. ``quantize``: run ``graph`` with its weight and
    activation quantization simulated. With ``reference`` (a graph holding layers of the same names, run in float)
    the patches of both are formed from the same images and the reference's moments and the cross moments are
    kept too. Only the part of each graph the layers' inputs need is run."""
    import tensorflow as tf
    from tqdm.auto import tqdm

    from ..backend.executor import _checked_inputs
    from ..backend.tf_lowering import lower

    nodes = _layer_nodes(graph, layers)
    if not nodes:
        return {}
    if len(graph.inputs) != 1:
        raise DataError(f"input statistics are gathered on single-input graphs; {graph.name!r} has "
                        f"{len(graph.inputs)} inputs")
    graphs = [graph] if reference is None else [graph, reference]
    input_names = [{v.name for v in g.inputs} for g in graphs]
    taps = [sorted({g.node(n.name).inputs[0].name for n in nodes} - ins) for g, ins in zip(graphs, input_names)]
    prefixes = [_prefix(g, t) for g, t in zip(graphs, taps)]
    per_image = sum(4 * _patches_per_image(n) * patch_width(n)
                    * (n.inputs[0].shape[-1] if n.op is Op.DEPTHWISE_CONV2D else 1) for n in nodes) * len(graphs)
    chunk = chunk or int(np.clip(_CHUNK_BYTES // max(per_image, 1), 1, 32))
    sig = [tf.TensorSpec([None, *v.shape[1:]], tf.float32) for v in graph.inputs]

    def fn(x):
        rows = []
        for k, (g, pre, t) in enumerate(zip(graphs, prefixes, taps)):
            tapped = lower(pre, [x], quantize=quantize and k == 0, taps=t)[1] if t else {}
            per_layer = {}
            for n in nodes:
                node = g.node(n.name)
                name = node.inputs[0].name
                v = tf.ensure_shape(tapped.get(name, x), [None, *node.inputs[0].shape[1:]])
                r = _patch_rows(tf, v, node)
                per_layer[n.name] = tf.transpose(r, [2, 0, 1]) if node.op is Op.DEPTHWISE_CONV2D else r
            rows.append(per_layer)
        out = {}
        for n in nodes:
            p = rows[0][n.name]
            axis = 1 if n.op is Op.DEPTHWISE_CONV2D else 0  # depthwise: (C, P, K), else (P, K)
            res = [tf.reduce_sum(p, axis=axis), tf.matmul(p, p, transpose_a=True)]
            if reference is not None:
                f = rows[1][n.name]
                res += [tf.reduce_sum(f, axis=axis), tf.matmul(f, f, transpose_a=True), tf.matmul(f, p, transpose_a=True)]
            out[n.name] = res
        return out

    traced = tf.function(fn, input_signature=sig, autograph=False)
    totals: Dict[str, list] = {}
    images = 0
    disable = None if progress is None else not progress
    with tqdm(total=len(data), desc=desc, unit="img", disable=disable, leave=False) as bar:
        for batch in data.batches():
            for s in range(0, len(batch), chunk):
                x = _checked_inputs(graph, [batch[s:s + chunk]])[0]
                for name, parts in traced(x).items():
                    arrays = [t.numpy().astype(np.float64) for t in parts]
                    have = totals.get(name)
                    totals[name] = arrays if have is None else [a + b for a, b in zip(have, arrays)]
                images += len(x)
                bar.update(len(x))
    out = {}
    for n in nodes:
        parts = totals[n.name]
        count = images * _patches_per_image(n)
        out[n.name] = Patches(parts[0], parts[1], count) if reference is None else Patches(
            parts[0], parts[1], count, ref_sum=parts[2], ref_gram=parts[3], cross=parts[4])
    return out


class PatchMoments(Analysis):
    """:class:`Patches` of the named weighted layers (default: every Conv2D, DepthwiseConv2D and Dense with a
    constant kernel) of the float graph over the calibration data, cached per graph state."""

    def __init__(self, layers: Optional[Sequence[str]] = None, chunk: Optional[int] = None,
                 progress: Optional[bool] = None):
        self.layers = None if layers is None else tuple(sorted(layers))
        self.chunk, self.progress = chunk, progress
        self.name = "patch_moments:" + ("*" if self.layers is None else ",".join(self.layers))

    def compute(self, graph: Graph, ctx: Context) -> Dict[str, Patches]:
        data = ctx.require_data("input-patch statistics")
        return gather_patch_moments(graph, data, self.layers, chunk=self.chunk, progress=self.progress)


def patch_moments(graph: Graph, ctx: Context, layers: Optional[Sequence[str]] = None) -> Dict[str, Patches]:
    """:class:`PatchMoments` of ``layers`` (default: every weighted layer), cached in ``ctx`` for this graph state."""
    return ctx.analysis(PatchMoments(layers), graph)
