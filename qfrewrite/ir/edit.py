"""Edits of a layer's constants that keep the IR's typed state true.

* :func:`set_kernel`, :func:`set_bias`: give a layer a new constant (never editing an array another node may share);
* :func:`record_output_scaling`: after output channel ``c`` of a layer was multiplied by ``factor[c]`` (equalization
  divides by ``s``), keep its :class:`~qfrewrite.ir.graph.FoldedBatchNorm` record true.
"""
from __future__ import annotations

import numpy as np

from .graph import Graph, Node

__all__ = ["set_kernel", "set_bias", "record_output_scaling"]


def set_kernel(graph: Graph, layer: Node, kernel: np.ndarray, tag: str) -> None:
    """Give ``layer`` a new constant kernel named ``<layer>/kernel_<tag>``."""
    layer.set_input(1, graph.const(np.asarray(kernel, np.float32), name=f"{layer.name}/kernel_{tag}"))


def set_bias(graph: Graph, layer: Node, bias: np.ndarray, tag: str) -> None:
    """Give ``layer`` a new constant bias named ``<layer>/bias_<tag>``, adding the input when it had none."""
    b = graph.const(np.asarray(bias, np.float32), name=f"{layer.name}/bias_{tag}")
    if layer.bias is not None:
        layer.set_input(2, b)
    else:
        layer.append_input(b)


def record_output_scaling(layer: Node, factor: np.ndarray) -> None:
    """Note that output channel ``c`` of ``layer`` (kernel and bias) was multiplied by ``factor[c]``."""
    if layer.folded_bn is not None:
        layer.folded_bn = layer.folded_bn.rescaled(factor)
