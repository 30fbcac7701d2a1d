"""The pass manager's report: one :class:`PassReport` per pass, printable, JSON-serialisable."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["PassReport", "Report"]


@dataclass
class PassReport:
    name: str
    exact: bool
    modified: bool
    stats: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    drift: Optional[Dict[str, Any]] = None
    stats_before: Optional[Dict[str, Any]] = None
    stats_after: Optional[Dict[str, Any]] = None


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if hasattr(x, "item") and callable(x.item):
        return _jsonable(x.item())
    return x


class Report:
    """The ordered list of pass reports of one pipeline run."""

    def __init__(self, source: Optional[str] = None):
        self.source = source
        self.passes: List[PassReport] = []

    def add(self, entry: PassReport) -> None:
        self.passes.append(entry)

    def __getitem__(self, name_or_index):
        if isinstance(name_or_index, int):
            return self.passes[name_or_index]
        for p in self.passes:
            if p.name == name_or_index:
                return p
        raise KeyError(name_or_index)

    def __len__(self) -> int:
        return len(self.passes)

    def to_dict(self) -> Dict[str, Any]:
        return _jsonable({"source": self.source, "passes": [asdict(p) for p in self.passes]})

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        lines = [f"{'pass':<28} {'exact':<6} {'modified':<9} {'drift dB':>9} {'seconds':>8}  stats"]
        for p in self.passes:
            drift = "" if not p.drift else f"{p.drift['sqnr_db']:.1f}"
            stats = ", ".join(f"{k}={v}" for k, v in p.stats.items() if not isinstance(v, (list, dict)))
            lines.append(f"{p.name:<28} {str(p.exact):<6} {str(p.modified):<9} {drift:>9} {p.seconds:>8.2f}  {stats}")
        return "\n".join(lines)
