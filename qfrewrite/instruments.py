"""The pass manager's instruments: what :func:`qfrewrite.rewrite` measures and checks around every pass.

* :class:`Verify`: the graph invariants (:func:`qfrewrite.ir.verify`) before the first pass and after each one;
* :class:`MeasureDrift`: for a non-exact pass that changed the graph, the drift of the (simulated int8) outputs on a
  calibration batch, or a fixed random batch without data (SQNR in dB, max abs diff, top-1 agreement);
* :class:`ChannelStatistics`: per-channel statistics of the weights before and after each pass (an
  :class:`~qfrewrite.pass_infra.Analysis`, cached in the context, so recomputed only after a modifying pass), or any
  callable ``(graph) -> summary``;
* :class:`CollectReport`: one :class:`~qfrewrite.report.PassReport` per pass, gathered in a
  :class:`~qfrewrite.report.Report`.

Instruments write into ``record.measurements`` (``"drift"``, ``"stats_before"``, ``"stats_after"``); the report reads
them there, so :class:`CollectReport` goes last.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Union

import numpy as np

from .analysis.channel_stats import ChannelStats
from .backend.executor import Executor
from .ir import Graph, verify
from .numerics.metrics import output_drift
from .pass_infra import Analysis, Context, Instrument, Pass, PassRecord, PassResult
from .report import PassReport, Report

__all__ = ["Verify", "MeasureDrift", "ChannelStatistics", "CollectReport", "TracedGraph", "default_instruments"]


class Verify(Instrument):
    """Check the graph invariants before the first pass and after every pass."""

    def start(self, graph: Graph, ctx: Context) -> None:
        verify(graph)

    def after_pass(self, p: Pass, result: PassResult, ctx: Context, record: PassRecord) -> None:
        verify(result.graph)


class TracedGraph(Analysis):
    """The graph's traced :class:`~qfrewrite.backend.executor.Executor` (``quantize``: simulated int8), cached in the
    context like any analysis, so consecutive users of one graph state trace it once."""

    def __init__(self, quantize: bool = True):
        self.quantize = bool(quantize)
        self.name = f"traced_graph:quantize={self.quantize}"

    def compute(self, graph: Graph, ctx: Context) -> Executor:
        return Executor(graph, quantize=self.quantize)


class MeasureDrift(Instrument):
    """Output drift of each non-exact pass that modified the graph (see the module docstring)."""

    def __init__(self, batch: int = 4):
        self.batch = int(batch)
        self._inputs: Optional[List[np.ndarray]] = None
        self._reference = None

    def start(self, graph: Graph, ctx: Context) -> None:
        self._inputs, self._reference = None, None

    def _drift_inputs(self, graph: Graph, ctx: Context) -> List[np.ndarray]:
        if self._inputs is None:
            if ctx.data is not None:
                self._inputs = list(ctx.data.drift_batch())
            else:
                rng = np.random.default_rng(0)
                self._inputs = [rng.standard_normal((self.batch, *[d or 224 for d in v.shape[1:]])).astype(np.float32)
                                for v in graph.inputs]
        return self._inputs

    def before_pass(self, p: Pass, graph: Graph, ctx: Context, record: PassRecord) -> None:
        self._reference = None
        if not p.exact:
            self._reference = ctx.analysis(TracedGraph(), graph)(*self._drift_inputs(graph, ctx))

    def after_pass(self, p: Pass, result: PassResult, ctx: Context, record: PassRecord) -> None:
        if self._reference is not None and result.modified:
            drift = output_drift(self._reference, ctx.analysis(TracedGraph(), result.graph)(*self._inputs))
            drift["on"] = "calibration batch" if ctx.data is not None else "random normal batch"
            record.measurements["drift"] = drift
        self._reference = None


class ChannelStatistics(Instrument):
    """Per-channel statistics before and after each pass: an :class:`Analysis` (cached in the context; default
    :class:`~qfrewrite.analysis.channel_stats.ChannelStats`) or a callable ``(graph) -> summary``."""

    def __init__(self, stats: Union[Analysis, Callable[[Graph], Any], None] = None):
        self.stats = stats if stats is not None else ChannelStats()

    def _compute(self, graph: Graph, ctx: Context):
        if isinstance(self.stats, Analysis):
            return ctx.analysis(self.stats, graph)
        return self.stats(graph)

    def before_pass(self, p: Pass, graph: Graph, ctx: Context, record: PassRecord) -> None:
        record.measurements["stats_before"] = self._compute(graph, ctx)

    def after_pass(self, p: Pass, result: PassResult, ctx: Context, record: PassRecord) -> None:
        record.measurements["stats_after"] = (self._compute(result.graph, ctx) if result.modified
                                              else record.measurements.get("stats_before"))


class CollectReport(Instrument):
    """Gather a :class:`~qfrewrite.report.PassReport` per pass into :attr:`report`."""

    def __init__(self, report: Optional[Report] = None):
        self.report = report

    def start(self, graph: Graph, ctx: Context) -> None:
        if self.report is None:
            self.report = Report(source=graph.meta.get("source"))

    def after_pass(self, p: Pass, result: PassResult, ctx: Context, record: PassRecord) -> None:
        self._add(record, record.name, False)

    def _add(self, record: PassRecord, name: str, inner: bool) -> None:
        m = record.measurements
        self.report.add(PassReport(name=name, exact=record.exact, modified=record.modified,
                                   stats=record.stats, skipped=record.skipped, seconds=record.seconds,
                                   drift=m.get("drift"), stats_before=m.get("stats_before"),
                                   stats_after=m.get("stats_after"), inner=inner))
        for sub in record.nested:  # the inner passes that made the graph, as rows of their own
            self._add(sub, f"{name} > {sub.name}", True)


def default_instruments(verify_each: bool = True, stats: Union[bool, Analysis, Callable, None] = True,
                        measure_drift: bool = True, report: Optional[Report] = None) -> List[Instrument]:
    """The instruments :func:`qfrewrite.rewrite` runs: verification, drift, channel statistics and the report
    (``stats=True``: the default :class:`ChannelStats`; an Analysis or callable replaces it; falsy: none)."""
    out: List[Instrument] = []
    if verify_each:
        out.append(Verify())
    if measure_drift:
        out.append(MeasureDrift())
    if stats:
        out.append(ChannelStatistics(None if stats is True else stats))
    out.append(CollectReport(report))
    return out
