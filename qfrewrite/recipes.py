"""Named pass lists for common goals. Each takes the InsertFakeQuant options and returns a list of passes::

    from qfrewrite import recipes, rewrite
    result = rewrite(model, passes=recipes.dfq(weights="per_tensor"), data=images)

* :func:`plain`: fold BatchNorm and quantize. The baseline: per-tensor weights collapse on models whose folded
  depthwise kernels hold outlier channels (TF-slim MobileNetV1: about 3% top-1).
* :func:`dfq`: the best no-retraining recipe measured on the MobileNets in ../shared (see its docstring).
* :func:`qualcomm`: the Qualcomm MobileNet architecture (arXiv 1803.08607) on a pretrained graph: depthwise convs
  without BN and ReLU6, ReLU in the pointwise convs. **Not** a post-training fix: without retraining it drops float
  accuracy to 0.0-0.2% (measured on three MobileNets); emit ``Result.to_keras()`` and fine-tune first.

``weights`` ("per_tensor" or "per_channel"), ``activations`` and ``bits`` go to InsertFakeQuant unchanged (and the
weight options to CorrectBias, so it corrects exactly the quantization that will be applied). Extra keyword
arguments go to InsertFakeQuant. ``quantize=False`` leaves InsertFakeQuant out (a float rewrite).
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional

from .pass_infra import Pass

__all__ = ["plain", "dfq", "qualcomm"]

log = logging.getLogger(__name__)


def _fake_quant(quantize: bool, weights: str, activations: Optional[str], bits: int, extra) -> List[Pass]:
    if not quantize:
        return []
    from qfrewrite.passes import InsertFakeQuant
    kwargs: dict = {"weights": weights, "bits": bits, **extra}
    if activations is not None:
        kwargs["activations"] = activations
    return [InsertFakeQuant(**kwargs)]


def plain(weights: str = "per_tensor", activations: Optional[str] = None, bits: int = 8, quantize: bool = True,
          **fakequant_options: Any) -> List[Pass]:
    """``FoldBatchNorm`` then ``InsertFakeQuant``: post-training quantization with no rewriting."""
    from qfrewrite.passes import FoldBatchNorm

    return [FoldBatchNorm()] + _fake_quant(quantize, weights, activations, bits, fakequant_options)


def dfq(weights: str = "per_tensor", activations: Optional[str] = None, bits: int = 8, quantize: bool = True,
        absorb: bool = False, **fakequant_options: Any) -> List[Pass]:
    """The best no-retraining recipe measured here: data-free quantization (Nagel et al. 2019) guarded for dead
    channels, with data-driven bias correction.

    1. ``FoldBatchNorm``: the weights as the int8 model will hold them;
    2. ``FoldDeadChannels`` (exact): constant channels (all-zero weights, or a ReLU whose input provably never
       crosses 0) folded into the next layer's bias, so the depthwise weights that only ever see a constant, the
       outliers that collapse TF-slim MobileNetV1, are zeroed;
    3. ``CrossLayerEqualization(clip="exact")`` (exact): per-channel weight ranges equalized through ReLU6 with a
       per-channel clip; dead/constant/near-zero channels never scaled, no channel pushed out of its tensor's range;
    4. ``AbsorbBias`` only with ``absorb=True`` (no gain measured on these models);
    5. ``CorrectBias``: the expected output error of the quantized kernels removed from the biases, for exactly the
       weight quantization InsertFakeQuant applies (same ``weights``/``bits``/``weight_method``);
    6. ``InsertFakeQuant`` with the given options.

    Measured (``benchmarks/run_all.py``: 200 calibration and 500 disjoint evaluation images from ../shared, the
    emitted int8 TFLite models scored in LiteRT, InsertFakeQuant's default MSE activation ranges), top-1 %:

    ========================== ===== ========== ========== ============ ============= =============
    model                      float dfq tensor dfq channel plain tensor plain channel TF PTQ t / c
    ========================== ===== ========== ========== ============ ============= =============
    TF-slim MobileNetV1 1.0    91.0  91.2       91.2        3.8         89.2          4.0 / 89.2
    torchvision MobileNetV2    83.6  83.2       84.2        81.4        83.2          80.4 / 81.2
    Keras MobileNetV1 0.25     59.2  58.0       60.0        0.0         58.2          0.0 / 57.4
    ========================== ===== ========== ========== ============ ============= =============

    The price of the exact per-channel clips: one MINIMUM per equalized ReLU6. LiteRT int8 latency, batch 1, on a
    shared 2-core x86 machine: MobileNetV1 3.19 -> 3.63 ms (1 thread), MobileNetV2 3.70 -> 4.07 ms.

    Why this order: on V1 per-tensor (800 images, float 89.75) FoldDeadChannels + CorrectBias alone reached 88.5 and
    adding the equalization 89.5; the equalization before dead-channel folding (or with near-dead channels left
    unfolded) made it worse (82-83), because a guarded constant channel kept its outlier range while the others
    shrank. Sequential bias correction and bias absorption gave no gain when tried (V1 per-tensor, before dead
    channels were also found from bounds: sequential 86.1 vs 86.8, absorption 82.0 vs 82.4; within noise).
    """
    from qfrewrite.passes import (AbsorbBias, CorrectBias, CrossLayerEqualization, FoldBatchNorm,
                                  FoldDeadChannels)

    passes: List[Pass] = [FoldBatchNorm(), FoldDeadChannels(), CrossLayerEqualization(clip="exact")]
    if absorb:
        passes.append(AbsorbBias())
    passes.append(CorrectBias(weights=weights, bits=bits, method=fakequant_options.get("weight_method")))
    return passes + _fake_quant(quantize, weights, activations, bits, fakequant_options)


def qualcomm(weights: str = "per_tensor", activations: Optional[str] = None, bits: int = 8, quantize: bool = True,
             **fakequant_options: Any) -> List[Pass]:
    """The Qualcomm block: ``FoldBatchNorm`` (pointwise only), ``RemoveDepthwiseBNReLU6``, ``ReLU6ToReLU`` in the
    pointwise convs, then ``InsertFakeQuant``. For fine-tuning (``quantize=False``, then ``Result.to_keras()``);
    without retraining it scores 0.0-0.2% top-1, float or int8."""
    from qfrewrite.passes import FoldBatchNorm, ReLU6ToReLU, RemoveDepthwiseBNReLU6

    passes: List[Pass] = [FoldBatchNorm(scope="pointwise"), RemoveDepthwiseBNReLU6(), ReLU6ToReLU("pointwise")]
    return passes + _fake_quant(quantize, weights, activations, bits, fakequant_options)
