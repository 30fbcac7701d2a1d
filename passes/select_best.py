"""Keep the best of several candidate pipelines, judged on calibration images held back from their calibration.

Each candidate is a list of passes that ends with the graph quantized (typically a rewriting recipe and ``plain``).
The pass splits the calibration data: ``holdout`` of it (evenly spaced, between ``min_holdout`` and ``max_holdout``
images) is held back, the rest calibrates every candidate on its own copy of the graph. On the held-back images each
candidate's simulated int8 outputs are compared with the float outputs of the graph as it came in; the candidate with
the highest output SQNR is kept (ties: the earlier one), and the others are dropped. This is how a recipe is never
worse than plain on a model: ``recipes.dfq()`` puts its passes and ``plain``'s side by side. Once the choice is made
the held-back images could calibrate too: with ``refit=True`` the kept pipeline runs again, calibrated on all the
calibration images (the shared pass continued over the held-back ones,
:class:`~qfrewrite.analysis.calibration_pass.CalibrationPass`, so the data are read once in all), and the graph it
then makes is the one returned; so it is, whatever ``refit`` says, when a candidate's pass leaves part of its work
out while the candidates are compared (:meth:`~qfrewrite.pass_infra.Pass.defers_while_compared`: LearnedRounding's
block reconstruction), the kept pipeline then running again in full. Otherwise the default, ``refit=False``,
returns the graph that was scored: on MobileNetV2 and
EfficientNet-Lite0 with 500 calibration images (``recipes.dfq()``, TFLite top-1 on 500 other ../shared images,
per-channel / per-tensor, at commit f5c93f7) the refit scored 82.2 / 82.6 and 87.0 / 87.4 against 81.8 / 83.6 and
87.0 / 87.2 without it, a few images either way, and took 1.3 / 3.1 s more on MobileNetV2 (the held-back images
observed, the kept pipeline run again).

The candidates share one calibration pass: the activation statistics of the graph as it came in (every activation's
observers and the mean maps of the weighted layers' inputs, :mod:`qfrewrite.analysis.calibration_pass`) are computed
once on the calibration images and served to every candidate, so a candidate that quantizes the graph as it is
(``plain``) runs no pass of its own over the data, and neither does one whose passes hand the statistics on:
CrossLayerEqualization with its clip fused rescales them (per-channel histograms included, kept only when a
candidate holds a pass that ``rescales_channels``), CorrectBias keeps them, so ``recipes.dfq()``'s candidate
calibrates InsertFakeQuant from the same pass.

With fewer than ``2 * min_holdout`` calibration images nothing can be held back: the first candidate is kept and
the report says so. ``stats["scores"]`` gives each candidate's SQNR (dB) and top-1 agreement with float on the held-back
images and its run time; ``stats["kept"]`` the one kept and ``stats["why"]`` why; ``stats["calibrated_on"]`` the
images the candidates were calibrated on for scoring, ``stats["recalibrated_on"]`` and ``stats["refit_seconds"]``
those of the kept pipeline's second run and its time.

Not exact (its candidates quantize). Contract: what its candidates' pipelines require, forbid and all ensure.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Mapping, Sequence

import numpy as np

from qfrewrite.analysis.calibration_pass import CalibrationPass, serve
from qfrewrite.backend.executor import Executor
from qfrewrite.contracts import Contract
from qfrewrite.data import holdout_indices
from qfrewrite.errors import QfrewriteError
from qfrewrite.instruments import TracedGraph, Verify
from qfrewrite.ir import Graph
from qfrewrite.numerics.metrics import output_drift
from qfrewrite.pass_infra import COMPARING, Context, Pass, PassManager, PassResult, Skip
from qfrewrite.spec import QuantSpec, merge_statements

__all__ = ["SelectBest"]

log = logging.getLogger(__name__)


class SelectBest(Pass):
    """Run each candidate pipeline and keep the one whose int8 outputs are closest to float on held-back images."""

    exact = False
    needs_data = True

    def __init__(self, candidates: Mapping[str, Sequence[Pass]], holdout: float = 0.1, min_holdout: int = 16,
                 max_holdout: int = 64, refit: bool = False):
        if not candidates:
            raise QfrewriteError("SelectBest needs at least one candidate pipeline")
        if not 0.0 < float(holdout) < 0.5:
            raise QfrewriteError(f"SelectBest holdout must be a fraction in (0, 0.5), got {holdout}")
        self.candidates: Dict[str, PassManager] = {name: PassManager(list(passes), instruments=[Verify()])
                                                  for name, passes in candidates.items()}
        self.holdout, self.min_holdout, self.max_holdout = float(holdout), int(min_holdout), int(max_holdout)
        self.refit = bool(refit)

    def __repr__(self) -> str:
        return "SelectBest(" + ", ".join(f"{k}=[{', '.join(p.name for p in pm.passes)}]"
                                         for k, pm in self.candidates.items()) + ")"

    def contract(self, spec: QuantSpec) -> Contract:
        cs = [pm.contract(spec) for pm in self.candidates.values()]
        return Contract(frozenset().union(*(c.requires for c in cs)),
                        frozenset.intersection(*(c.ensures for c in cs)),
                        frozenset().union(*(c.forbids for c in cs)))

    def spec_statement(self) -> QuantSpec:
        return merge_statements(None, [(f"{self.name} candidate {k!r}", pm.spec_statement())
                                       for k, pm in self.candidates.items()])

    def _split(self, data):
        n = len(data)
        held = int(np.clip(round(self.holdout * n), self.min_holdout, self.max_holdout))
        if n < 2 * self.min_holdout:
            return data, None
        keep, back = holdout_indices(n, held)
        return data.subset(keep), data.subset(back)

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        data = ctx.require_data(self.name)
        for name, pm in self.candidates.items():  # every candidate's order and options, before any work
            try:
                pm.check(graph, ctx.stated_spec)
            except QfrewriteError as exc:
                raise QfrewriteError(f"candidate {name!r}: {exc}") from exc
        calib, held = self._split(data)
        names = list(self.candidates)
        if held is None or len(names) == 1:
            why = (f"only {len(data)} calibration images: none held back to compare" if held is None
                   else "one candidate")
            first = names[0]
            result = self._run_candidate(first, graph.copy(), ctx, data)
            return PassResult(result.graph, result.modified, {"kept": first, "why": why, "scores": {}},
                              [Skip(None, f"no comparison: {why}")], result.nested)
        x = np.concatenate(list(held.batches()))
        reference = ctx.analysis(TracedGraph(), graph)(x)  # the manager's drift measurement traced it already
        t0 = time.perf_counter()
        spec = ctx.spec
        deferring = [p.name for pm in self.candidates.values() for p in pm.passes if p.defers_while_compared(spec)]
        refit = self.refit or bool(deferring)
        calibration = CalibrationPass(graph, len(data) if refit else len(calib), channel_histograms=any(
            p.rescales_channels for pm in self.candidates.values() for p in pm.passes))
        shared = calibration.feed(calib).statistics()
        shared_seconds = time.perf_counter() - t0
        scores: Dict[str, dict] = {}
        results: Dict[str, PassResult] = {}
        executors: Dict[str, Executor] = {}
        for name in names:
            t0 = time.perf_counter()
            res = self._run_candidate(name, graph.copy(), ctx, calib, shared, comparing=bool(deferring))
            executors[name] = Executor(res.graph, quantize=True)
            drift = output_drift(reference, executors[name](x))
            scores[name] = {"sqnr_db": drift["sqnr_db"], "top1_agreement": drift["top1_agreement"],
                            "seconds": time.perf_counter() - t0,
                            "passes": [p.name for p in self.candidates[name].passes]}
            results[name] = res
            log.info("SelectBest: %s scores %.2f dB, top-1 agreement %.3f", name, drift["sqnr_db"],
                     drift["top1_agreement"])
        best = max(names, key=lambda k: (scores[k]["sqnr_db"], -names.index(k)))
        others = ", ".join(f"{k} {scores[k]['sqnr_db']:.1f} dB" for k in names if k != best)
        why = (f"highest output SQNR on {len(x)} held-back calibration images: {scores[best]['sqnr_db']:.1f} dB "
               f"(top-1 agreement {100 * scores[best]['top1_agreement']:.1f}%) against {others}")
        stats = {"kept": best, "why": why, "scores": scores, "held_back": len(x), "calibrated_on": len(calib),
                 "shared_calibration_seconds": shared_seconds}
        if not refit:
            return PassResult(results[best].graph, results[best].modified, stats, nested=results[best].nested,
                              carried=[(TracedGraph(), executors[best])])
        # the choice is made: the kept pipeline is calibrated again on all the images, the shared pass continued
        # over the held-back ones
        t0 = time.perf_counter()
        kept = self._run_candidate(best, graph.copy(), ctx, data, calibration.feed(held).statistics())
        stats.update(recalibrated_on=len(data), refit_seconds=time.perf_counter() - t0)
        again = (f"then run again in full ({', '.join(sorted(set(deferring)))} left part of its work out while "
                 f"the candidates were compared) on all {len(data)} calibration images" if deferring
                 else f"then calibrated again on all {len(data)} calibration images")
        stats["why"] = f"{why}; {again}"
        log.info("SelectBest: %s %s (%.1f s)", best, again, stats["refit_seconds"])
        return PassResult(kept.graph, kept.modified, stats, nested=kept.nested)

    def _run_candidate(self, name: str, graph: Graph, ctx: Context, data, shared=None,
                       comparing: bool = False) -> PassResult:
        sub = Context(data=data, spec=ctx.stated_spec, options={COMPARING: True} if comparing else None)
        if shared is not None:
            serve(sub, graph, shared)
        try:
            return self.candidates[name].run(graph, sub)
        except QfrewriteError as exc:
            raise QfrewriteError(f"candidate {name!r}: {exc}") from exc
