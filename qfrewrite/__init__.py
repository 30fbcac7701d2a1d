"""qfrewrite: graph-rewriting passes that make pretrained MobileNet-family models survive 8-bit quantization.

    import qfrewrite
    from qfrewrite import passes
    result = qfrewrite.rewrite("model.h5", passes=[passes.FoldBatchNorm()])
    result.to_tflite("model.tflite")
"""
from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of user output

from .api import Result, load, rewrite  # noqa: E402
from .errors import (ContractError, DataError, EmitError, GraphError, ModelLoadError, OutputError,  # noqa: E402
                     PassError, PipelineOrderError, PostconditionError, PreconditionError, QfrewriteError,
                     QuantizedModelError,
                     SpecConflictError, UnsupportedOpError, VerificationError)
from .evaluate import evaluate  # noqa: E402
from .ir import Graph, Node, Op, Value  # noqa: E402
from .pass_infra import Context, Pass, PassManager, PassResult, Skip  # noqa: E402
from .spec import QuantSpec  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "rewrite", "load", "evaluate", "Result", "Graph", "Node", "Op", "Value", "Pass", "PassResult", "PassManager", "Context",
    "Skip", "QuantSpec", "QfrewriteError", "ModelLoadError", "QuantizedModelError", "UnsupportedOpError", "GraphError", "VerificationError",
    "PassError", "ContractError", "PipelineOrderError", "PreconditionError", "PostconditionError", "SpecConflictError",
    "DataError", "EmitError", "OutputError", "__version__",
]
