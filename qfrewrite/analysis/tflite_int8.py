"""What an int8 (or uint8) ``.tflite`` stores, layer by layer: the diagnosis of a model that was quantized already.

A user whose quantized model lost accuracy wants to know which layers and channels are to blame before deciding what
to re-run. The file is read with the same schema reader as the importer (:mod:`qfrewrite.importers.tflite_reader`);
nothing is run. For every ``CONV_2D``, ``DEPTHWISE_CONV_2D`` and ``FULLY_CONNECTED`` with integer weights:

* the **stored scales**: the weight scale per tensor or per output channel (min / median / max), and the scales
  and zero points of the layer's input and output activations;
* the **levels each output channel uses**: the number of distinct integer codes among its weights. A symmetric int8
  channel can use up to 255 (a uint8 one 256, an INT4 one 15); a channel with **2 levels or fewer** keeps at most a
  sign (or nothing): its weights were rounded to ``{0}`` or ``{0, +-1 step}``;
* **range domination** (per-tensor weights only): with one scale for the whole tensor, each channel's code span
  ``max q - min q`` is its share of the range. The layer's *spread* is the widest span over the median non-zero one;
  the channels that set it are the outliers of :func:`qfrewrite.analysis.channel_math.outlier_channels` (a robust
  z-score on the log span and at least :data:`~qfrewrite.analysis.channel_math.MIN_OUTLIER_RATIO` times the median:
  the channel costs the median channel two bits or more). With per-channel scales no channel sets another's range.

Layers are ranked by the resolution of their median channel: the codes it reaches (``max |q - z|`` for symmetric
weights, the code span for asymmetric ones) over the most a channel can reach (127, or 255), lowest first. The levels a
channel uses are bounded by its weight count too (9 for a 3x3 depthwise channel), so they flag channels, not rank
layers. A TFLite file holds no BatchNorm (the
converter folded them), so the report never attributes an outlier to a BatchNorm scale; it says so. The remedy is
never to requantize this file (:class:`~qfrewrite.errors.QuantizedModelError`) but to quantize the float model again
with the passes the findings point to.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Union

import numpy as np

from ..errors import ModelLoadError
from ..importers.tflite_ops import layer_name
from ..importers.tflite_reader import TFLiteFile, read_tflite
from ..numerics.qdq import CONTAINERS
from ..text_report import TextReport
from . import channel_math as cm

__all__ = ["FEW_LEVELS", "Int8Layer", "Int8Diagnosis", "is_quantized_tflite", "diagnose_int8_tflite"]

log = logging.getLogger(__name__)

#: A channel whose weights use this many distinct codes or fewer is flagged.
FEW_LEVELS = 2
#: the code range of an INT4 kernel (read as int8 codes)
_INT4 = SimpleNamespace(min=CONTAINERS["int4"].lowest, max=CONTAINERS["int4"].highest)
_WEIGHTED = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "dw", "FULLY_CONNECTED": "dense"}
_LIST_CHANNELS = 8


def _names(channels, limit: int = _LIST_CHANNELS) -> str:
    channels = [int(c) for c in channels]
    shown = ", ".join(str(c) for c in channels[:limit])
    return shown + (f" ... (+{len(channels) - limit})" if len(channels) > limit else "")


@dataclass
class Int8Layer:
    """One weighted layer of a quantized file: its stored scales and the levels its channels use."""

    index: int
    name: str
    tensor: str
    op: str
    dtype: str
    per_channel: bool
    scales: np.ndarray  # one per output channel (repeated for a per-tensor scale)
    zero_points: np.ndarray
    levels: np.ndarray  # distinct codes per output channel
    spans: np.ndarray  # the codes each output channel reaches (see _layer)
    full_span: int = 127  # the reach of the widest possible channel: 127 for symmetric int8, 255 for uint8 spans
    input_quant: Optional[Dict[str, float]] = None
    output_quant: Optional[Dict[str, float]] = None
    outlier_channels: List[int] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return int(self.levels.size)

    @property
    def few_level_channels(self) -> List[int]:
        return [int(c) for c in np.flatnonzero(self.levels <= FEW_LEVELS)]

    @property
    def median_levels(self) -> float:
        live = self.levels[self.levels > FEW_LEVELS]
        return float(np.median(live)) if live.size else float(np.median(self.levels))

    @property
    def median_reach(self) -> float:
        """Codes the median non-zero channel reaches (of :attr:`full_span`): its resolution."""
        return cm.median_range(self.spans)

    @property
    def spread(self) -> float:
        """Widest code span over the median non-zero one (per-tensor weights; 1.0 for per-channel)."""
        return 1.0 if self.per_channel else cm.spread(self.spans)

    @property
    def dominated(self) -> bool:
        """Per-tensor weights whose range outlier channels set (see the module docstring)."""
        return not self.per_channel and bool(self.outlier_channels)

    def to_dict(self, per_channel: bool = True) -> Dict[str, Any]:
        d = {"name": self.name, "tensor": self.tensor, "operator": self.index, "op": self.op, "dtype": self.dtype,
             "channels": self.channels, "weights": "per_channel" if self.per_channel else "per_tensor",
             "weight_scale": {"min": float(self.scales.min()), "median": float(np.median(self.scales)),
                              "max": float(self.scales.max())},
             "input": self.input_quant, "output": self.output_quant,
             "median_levels": self.median_levels, "min_levels": int(self.levels.min()),
             "median_reach": self.median_reach, "full_reach": self.full_span,
             "few_level_channels": self.few_level_channels, "spread": self.spread,
             "range_dominated_by": list(self.outlier_channels) if self.dominated else []}
        if per_channel:
            d["levels"] = [int(v) for v in self.levels]
            if self.per_channel:
                d["scales"] = [float(v) for v in self.scales]
        return d


def _act_quant(f: TFLiteFile, tensor: int) -> Optional[Dict[str, float]]:
    q = f.quantization(tensor) if tensor >= 0 else None
    if q is None:
        return None
    return {"dtype": f.type_name(tensor).lower(), "scale": float(q.scale[0]), "zero_point": int(q.zero_point[0])}


def _levels(codes: np.ndarray, offset: int, width: int) -> np.ndarray:
    """Distinct codes per row of ``codes`` (``(C, K)`` integers in ``[-offset, width - offset)``), by one bincount."""
    c = codes.shape[0]
    flat = (codes.astype(np.int64) + offset) + width * np.arange(c, dtype=np.int64)[:, None]
    counts = np.bincount(flat.ravel(), minlength=c * width).reshape(c, width)
    return (counts > 0).sum(axis=1)


def _layer(f: TFLiteFile, index: int, bits: int = 8) -> Optional[Int8Layer]:
    op = f.operators[index]
    name = f.op_name(op)
    ins = f.op_inputs(op)
    if name not in _WEIGHTED or len(ins) < 2 or ins[1] < 0:
        return None
    w_t = ins[1]
    q = f.quantization(w_t)
    w = f.raw(w_t)
    if q is None or w is None or w.dtype not in (np.int8, np.uint8, np.int16):
        return None
    # output channels: axis 0 for CONV_2D (O, kh, kw, I) and FULLY_CONNECTED (O, I), axis 3 for depthwise
    axis = 3 if name == "DEPTHWISE_CONV_2D" else 0
    codes = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    info = _INT4 if f.type_name(w_t) == "INT4" else np.iinfo(w.dtype)
    width = int(info.max) - int(info.min) + 1
    levels = _levels(codes, -int(info.min), width) if width <= 65536 else \
        np.array([np.unique(r).size for r in codes])
    channels = codes.shape[0]
    scales = np.broadcast_to(q.scale, (channels,)).astype(np.float64) if q.scale.size in (1, channels) else \
        np.full(channels, float(q.scale[0]))
    zps = np.broadcast_to(q.zero_point, (channels,)).astype(np.int64) if q.zero_point.size in (1, channels) else \
        np.zeros(channels, np.int64)
    hi, lo = codes.max(axis=1).astype(np.int64), codes.min(axis=1).astype(np.int64)
    # the share of the range a channel needs: its reach around zero for symmetric weights (zero point 0), its code
    # span for asymmetric ones (uint8 weights with a zero point)
    symmetric = not zps.any()
    spans = (np.maximum(hi - zps, zps - lo) if symmetric else hi - lo).astype(np.float64)
    out_t = f.op_outputs(op)[0]
    layer = Int8Layer(index=index, name=layer_name(f.name(out_t)), tensor=f.name(out_t), op=name,
                      dtype=f.type_name(w_t).lower(), per_channel=q.per_channel, scales=scales, zero_points=zps,
                      levels=levels, spans=spans, full_span=int(info.max) if symmetric else width - 1,
                      input_quant=_act_quant(f, ins[0]),
                      output_quant=_act_quant(f, out_t))
    if not q.per_channel:
        layer.outlier_channels = [int(c) for c in cm.outlier_channels(spans, bits=bits)]
    return layer


def is_quantized_tflite(source) -> bool:
    """True for a path to a ``.tflite`` file holding quantized tensors (checked by reading it)."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).lower().endswith(".tflite"):
        return False
    if not Path(source).is_file():
        return False
    return bool(read_tflite(source).quantized_tensors())


@dataclass
class Int8Diagnosis(TextReport):
    """The per-layer report on a quantized ``.tflite`` (see the module docstring)."""

    source: str
    layers: List[Int8Layer]
    activations: str
    op_counts: Dict[str, int]

    def ranked(self) -> List[Int8Layer]:
        return sorted(self.layers, key=lambda ls: (ls.median_reach / ls.full_span, -len(ls.few_level_channels),
                                                   ls.index))

    def totals(self) -> Dict[str, int]:
        return {"layers": len(self.layers),
                "per_tensor_layers": sum(not ls.per_channel for ls in self.layers),
                "few_level_channels": sum(len(ls.few_level_channels) for ls in self.layers),
                "range_dominated_layers": sum(ls.dominated for ls in self.layers)}

    def advice(self) -> List[str]:
        """What to re-run, from the findings (always from the float model, never this file)."""
        out = []
        dominated = [ls.name for ls in self.ranked() if ls.dominated]
        few = [ls.name for ls in self.ranked() if ls.few_level_channels]
        if dominated:
            out.append(f"per-channel weights (InsertFakeQuant(weights='per_channel'), 'qfrewrite convert --weights "
                       f"per-channel'), or the dfq recipe's CrossLayerEqualization for per-tensor targets: "
                       f"{len(dominated)} layer(s) whose range outlier channels set: {', '.join(dominated[:6])}"
                       + (" ..." if len(dominated) > 6 else ""))
        if few:
            out.append(f"FoldDeadChannels and CorrectBias (the dfq recipe): {len(few)} layer(s) with channels left "
                       f"with {FEW_LEVELS} levels or fewer: {', '.join(few[:6])}" + (" ..." if len(few) > 6 else ""))
        return out

    # -- JSON --------------------------------------------------------------------------------------------------
    def to_dict(self, per_channel: bool = True) -> Dict[str, Any]:
        from ..report import jsonable

        return jsonable({
            "model": self.source, "format": "tflite", "quantized": True, "activations": self.activations,
            "op_counts": self.op_counts,
            "view": "weights as stored: integer codes, scales and zero points",
            "batchnorm": "folded in the file: no BatchNorm scale is known, so none is blamed for an outlier",
            "rules": {"few_levels": f"a channel's weights use {FEW_LEVELS} distinct codes or fewer",
                      "range_dominated": "per-tensor weights: modified z-score of log code span > 3.5 and span >= "
                                         f"{cm.MIN_OUTLIER_RATIO:g}x the median"},
            "totals": self.totals(),
            "layers": [{"rank": r, **ls.to_dict(per_channel)} for r, ls in enumerate(self.ranked(), 1)],
            "advice": self.advice(),
        })

    # -- figure ------------------------------------------------------------------------------------------------
    def plot(self, path: Union[str, os.PathLike], top: int = 6):
        """PNG of the levels every channel uses in the ``top`` worst layers (the 2-level line dashed)."""
        from matplotlib.figure import Figure

        from ..io_utils import one_output

        layers = self.ranked()[:top]
        fig = Figure(figsize=(10, 2.2 * max(len(layers), 1)))
        for k, ls in enumerate(layers):
            ax = fig.add_subplot(max(len(layers), 1), 1, k + 1)
            ax.bar(np.arange(ls.channels), ls.levels, width=1.0, color="tab:blue")
            ax.axhline(FEW_LEVELS, color="tab:red", ls="--", lw=0.8)
            ax.set_yscale("log")
            ax.set_ylabel("levels")
            ax.set_title(f"{ls.name} ({ls.op}, {'per-channel' if ls.per_channel else 'per-tensor'})", fontsize=9)
        fig.tight_layout()
        with one_output(path, "the plot", [("the model", self.source)]) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        return Path(path)

    # -- text --------------------------------------------------------------------------------------------------
    def header(self) -> str:
        t = self.totals()
        weights = ("per-channel" if not t["per_tensor_layers"] else
                   "per-tensor" if t["per_tensor_layers"] == t["layers"] else "mixed per-tensor/per-channel")
        return (f"{self.source} (quantized tflite; {t['layers']} weighted layers; {weights} weights; activations "
                f"{self.activations}; BatchNorm folded in the file: no BN scale is known, so no outlier is "
                "attributed to one)")

    def _table(self, top: int):
        from rich import box
        from rich.table import Table

        t = Table(title=f"layers ranked by the codes their median channel reaches (fewest first, top {top})",
                  title_justify="left", box=box.SIMPLE_HEAD)
        cols = [("#", "right"), ("layer", "left"), ("op", "left"), ("ch", "right"), ("w", "left"),
                ("w scale", "right"), ("reach", "right"), ("levels", "right"), ("min", "right"),
                (f"<={FEW_LEVELS}", "right"),
                ("spread", "right"), ("in scale", "right"), ("out scale", "right")]
        for name, just in cols:
            t.add_column(name, justify=just, no_wrap=name != "layer", overflow="fold")
        for rank, ls in enumerate(self.ranked()[:top], 1):
            scale = (f"{ls.scales.min():.3g}..{ls.scales.max():.3g}" if ls.per_channel else f"{ls.scales[0]:.3g}")
            t.add_row(str(rank), ls.name, _WEIGHTED[ls.op], str(ls.channels), "PC" if ls.per_channel else "PT",
                      scale, f"{ls.median_reach:.0f}/{ls.full_span}", f"{ls.median_levels:.0f}",
                      str(int(ls.levels.min())), str(len(ls.few_level_channels)),
                      "-" if ls.per_channel else f"{ls.spread:.3g}",
                      f"{ls.input_quant['scale']:.3g}" if ls.input_quant else "-",
                      f"{ls.output_quant['scale']:.3g}" if ls.output_quant else "-")
        return t

    def _details(self, top: int) -> List[str]:
        lines = []
        for ls in self.ranked()[:top]:
            if not (ls.few_level_channels or ls.dominated):
                continue
            lines.append(f"{ls.name} ({ls.op}, {ls.channels} channels, {ls.dtype} weights "
                         f"{'per-channel' if ls.per_channel else 'per-tensor'}, median {ls.median_levels:.0f} "
                         f"levels):")
            if ls.dominated:
                med = cm.median_range(ls.spans)
                worst = sorted(ls.outlier_channels, key=lambda c: -ls.spans[c])
                parts = [f"{c} ({ls.spans[c] / med:.3g}x" for c in worst[:_LIST_CHANNELS]]
                parts = [p + ")" for p in parts[:-1]] + parts[-1:]
                lines.append(f"  range set by channel(s) {', '.join(parts)} the median channel's reach): the median "
                             f"channel reaches {ls.median_reach:.0f} of {ls.full_span} codes")
            if ls.few_level_channels:
                lines.append(f"  channels with {FEW_LEVELS} levels or fewer: {_names(ls.few_level_channels, 16)}")
        return lines

    def renderables(self, top: int = 10) -> list:
        from rich.text import Text

        legend = ("w: PT per-tensor / PC per-channel weights; reach: codes the median channel reaches, of the most "
                  "possible; levels: median distinct codes of the live channels; "
                  f"min: fewest codes of any channel; <={FEW_LEVELS}: channels with {FEW_LEVELS} levels or fewer; "
                  "spread: widest channel's code span over the median (per-tensor weights)")
        out: list = [Text(self.header()), self._table(top), Text(legend)]
        details = self._details(top)
        if details:
            out.append(Text("channels to blame in these layers:\n" + "\n".join(details)))
        advice = self.advice()
        lines = ["this file is quantized: requantizing it loses accuracy. Quantize the float model again with:"
                 if advice else "no layer has channels with few levels or a range set by outlier channels"]
        lines += [f"  {a}" for a in advice]
        out.append(Text("\n".join(lines)))
        return out



def diagnose_int8_tflite(path: Union[str, os.PathLike], bits: int = 8) -> Int8Diagnosis:
    """The report of the module docstring for the quantized TFLite file at ``path`` (only read)."""
    f = read_tflite(path)
    if not f.quantized_tensors():
        raise ModelLoadError(f"{path}: a float TFLite model; diagnose it through qfrewrite.diagnose.diagnose")
    layers = [ls for ls in (_layer(f, i, bits) for i in range(len(f.operators))) if ls is not None]
    produced = {t for op in f.operators for t in f.op_outputs(op)}
    act_types = sorted({f.type_name(t).lower() for t in f.quantized_tensors() if t in produced})
    counts: Dict[str, int] = {}
    for op in f.operators:
        counts[f.op_name(op)] = counts.get(f.op_name(op), 0) + 1
    result = Int8Diagnosis(source=str(path), layers=layers, activations="/".join(act_types) or "float",
                           op_counts=dict(sorted(counts.items())))
    log.info("diagnosed quantized %s: %s", path, result.totals())
    return result
