"""Typed errors raised by qfrewrite.

Every error a user can meet derives from :class:`QfrewriteError`, so a caller can catch one class. Messages name the
file, node or layer at fault and what is supported instead.
"""
from __future__ import annotations

__all__ = [
    "QfrewriteError",
    "ModelLoadError",
    "QuantizedModelError",
    "UnsupportedOpError",
    "GraphError",
    "VerificationError",
    "PassError",
    "ContractError",
    "PipelineOrderError",
    "PreconditionError",
    "PostconditionError",
    "SpecConflictError",
    "DataError",
    "EmitError",
    "OutputError",
    "one_line",
]


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (whitespace runs collapsed), or its type name when it has none."""
    return " ".join(str(exc).split()) or type(exc).__name__


class QfrewriteError(Exception):
    """Base class of every error qfrewrite raises on purpose."""


class ModelLoadError(QfrewriteError):
    """A model file or object could not be read (missing, corrupt, truncated, unknown format)."""


class QuantizedModelError(ModelLoadError):
    """The model is already quantized (an int8 or uint8 ``.tflite``): rewriting it would requantize rounded values.
    The message says what to quantize instead; ``diagnose`` reads such a file."""


class UnsupportedOpError(QfrewriteError):
    """The source model holds a layer or op that the IR cannot represent."""

    def __init__(self, node: str, op: str, supported, source: str | None = None, detail: str | None = None):
        self.node, self.op, self.supported = node, op, sorted(supported)
        where = f" in {source}" if source else ""
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"unsupported op {op!r} at node/layer {node!r}{where}{extra}; supported: {', '.join(self.supported)}"
        )


class GraphError(QfrewriteError):
    """An illegal edit of the IR (for example removing a node whose output is still used)."""


class VerificationError(GraphError):
    """The graph broke an invariant (one producer per value, no dangling use, topological order, shapes)."""


class PassError(QfrewriteError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class ContractError(QfrewriteError):
    """A pass's declared contract (what it requires, ensures and forbids) is broken by a pipeline or a graph."""


class PipelineOrderError(ContractError):
    """A pass list cannot run as given: a pass comes before the pass that establishes what it requires, after one
    that establishes what it forbids, or needs calibration data that was not given. Raised before any work is done;
    the message names the passes and the order that works."""


class PreconditionError(ContractError):
    """The graph does not satisfy what a pass requires (checked on the graph itself, just before the pass runs)."""


class PostconditionError(ContractError):
    """A pass returned a graph that does not satisfy what it declares to ensure."""


class SpecConflictError(QfrewriteError):
    """Two statements of the quantization spec disagree (two passes' options, or a pass and the spec given to
    ``rewrite``); the message names both."""


class DataError(QfrewriteError):
    """Calibration or evaluation data is missing, empty or does not fit the model."""


class EmitError(QfrewriteError):
    """A TFLite/ONNX/Keras model could not be written from the graph."""


class OutputError(QfrewriteError):
    """An output path cannot be used: it names an input or another output, or its folder is not writable."""
