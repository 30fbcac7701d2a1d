"""The pass contract, the context that carries data, spec and cached analyses, and the pass manager.

* A :class:`Pass` has a ``name``, an ``exact`` flag (does it keep the float function?), a :class:`Contract` (what it
  requires, ensures and forbids: :mod:`qfrewrite.contracts`), ``needs_data``, the quantization options it may state
  explicitly (``spec_options``: its attribute -> the :class:`~qfrewrite.spec.QuantSpec` field), and
  ``run(graph, ctx) -> PassResult(graph, modified, stats, skipped)``. ``modified`` is set only by real edits; what a
  pass leaves alone goes in ``skipped`` as typed :class:`Skip` records (which node, why; ``node=None`` when the pass
  found nothing to do at all); a real error raises.
* :class:`Context` carries the calibration data, the pipeline's resolved quantization spec and cached analyses
  (activation ranges, channel statistics); the cache is invalidated whenever a pass reports ``modified=True``.
* :class:`PassManager` is itself a pass. Before any work it resolves the spec from its passes' explicit options
  (:func:`qfrewrite.spec.merge_statements`: two options that disagree raise an error naming both), checks the order of
  the list against the contracts (:func:`qfrewrite.contracts.check_pipeline`) and that data is there for the passes
  that need it. It then runs a bounded list, checks the properties that can be read off a graph before a pass that
  requires them and after one that ensures them, and wraps failures in :class:`PassError` naming the pass and those
  that ran before it. Everything else it does goes through :class:`Instrument` objects (verification, output drift,
  channel statistics, the report: :mod:`qfrewrite.instruments`), which see a :class:`PassRecord` per pass.

This module imports only the IR, the errors, the spec and the contracts: it is a leaf of the package.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple

from .contracts import CHECKS, Contract, Property, check_pipeline, graph_properties, order_passes
from .errors import DataError, PassError, PostconditionError, PreconditionError, QfrewriteError
from .ir import Graph
from .spec import QuantSpec, merge_statements

__all__ = ["COMPARING", "Pass", "PassResult", "Skip", "Context", "PassManager", "Analysis", "Instrument", "PassRecord",
           "pass_classes", "ordered"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skip:
    """Something a pass left alone: the ``node`` (``None``: the whole graph) and the ``reason``."""

    node: Optional[str]
    reason: str

    def __str__(self) -> str:
        return self.reason if self.node is None else f"{self.node}: {self.reason}"


@dataclass
class PassResult:
    """What a pass returns: the (possibly same, edited in place) graph, whether it changed, its statistics and what it
    left alone, with why. A pass made of passes (a :class:`PassManager`, a choice among pipelines) lists the runs
    of its inner passes that produced the graph in ``nested``."""

    graph: Graph
    modified: bool
    stats: Dict[str, Any] = field(default_factory=dict)
    skipped: List[Skip] = field(default_factory=list)
    nested: List["PassRecord"] = field(default_factory=list)
    #: analyses of the graph before the pass that its edits transform exactly, as ``(analysis, new result)``: the
    #: manager caches them for the graph after it, so the next pass need not recompute them
    carried: List[Tuple["Analysis", Any]] = field(default_factory=list)

    @property
    def reason(self) -> Optional[str]:
        """Why the pass did nothing at all (its graph-wide skip), else ``None``."""
        return next((s.reason for s in self.skipped if s.node is None), None)

    def skips_for(self, node: str) -> List[str]:
        """The reasons the pass gave for leaving ``node`` alone."""
        return [s.reason for s in self.skipped if s.node == node]


class Analysis:
    """A cached computation over a graph (and the context's data). Subclasses set ``name`` and implement
    :meth:`compute`. Results are cached in :class:`Context` until a pass modifies the graph."""

    name: str = "analysis"

    def compute(self, graph: Graph, ctx: "Context") -> Any:  # pragma: no cover - interface
        raise NotImplementedError


class Context:
    """Carries calibration data, the quantization spec, options and cached analyses through a pass pipeline.

    ``data`` is a :class:`qfrewrite.data.CalibrationSet` (or ``None`` for data-free passes). ``spec`` is what the
    caller stated (a :class:`QuantSpec`, fields may be unstated); :attr:`spec` reads as the resolved spec, with the
    pipeline's explicit pass options merged in once a :class:`PassManager` has run.
    """

    def __init__(self, data=None, spec: Optional[QuantSpec] = None, options: Optional[Dict[str, Any]] = None):
        self.data = data
        self.stated_spec: QuantSpec = spec if spec is not None else QuantSpec()
        self.options: Dict[str, Any] = dict(options or {})
        self._cache: Dict[str, Any] = {}

    @property
    def spec(self) -> QuantSpec:
        """The resolved spec (every field set)."""
        return self.stated_spec.resolved()

    def analysis(self, analysis: Analysis, graph: Graph) -> Any:
        """The result of ``analysis`` on ``graph``, computed once per graph state."""
        key = f"{analysis.name}:{id(graph)}"
        if key not in self._cache:
            log.debug("computing analysis %s", analysis.name)
            self._cache[key] = (analysis, analysis.compute(graph, self))
        return self._cache[key][1]

    def put(self, analysis: Analysis, graph: Graph, value: Any) -> None:
        """Cache ``value`` as the result of ``analysis`` on the current state of ``graph`` (a pass that knows how its
        edits transform an analysis hands the new result on: :attr:`PassResult.carried`)."""
        self._cache[f"{analysis.name}:{id(graph)}"] = (analysis, value)

    def cached_analyses(self, graph: Graph) -> List[Tuple[Analysis, Any]]:
        """The ``(analysis, result)`` pairs cached for the current state of ``graph``."""
        suffix = f":{id(graph)}"
        return [v for k, v in self._cache.items() if k.endswith(suffix)]

    def cached(self, name: str, graph: Graph) -> bool:
        return f"{name}:{id(graph)}" in self._cache

    def invalidate(self) -> None:
        """Drop every cached analysis (called after a modifying pass)."""
        self._cache.clear()

    def require_data(self, who: str):
        if self.data is None:
            raise DataError(f"{who} needs calibration data: pass data=... (an image folder, an array or batches)")
        return self.data


_REGISTRY: Dict[str, type] = {}


#: the context option under which candidate pipelines run while being compared (:meth:`Pass.defers_while_compared`)
COMPARING = "comparing"


class Pass:
    """Base class of every pass. Subclasses set ``exact``, their contract and ``needs_data``, and implement
    :meth:`run`.

    Quantization options: a subclass lists in ``spec_options`` each constructor attribute that mirrors a
    :class:`QuantSpec` field (``{"weights": "weights", "bits": "weight_bits"}``). The attribute is ``None`` unless
    the user stated it; :meth:`option` reads the stated value or, when unstated, the pipeline's spec.
    """

    exact: ClassVar[bool] = True
    needs_data: ClassVar[bool] = False
    #: the pass multiplies activation channels by per-channel factors and hands the cached activation statistics on
    #: rescaled, which needs their per-channel histograms (a shared calibration pass keeps them only for such a pass)
    rescales_channels: ClassVar[bool] = False
    requires: ClassVar[FrozenSet[Property]] = frozenset()
    ensures: ClassVar[FrozenSet[Property]] = frozenset()
    forbids: ClassVar[FrozenSet[Property]] = frozenset()
    spec_options: ClassVar[Dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_") and cls.__name__ != "PassManager":
            _REGISTRY[cls.__name__] = cls

    @property
    def name(self) -> str:
        return type(self).__name__

    def contract(self, spec: QuantSpec) -> Contract:
        """What this pass requires, ensures and forbids under the resolved ``spec`` (default: the class attributes)."""
        return Contract(frozenset(self.requires), frozenset(self.ensures), frozenset(self.forbids))

    def spec_statement(self) -> QuantSpec:
        """The quantization options this pass was given explicitly, as a partial spec."""
        return QuantSpec(**{field_: getattr(self, attr) for attr, field_ in self.spec_options.items()
                            if getattr(self, attr, None) is not None})

    def option(self, ctx: "Context", attr: str):
        """The value of quantization option ``attr``: as stated to this pass, else the context's spec."""
        value = getattr(self, attr)
        return value if value is not None else getattr(ctx.spec, self.spec_options[attr])

    def run(self, graph: Graph, ctx: Context) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def defers_while_compared(self, spec: QuantSpec) -> bool:
        """True when, under the resolved ``spec``, the pass leaves part of its work out while candidate pipelines
        are being compared (its context's ``options[COMPARING]`` set), so that a comparison must run the kept
        pipeline again in full (:class:`~qfrewrite.passes.SelectBest`). Default: never."""
        return False

    def __call__(self, graph: Graph, ctx: Optional[Context] = None) -> PassResult:
        return self.run(graph, ctx if ctx is not None else Context(spec=self.spec_statement()))

    def __repr__(self) -> str:
        return f"{self.name}()"


def pass_classes() -> Dict[str, type]:
    """Every concrete :class:`Pass` subclass defined so far, by name."""
    return dict(_REGISTRY)


def ordered(passes: Sequence[Pass], spec: Optional[QuantSpec] = None) -> List[Pass]:
    """``passes`` in the order their contracts require (:func:`qfrewrite.contracts.order_passes`)."""
    spec = (spec or QuantSpec()).resolved()
    return order_passes(list(passes), [p.contract(spec) for p in passes])


@dataclass
class PassRecord:
    """One pass's run, as the manager's instruments see it. ``measurements`` is where instruments put what they
    measured (output drift, channel statistics ...), keyed by name."""

    name: str
    exact: bool
    modified: bool = False
    stats: Dict[str, Any] = field(default_factory=dict)
    skipped: List[Skip] = field(default_factory=list)
    seconds: float = 0.0
    measurements: Dict[str, Any] = field(default_factory=dict)
    nested: List["PassRecord"] = field(default_factory=list)


class Instrument:
    """Hooks the pass manager calls around the pipeline and each pass (all optional)."""

    def start(self, graph: Graph, ctx: Context) -> None:
        """Before the first pass."""

    def before_pass(self, p: Pass, graph: Graph, ctx: Context, record: PassRecord) -> None:
        """Before ``p`` runs on ``graph``."""

    def after_pass(self, p: Pass, result: PassResult, ctx: Context, record: PassRecord) -> None:
        """After ``p`` returned ``result`` (``record`` is complete but for other instruments' measurements)."""

    def finish(self, graph: Graph, ctx: Context) -> None:
        """After the last pass."""


def _establishers(prop: Property) -> List[str]:
    out = []
    for name, cls in _REGISTRY.items():
        try:
            if prop in cls().contract(QuantSpec().resolved()).ensures:
                out.append(name)
        except Exception:  # a pass class that needs constructor arguments cannot advise
            continue
    return sorted(out)


class PassManager(Pass):
    """Run passes in order under their contracts, with instruments around each one.

    ``instruments`` see every pass (:mod:`qfrewrite.instruments`: ``Verify``, ``MeasureDrift``, ``ChannelStatistics``,
    ``CollectReport``); :func:`qfrewrite.rewrite` installs the usual ones. ``check_contracts=False`` skips the order and
    property checks (for experiments with pass lists the declarations refuse).
    """

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = (), max_passes: int = 1000,
                 check_contracts: bool = True):
        self.passes = list(passes)
        if len(self.passes) > max_passes:
            raise QfrewriteError(f"a pipeline holds at most {max_passes} passes, got {len(self.passes)}")
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"{p!r} is not a qfrewrite Pass (did you forget the parentheses?)")
        self.instruments = list(instruments)
        self.check_contracts = bool(check_contracts)

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return all(p.exact for p in self.passes)

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        return any(p.needs_data for p in self.passes)

    def contract(self, spec: QuantSpec) -> Contract:
        """The pipeline's contract: what its first passes require, and what it ensures at the end."""
        state: set = set()
        requires: set = set()
        forbids: set = set()
        for p in self.passes:
            c = p.contract(spec)
            requires |= c.requires - state
            forbids |= c.forbids - state
            state |= c.ensures
        return Contract(frozenset(requires), frozenset(state), frozenset(forbids))

    def spec_statement(self) -> QuantSpec:
        return merge_statements(None, [(repr(p), p.spec_statement()) for p in self.passes])

    def check(self, graph: Graph, spec: Optional[QuantSpec] = None,
              has_data: bool = True) -> Tuple[QuantSpec, List[Contract]]:
        """Resolve the spec and check the whole list against the contracts and the data, before any work.
        Returns the stated spec (``spec`` with the passes' explicit options merged in) and each pass's contract."""
        stated = merge_statements(spec, [(repr(p), p.spec_statement()) for p in self.passes])
        contracts = [p.contract(stated.resolved()) for p in self.passes]
        if self.check_contracts:
            check_pipeline(self.passes, contracts, graph_properties(graph), _establishers)
        needy = [p.name for p in self.passes if p.needs_data]
        if needy and not has_data:
            raise DataError(f"{', '.join(needy)} need{'s' if len(needy) == 1 else ''} calibration data: pass "
                            f"data=... (an image folder, an array or batches)")
        return stated, contracts

    def _checked(self, props, graph: Graph, when: str, p: Pass, error) -> None:
        for prop in props:
            check = CHECKS.get(prop)
            if check is not None and not check(graph):
                raise error(f"{p.name}: the graph is not '{prop}' {when}")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        ctx.stated_spec, contracts = self.check(graph, ctx.stated_spec, ctx.data is not None)
        for ins in self.instruments:
            ins.start(graph, ctx)
        any_modified = False
        ran: List[str] = []
        skipped: List[Skip] = []
        records: List[PassRecord] = []
        for p, c in zip(self.passes, contracts):
            record = PassRecord(name=p.name, exact=p.exact)
            records.append(record)
            stage = "before it ran"
            try:
                if self.check_contracts:
                    self._checked(c.requires, graph, "before it runs, which it requires", p, PreconditionError)
                for ins in self.instruments:
                    ins.before_pass(p, graph, ctx, record)
                stage = "while running"
                log.info("running pass %s", p.name)
                t0 = time.perf_counter()
                result = p.run(graph, ctx)
                record.seconds = time.perf_counter() - t0
                if result.modified:
                    ctx.invalidate()
                    for analysis, value in result.carried:
                        ctx.put(analysis, result.graph, value)
                stage = "after it ran"
                if self.check_contracts:
                    self._checked(c.ensures, result.graph, "after it ran, which it ensures", p, PostconditionError)
                record.modified, record.stats, record.skipped = result.modified, result.stats, list(result.skipped)
                record.nested = list(result.nested)
                for ins in self.instruments:
                    ins.after_pass(p, result, ctx, record)
            except QfrewriteError as exc:
                if isinstance(exc, PassError):
                    raise
                raise PassError(f"pass {p.name} failed (after: {', '.join(ran) or 'none'}): {exc}") from exc
            except Exception as exc:
                raise PassError(f"pass {p.name} failed {stage} (after: {', '.join(ran) or 'none'}): "
                                f"{type(exc).__name__}: {exc}") from exc
            graph = result.graph
            any_modified |= result.modified
            ran.append(p.name)
            skipped += [replace(s, reason=f"{p.name}: {s.reason}") for s in result.skipped]
            log.info("pass %s: modified=%s %s", p.name, result.modified, result.stats)
        for ins in self.instruments:
            ins.finish(graph, ctx)
        return PassResult(graph, any_modified, {"passes": ran}, skipped, records)
