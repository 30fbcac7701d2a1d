"""How much quantizing one layer alone hurts the graph outputs, measured on data.

For every Conv2D / DepthwiseConv2D / Dense layer ``L`` of a graph whose BatchNorms are folded, and for each of

* ``L``'s kernel quantized per tensor, and per output channel (symmetric narrow-range weights, exactly
  :func:`qfrewrite.quant.weights.weight_quant_attrs`, the quantization :class:`InsertFakeQuant` applies);
* ``L``'s output activation (the tensor the int8 model quantizes: after a sole-reader BatchNorm and ReLU/ReLU6)
  fake-quantized to a given range,

the float graph runs on the data with only that one change, and the harm is the SQNR of the graph outputs against
the float outputs, ``10 log10(sum y**2 / sum (y - y_q)**2)`` over every value of every output and image (``inf``
when nothing changes). The lower, the worse: a layer's harm depends on where it sits and on what its error passes
through (a residual branch, a ReLU that clips it, a head that amplifies it), not only on its own weights.

**Cost.** The graph is cut, in topological order, before every weighted layer and after every activation that gets
fake-quantized; each segment is one ``tf.function``, traced once, that takes the values it reads from earlier
segments (and its layer's kernel and bias as arguments, so that a quantized kernel needs no new trace). The images run
in chunks: each chunk goes through the float graph once, keeping the values the segments pass on; a column of layer
``L`` then reruns only the segments from ``L``'s on (for the activation, from the one after it, on the
fake-quantized float value) and reads every other value from the float run. So each layer costs one run of the part
of the graph after it per column, and values are released after their last reader. The segments of a chain run a
little slower than one traced graph of the whole model (fusions stop at the cuts); running the nodes eagerly
instead is about 4x slower on MobileNetV2.

:func:`measure_layer_harm` returns a :class:`LayerHarm` per layer (by node name) in a :class:`HarmMeasurement`, with
the wall time of each step (float runs, weight columns, activation columns).

:func:`estimated_harm_db` is the estimate without data: the SQNR of the layer's median channel with quantized weights,
from :class:`~qfrewrite.analysis.channel_stats.LayerStats`. :func:`noise_inputs` gives Gaussian-noise inputs on which
the harm can be measured without data, a far better estimate at the cost of the measurement.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError
from ..ir import WEIGHTED_OPS, FakeQuantAttrs, Graph, Node
from ..numerics.metrics import power_ratio_db
from ..quant.observers import chunk_size
from ..quant.weights import GRANULARITIES, quantized_kernel, weight_quant_attrs
from .channel_stats import LayerStats, activation_tensor

__all__ = ["LayerHarm", "HarmMeasurement", "measure_layer_harm", "estimated_harm_db", "diagnosis_harm", "noise_inputs",
           "ranked_layers", "harm_columns", "harm_legend", "COLUMNS", "HARM_IMAGES"]

log = logging.getLogger(__name__)

#: the measured columns: weights per tensor, weights per channel, the output activation
COLUMNS = ("per_tensor", "per_channel", "activations")
#: images ``qfrewrite diagnose`` measures the harm on by default (the first of its data)
HARM_IMAGES = 16
#: the table's short names of the columns
_SHORT = {"per_tensor": "out W/T", "per_channel": "out W/C", "activations": "out A"}
#: float values of one chunk held at a time (every value of the float run)
_CHUNK_BYTES = 512 * 2 ** 20


@dataclass
class LayerHarm:
    """The measured output SQNR (dB) of one layer quantized alone, per column of :data:`COLUMNS` that was measured."""

    name: str
    source_name: str
    op: str
    output_sqnr_db: Dict[str, float]
    #: the fake-quantized activation tensor (in the measured graph) and its range
    act_tensor: Optional[str] = None
    act_range: Optional[Tuple[float, float]] = None

    def db(self, column: str) -> float:
        return self.output_sqnr_db.get(column, float("nan"))

    def to_dict(self) -> Dict[str, object]:
        return {"output_sqnr_db": dict(self.output_sqnr_db),
                "act_range": None if self.act_range is None else list(self.act_range)}


@dataclass
class HarmMeasurement:
    """:class:`LayerHarm` of every weighted layer (by node name, topological order), the images used and the seconds
    each step took (``float``: the float runs, tracing included; one entry per column)."""

    layers: Dict[str, LayerHarm]
    images: int
    columns: Tuple[str, ...]
    seconds: Dict[str, float] = field(default_factory=dict)
    #: ``"data"``, or ``"noise"`` for Gaussian-noise inputs (:func:`noise_inputs`): an estimate without data
    inputs: str = "data"

    def ranked(self, column: str = "per_tensor") -> List[LayerHarm]:
        """Layers from the most harmful (lowest output SQNR in ``column``) to the least; unmeasured last."""
        def key(h: LayerHarm):
            v = h.db(column)
            return math.inf if math.isnan(v) else v

        return sorted(self.layers.values(), key=key)

    def to_dict(self) -> Dict[str, object]:
        return {"images": self.images, "inputs": self.inputs, "columns": list(self.columns),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def noise_inputs(graph: Graph, n: int, seed: int = 0) -> np.ndarray:
    """``n`` inputs for ``graph`` that are standard normal where the model's own normalisation puts them: after a
    leading ``Normalize`` (``x * scale + offset``, a model that takes raw pixels) when the input's only reader is
    one, else at the input itself (a model fed normalised images). Without data, the layer harm measured on them
    ranks the layers far better than the weights alone (``benchmarks/bench_diagnose_rank.py``)."""
    from ..ir import Op, sole_reader

    v = graph.inputs[0]
    if any(d is None for d in v.shape[1:]):
        raise DataError(f"noise inputs need a fixed input shape; {v.name} is {tuple(v.shape)}: give input_shape")
    z = np.random.default_rng(seed).standard_normal((int(n), *v.shape[1:]))
    norm = sole_reader(v)
    if norm is not None and norm.op is Op.NORMALIZE:
        z = (z - np.asarray(norm.attrs.offset, np.float64)) / np.asarray(norm.attrs.scale, np.float64)
    return z.astype(np.float32)


def estimated_harm_db(ls: LayerStats, granularity: str = "per_tensor") -> float:
    """Without data: the SQNR of the layer's median live channel with ``granularity`` weights (the figure the
    channel statistics rank by). It knows nothing of what follows the layer, so it is an estimate: on MobileNetV2
    its Spearman correlation with the measured output harm is about 0.5 (``benchmarks/bench_diagnose_rank.py``,
    which also measures the estimates that were tried in its place and ranked worse)."""
    return float(ls.sqnr_db.get(granularity, float("nan")))


class _Segments:
    """The graph cut, in topological order, before every weighted layer and after every fake-quantized activation:
    one traced ``tf.function`` per segment, taking the values it reads from earlier segments (and, when it starts
    with a weighted layer, that layer's kernel) and returning the values later segments or the graph outputs read.

    A run from segment ``k`` on changed values recomputes segments ``k ..`` and reads every value it does not
    change from the float run; a segment is traced once, whatever kernel it gets."""

    def __init__(self, graph: Graph, cuts_after: Iterable[str] = ()):
        import tensorflow as tf

        self.tf, self.graph = tf, graph
        order = graph.topological_order()
        after = set(cuts_after)
        groups: List[List[Node]] = []
        for node in order:
            if not groups or node.op in WEIGHTED_OPS or (groups[-1] and groups[-1][-1].name in after):
                groups.append([])
            groups[-1].append(node)
        self.segment_of = {n.name: k for k, grp in enumerate(groups) for n in grp}
        self.outputs = [v.name for v in graph.outputs]
        produced_in = {v.name: -1 for v in graph.inputs}
        produced_in.update({n.output.name: self.segment_of[n.name] for n in order})
        reads: List[List[str]] = []
        last_read: Dict[str, int] = {}
        for k, grp in enumerate(groups):
            own = {n.output.name for n in grp}
            ins = list(dict.fromkeys(v.name for n in grp for v in n.inputs if not v.is_const and v.name not in own))
            reads.append(ins)
            for name in ins:
                last_read[name] = k
        for name in self.outputs:
            last_read[name] = len(groups)
        self.reads = reads
        self.writes = [[n.output.name for n in grp if last_read.get(n.output.name, -1) > k]
                       for k, grp in enumerate(groups)]
        self.last_read = last_read
        self.groups = groups
        self._fns = [self._trace(grp, ins, outs) for grp, ins, outs in zip(groups, reads, self.writes)]
        self._float_kernels = {k: (tf.constant(grp[0].weight.const), tf.constant(
            grp[0].bias.const if grp[0].bias is not None else np.zeros(grp[0].output.shape[-1:], np.float32)))
            for k, grp in enumerate(groups) if grp[0].op in WEIGHTED_OPS}

    def _trace(self, nodes: List[Node], ins: List[str], outs: List[str]):
        from ..backend.tf_lowering import lower_node

        tf = self.tf
        weighted = nodes[0].op in WEIGHTED_OPS
        consts = {v.name: v.const for n in nodes for v in n.inputs if v.is_const}
        sig = [tf.TensorSpec([None, *self.graph.value(n).shape[1:]], tf.float32) for n in ins]
        if weighted:
            sig = [tf.TensorSpec(nodes[0].weight.const.shape, tf.float32),
                   tf.TensorSpec(nodes[0].output.shape[-1:], tf.float32)] + sig

        def fn(*xs):
            kernel, bias, xs = (xs[0], xs[1], xs[2:]) if weighted else (None, None, xs)
            env = dict(zip(ins, xs))
            for i, node in enumerate(nodes):
                args = [tf.constant(consts[v.name]) if v.is_const else env[v.name] for v in node.inputs]
                env[node.output.name] = lower_node(node, args, kernel=kernel if i == 0 else None,
                                                   bias=bias if i == 0 else None)
            return [env[n] for n in outs]

        return tf.function(fn, input_signature=sig, jit_compile=False, autograph=False)

    def _call(self, k: int, env: Mapping, base: Mapping, kernel=None, bias=None) -> Dict[str, object]:
        grp = self.groups[k]
        xs = [env[n] if n in env else base[n] for n in self.reads[k]]
        if grp[0].op in WEIGHTED_OPS:
            k0, b0 = self._float_kernels[k]
            xs = [k0 if kernel is None else kernel, b0 if bias is None else bias] + xs
        return dict(zip(self.writes[k], self._fns[k](*xs)))

    def float_run(self, x: np.ndarray) -> Dict[str, object]:
        """Every value a segment passes on, on ``x`` (the float graph)."""
        env: Dict[str, object] = {self.graph.inputs[0].name: self.tf.constant(x)}
        for k in range(len(self.groups)):
            env.update(self._call(k, env, env))
        return env

    def outputs_from(self, base: Mapping, start: int, changed: Optional[Mapping] = None, kernel=None,
                     bias=None) -> List[np.ndarray]:
        """The graph outputs when segments ``start ..`` are recomputed, segment ``start`` with ``kernel`` and
        ``bias`` when given, reading ``changed`` values in place of the float ones of ``base``."""
        env: Dict[str, object] = dict(changed or {})
        for k in range(start, len(self.groups)):
            env.update(self._call(k, env, base, kernel if k == start else None, bias if k == start else None))
            for name in [n for n in env if self.last_read.get(n, -1) <= k]:
                del env[name]
        return [np.asarray((env[o] if o in env else base[o]).numpy()) for o in self.outputs]


def measure_layer_harm(graph: Graph, batches: Iterable[np.ndarray], *,
                       act_ranges: Optional[Mapping[str, FakeQuantAttrs]] = None,
                       granularities: Sequence[str] = GRANULARITIES, method: str = "minmax", bits: int = 8,
                       layers: Optional[Sequence[str]] = None, limit: Optional[int] = None,
                       chunk: Optional[int] = None,
                       biases: Optional[Mapping[Tuple[str, str], np.ndarray]] = None,
                       inputs: str = "data") -> HarmMeasurement:
    """Measure the output SQNR of each weighted layer quantized alone (see the module docstring).

    ``graph``: single-input, BatchNorms folded (fold a copy with :class:`FoldBatchNorm` first: the weights are
    quantized as they are in the graph). ``batches``: NHWC float32 arrays. ``act_ranges``: ``{layer node name:
    FakeQuantAttrs}`` of the layer's output activation (:func:`activation_tensor`); layers without one get no
    activation column. ``granularities``, ``method``, ``bits``: the weight quantization (as
    :func:`weight_quant_attrs`). ``layers``: node names to measure (default: every weighted layer). ``limit``: use at
    most this many images. ``chunk``: images per float run (default: as many as keep one run's values near 512 MB).
    ``biases``: ``{(layer, granularity): bias}`` used with that layer's quantized kernel (a bias corrected for its
    quantization, e.g. by :class:`CorrectBias`); the float runs keep the graph's biases. ``inputs``: what the
    batches are (``"data"``, or ``"noise"`` from :func:`noise_inputs`), recorded in the result.
    """
    import tensorflow as tf

    from ..backend.tf_lowering import fake_quant_tf

    if len(graph.inputs) != 1:
        raise DataError(f"layer harm is measured on single-input graphs; {graph.name!r} has {len(graph.inputs)}")
    for g in granularities:
        if g not in GRANULARITIES:
            raise ValueError(f"granularities must be among {GRANULARITIES}, got {g!r}")
    granularities = [c for c in COLUMNS if c in granularities]
    act_ranges = dict(act_ranges or {})
    nodes = [graph.node(n) for n in layers] if layers is not None else graph.find(*WEIGHTED_OPS)
    kernels: Dict[Tuple[str, str], object] = {}
    for node in nodes:
        for g in granularities:
            kernels[node.name, g] = tf.constant(quantized_kernel(node, weight_quant_attrs(node, g, method, bits)))
    qbiases = {k: tf.constant(np.asarray(b, np.float32)) for k, b in (biases or {}).items()}
    acts = {n.name: activation_tensor(n) for n in nodes if n.name in act_ranges}
    columns = tuple(granularities) + (("activations",) if acts else ())
    segments = _Segments(graph, cuts_after=[graph.value(v).producer.name for v in acts.values()
                                            if graph.value(v).producer is not None])
    # the segments are traced on their first call: "float" includes that
    seconds = {"float": 0.0, **{c: 0.0 for c in columns}}
    frontier = sorted({n for w in segments.writes for n in w})
    chunk = int(chunk) if chunk else chunk_size(graph, frontier, _CHUNK_BYTES)

    noise = {(n.name, c): 0.0 for n in nodes for c in columns}
    signal, images = 0.0, 0

    def add(key, ref, outs):
        noise[key] += float(sum(np.sum((r.astype(np.float64) - o) ** 2) for r, o in zip(ref, outs)))

    for batch in batches:
        for s in range(0, len(batch), chunk):
            x = np.asarray(batch[s:s + chunk], np.float32)
            if limit is not None:
                x = x[:max(0, limit - images)]
            if len(x) == 0:
                continue
            t0 = time.perf_counter()
            base = segments.float_run(x)
            ref = [np.asarray(base[o].numpy()) for o in segments.outputs]
            signal += float(sum(np.sum(r.astype(np.float64) ** 2) for r in ref))
            seconds["float"] += time.perf_counter() - t0
            for node in nodes:
                start = segments.segment_of[node.name]
                for g in granularities:
                    t0 = time.perf_counter()
                    add((node.name, g), ref, segments.outputs_from(base, start, kernel=kernels[node.name, g],
                                                                   bias=qbiases.get((node.name, g))))
                    seconds[g] += time.perf_counter() - t0
                if node.name in acts:
                    t0 = time.perf_counter()
                    v = graph.value(acts[node.name])
                    changed = {v.name: fake_quant_tf(base[v.name], act_ranges[node.name])}
                    after = segments.segment_of[v.producer.name] + 1 if v.producer is not None else 0
                    add((node.name, "activations"), ref, segments.outputs_from(base, after, changed))
                    seconds["activations"] += time.perf_counter() - t0
            images += len(x)
        if limit is not None and images >= limit:
            break
    if images == 0:
        raise DataError("no images to measure the layer harm on")

    def db(n):
        return power_ratio_db(signal, n)

    out: Dict[str, LayerHarm] = {}
    for node in nodes:
        measured = {c: db(noise[node.name, c]) for c in columns if c != "activations" or node.name in acts}
        fq = act_ranges.get(node.name)
        out[node.name] = LayerHarm(node.name, node.source_name, node.op.value, measured,
                                   act_tensor=activation_tensor(node) if node.name in acts else None,
                                   act_range=None if fq is None else (float(fq.lo[0]), float(fq.hi[0])))
    log.info("layer harm of %d layers on %d images in %.1f s (%s)", len(out), images, sum(seconds.values()),
             ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return HarmMeasurement(out, images, columns, seconds, inputs)


def diagnosis_harm(graph: Graph, folded: Graph, ctx, stats, bits: int = 8, limit: Optional[int] = None,
                   biases: Optional[Mapping[Tuple[str, str], np.ndarray]] = None) -> HarmMeasurement:
    """:func:`measure_layer_harm` for ``qfrewrite diagnose``: on ``folded``, a copy of ``graph`` with its BatchNorms
    folded (by :class:`FoldBatchNorm`), on
    the context's calibration data (at most ``limit`` images), with the spec's weight method and ``bits``, and each
    layer's activation range chosen by the spec's method from the observer statistics the diagnosis already
    gathered (``stats``: its :class:`~qfrewrite.analysis.channel_stats.GraphChannelStats`; graph outputs take
    min/max, as :class:`InsertFakeQuant` does). ``biases``: as :func:`measure_layer_harm`'s."""
    from ..quant.observers import activation_stats
    from ..quant.ranges import activation_attrs

    spec = ctx.spec.resolved()
    data = ctx.require_data("the layer harm")
    names = [ls.act_tensor for ls in stats.values() if ls.act_tensor]
    observed = activation_stats(graph, ctx, names)
    outputs = {v.name for v in graph.outputs}
    act_ranges = {}
    for ls in stats.values():
        if ls.act_tensor in observed:
            method = "minmax" if ls.act_tensor in outputs else spec.activations
            act_ranges[ls.name] = activation_attrs(observed[ls.act_tensor], method, spec.activation_bits)
    return measure_layer_harm(folded, data.batches(), act_ranges=act_ranges, method=spec.weight_method, bits=bits,
                              layers=[n for n in stats if n in {x.name for x in folded.find(*WEIGHTED_OPS)}],
                              limit=limit, biases=biases)


def ranked_layers(stats, harm: Optional[HarmMeasurement], granularity: str = "per_tensor") -> List[LayerStats]:
    """The layers of ``stats`` from the most harmful: by the measured output SQNR of ``granularity`` weights when
    ``harm`` is given, else by the estimate of :func:`estimated_harm_db` (ties: the larger spread first)."""
    def key(ls: LayerStats):
        if harm is not None and ls.name in harm.layers:
            v = harm.layers[ls.name].db(granularity)
        else:
            v = estimated_harm_db(ls, granularity)
        return (math.inf if math.isnan(v) else v, -ls.spread if np.isfinite(ls.spread) else -math.inf)

    return sorted(stats.values(), key=key)


def harm_columns(harm: Optional[HarmMeasurement], layer: Optional[str] = None) -> List[str]:
    """The table's column names (``layer=None``) or one layer's cells (dB, ``-`` where not measured); none without
    a measurement."""
    if harm is None:
        return []
    if layer is None:
        return [_SHORT[c] for c in harm.columns]
    h = harm.layers.get(layer)
    return [f"{h.db(c):.1f}" if h is not None and c in h.output_sqnr_db else "-" for c in harm.columns]


def harm_legend(harm: Optional[HarmMeasurement]) -> str:
    """The legend line of the measured columns (empty without a measurement)."""
    if harm is None:
        return ""
    names = " / ".join(_SHORT[c] for c in harm.columns)
    what = {"per_tensor": "its weights per tensor", "per_channel": "its weights per channel",
            "activations": "its output activation"}
    on = f"{harm.images} image(s)" if harm.inputs == "data" else f"{harm.images} Gaussian-noise input(s) (no data)"
    return (f"{names}: SQNR (dB) of the graph outputs on {on} with only this layer quantized: "
            + " / ".join(what[c] for c in harm.columns) + "\n")

