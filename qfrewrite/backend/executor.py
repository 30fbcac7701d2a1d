"""The reference executor: run an IR graph on numpy batches through its TensorFlow lowering."""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from ..errors import DataError
from ..ir import Graph
from .tf_lowering import lower

__all__ = ["Executor", "run_graph"]

log = logging.getLogger(__name__)


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

    def _check(self, xs: Sequence[np.ndarray]) -> List[np.ndarray]:
        if len(xs) != len(self.graph.inputs):
            raise DataError(f"the graph has {len(self.graph.inputs)} inputs, got {len(xs)} arrays")
        out = []
        for x, v in zip(xs, self.graph.inputs):
            x = np.asarray(x, dtype=np.float32)
            if x.ndim != len(v.shape) or any(d is not None and d != s for d, s in zip(v.shape[1:], x.shape[1:])):
                raise DataError(f"input {v.name} expects shape {tuple(v.shape)} (NHWC), got {x.shape}")
            out.append(x)
        return out

    def __call__(self, *xs: np.ndarray):
        """Outputs for one batch, and the tapped values when taps were asked (as ``(outputs, taps_dict)``)."""
        outs, tapped = self._fn(*self._check(xs))
        outs = [o.numpy() for o in outs]
        if self.taps:
            return outs, {name: t.numpy() for name, t in zip(self.taps, tapped)}
        return outs


def run_graph(graph: Graph, *xs: np.ndarray, quantize: bool = False, batch_size: int = 32) -> List[np.ndarray]:
    """Run ``graph`` on NHWC arrays in batches; returns the list of outputs (concatenated over batches)."""
    ex = Executor(graph, quantize=quantize)
    n = xs[0].shape[0]
    chunks: List[List[np.ndarray]] = []
    for s in range(0, n, batch_size):
        chunks.append(ex(*(x[s:s + batch_size] for x in xs)))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(graph.outputs))]
