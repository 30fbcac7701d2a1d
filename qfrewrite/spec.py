"""The quantization spec: how the model will be quantized, stated once for a whole pipeline.

Every pass whose work depends on the final quantization reads it from the pipeline's :class:`QuantSpec`
(``ctx.spec``): CorrectBias corrects exactly the weight quantization InsertFakeQuant applies, equalization picks its
clip for the target, a rounding pass rounds to the same grid, ``diagnose`` measures that quantization, and the
emitters store what it asks for. Fields:

==================  ================================  ============================================================
field               values (default first)            meaning
==================  ================================  ============================================================
``weights``         ``per_channel``, ``per_tensor``   weight range granularity (symmetric, narrow range)
``weight_bits``     8 (2..8)                          weight bit width
``weight_method``   ``minmax``, ``mse``               how a weight range is chosen
``rounding``        ``nearest``, ``learned``          how weights are rounded to their grid
``activation_bits`` 8                                 activation bit width (the int8 kernels of TFLite / ONNX)
``activations``     ``mse``, ``minmax``,              how an activation range is chosen from the calibration data
                    ``percentile``, ``kl``
``target``          ``tflite``, ``onnx``              the runtime the int8 model is for (TFLite int8, ONNX QDQ)
==================  ================================  ============================================================

A field left ``None`` is *unstated*: :meth:`QuantSpec.merged` fills it from another statement (a pass's explicit
option), and :meth:`QuantSpec.resolved` from the defaults. Two statements that disagree are an error naming both
(:func:`resolve_spec`), so a pipeline cannot correct one quantization and apply another.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Iterable, Optional, Tuple

from .errors import QfrewriteError, SpecConflictError

__all__ = ["QuantSpec", "merge_statements", "resolve_spec", "CHOICES", "DEFAULTS"]

#: the allowed values of each field (``None``: a range checked in :meth:`QuantSpec.__post_init__`)
CHOICES: Dict[str, Optional[Tuple[Any, ...]]] = {
    "weights": ("per_channel", "per_tensor"),
    "weight_bits": None,
    "weight_method": ("minmax", "mse"),
    "rounding": ("nearest", "learned"),
    "activation_bits": (8,),
    "activations": ("mse", "minmax", "percentile", "kl"),
    "target": ("tflite", "onnx"),
}
#: the value of an unstated field
DEFAULTS: Dict[str, Any] = {"weights": "per_channel", "weight_bits": 8, "weight_method": "minmax",
                            "rounding": "nearest", "activation_bits": 8, "activations": "mse", "target": "tflite"}
_WEIGHT_BITS = (2, 8)


@dataclass(frozen=True)
class QuantSpec:
    """How the model will be quantized (see the module docstring); ``None`` fields are unstated."""

    weights: Optional[str] = None
    weight_bits: Optional[int] = None
    weight_method: Optional[str] = None
    rounding: Optional[str] = None
    activation_bits: Optional[int] = None
    activations: Optional[str] = None
    target: Optional[str] = None

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if f.name == "weight_bits":
                if isinstance(v, bool) or not isinstance(v, int) or not _WEIGHT_BITS[0] <= v <= _WEIGHT_BITS[1]:
                    raise QfrewriteError(f"weight_bits must be an integer in {_WEIGHT_BITS[0]}..{_WEIGHT_BITS[1]}, "
                                         f"got {v!r}")
            elif v not in CHOICES[f.name]:
                raise QfrewriteError(f"{f.name} must be one of {', '.join(map(str, CHOICES[f.name]))}, got {v!r}")

    def stated(self) -> Dict[str, Any]:
        """The fields that are stated (not ``None``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def merged(self, other: "QuantSpec") -> "QuantSpec":
        """This spec with ``other``'s stated fields filled in where this one is unstated (no conflict check)."""
        return replace(self, **{k: v for k, v in other.stated().items() if getattr(self, k) is None})

    def resolved(self) -> "QuantSpec":
        """Every unstated field at its default."""
        return replace(self, **{k: v for k, v in DEFAULTS.items() if getattr(self, k) is None})

    @property
    def per_channel(self) -> bool:
        return self.resolved().weights == "per_channel"

    def describe(self) -> str:
        r = self.resolved()
        return (f"{r.weights} W{r.weight_bits} ({r.weight_method}, {r.rounding} rounding), "
                f"A{r.activation_bits} ({r.activations}), target {r.target}")

    def __str__(self) -> str:
        return "QuantSpec(" + ", ".join(f"{k}={v!r}" for k, v in self.stated().items()) + ")"


def merge_statements(spec: Optional[QuantSpec], statements: Iterable[Tuple[str, QuantSpec]],
                     spec_source: str = "the spec given to rewrite") -> QuantSpec:
    """``spec`` merged with each ``(who, statement)`` in turn; unstated fields stay unstated.

    Raises :class:`~qfrewrite.errors.SpecConflictError` naming both sides when two statements set a field to
    different values.
    """
    current = spec if spec is not None else QuantSpec()
    source = {k: spec_source for k in current.stated()}
    for who, stmt in statements:
        for k, v in stmt.stated().items():
            have = getattr(current, k)
            if have is None:
                current = replace(current, **{k: v})
                source[k] = who
            elif have != v:
                raise SpecConflictError(
                    f"{who} sets {k}={v!r} but {source[k]} sets {k}={have!r}: the passes of one pipeline must agree "
                    f"on how the model is quantized; drop one of the two options or make them equal (an option "
                    f"left out is taken from the pipeline's QuantSpec)")
    return current


def resolve_spec(spec: Optional[QuantSpec], statements: Iterable[Tuple[str, QuantSpec]] = ()) -> QuantSpec:
    """:func:`merge_statements`, then every unstated field at its default."""
    return merge_statements(spec, statements).resolved()
