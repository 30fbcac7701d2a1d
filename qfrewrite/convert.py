"""The main job in one call: import a model, run a recipe on calibration images, emit a fully int8 TFLite file,
read it back and check it against the float model on held-back images.

``convert(model, output, data, recipe="dfq", weights="per_channel", weight_bits=8, rounding="nearest", ...)``
returns a :class:`ConvertSummary` and writes, beside ``output`` (``OUT.tflite``), the report JSON ``OUT.json``: the
pass report, the emitted model's op counts and size, how each written file stores its kernels (type and bytes, read
back from the file: :mod:`qfrewrite.emit.storage`), and the float-vs-int8 agreement (top-1 too when the folder's
labels fit the model's outputs). ``weight_bits`` (2..8) and ``rounding`` ("nearest", "learned") are the recipe's
spec fields: 2- to 4-bit weights are stored as int4 in both TFLite and ONNX (half the kernel bytes), 5- to 7-bit
ones as int8 codes of their fewer levels (no size saving).
Images are split deterministically: ``holdout`` images, evenly spaced over the sorted file list, are held back from
calibration and used only for the agreement check. Every output is written all or nothing, never over an input.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np

from .data import holdout_indices
from .errors import DataError, OutputError, QfrewriteError

__all__ = ["convert", "plan_outputs", "recipe_passes", "ConvertSummary", "RECIPES"]

log = logging.getLogger(__name__)

RECIPES = ("plain", "dfq", "qualcomm")


@dataclass
class ConvertSummary:
    """What :func:`convert` did and measured."""

    model: str
    output: str
    report_json: str
    recipe: str
    weights: str
    size_bytes: int
    op_counts: Dict[str, int]
    fully_integer: bool
    input_dtype: str
    calibration_images: int
    holdout_images: int
    agreement: Optional[Dict[str, Any]] = None
    top1_float: Optional[float] = None
    top1_int8: Optional[float] = None
    labels_note: Optional[str] = None
    onnx: Optional[str] = None
    seconds: float = 0.0
    passes: list = field(default_factory=list)
    weight_bits: int = 8
    rounding: str = "nearest"
    #: per written format ("tflite", "onnx"): :meth:`~qfrewrite.emit.storage.StorageSummary.to_dict`
    storage: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in self.op_counts.items())
        lines = [
            f"model        {self.model}",
            f"recipe       {self.recipe} ({self.weights} weights): {' -> '.join(self.passes)}",
            f"output       {self.output} ({self.size_bytes / 1024:.1f} KiB, "
            f"{self._integer_label()}, input {self.input_dtype})",
            f"ops          {ops}",
            f"weights      {self.describe_weights()}",
            f"calibration  {self.calibration_images} images; held back {self.holdout_images}",
        ]
        if self.agreement:
            a = self.agreement
            lines.append(f"float vs int8 on held-back images: top-1 agreement {100 * a['top1_agreement']:.1f}%, "
                         f"SQNR {a['sqnr_db']:.1f} dB")
        if self.top1_float is not None:
            lines.append(f"top-1 on held-back images: float {100 * self.top1_float:.1f}%, "
                         f"int8 {100 * self.top1_int8:.1f}%")
        elif self.labels_note:
            lines.append(f"top-1        not measured: {self.labels_note}")
        if self.onnx:
            size = self.storage.get("onnx", {}).get("file_bytes")
            lines.append(f"onnx         {self.onnx}" + (f" ({size / 1024:.1f} KiB)" if size else ""))
        lines.append(f"report       {self.report_json}")
        lines.append(f"time         {self.seconds:.1f} s")
        return "\n".join(lines)


    def _integer_label(self) -> str:
        if not self.fully_integer:
            return "NOT fully integer"
        stored = self.storage.get("tflite", {}).get("dtypes", ["int8"])
        return "fully int8" if list(stored) == ["int8"] else f"fully integer: {'/'.join(stored)} weights"

    def describe_weights(self) -> str:
        """``4-bit (nearest rounding): TFLite int4 (kernels 106.0 KiB, 212.0 KiB at int8), ONNX int4 (...)``: the bit
        width and how each written file stores the kernels, from the files' own tensors."""
        parts = []
        for fmt, label in (("tflite", "TFLite"), ("onnx", "ONNX")):
            s = self.storage.get(fmt)
            if s is None:
                continue
            kernels = f"kernels {s['kernel_bytes'] / 1024:.1f} KiB"
            if s["kernel_bytes"] < s["int8_bytes"]:
                how = f"{kernels}, {s['int8_bytes'] / 1024:.1f} KiB at int8"
            elif self.weight_bits < 8:
                how = f"{kernels}: no size saving, {2 ** self.weight_bits - 1} of 255 int8 codes used"
            else:
                how = kernels
            parts.append(f"{label} {'/'.join(s['dtypes'])} ({how})")
        return f"{self.weight_bits}-bit ({self.rounding} rounding): " + ", ".join(parts)


def applied_passes(report) -> list:
    """The passes that made the model, in order: a choice among pipelines as ``SelectBest(kept dfq)`` followed by
    the kept pipeline's passes."""
    out = []
    for p in report.passes:
        if p.inner:
            out.append(p.name.rsplit(" > ", 1)[-1])
        elif "kept" in p.stats:
            out.append(f"{p.name}(kept {p.stats['kept']})")
        else:
            out.append(p.name)
    return out


def recipe_passes(recipe: str, weights: str = "per_channel", activations: Optional[str] = None,
                  weight_bits: int = 8, rounding: str = "nearest"):
    """``recipes.<recipe>(weights=..., weight_bits=..., rounding=..., activations=...)``, with one-line errors for
    bad values (the spec's own checks: weight_bits an integer in 2..8, rounding nearest or learned)."""
    from . import recipes
    from .spec import QuantSpec

    if recipe not in RECIPES:
        raise QfrewriteError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if weights not in ("per_channel", "per_tensor"):
        raise QfrewriteError(f"weights must be per_channel or per_tensor, got {weights!r}")
    QuantSpec(weight_bits=weight_bits, rounding=rounding)  # raises QfrewriteError naming the bad field
    kwargs = {"weights": weights, "weight_bits": weight_bits, "rounding": rounding}
    if activations:
        kwargs["activations"] = activations
    return getattr(recipes, recipe)(**kwargs)


def plan_outputs(outs, output: Union[str, os.PathLike], onnx_output=None) -> Dict[str, Path]:
    """Plan the files :func:`convert` writes into the :class:`~qfrewrite.io_utils.OutputSet` ``outs``:
    ``{"tflite", "report", "onnx"}`` paths (``onnx`` only when asked for)."""
    output = Path(output)
    if output.suffix.lower() != ".tflite":
        raise OutputError(f"output {output} must end in .tflite (the TFLite model; its report goes beside it as .json)")
    paths = {"tflite": outs.add(output, "the TFLite model"),
             "report": outs.add(output.with_suffix(".json"), "the report (beside the TFLite model)")}
    if onnx_output is not None:
        paths["onnx"] = outs.add(onnx_output, "the ONNX model")
    return paths


def convert(model, output: Union[str, os.PathLike], data, recipe: str = "dfq", weights: str = "per_channel",
            activations: Optional[str] = None, preprocess=None, onnx_output: Optional[Union[str, os.PathLike]] = None,
            holdout: Optional[int] = None, limit: Optional[int] = None, io_dtype: str = "float32",
            inputs=None, outputs=None, input_shape=None, progress: Optional[bool] = None,
            output_set=None, weight_bits: int = 8, rounding: str = "nearest") -> ConvertSummary:
    """Convert ``model`` to a fully int8 TFLite file at ``output`` (see the module docstring).

    The outputs (``output``, its ``.json`` report, ``onnx_output``) are written all or nothing: planned and checked
    against each other and the inputs before any work, renamed into place together at the end
    (:class:`~qfrewrite.io_utils.OutputSet`). ``output_set``: an OutputSet of a larger job to join instead (the
    caller commits it; until then the files are at ``output_set.staged(path)``). ``weights``, ``weight_bits``,
    ``rounding``, ``activations``: the recipe's spec (:func:`recipe_passes`).
    """
    from .io_utils import OutputSet

    if output_set is not None:
        return _convert(output_set, model, output, data, recipe, weights, activations, preprocess, onnx_output,
                        holdout, limit, io_dtype, inputs, outputs, input_shape, progress, weight_bits, rounding)
    with OutputSet() as outs:
        return _convert(outs, model, output, data, recipe, weights, activations, preprocess, onnx_output, holdout,
                        limit, io_dtype, inputs, outputs, input_shape, progress, weight_bits, rounding)


def _convert(outs, model, output, data, recipe, weights, activations, preprocess, onnx_output, holdout, limit,
             io_dtype, inputs, outputs, input_shape, progress, weight_bits, rounding) -> ConvertSummary:
    from . import load, rewrite
    from .evaluate import evaluate
    from .images import ImageFolder, ImageSet, folder_reads
    from .emit.storage import onnx_kernels, summarize, tflite_kernels
    from .report import jsonable
    from .tflite_inspect import float_ops, inspect_tflite

    t0 = time.perf_counter()
    outs.add_input(model, "the model")
    folder = data.path if isinstance(data, ImageFolder) else data
    outs.add_input(folder if isinstance(folder, (str, os.PathLike)) else None, "the calibration images",
                   folder_reads)
    paths = plan_outputs(outs, output, onnx_output)
    passes = recipe_passes(recipe, weights, activations, weight_bits, rounding)
    graph = load(model, inputs=inputs, outputs=outputs, input_shape=input_shape)
    if isinstance(data, ImageSet):
        images = data
    elif isinstance(data, (str, os.PathLike, ImageFolder)):
        folder = data if isinstance(data, ImageFolder) else ImageFolder(data, preprocess=preprocess, limit=limit,
                                                                       progress=progress)
        images = folder.read(graph, preprocess=preprocess)
    else:
        raise DataError("convert needs calibration images: an image folder (flat or one sub-folder per class)")
    n = len(images)
    if holdout is None:
        holdout = min(100, n // 10)
    calib_idx, held_idx = holdout_indices(n, holdout)
    calib = images.subset(calib_idx)
    held = images.subset(held_idx) if len(held_idx) else None
    log.info("calibrating on %d images, holding back %d", len(calib), 0 if held is None else len(held))

    result = rewrite(graph, passes=passes, data=calib)
    flatbuffer = result.to_tflite(None, io_dtype=io_dtype)
    info = inspect_tflite(flatbuffer)
    fully_int = not float_ops(info)
    in_t = info.tensors[info.inputs[0]]
    agreement = top1_f = top1_q = labels_note = None
    if held is not None and len(held):
        ev = evaluate(flatbuffer, held, reference=graph)
        agreement = {"top1_agreement": ev.top1_agreement, "sqnr_db": ev.sqnr_db, "images": ev.images}
        labels_note = ev.labels_note
        if ev.top1 is not None:
            top1_q = ev.top1
            top1_f = evaluate(graph, held).top1
    onnx_model = result.to_onnx(None) if "onnx" in paths else None
    onnx_bytes = onnx_model.SerializeToString() if onnx_model is not None else None
    storage = {"tflite": summarize(tflite_kernels(flatbuffer), flatbuffer).to_dict()}
    if onnx_model is not None:
        storage["onnx"] = summarize(onnx_kernels(onnx_model), onnx_bytes).to_dict()
    summary = ConvertSummary(
        model=str(model if isinstance(model, (str, os.PathLike)) else getattr(model, "name", type(model).__name__)),
        output=str(paths["tflite"]), report_json=str(paths["report"]), recipe=recipe, weights=weights,
        size_bytes=len(flatbuffer), op_counts=info.op_counts(), fully_integer=fully_int,
        input_dtype=np.dtype(in_t.dtype).name, calibration_images=len(calib),
        holdout_images=0 if held is None else len(held), agreement=agreement, top1_float=top1_f, top1_int8=top1_q,
        labels_note=labels_note, onnx=str(paths["onnx"]) if "onnx" in paths else None,
        passes=applied_passes(result.report), weight_bits=result.spec.weight_bits, rounding=result.spec.rounding,
        storage=storage)
    summary.seconds = time.perf_counter() - t0
    doc = {"summary": summary.to_dict(), "report": result.report.to_dict()}
    outs.write_bytes(paths["tflite"], flatbuffer)
    if onnx_bytes is not None:
        outs.write_bytes(paths["onnx"], onnx_bytes)
    outs.write_bytes(paths["report"], json.dumps(jsonable(doc), indent=2).encode())
    return summary
