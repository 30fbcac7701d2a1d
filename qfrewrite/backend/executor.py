"""The reference executor: run an IR graph on numpy batches through its TensorFlow lowering.

:class:`Executor` returns the outputs (and, with ``taps``, named intermediate values as arrays).
:class:`ReducingExecutor` returns, for each named value, statistics computed inside the traced function
(:class:`Reduction`: per-channel min/max/sum/sum of squares, the per-position sum over the batch, a strided sample of
positions), so that calibration never copies whole activations out of TensorFlow.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..ir import Graph
from .tf_lowering import lower

__all__ = ["Executor", "ReducingExecutor", "Reduction", "run_graph"]

log = logging.getLogger(__name__)


class _RetracingNotice(logging.Filter):
    """TensorFlow's notice that several tf.functions were traced: every executor is a new traced function of a new
    graph state by design (one per pass), so the notice tells the user nothing they can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


logging.getLogger("tensorflow").addFilter(_RetracingNotice())


class Executor:
    """A compiled (traced) function of one graph state. Build it once, call it on many batches.

    ``taps`` names intermediate values to return besides the outputs; ``quantize`` simulates FakeQuant.
    The graph must not change while the executor is in use (build a new one after a pass).
    """

    def __init__(self, graph: Graph, taps: Optional[Sequence[str]] = None, quantize: bool = False):
        import tensorflow as tf

        self.graph = graph
        self.taps = list(taps or [])
        self.quantize = quantize
        sig = [tf.TensorSpec([None, *v.shape[1:]], tf.float32, name=f"in{i}") for i, v in enumerate(graph.inputs)]
        taps_ = self.taps

        def fn(*xs):
            if taps_:
                outs, tapped = lower(graph, xs, quantize=quantize, taps=taps_)
                return outs, [tapped[t] for t in taps_]
            return lower(graph, xs, quantize=quantize), []

        self._fn = tf.function(fn, input_signature=sig, jit_compile=False, autograph=False)

    def __call__(self, *xs: np.ndarray):
        """Outputs for one batch, and the tapped values when taps were asked (as ``(outputs, taps_dict)``)."""
        outs, tapped = self._fn(*_checked_inputs(self.graph, xs))
        outs = [o.numpy() for o in outs]
        if self.taps:
            return outs, {name: t.numpy() for name, t in zip(self.taps, tapped)}
        return outs


def _checked_inputs(graph: Graph, xs: Sequence[np.ndarray]) -> List[np.ndarray]:
    """``xs`` as float32 arrays, one per graph input, each of the input's shape (batch open); DataError otherwise."""
    if len(xs) != len(graph.inputs):
        raise DataError(f"the graph has {len(graph.inputs)} inputs, got {len(xs)} arrays")
    out = []
    for x, v in zip(xs, graph.inputs):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != len(v.shape) or any(d is not None and d != s for d, s in zip(v.shape[1:], x.shape[1:])):
            raise DataError(f"input {v.name} expects shape {tuple(v.shape)} (NHWC), got {x.shape}")
        out.append(x)
    return out


@dataclass(frozen=True)
class Reduction:
    """What :class:`ReducingExecutor` computes from one value per call (channels on the last axis); each is one pass
    over the value, so ask only for what is used:

    * ``min``, ``max``, ``sum``, ``sumsq``: per channel over every other axis (with ``count``, the positions per
      channel);
    * ``batch_sum``: the sum over the batch axis (``(H, W, C)`` for NHWC), for mean maps;
    * ``sample_rows``: at most this many positions of each item, evenly strided, as ``sample`` ``(N, rows, C)``
      (``0``: none; ``-1``: every position);
    * ``sample_zeros``: with a sample, the number of exact zeros in it per channel, as ``sample_zeros`` ``(C,)``
      (counted in the traced function, where it runs threaded).
    """

    min: bool = False
    max: bool = False
    sum: bool = False
    sumsq: bool = False
    batch_sum: bool = False
    sample_rows: int = 0
    sample_zeros: bool = False


class ReducingExecutor:
    """A traced function of one graph state returning, per value named in ``reductions``, the statistics its
    :class:`Reduction` asks for, as numpy arrays: ``{name: {"min", "max", "sum", "count", "sumsq", "batch_sum",
    "sample"}}`` (only the asked ones). Graph inputs may be named too."""

    def __init__(self, graph: Graph, reductions: Mapping[str, Reduction], quantize: bool = False):
        import tensorflow as tf

        self.graph = graph
        self.reductions = dict(reductions)
        names = list(self.reductions)
        inputs = {v.name: i for i, v in enumerate(graph.inputs)}
        taps = [n for n in names if n not in inputs]
        sig = [tf.TensorSpec([None, *v.shape[1:]], tf.float32, name=f"in{i}") for i, v in enumerate(graph.inputs)]
        specs = self.reductions

        def reduce(name: str, t, r: Reduction):
            # static shapes (all but the batch) keep the traced graph small: tracing costs more than it runs; where
            # TensorFlow's lowering lost them, the IR's shape of the value holds them
            dims = list(t.shape[1:])
            if any(d is None for d in dims):
                dims = list(graph.value(name).shape[1:])
            if any(d is None for d in dims):
                raise DataError(f"value {name!r} has the open shape {tuple(graph.value(name).shape)} and cannot be "
                                f"calibrated: give the model a fixed input shape (--input-shape)")
            t = tf.ensure_shape(t, [None, *dims])
            c = int(dims[-1])
            positions = int(np.prod(dims[:-1])) if len(dims) > 1 else 1
            rows = tf.reshape(t, [-1, positions, c])
            out = {}
            if r.min:
                out["min"] = tf.reduce_min(rows, axis=[0, 1])
            if r.max:
                out["max"] = tf.reduce_max(rows, axis=[0, 1])
            if r.sum:
                out["sum"] = tf.reduce_sum(rows, axis=[0, 1])
            if r.sumsq:
                out["sumsq"] = tf.reduce_sum(tf.square(rows), axis=[0, 1])
            if r.batch_sum:
                out["batch_sum"] = tf.reduce_sum(t, axis=0)
            if r.sample_rows:
                step = 1 if r.sample_rows < 0 else max(1, -(-positions // r.sample_rows))
                # a gather of the strided positions: the same values as ``rows[:, ::step]``, whose strided slice
                # runs about ten times slower in TensorFlow on CPU
                out["sample"] = tf.gather(rows, np.arange(0, positions, step, dtype=np.int32), axis=1) if step > 1 \
                    else rows
                if r.sample_zeros:
                    out["sample_zeros"] = tf.reduce_sum(tf.cast(tf.equal(out["sample"], 0.0), tf.int32), axis=[0, 1])
            return out

        # one flat list of outputs, ``self._keys`` naming each: a nested structure costs a walk of it on every call
        self._keys = [(n, k) for n in names for k in _output_keys(specs[n])]

        def fn(*xs):
            if taps:
                _, tapped = lower(graph, xs, quantize=quantize, taps=taps)
            else:
                tapped = {}
            values = {n: (xs[inputs[n]] if n in inputs else tapped[n]) for n in names}
            reduced = {n: reduce(n, values[n], specs[n]) for n in names}
            return [reduced[n][k] for n, k in self._keys]

        self._fn = tf.function(fn, input_signature=sig, jit_compile=False, autograph=False)
        self._names = names

    def __call__(self, *xs: np.ndarray) -> Dict[str, Dict[str, np.ndarray]]:
        xs = _checked_inputs(self.graph, xs)
        out = self._fn(*xs)  # an open shape fails here, in the trace, with its DataError
        res: Dict[str, Dict[str, np.ndarray]] = {}
        for name in self._names:
            shape = self.graph.value(name).shape
            res[name] = {"count": len(xs[0]) * (int(np.prod(shape[1:-1])) if len(shape) > 2 else 1)}
        for (name, key), value in zip(self._keys, out):
            res[name][key] = value.numpy()
        return res


def _output_keys(r: Reduction) -> List[str]:
    """The statistics a :class:`Reduction` asks for, in the order :class:`ReducingExecutor` returns them."""
    keys = [k for k in ("min", "max", "sum", "sumsq", "batch_sum") if getattr(r, k)]
    if r.sample_rows:
        keys.append("sample")
        if r.sample_zeros:
            keys.append("sample_zeros")
    return keys


def run_graph(graph: Graph, *xs: np.ndarray, quantize: bool = False, batch_size: int = 32) -> List[np.ndarray]:
    """Run ``graph`` on NHWC arrays in batches; returns the list of outputs (concatenated over batches)."""
    ex = Executor(graph, quantize=quantize)
    n = xs[0].shape[0]
    chunks: List[List[np.ndarray]] = []
    for s in range(0, n, batch_size):
        chunks.append(ex(*(x[s:s + batch_size] for x in xs)))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(graph.outputs))]
