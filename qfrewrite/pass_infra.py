"""Pass contract, context with cached analyses, and the pass manager.

* A :class:`Pass` has a ``name``, an ``exact`` flag (does it keep the float function?) and
  ``run(graph, ctx) -> PassResult(graph, modified, stats)``. ``modified`` is set only by real edits; a pass that
  cannot apply says why in ``stats`` and returns ``modified=False``; a real error raises.
* :class:`Context` carries the calibration data and caches analyses (activation ranges, channel statistics); the
  cache is invalidated whenever a pass reports ``modified=True``.
* :class:`PassManager` is itself a pass: it runs a bounded list, verifies the graph after every pass, records one
  :class:`~qfrewrite.report.PassReport` per pass (channel statistics before and after; for a non-exact pass the float
  output drift in dB) and wraps failures in :class:`PassError` naming the pass and those that ran before it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .errors import PassError, QfrewriteError
from .ir import Graph, verify

__all__ = ["Pass", "PassResult", "Context", "PassManager", "Analysis", "output_drift"]

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What a pass returns: the (possibly same, edited in place) graph, whether it changed, and its statistics."""

    graph: Graph
    modified: bool
    stats: Dict[str, Any] = field(default_factory=dict)


class Analysis:
    """A cached computation over a graph (and the context's data). Subclasses set ``name`` and implement
    :meth:`compute`. Results are cached in :class:`Context` until a pass modifies the graph."""

    name: str = "analysis"

    def compute(self, graph: Graph, ctx: "Context") -> Any:  # pragma: no cover - interface
        raise NotImplementedError


class Context:
    """Carries calibration data, options and cached analyses through a pass pipeline.

    ``data`` is a :class:`qfrewrite.data.CalibrationSet` (or ``None`` for data-free passes).
    """

    def __init__(self, data=None, options: Optional[Dict[str, Any]] = None):
        self.data = data
        self.options: Dict[str, Any] = dict(options or {})
        self._cache: Dict[str, Any] = {}
        self.report = None  # set by PassManager

    def analysis(self, analysis: Analysis, graph: Graph) -> Any:
        """The result of ``analysis`` on ``graph``, computed once per graph state."""
        key = f"{analysis.name}:{id(graph)}"
        if key not in self._cache:
            log.debug("computing analysis %s", analysis.name)
            self._cache[key] = analysis.compute(graph, self)
        return self._cache[key]

    def cached(self, name: str, graph: Graph) -> bool:
        return f"{name}:{id(graph)}" in self._cache

    def invalidate(self) -> None:
        """Drop every cached analysis (called after a modifying pass)."""
        self._cache.clear()

    def require_data(self, who: str):
        from .errors import DataError

        if self.data is None:
            raise DataError(f"{who} needs calibration data: pass data=... (an image folder, an array or batches)")
        return self.data


class Pass:
    """Base class of every pass. Subclasses set ``exact`` and implement :meth:`run`."""

    exact: bool = True

    @property
    def name(self) -> str:
        return type(self).__name__

    def run(self, graph: Graph, ctx: Context) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, graph: Graph, ctx: Optional[Context] = None) -> PassResult:
        return self.run(graph, ctx if ctx is not None else Context())

    def __repr__(self) -> str:
        return f"{self.name}()"


def output_drift(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> Dict[str, float]:
    """SQNR in dB of ``outputs`` against ``reference`` (inf when identical), max abs diff and top-1 agreement."""
    ref = np.concatenate([np.asarray(r, np.float64).ravel() for r in reference])
    out = np.concatenate([np.asarray(o, np.float64).ravel() for o in outputs])
    noise = float(np.sum((ref - out) ** 2))
    signal = float(np.sum(ref ** 2))
    sqnr = float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)
    agree = float(np.mean(np.argmax(reference[0].reshape(len(reference[0]), -1), -1)
                          == np.argmax(outputs[0].reshape(len(outputs[0]), -1), -1)))
    return {"sqnr_db": sqnr, "max_abs_diff": float(np.max(np.abs(ref - out))) if ref.size else 0.0,
            "top1_agreement": agree}


#: the statistics hook: a callable ``(graph) -> summary`` recorded before and after each pass
StatsHook = Callable[[Graph], Any]


class PassManager(Pass):
    """Run passes in order, verifying after each one and recording a report.

    ``stats`` gives the per-channel statistics of a graph (``None``: no statistics): an :class:`Analysis`, cached in
    the context and so recomputed only after a modifying pass (default:
    :class:`~qfrewrite.analysis.channel_stats.ChannelStats`), or a callable ``(graph) -> summary``.
    ``drift_batch`` is an NHWC batch used to measure the float output drift of non-exact passes; by default the first
    calibration batch of the context, else a fixed random batch.
    """

    def __init__(self, passes: Sequence[Pass], verify_each: bool = True, stats: Optional[StatsHook] = "default",
                 measure_drift: bool = True, max_passes: int = 1000):
        self.passes = list(passes)
        if len(self.passes) > max_passes:
            raise QfrewriteError(f"a pipeline holds at most {max_passes} passes, got {len(self.passes)}")
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"{p!r} is not a qfrewrite Pass (did you forget the parentheses?)")
        self.verify_each = verify_each
        if stats == "default":
            from .analysis.channel_stats import ChannelStats

            stats = ChannelStats()
        self.stats = stats
        self.measure_drift = measure_drift

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return all(p.exact for p in self.passes)

    def _drift_inputs(self, graph: Graph, ctx: Context) -> List[np.ndarray]:
        if ctx.data is not None:
            return list(ctx.data.drift_batch())
        rng = np.random.default_rng(0)
        return [rng.standard_normal((4, *[d or 224 for d in v.shape[1:]])).astype(np.float32) for v in graph.inputs]

    def _stats(self, graph: Graph, ctx: Context):
        """The statistics hook's result: an :class:`Analysis` hook is cached in ``ctx``, a callable is called."""
        if not self.stats:
            return None
        if isinstance(self.stats, Analysis):
            return ctx.analysis(self.stats, graph)
        return self.stats(graph)

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        from .backend.executor import Executor
        from .report import PassReport, Report

        if ctx.report is None:
            ctx.report = Report(source=graph.meta.get("source"))
        report = ctx.report
        if self.verify_each:
            verify(graph)
        any_modified = False
        ran: List[str] = []
        drift_inputs = None
        for p in self.passes:
            before = self._stats(graph, ctx)
            ref_outputs = None
            if self.measure_drift and not p.exact:
                drift_inputs = drift_inputs if drift_inputs is not None else self._drift_inputs(graph, ctx)
                ref_outputs = Executor(graph, quantize=True)(*drift_inputs)
            t0 = time.perf_counter()
            log.info("running pass %s", p.name)
            try:
                result = p.run(graph, ctx)
                if result.modified:
                    ctx.invalidate()
                if self.verify_each:
                    verify(result.graph)
            except QfrewriteError as exc:
                if isinstance(exc, PassError):
                    raise
                raise PassError(f"pass {p.name} failed (after: {', '.join(ran) or 'none'}): {exc}") from exc
            except Exception as exc:
                raise PassError(f"pass {p.name} failed (after: {', '.join(ran) or 'none'}): "
                                f"{type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - t0
            graph = result.graph
            any_modified |= result.modified
            ran.append(p.name)
            drift = None
            if ref_outputs is not None and result.modified:
                drift = output_drift(ref_outputs, Executor(graph, quantize=True)(*drift_inputs))
                drift["on"] = "calibration batch" if ctx.data is not None else "random normal batch"
            after = self._stats(graph, ctx) if result.modified else before
            report.add(PassReport(name=p.name, exact=p.exact, modified=result.modified, stats=result.stats,
                                  seconds=seconds, drift=drift, stats_before=before, stats_after=after))
            log.info("pass %s: modified=%s %s", p.name, result.modified, result.stats)
        return PassResult(graph, any_modified, {"passes": ran})
