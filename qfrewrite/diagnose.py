"""Why does this model quantize badly? A verdict from the per-channel statistics.

:func:`diagnose` loads any model :func:`qfrewrite.load` reads, computes
:class:`~qfrewrite.analysis.channel_stats.ChannelStats` in the "as quantized" view (BatchNorm folded) and, with
calibration data, the activation ranges, and returns a :class:`Diagnosis`:

* the layers ranked by how badly per-tensor 8-bit weights hurt them: the SQNR of the median live channel under
  per-tensor quantization, lowest first (rules in :mod:`qfrewrite.analysis.channel_math`);
* for each layer its outlier channels with their values and, where a BatchNorm is present, the BN scale and whether
  it causes the outlier; its all-zero and near-zero channels; depthwise channels that read a dead channel;
* the passes that address what was found (named, not run):

  - ``FoldDeadChannels`` for all-zero / near-zero (constant-output) channels and for outliers that read one;
  - ``CrossLayerEqualization`` for a spread of at least :data:`~qfrewrite.analysis.channel_math.MIN_OUTLIER_RATIO`
    (the widest channel costs the median channel two bits or more);
  - per-channel weight quantization and ``CorrectBias`` for a layer *hurt* by per-tensor weights: its median channel
    loses at least :data:`HURT_DB` against per-channel quantization: two bits (12.04 dB), the same cost the outlier
    rule uses. One bit would flag nearly every layer: the median channel's absolute maximum is commonly half the
    largest, which alone costs 6 dB.
  - ``FoldBatchNorm`` first whenever BatchNorms are still in the graph (the figures assume them folded).

A quantized ``.tflite`` (int8 or uint8) is read as stored instead: its scales and the levels its channels use
(:mod:`qfrewrite.analysis.tflite_int8`, an :class:`~qfrewrite.analysis.tflite_int8.Int8Diagnosis`). A model whose
BatchNorms were folded before it reached qfrewrite (a float ``.tflite``) has no BN scale to blame: its outliers are
explained from the weights alone and the report says that the cause cannot be attributed to a BN scale.

The diagnosis prints as a rich table (``str(diagnosis)`` for plain text), converts to JSON (one entry per layer, named
as in the source model, with ``outlier_channels`` and ``zero_channels``) and draws the per-channel ranges of the worst
layers (:meth:`Diagnosis.plot`). The caller's model is never modified.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .analysis.channel_math import MIN_OUTLIER_RATIO
from .analysis.channel_stats import ChannelStats, GraphChannelStats, LayerStats
from .analysis.layer_harm import (HARM_IMAGES, HarmMeasurement, diagnosis_harm, harm_columns, harm_legend,
                                  measure_layer_harm, noise_inputs, ranked_layers)
from .analysis.tflite_int8 import Int8Diagnosis, diagnose_int8_tflite, is_quantized_tflite
from .calibration import as_calibration_set
from .importers import load
from .io_utils import one_output
from .ir import Op
from .pass_infra import Context, ordered
from .passes import CorrectBias, CrossLayerEqualization, FoldBatchNorm, FoldDeadChannels
from .errors import QfrewriteError
from .quant.weights import GRANULARITIES
from .spec import QuantSpec
from .text_report import TextReport

__all__ = ["HURT_DB", "Diagnosis", "diagnose", "layer_suggestions"]

log = logging.getLogger(__name__)

#: Two bits of resolution: a layer whose median channel loses this much SQNR to per-tensor weights is "hurt".
HURT_DB = 20.0 * math.log10(4.0)
#: Short names of the suggestions for the table's "fix" column.
_OPS = {"Conv2D": "conv", "DepthwiseConv2D": "dw", "Dense": "dense"}
_CODES = {"FoldDeadChannels": "FDC", "CrossLayerEqualization": "CLE", "per-channel weights": "PC",
          "CorrectBias": "CB"}
#: How many outlier channels the text lists per layer (the JSON lists all).
_LIST_CHANNELS = 8


def _hurt(ls: LayerStats) -> bool:
    loss = ls.per_tensor_loss_db
    return not math.isnan(loss) and loss >= HURT_DB


def _names(channels: List[int], limit: int = _LIST_CHANNELS) -> str:
    shown = ", ".join(str(c) for c in channels[:limit])
    return shown + (f" ... (+{len(channels) - limit})" if len(channels) > limit else "")


def layer_suggestions(ls: LayerStats) -> List[Dict[str, str]]:
    """``[{"pass": name, "why": reason}]`` for one layer, in the order a pipeline would run them."""
    out: List[Dict[str, str]] = []
    dead_outliers = [c for c in ls.outlier_channels if c in ls.dead_inputs]
    if ls.zero_channels or ls.near_zero_channels or dead_outliers:
        parts = []
        if ls.zero_channels:
            parts.append(f"{len(ls.zero_channels)} all-zero channel(s)")
        if ls.near_zero_channels:
            parts.append(f"{len(ls.near_zero_channels)} near-zero channel(s)")
        if dead_outliers:
            srcs = sorted({ls.dead_inputs[c] for c in dead_outliers})
            parts.append(f"outlier channel(s) {_names(dead_outliers)} read dead channels of {', '.join(srcs)}")
        out.append({"pass": "FoldDeadChannels", "why": "; ".join(parts)})
    if math.isfinite(ls.spread) and ls.spread >= MIN_OUTLIER_RATIO:
        out.append({"pass": "CrossLayerEqualization",
                    "why": f"spread {ls.spread:.3g}x: the widest channel needs {ls.spread:.3g}x the median range"})
    if _hurt(ls):
        why = (f"per-tensor weights cost the median channel {ls.per_tensor_loss_db:.1f} dB "
               f"({ls.sqnr_db['per_tensor']:.1f} vs {ls.sqnr_db['per_channel']:.1f} dB per-channel)")
        out.append({"pass": "per-channel weights", "why": why})
        out.append({"pass": "CorrectBias", "why": "removes the mean output error of the quantized weights "
                                                  "(most useful when weights stay per-tensor)"})
    return out


@dataclass
class Diagnosis(TextReport):
    """The per-channel verdict on one model (see the module docstring)."""

    source: str
    format: Optional[str]
    stats: GraphChannelStats
    batchnorms: int
    data: Optional[Dict[str, Any]] = None
    bits: int = 8
    #: BatchNorms were folded in the source file (a float .tflite): no BN scale is known to explain an outlier
    bn_folded_in_source: bool = False
    #: the measured output harm of each layer quantized alone (with data), and the weight granularity ranked by
    harm: Optional[HarmMeasurement] = None
    weights: str = "per_tensor"
    #: the recipe whose float rewrite was diagnosed (``None``: the model as it is)
    recipe: Optional[str] = None

    def ranked(self) -> List[LayerStats]:
        return ranked_layers(self.stats, self.harm, self.weights)

    def suggestions(self) -> List[Dict[str, Any]]:
        """The passes to try, in the order their contracts put them, each with the layers (source names) it
        addresses; per-channel weights (a spec choice, not a pass) last."""
        order = [p.name for p in ordered([FoldBatchNorm(), FoldDeadChannels(), CrossLayerEqualization(),
                                          CorrectBias()])] + ["per-channel weights"]
        layers: Dict[str, List[str]] = {k: [] for k in order}
        for ls in self.ranked():
            for s in layer_suggestions(ls):
                layers[s["pass"]].append(ls.source_name)
        why = {
            "FoldBatchNorm": f"{self.batchnorms} BatchNorm(s) still in the graph; the figures assume them folded",
            "FoldDeadChannels": "constant (dead) channels and the outliers that read them",
            "CrossLayerEqualization": f"layers with a weight spread of {MIN_OUTLIER_RATIO:g}x or more",
            "CorrectBias": f"layers whose median channel loses {HURT_DB:.1f} dB or more to per-tensor weights",
            "per-channel weights": "the same layers: per-channel quantization removes the loss where the target "
                                   "supports it (InsertFakeQuant(weights='per_channel'))",
        }
        out = []
        for k in order:
            if k == "FoldBatchNorm" and self.batchnorms:
                out.append({"pass": k, "why": why[k], "layers": []})
            elif layers[k]:
                out.append({"pass": k, "why": why[k], "layers": layers[k]})
        return out

    # -- JSON ------------------------------------------------------------------------------------------------------
    def to_dict(self, per_channel: bool = True) -> Dict[str, Any]:
        from .report import jsonable

        layers = []
        for rank, ls in enumerate(self.ranked(), 1):
            d = {"rank": rank, **ls.to_dict(per_channel=per_channel), "hurt": _hurt(ls),
                 "suggestions": layer_suggestions(ls)}
            if self.harm is not None and ls.name in self.harm.layers:
                d.update(self.harm.layers[ls.name].to_dict())
            layers.append(d)
        return jsonable({
            "model": self.source, "format": self.format, "bits": self.bits, "after_recipe": self.recipe,
            "view": "weights as quantized: BatchNorm folded into the layer before it",
            "batchnorms_in_graph": self.batchnorms, "data": self.data,
            "batchnorm_folded_in_source": self.bn_folded_in_source,
            "rules": {"outlier": "modified z-score of log range > 3.5 and range >= "
                                 f"{MIN_OUTLIER_RATIO:g}x the median live range",
                      "near_zero": f"0 < range < median / {2 ** self.bits - 1}",
                      "caused_by_bn": "|bn_scale| / median |bn_scale| >= sqrt(range / median range)",
                      "hurt": f"per-tensor loss >= {HURT_DB:.2f} dB on the median channel"},
            "ranking": self.ranking(),
            "totals": self.stats.totals(), "layers": layers, "suggestions": self.suggestions(),
        })

    def ranking(self) -> Dict[str, Any]:
        """What the layers are ranked by: ``measured`` (the output SQNR of each layer quantized alone, on data) or
        an estimate from the weights alone."""
        w = self.weights.replace("_", "-")
        if self.harm is not None and self.harm.inputs == "noise":
            return {"by": f"estimate without data: output SQNR with only this layer's {w} {self.bits}-bit weights "
                          f"quantized, on {self.harm.images} Gaussian-noise inputs", "measured": False,
                    **self.harm.to_dict()}
        if self.harm is not None:
            return {"by": f"output SQNR with only this layer's {w} {self.bits}-bit weights quantized",
                    "measured": True, **self.harm.to_dict()}
        return {"by": f"estimate from the weights alone: SQNR of the median channel with {w} {self.bits}-bit "
                      "weights (no data)",
                "measured": False}

    # -- figure ------------------------------------------------------------------------------------------------------
    def plot(self, path: Union[str, os.PathLike], top: int = 6):
        """PNG of the per-channel weight ranges of the ``top`` worst layers (outliers circled, zeros marked)."""
        from .analysis.plot import plot_channel_ranges

        panels = [(ls, None) for ls in self.ranked()[:top]]
        with one_output(path, "the plot", [("the model", self.source)]) as tmp:
            plot_channel_ranges(tmp, panels, title=f"per-channel weight ranges (BatchNorm folded): "
                                                   f"{os.path.basename(str(self.source))}")
        return Path(path)

    # -- text --------------------------------------------------------------------------------------------------------
    def header(self) -> str:
        bn = f"{self.batchnorms} BatchNorm(s) folded in this view" if self.batchnorms else "no BatchNorm in the graph"
        if self.bn_folded_in_source:
            bn = ("BatchNorm folded in the source file: outliers are explained from the weights alone; their cause "
                  "cannot be attributed to a BN scale")
        data = (f"activations from {self.data['images']} image(s) of {self.data['name']}" if self.data
                else f"no data: the ranking is an estimate on {self.harm.images} Gaussian-noise inputs"
                if self.harm is not None else "no data: weights only, the ranking is an estimate")
        after = f"after {self.recipe}'s rewrite; " if self.recipe else ""
        return f"{self.source} ({self.format or 'graph'}; {after}{len(self.stats)} weighted layers; {bn}; {data})"

    def _table(self, top: int):
        from rich import box
        from rich.table import Table

        w = self.weights.replace("_", "-")
        noise = self.harm is not None and self.harm.inputs == "noise"
        title = (f"layers ranked by the harm of {w} {self.bits}-bit weights to the outputs, estimated on "
                 f"Gaussian-noise inputs (top {top})" if noise else
                 f"layers ranked by the measured harm of {w} {self.bits}-bit weights to the outputs (top {top})"
                 if self.harm is not None else
                 f"layers ranked by how badly {w} {self.bits}-bit weights hurt them, estimated from the weights "
                 f"(top {top})")
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=self.harm is not None)
        cols = [("#", "right"), ("layer", "left"), ("op", "left"), ("ch", "right"), ("spread", "right"),
                ("outl", "right"), ("zero", "right"), ("near0", "right"),
                ("dB/T", "right"), ("dB/C", "right"), ("loss", "right")]
        cols += [(c, "right") for c in harm_columns(self.harm)]
        if self.stats.with_activations and self.harm is None:  # the measured columns take their place
            cols += [("act range", "right"), ("act spread", "right")]
        cols.append(("fix", "left"))
        for name, just in cols:
            t.add_column(name, justify=just, no_wrap=name not in ("layer", "fix"), overflow="fold",
                         min_width=min(48, max(len(ls.source_name) for ls in self.stats.values()))
                         if name == "layer" and len(self.stats) else None)
        for rank, ls in enumerate(self.ranked()[:top], 1):
            row = [str(rank), ls.source_name, _OPS.get(ls.op, ls.op), str(ls.channels), f"{ls.spread:.3g}",
                   str(len(ls.outlier_channels)), str(len(ls.zero_channels)), str(len(ls.near_zero_channels)),
                   f"{ls.sqnr_db['per_tensor']:.1f}", f"{ls.sqnr_db['per_channel']:.1f}",
                   f"{ls.per_tensor_loss_db:.1f}"]
            row += harm_columns(self.harm, ls.name)
            if self.stats.with_activations and self.harm is None:
                row += [f"[{ls.act_min.min():.3g}, {ls.act_max.max():.3g}]", f"{ls.act_spread:.3g}"]
            row.append(" ".join(_CODES[s["pass"]] for s in layer_suggestions(ls)))
            t.add_row(*row)
        return t

    def _details(self, top: int) -> List[str]:
        lines: List[str] = []
        for ls in self.ranked()[:top]:
            if not (ls.outlier_channels or ls.zero_channels or ls.near_zero_channels):
                continue
            lines.append(f"{ls.source_name} ({ls.op}, {ls.channels} channels, median range {ls.median_range:.3g}"
                         + (f", BN {ls.bn_name}" if ls.bn_name else "") + "):")
            details = sorted(ls.outlier_details(), key=lambda d: -d["range"])  # the worst first
            for d in details[:_LIST_CHANNELS]:
                text = (f"  outlier channel {d['channel']}: weights [{d['min']:.3g}, {d['max']:.3g}], range "
                        f"{d['range']:.3g} = {d['range_over_median']:.3g}x median")
                if "bn_scale" in d:
                    text += (f"; BN scale {d['bn_scale']:.3g} = {d['bn_scale_over_median']:.3g}x median"
                             + (" (the BN scale causes it)" if d["caused_by_bn"] else ""))
                elif self.bn_folded_in_source:
                    text += "; no BN scale in the file: cause not attributable to a BN scale"
                if "reads_dead_input_of" in d:
                    text += f"; reads a dead channel of {d['reads_dead_input_of']}"
                lines.append(text)
            if len(details) > _LIST_CHANNELS:
                lines.append(f"  ... and {len(details) - _LIST_CHANNELS} more outlier channel(s) (see --json)")
            if ls.zero_channels:
                lines.append(f"  all-zero channels: {_names(ls.zero_channels, 16)}")
            if ls.near_zero_channels:
                lines.append(f"  near-zero channels: {_names(ls.near_zero_channels, 16)}")
        return lines

    def renderables(self, top: int = 10) -> list:
        from rich.text import Text

        legend = ("dB/T, dB/C: SQNR of the median live channel with symmetric weights per tensor / per channel; "
                  "loss: dB/C - dB/T; outl, zero, near0: outlier, all-zero, near-zero channels\n"
                  + harm_legend(self.harm) +
                  "fix: " + ", ".join(f"{v} {k}" for k, v in _CODES.items()))
        out: list = [Text(self.header()), self._table(top), Text(legend)]
        details = self._details(top)
        if details:
            out.append(Text("outlier and zero channels of these layers:\n" + "\n".join(details)))
        sugg = self.suggestions()
        if sugg:
            lines = ["suggested passes, in pipeline order:"]
            for s in sugg:
                where = f" ({len(s['layers'])} layer(s): {', '.join(s['layers'][:6])}" + \
                        (" ..." if len(s["layers"]) > 6 else "") + ")" if s["layers"] else ""
                lines.append(f"  {s['pass']}: {s['why']}{where}")
            out.append(Text("\n".join(lines)))
        else:
            out.append(Text("no layer is hurt by per-tensor weights and no dead or outlier channel was found"))
        return out



def diagnose(model, data=None, *, spec: Optional[QuantSpec] = None, preprocess=None, limit: Optional[int] = None,
             batch_size: int = 32, bits: Optional[int] = None, inputs=None, outputs=None,
             input_shape=None, weights: str = "per_tensor", harm: bool = True,
             harm_images: Optional[int] = HARM_IMAGES, recipe: Optional[str] = None,
             noise_images: int = 0) -> Union[Diagnosis, Int8Diagnosis]:
    """Diagnose ``model`` (anything :func:`qfrewrite.load` reads, or a :class:`Graph`, which is copied).

    ``data`` (an image folder, an array or batches; ``preprocess`` and ``limit`` as in :func:`qfrewrite.rewrite`) adds
    per-channel activation ranges from the streaming observers. ``spec`` is the quantization to diagnose for (its
    weight bits; default 8); ``bits`` overrides the weight bit width (2..16, beyond what the int8 targets run).
    With data (and ``harm``) each layer's harm to the outputs is measured on at most ``harm_images`` of the images
    (:mod:`qfrewrite.analysis.layer_harm`) and the layers are ranked by it for ``weights`` (``"per_tensor"`` or
    ``"per_channel"``); without, by an estimate from the weights alone. ``recipe="dfq"`` (needs data) diagnoses the
    graph the recipe's float rewrite leaves, with its bias correction applied to each quantized layer
    (:func:`qfrewrite.recipes.float_view`): which layers still hurt after it. Without data, ``noise_images`` > 0
    estimates the harm on that many Gaussian-noise inputs (:func:`~qfrewrite.analysis.layer_harm.noise_inputs`,
    weights only) and ranks by it.

    A quantized ``.tflite`` gives an :class:`~qfrewrite.analysis.tflite_int8.Int8Diagnosis` (``data`` unused).
    """
    if is_quantized_tflite(model):
        if data is not None:
            log.warning("%s is quantized: its report reads the stored scales and codes; --data is not used", model)
        return diagnose_int8_tflite(model, bits=int(bits) if bits is not None else 8)
    if weights not in GRANULARITIES:
        raise QfrewriteError(f"diagnose weights must be one of {GRANULARITIES}, got {weights!r}")
    graph = load(model, inputs=inputs, outputs=outputs, input_shape=input_shape)
    bits = int(bits) if bits is not None else (spec or QuantSpec()).resolved().weight_bits
    ctx = Context(data=as_calibration_set(data, graph, batch_size=batch_size, preprocess=preprocess, limit=limit),
                  spec=spec)
    biases = None
    if recipe is not None:
        ctx.require_data(f"diagnose after the recipe {recipe!r}")
        from .recipes import float_view

        graph, biases = float_view(graph, ctx.data, spec or QuantSpec(), recipe)
    stats = ctx.analysis(ChannelStats(fold_bn=True, activations="always" if ctx.data is not None else "never",
                                      bits=bits), graph)
    source = graph.meta.get("source") or (str(model) if isinstance(model, (str, os.PathLike)) else graph.name)
    data_info = None
    if ctx.data is not None:
        data_info = {"name": str(getattr(ctx.data, "name", "data")), "images": len(ctx.data)}
    measured = None
    if harm and (ctx.data is not None or noise_images > 0):
        folded = graph.copy()
        FoldBatchNorm().run(folded, Context())
        if ctx.data is not None:
            measured = diagnosis_harm(graph, folded, ctx, stats, bits, harm_images, biases)
        else:
            method = (spec or QuantSpec()).resolved().weight_method
            measured = measure_layer_harm(folded, [noise_inputs(folded, noise_images)], method=method, bits=bits,
                                          layers=[n for n in stats], inputs="noise")
    result = Diagnosis(source=str(source), format=graph.meta.get("format"), stats=stats,
                       batchnorms=len(graph.find(Op.BATCH_NORM)), data=data_info, bits=bits, harm=measured,
                       weights=weights, recipe=recipe,
                       bn_folded_in_source=bool(graph.meta.get("batchnorm_folded_in_source")))
    log.info("diagnosed %s: %d layers, %d outlier and %d zero channels", result.source, len(stats),
             stats.totals()["outlier_channels"], stats.totals()["zero_channels"])
    return result
