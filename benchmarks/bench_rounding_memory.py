"""Peak memory and time of the LearnedRounding pass alone on a ../shared model (Linux).

The float graph after ``recipes.dfq``'s function-keeping passes (FoldBatchNorm, FoldDeadChannels,
CrossLayerEqualization) is built first, with the calibration images decoded; then the process's peak resident
memory is reset (``/proc/self/clear_refs``, value 5) and ``LearnedRounding`` runs by itself (its input-patch moments
included). Printed: the resident memory before the pass, the peak during it and the difference (the pass's own
peak), and the peak of Python/numpy allocations during the pass (``tracemalloc``; TensorFlow's own buffers are not
seen by it, the resident figure includes them).

    python benchmarks/bench_rounding_memory.py --models efficientnet_lite0 tf_slim_v1 --bits 4
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MODELS, load_shared_model, shared_images_present  # noqa: E402


def _memory_mib() -> dict:
    """``VmRSS`` and ``VmHWM`` (peak) of this process, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024
    return out


def measure(name: str, bits: int, granularity: str, n_calib: int) -> str:
    from qfrewrite import recipes
    from qfrewrite.pass_infra import Context
    from qfrewrite.passes import CorrectBias, LearnedRounding
    from qfrewrite.spec import QuantSpec

    graph, _, calib, _ = load_shared_model(name, n_calib, 1)
    spec = QuantSpec(weights=granularity, weight_bits=bits, rounding="learned")
    work, ctx = graph.copy(), Context(data=calib, spec=spec)
    for p in recipes.dfq(spec=spec, quantize=False):
        if not isinstance(p, (CorrectBias, LearnedRounding)) and p.run(work, ctx).modified:
            ctx.invalidate()
    ctx.invalidate()
    before = _memory_mib()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    tracemalloc.start()
    t0 = time.perf_counter()
    LearnedRounding(weights=granularity, bits=bits).run(work, ctx)
    seconds = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    after = _memory_mib()
    return (f"{name} W{bits} {granularity}, {len(calib)} images: LearnedRounding {seconds:.0f} s; resident before "
            f"{before:.0f} MiB, peak during the pass {after['VmHWM']:.0f} MiB (+{after['VmHWM'] - before:.0f}); "
            f"Python/numpy peak {py_peak / 2 ** 20:.0f} MiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["efficientnet_lite0"], choices=list(MODELS))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--granularity", default="per_channel", choices=["per_channel", "per_tensor"])
    ap.add_argument("--calib", type=int, default=500)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not shared_images_present():
        return 2
    if not Path("/proc/self/clear_refs").exists():
        print("needs Linux's /proc/self/clear_refs to reset the peak", file=sys.stderr)
        return 2
    for name in args.models:  # the reset before each pass makes each figure that pass's own peak
        print(measure(name, args.bits, args.granularity, args.calib), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
