"""Named pipelines for common goals. Each returns a :class:`Recipe`: a list of passes that carries the quantization
spec it was built for::

    from qfrewrite import recipes, rewrite
    result = rewrite(model, passes=recipes.dfq(weights="per_tensor"), data=images)

* :func:`plain`: fold BatchNorm and quantize. The baseline: per-tensor weights collapse on models whose folded
  depthwise kernels hold outlier channels (TF-slim MobileNetV1: about 3% top-1).
* :func:`dfq`: the best no-retraining recipe measured on the MobileNets in ../shared (see its docstring).
* :func:`qualcomm`: the Qualcomm MobileNet architecture (arXiv 1803.08607) on a pretrained graph: depthwise convs
  without BN and ReLU6, ReLU in the pointwise convs. **Not** a post-training fix: without retraining it drops float
  accuracy to 0.0-0.2% (measured on three MobileNets); emit ``Result.to_keras()`` and fine-tune first.

The keyword options are the fields of :class:`~qfrewrite.spec.QuantSpec` (``weights="per_tensor"|"per_channel"``,
``weight_bits``, ``weight_method``, ``rounding``, ``activations``, ``activation_bits``, ``target``), or a whole
``spec=``; they become the recipe's spec, which every pass reads (InsertFakeQuant and CorrectBias then apply and
correct the same weight quantization). The passes themselves are built without quantization options. Other keyword
arguments are InsertFakeQuant's own knobs (``percentile``, ``saturation_weight``). ``quantize=False`` leaves
InsertFakeQuant out (a float rewrite). The order of the passes comes from their contracts
(:func:`qfrewrite.pass_infra.ordered`), not from the recipe.
"""
from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .errors import QfrewriteError
from .ir import WEIGHTED_OPS, Graph
from .pass_infra import Context, Pass, ordered
from .passes import (AbsorbBias, CorrectBias, CrossLayerEqualization, FoldBatchNorm, FoldDeadChannels,
                     InsertFakeQuant, LearnedRounding, ReLU6ToReLU, RemoveDepthwiseBNReLU6, SelectBest)
from .spec import QuantSpec, merge_statements

__all__ = ["Recipe", "plain", "dfq", "qualcomm", "float_view", "VIEWS"]

log = logging.getLogger(__name__)

_SPEC_FIELDS = {f.name for f in fields(QuantSpec)}


class Recipe(list):
    """A list of passes with the :class:`QuantSpec` they were chosen for (``rewrite`` uses it when given no spec)."""

    def __init__(self, name: str, passes: Iterable[Pass], spec: QuantSpec):
        super().__init__(passes)
        self.name, self.spec = name, spec

    def __repr__(self) -> str:
        return f"Recipe({self.name!r}, [{', '.join(map(repr, self))}], {self.spec})"


def _split_options(name: str, spec: Optional[QuantSpec], options):
    """The recipe's spec (``spec`` merged with the options that are spec fields) and InsertFakeQuant's knobs."""
    stated = {k: v for k, v in options.items() if k in _SPEC_FIELDS and v is not None}
    knobs = {k: v for k, v in options.items() if k not in _SPEC_FIELDS}
    unknown = set(knobs) - {"percentile", "saturation_weight"}
    if unknown:
        raise TypeError(f"recipes.{name}() got unexpected options {sorted(unknown)}: give QuantSpec fields "
                        f"({', '.join(sorted(_SPEC_FIELDS))}) or InsertFakeQuant's percentile / saturation_weight")
    full = merge_statements(spec, [(f"recipes.{name}(...)", QuantSpec(**stated))], spec_source="the recipe's spec")
    return full, knobs


def _rounding(spec: QuantSpec) -> List[Pass]:
    """The weight rounding the spec asks for before quantization: :class:`LearnedRounding` for
    ``rounding="learned"`` (it also corrects the biases), nothing for nearest rounding."""
    return [LearnedRounding()] if spec.resolved().rounding == "learned" else []


def _recipe(name: str, passes: List[Pass], quantize: bool, spec: Optional[QuantSpec], options) -> Recipe:
    full, knobs = _split_options(name, spec, options)
    if quantize:
        passes = passes + _rounding(full) + [InsertFakeQuant(**knobs)]
    return Recipe(name, ordered(passes, full), full)


def plain(spec: Optional[QuantSpec] = None, quantize: bool = True, **options: Any) -> Recipe:
    """``FoldBatchNorm`` then ``InsertFakeQuant``: post-training quantization with no rewriting (with
    ``rounding="learned"``, ``LearnedRounding`` before the quantization)."""
    return _recipe("plain", [FoldBatchNorm()], quantize, spec, options)


def dfq(spec: Optional[QuantSpec] = None, quantize: bool = True, absorb: bool = False, clip: Optional[str] = None,
        compare: bool = True, equalize: Optional[bool] = None, **options: Any) -> Recipe:
    """The best no-retraining recipe measured here: data-free quantization (Nagel et al. 2019) guarded for dead
    channels, with data-driven bias correction, never worse than :func:`plain`.

    1. ``FoldBatchNorm``: the weights as the int8 model will hold them;
    2. ``FoldDeadChannels`` (exact): constant channels (all-zero weights, or a ReLU whose input provably never
       crosses 0) folded into the next layer's bias, so the depthwise weights that only ever see a constant, the
       outliers that collapse TF-slim MobileNetV1, are zeroed;
    3. ``CrossLayerEqualization``, except for per-channel 8-bit weights with nearest rounding (``equalize=None``,
       the default; ``True`` or ``False`` forces it either way): per-channel weight ranges equalized through ReLU6; by default with the clip kept
       fused (exact on the calibration data, no op added to the int8 model: ``clip="fused"``), ``clip="exact"`` for
       a per-channel clip (a TFLite MINIMUM per ReLU6, which XNNPACK cannot run); dead/constant/near-zero channels
       never scaled, no channel pushed out of its tensor's range. Per-channel weights already give each output
       channel its own range, and there the equalization measured no gain: TFLite top-1 on the 500 odd-position
       ../shared images, 500 calibration images, ``compare=False``, per-channel, plain / without it / with it:
       Keras MobileNetV1 0.25 58.2 / 60.2 / 59.0, TF-slim MobileNetV1 89.4 / 91.6 / 92.0, MobileNetV2
       84.0 / 83.8 / 83.2, EfficientNet-Lite0 87.0 / 87.2 / 87.4 (without it: 1.2 points more over the four, and
       no per-channel histograms to keep in the calibration pass). Fewer weight bits and learned rounding keep it:
       there it was not measured without;
    4. ``AbsorbBias`` only with ``absorb=True`` (no gain measured on these models);
    5. ``CorrectBias``: the expected output error of the quantized kernels removed from the biases, for exactly the
       weight quantization InsertFakeQuant applies (both read the recipe's spec); with ``rounding="learned"``
       ``LearnedRounding`` instead, which rounds each kernel on the calibration data to lower its layer's output
       error and corrects the bias for it (also in plain's candidate below);
    6. ``InsertFakeQuant``.

    With ``compare=True`` (the default, and only when quantizing) steps 3-6 and plain's InsertFakeQuant run side by
    side under :class:`~qfrewrite.passes.SelectBest`, after step 2 (exact for every input, so both candidates quantize
    the same float function): both calibrated on the calibration images less a held-back tenth, from one shared pass
    over them, the one whose int8 outputs are closer to float on the held-back images is kept, and the report says
    which and why.

    Why this order (which the passes' contracts encode): on V1 per-tensor (800 images, float 89.75) FoldDeadChannels
    + CorrectBias alone reached 88.5 and adding the equalization 89.5; the equalization before dead-channel folding
    (or with near-dead channels left unfolded) made it worse (82-83), because a guarded constant channel kept its
    outlier range while the others shrank. Sequential bias correction and bias absorption gave no gain when tried
    (V1 per-tensor, before dead channels were also found from bounds: sequential 86.1 vs 86.8, absorption 82.0 vs
    82.4; within noise). The measured top-1 of this recipe is in the README's benchmark table.
    """
    full, knobs = _split_options("dfq", spec, options)
    learned = _rounding(full)
    if equalize is None:  # off only where it was measured to buy nothing: per-channel 8-bit nearest rounding
        r = full.resolved()
        equalize = not (r.weights == "per_channel" and r.weight_bits == 8 and r.rounding == "nearest")
    if clip is not None and not equalize:
        raise QfrewriteError(f"recipes.dfq(clip={clip!r}) sets the equalization's clip, but this recipe does not "
                             f"equalize ({full.resolved().weights} 8-bit weights): pass equalize=True as well")
    passes: List[Pass] = ([FoldDeadChannels()] + ([CrossLayerEqualization(clip=clip)] if equalize else [])
                          + (learned or [CorrectBias()]))
    if absorb:
        passes.append(AbsorbBias())
    if not quantize:
        return Recipe("dfq", ordered([FoldBatchNorm()] + passes, full), full)
    rewriting = ordered(passes + [InsertFakeQuant(**knobs)], full)
    if not compare:
        return Recipe("dfq", ordered([FoldBatchNorm()] + rewriting, full), full)
    return Recipe("dfq", [FoldBatchNorm(), rewriting[0],
                          SelectBest({"dfq": rewriting[1:], "plain": _rounding(full) + [InsertFakeQuant(**knobs)]})],
                  full)


def qualcomm(spec: Optional[QuantSpec] = None, quantize: bool = True, **options: Any) -> Recipe:
    """The Qualcomm block: ``FoldBatchNorm`` (pointwise only), ``RemoveDepthwiseBNReLU6``, ``ReLU6ToReLU`` in the
    pointwise convs, then ``InsertFakeQuant``. Without retraining it scores 0.0-0.2% top-1, float or int8.

    The whole path goes through :func:`qfrewrite.finetune.finetune` (``qfrewrite finetune MODEL --data DIR -o
    OUT.keras``): it builds this recipe's float graph (``quantize=False``), emits it to Keras with a BatchNorm after
    every pointwise conv that feeds a ReLU (``Result.to_keras(logits=True, batchnorm_after=...)``), initialises it from
    data and distils the original model into it on unlabelled images. The saved model then goes back through
    ``rewrite`` like any Keras model: ``rewrite("OUT.keras", recipes.plain(weights="per_tensor"), data=images)``
    folds its BatchNorms and quantizes it (this recipe on it changes nothing but the folding: its depthwise convs
    already have no BN and ReLU6). Measured (``benchmarks/bench_finetune.py``, 450 training images of ../shared,
    float top-1 on 500 others): on Keras MobileNetV1 0.25 (original 59.2%) the least-squares initialisation scores
    18.4% and 30 minutes of distillation 22.2%; on torchvision MobileNetV2 (original 83.6%) the initialisation scores
    41.4% and every epoch of distillation lowered it, so ``finetune`` kept the initialisation. A few hundred images do
    not retrain this architecture (README, "Fine-tuning the Qualcomm architecture")."""
    passes: List[Pass] = [FoldBatchNorm(scope="pointwise"), RemoveDepthwiseBNReLU6(), ReLU6ToReLU("pointwise")]
    return _recipe("qualcomm", passes, quantize, spec, options)


#: the recipes :func:`float_view` (and ``diagnose --after``) can show the graph after
VIEWS = ("dfq",)


def float_view(graph: Graph, data, spec: QuantSpec, recipe: str = "dfq",
                granularities: Sequence[str] = ("per_tensor", "per_channel"),
                ) -> Tuple[Graph, Dict[Tuple[str, str], np.ndarray]]:
    """The graph a recipe's float rewrite leaves, for diagnosing which layers still hurt after it: a copy of
    ``graph`` after ``recipe``'s function-keeping passes, and ``{(layer, granularity): bias}`` from its bias
    correction for each granularity. ``data``: the calibration set.

    ``dfq`` (:func:`qfrewrite.recipes.dfq`, with its equalization, which it runs for per-tensor weights; the
    per-channel recipe stops before it): FoldBatchNorm, FoldDeadChannels and CrossLayerEqualization keep the float
    function (CrossLayerEqualization with its fused clip: on the calibration data), so their graph is the float
    reference; CorrectBias changes each layer's bias for the error of that layer's quantized kernel, which holds only
    when the kernel is quantized. So the view is the graph after the first three passes, and for each weight
    granularity the biases CorrectBias computes for it: the layer harm
    (:func:`~qfrewrite.analysis.layer_harm.measure_layer_harm`) uses a layer's corrected bias together with its quantized kernel, and the float biases
    everywhere else.
    """
    if recipe not in VIEWS:
        raise QfrewriteError(f"diagnose can look at the graph after the recipe(s) {', '.join(VIEWS)}; "
                             f"got {recipe!r}")
    passes = list(dfq(spec=spec, quantize=False, equalize=True))
    work = graph.copy()
    ctx = Context(data=data, spec=spec)
    for p in passes:
        if isinstance(p, (CorrectBias, LearnedRounding)):
            continue
        if p.run(work, ctx).modified:
            ctx.invalidate()
    biases: Dict[Tuple[str, str], np.ndarray] = {}
    for g in granularities:
        corrected = work.copy()
        CorrectBias(weights=g).run(corrected, Context(data=data, spec=spec))
        for node in corrected.find(*WEIGHTED_OPS):
            if node.bias is not None:
                biases[node.name, g] = np.asarray(node.bias.const, np.float32)
    log.info("diagnosing the graph after %s: %s (CorrectBias applied with each quantized kernel)", recipe,
             ", ".join(p.name for p in passes if not isinstance(p, (CorrectBias, LearnedRounding))))
    return work, biases
