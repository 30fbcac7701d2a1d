"""The Qualcomm depthwise block on a pretrained graph (arXiv 1803.08607): drop the ReLU6 after every depthwise conv
and move the depthwise BatchNorm affine into the next pointwise conv (not exact).

With depthwise output ``d = conv(x, W)`` (the kernel in its natural, pre-BN range), BN ``y = s * d + t`` and the next
1x1 conv ``z = W2 y + b2``:

    z = (W2 diag(s)) d + (b2 + W2 t)

so the depthwise kernel keeps its natural range (no BN scale of a near-zero-variance channel blows it up), the BN
scale moves into the input channels of the pointwise kernel and the shift into its bias. This is exact only without
the ReLU6 that sat between them: **without retraining it destroys the accuracy of a pretrained model** (measured
with ``recipes.qualcomm()`` on 500 ../shared images, float top-1: TF-slim MobileNetV1 91.0 -> 0.0, torchvision
MobileNetV2 83.6 -> 0.2, Keras MobileNetV1 0.25 59.2 -> 0.2). Fine-tune the result first:
``Result.to_keras()`` gives a float Keras model to train; give the trained model back to ``rewrite``.

Where the BN affine comes from:

* an unfolded ``BatchNorm`` between the depthwise conv and the clip;
* a BatchNorm folded by :class:`FoldBatchNorm` (the layer's :class:`~qfrewrite.ir.FoldedBatchNorm` record, kept true
  through equalization): unfolded from the kernel;
* a depthwise conv whose BN was folded in the source file (scale unknown): only its bias moves forward.

Left alone, each a skip with the reason: depthwise convs whose output has several readers, that are not followed by
``Clip(0, hi)``/``Relu`` and a padding-free Conv2D, or where the BN scale is 0 (the natural kernel cannot be
recovered).

Contract: cannot run once the weights are final or the graph quantized.
"""
from __future__ import annotations

import logging
from typing import List

import numpy as np

from qfrewrite.contracts import Property
from qfrewrite.ir import Graph, Node, Op, bn_affine, padding_free, set_bias, set_kernel, sole_reader_or_reason
from qfrewrite.numerics.kernels import const_input_bias, scale_in
from qfrewrite.pass_infra import Context, Pass, PassResult, Skip

__all__ = ["RemoveDepthwiseBNReLU6"]

log = logging.getLogger(__name__)

WARNING = ("not exact: the ReLU6 after each depthwise conv is removed; without retraining this destroys the "
           "accuracy of a pretrained model (float top-1 0.0-0.2% measured on three MobileNetV1/V2). Fine-tune "
           "the float model from Result.to_keras() and give it back to rewrite() before quantizing.")


class RemoveDepthwiseBNReLU6(Pass):
    """Depthwise conv without BN and ReLU6: BN affine moved into the following pointwise conv."""

    exact = False
    forbids = frozenset({Property.WEIGHTS_FINAL, Property.QUANTIZED})

    def _match(self, dw: Node):
        """``(bn or None, clip, pointwise)`` or a reason."""
        nxt = sole_reader_or_reason(dw.output)
        if isinstance(nxt, str):
            return f"output {nxt}"
        bn = None
        if nxt.op is Op.BATCH_NORM:
            bn = nxt
            nxt = sole_reader_or_reason(bn.output)
            if isinstance(nxt, str):
                return f"BatchNorm output {nxt}"
        if not (nxt.op is Op.RELU or (nxt.op is Op.CLIP and nxt.attrs.lo == 0.0)):
            return f"followed by {nxt.op.value}, not ReLU6"
        clip = nxt
        pw = sole_reader_or_reason(clip.output)
        if isinstance(pw, str):
            return f"activation output {pw}"
        if pw.op not in (Op.CONV2D, Op.DENSE) or pw.inputs[0] is not clip.output:
            return f"activation feeds {pw.op.value}, not a pointwise conv"
        if not padding_free(pw):
            return f"{pw.name} reads zero padding (the BN shift would not be exact at the borders)"
        return bn, clip, pw

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        done: List[str] = []
        skipped: List[Skip] = []
        bias_only: List[str] = []
        for dw in graph.find(Op.DEPTHWISE_CONV2D):
            m = self._match(dw)
            if isinstance(m, str):
                skipped.append(Skip(dw.name, m))
                continue
            bn, clip, pw = m
            k = dw.weight.const.astype(np.float64)
            b = dw.bias.const.astype(np.float64) if dw.bias is not None else np.zeros(k.shape[2] * k.shape[3])
            if bn is not None:
                s, t, bad = bn_affine(bn)
                if bad.any():
                    skipped.append(Skip(dw.name, f"BatchNorm {bn.name} has zero variance + eps in channels "
                                                 f"{np.flatnonzero(bad).tolist()}"))
                    continue
                shift = s * b + t  # y = s * (conv + b) + t
                natural = k
            else:
                s = (np.ones_like(b) if dw.folded_bn is None else np.asarray(dw.folded_bn.scale, np.float64))
                if dw.folded_bn is None:
                    bias_only.append(dw.name)
                if np.any(s == 0) or not np.all(np.isfinite(s)):
                    skipped.append(Skip(dw.name, "folded BatchNorm scale is 0 in some channel: natural kernel "
                                                 "unknown"))
                    continue
                natural = k / s.reshape(k.shape[2], k.shape[3])
                shift = b
            kind = "dense" if pw.op is Op.DENSE else "conv"
            k2 = pw.weight.const.astype(np.float64)
            b2 = (pw.bias.const.astype(np.float64) if pw.bias is not None else 0.0) + const_input_bias(k2, shift, kind)
            set_kernel(graph, pw, scale_in(k2, s, kind), "qualcomm")
            set_bias(graph, pw, b2, "qualcomm")
            set_kernel(graph, dw, natural, "natural")
            if dw.bias is not None:
                set_bias(graph, dw, np.zeros_like(b), "qualcomm")
            dw.folded_bn = None
            if bn is not None:
                graph.bypass(bn)
            graph.bypass(clip)
            done.append(dw.name)
        if done:
            graph.remove_unused()
        stats = {"rewritten": len(done), "layers": done, "bias_only": bias_only}
        if done:
            stats["warning"] = WARNING
            log.warning("RemoveDepthwiseBNReLU6: %s", WARNING)
        else:
            skipped.append(Skip(None, "no depthwise conv followed by BN/ReLU6 and a pointwise conv"))
        return PassResult(graph, bool(done), stats, skipped)
