"""How well ``diagnose`` ranks the layers by the harm they really do to the outputs, and what it costs.

Ground truth, measured independently of ``qfrewrite.analysis.layer_harm``: for every weighted layer of the model
(BatchNorm folded), the layer's kernel alone gets ``weight_quant`` (symmetric 8-bit, per tensor or per channel), a
fresh :class:`~qfrewrite.backend.executor.Executor` runs the whole graph with ``quantize=True`` (TensorFlow's own
fake-quant op) on the evaluation images, and the SQNR of the outputs against the float graph is that layer's harm.

``diagnose`` runs on calibration images disjoint from those (``benchmarks.common.split_images``: diagnose on the even
positions of the class-sorted folder, the ground truth on the odd ones). The figures are Spearman correlations
between ``diagnose``'s rank (1 = worst) and the ground-truth SQNR (low = bad), per granularity:

* ``measured``: ``diagnose(model, data)``, harm measured on ``harm_images`` of its images (each value of
  ``--harm-images``);
* ``no data``: ``diagnose(model)``: the ranking without data (the median channel's weight SQNR);
  ``diagnose(model, noise_images=8)``: the harm measured on Gaussian-noise inputs; and two weight-only estimates
  tried in place of the median channel: the SQNR of the whole kernel, and the same with each output channel's signal and noise
  weighted by the power gain of the layers that read it (:func:`propagated_harm_db`);

and the wall time of ``diagnose`` with data beside one float forward pass over the same images in the same run
(traced executor, build included), as a ratio: the machine is shared, so absolute times are noisy.

    python benchmarks/bench_diagnose_rank.py                      # MobileNetV2 and EfficientNet-Lite0
    python benchmarks/bench_diagnose_rank.py --models torchvision_v2 --harm-images 16 --out results/rank.json

The ground truth is cached (``--truth``, keyed by model, image count and granularity); Spearman's rho is computed
with numpy (average ranks for ties).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MODELS, SHARED, split_images  # noqa: E402

log = logging.getLogger("bench_diagnose_rank")

GRANULARITIES = ("per_tensor", "per_channel")
#: Gaussian-noise inputs of the no-data estimate ``diagnose(model, noise_images=...)``
NOISE_IMAGES = 8


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks."""
    def ranks(x):
        x = np.asarray(x, np.float64)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):  # ties: average rank
            m = x == v
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(np.sum(ra * rb) / np.sqrt(np.sum(ra ** 2) * np.sum(rb ** 2)))


def float_outputs(graph, images) -> List[np.ndarray]:
    from qfrewrite.backend.executor import Executor

    ex = Executor(graph)
    chunks = [ex(x) for x in images.batches()]
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(graph.outputs))]


def ground_truth(folded, images, granularity: str) -> Dict[str, float]:
    """``{layer node name: output SQNR (dB)}`` with only that layer's weights quantized (see the module docstring)."""
    from qfrewrite.backend.executor import Executor
    from qfrewrite.ir import WEIGHTED_OPS
    from qfrewrite.numerics.metrics import sqnr_db
    from qfrewrite.quant.weights import weight_quant_attrs

    ref = float_outputs(folded, images)
    out = {}
    for node in folded.find(*WEIGHTED_OPS):
        node.weight_quant = weight_quant_attrs(node, granularity, "minmax", 8)
        try:
            ex = Executor(folded, quantize=True)
            chunks = [ex(x) for x in images.batches()]
        finally:
            node.weight_quant = None
        outs = [np.concatenate([c[i] for c in chunks]) for i in range(len(folded.outputs))]
        out[node.name] = sqnr_db(np.concatenate([r.ravel() for r in ref]), np.concatenate([o.ravel() for o in outs]))
        log.info("truth %s %s: %.2f dB", granularity, node.source_name, out[node.name])
    return out


# -- estimates without data tried in place of the median channel's SQNR ------------------------------------------------
#: the longest forward walk from a layer to the weighted layers that read its channels
_MAX_WALK = 16


def _channel_readers(node) -> list:
    """The weighted layers that read ``node``'s output channel by channel: forward through channel-wise ops and
    residual Adds (channel ``c`` stays channel ``c``), stopping at anything else."""
    from qfrewrite.ir import WEIGHTED_OPS, Op, is_channelwise

    found = []
    frontier, seen = [node.output], set()
    for _ in range(_MAX_WALK):
        nxt = []
        for v in frontier:
            for reader, idx in v.uses():
                if reader.name in seen:
                    continue
                seen.add(reader.name)
                if reader.op in WEIGHTED_OPS and idx == 0:
                    found.append(reader)
                elif is_channelwise(reader) and idx == 0 or (reader.op is Op.ADD and not any(
                        i.is_const for i in reader.inputs)):
                    nxt.append(reader.output)
        if not nxt:
            break
        frontier = nxt
    return found


def _input_channel_gain(reader) -> np.ndarray:
    """``sum W**2`` per input channel of a weighted layer: the noise power gain of each channel it reads."""
    from qfrewrite.ir import Op

    k = np.asarray(reader.weight.const, np.float64) ** 2
    if reader.op is Op.DENSE:
        return k.sum(axis=1)
    return k.sum(axis=(0, 1, 3))


def propagated_harm_db(graph, granularity: str = "per_tensor", method: str = "minmax",
                       bits: int = 8) -> Dict[str, float]:
    """Without data: each layer's weight SQNR with every output channel's signal and noise weighted by the power
    gain of the layers that read it, ``10 log10(sum_c S_c g_c / sum_c N_c g_c)`` with ``S_c = sum W_c**2``,
    ``N_c = sum (W_c - W_q,c)**2`` and ``g_c`` the sum over the reading layers (:func:`_channel_readers`) of their
    ``sum W**2`` over the weights that read channel ``c`` (``g_c = 1`` where no layer reads the channels).

    A channel whose weights are small but whose readers amplify it (a near-zero channel after per-tensor
    rounding) then counts as much as it will at the next layer's output. ``graph``: BatchNorms folded."""
    from qfrewrite.ir import WEIGHTED_OPS, layer_kind
    from qfrewrite.numerics.kernels import out_channels_last
    from qfrewrite.quant.weights import quantized_kernel, weight_quant_attrs

    out = {}
    for node in graph.find(*WEIGHTED_OPS):
        w = out_channels_last(np.asarray(node.weight.const, np.float64), layer_kind(node))
        q = out_channels_last(np.asarray(quantized_kernel(node, weight_quant_attrs(node, granularity, method, bits)),
                                         np.float64), layer_kind(node))
        signal, noise = (w ** 2).sum(axis=0), ((w - q) ** 2).sum(axis=0)
        gain = np.zeros_like(signal)
        for reader in _channel_readers(node):
            g = _input_channel_gain(reader)
            if len(g) == len(gain):
                gain += g
        if not gain.any():
            gain = np.ones_like(signal)
        n = float(np.sum(noise * gain))
        out[node.name] = math.inf if n == 0 else 10.0 * math.log10(max(float(np.sum(signal * gain)), 1e-30) / n)
    return out


def correlation(ranked, truth: Dict[str, float]) -> float:
    """Spearman between a ranking (list of LayerStats, worst first) and the ground truth SQNR."""
    names = [ls.name for ls in ranked]
    return spearman(np.arange(len(names)), [truth[n] for n in names])


def bench_model(key: str, n: int, harm_images: Sequence[int], truth_cache: Dict) -> Dict:
    import qfrewrite
    from qfrewrite.analysis.layer_harm import ranked_layers
    from qfrewrite.diagnose import diagnose
    from qfrewrite.images import load_image_folder
    from qfrewrite.pass_infra import Context
    from qfrewrite.passes import FoldBatchNorm

    m = MODELS[key]
    graph = qfrewrite.load(SHARED / m["file"], **m.get("load", {}))
    folded = graph.copy()
    FoldBatchNorm().run(folded, Context())
    images = load_image_folder(SHARED / "images" / "imagenet_sample", graph, preprocess=m["preprocess"],
                               limit=2 * n)
    calib, evals = split_images(images, n, n)
    truth = {}
    for g in GRANULARITIES:
        ck = f"{key}:{n}:{g}"
        if ck not in truth_cache:
            truth_cache[ck] = ground_truth(folded, evals, g)
        truth[g] = truth_cache[ck]

    row: Dict = {"model": key, "layers": len(truth["per_tensor"]), "images": {"diagnose": len(calib),
                                                                             "truth": len(evals)}}
    plain = diagnose(graph)
    t0 = time.perf_counter()
    noisy = diagnose(graph, noise_images=NOISE_IMAGES)
    row["noise_seconds"] = round(time.perf_counter() - t0, 2)
    row["no_data"] = {}
    for g in GRANULARITIES:
        prop = propagated_harm_db(folded, g)
        row["no_data"][g] = {
            "median_channel": correlation(ranked_layers(plain.stats, None, g), truth[g]),
            "noise": correlation(ranked_layers(noisy.stats, noisy.harm, g), truth[g]),
            "whole_kernel": correlation(sorted(plain.stats.values(), key=lambda ls: ls.tensor_sqnr_db[g]), truth[g]),
            "propagated": correlation(sorted(plain.stats.values(), key=lambda ls: prop[ls.name]), truth[g])}
    row["measured"] = []
    for k in harm_images:
        t0 = time.perf_counter()
        float_outputs(graph, calib)
        t_float = time.perf_counter() - t0
        t0 = time.perf_counter()
        d = diagnose(graph, calib, harm_images=k)
        t_diag = time.perf_counter() - t0
        entry = {"harm_images": d.harm.images, "seconds": round(t_diag, 2), "float_forward_seconds": round(t_float, 2),
                 "ratio_to_float_forward": round(t_diag / t_float, 1), "steps": d.harm.seconds}
        for g in GRANULARITIES:
            entry[g] = correlation(ranked_layers(d.stats, d.harm, g), truth[g])
        worst = min(truth["per_tensor"], key=truth["per_tensor"].get)
        entry["truth_worst"] = {"layer": graph.node(worst).source_name, "db": truth["per_tensor"][worst],
                                "diagnose_rank": 1 + [ls.name for ls in d.ranked()].index(worst)}
        row["measured"].append(entry)
        log.info("%s: %s", key, entry)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["torchvision_v2", "efficientnet_lite0"], choices=list(MODELS))
    ap.add_argument("--images", type=int, default=64, help="images for diagnose, and as many for the ground truth")
    ap.add_argument("--harm-images", type=int, nargs="+", default=[16],
                    help="diagnose's harm_images (one run each)")
    ap.add_argument("--truth", type=Path, default=REPO / "benchmarks" / "results" / "diagnose_rank_truth.json",
                    help="ground-truth cache")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cache = json.loads(args.truth.read_text()) if args.truth.exists() else {}
    rows = []
    for key in args.models:
        rows.append(bench_model(key, args.images, args.harm_images, cache))
        args.truth.write_text(json.dumps(cache, indent=1))
    print(f"| model | layers | no data: median channel T / C | noise ({NOISE_IMAGES} inputs) T / C | whole kernel T / C "
          "| propagated T / C | harm images | measured T / C | diagnose s | float fwd s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        nd = r["no_data"]
        cells = " | ".join(f"{nd['per_tensor'][k]:.3f} / {nd['per_channel'][k]:.3f}"
                           for k in ("median_channel", "noise", "whole_kernel", "propagated"))
        for e in r["measured"]:
            print(f"| {r['model']} | {r['layers']} | {cells} | {e['harm_images']} | {e['per_tensor']:.3f} / "
                  f"{e['per_channel']:.3f} | {e['seconds']} | {e['float_forward_seconds']} | "
                  f"{e['ratio_to_float_forward']} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
