"""Latency of emitted TFLite models in the LiteRT interpreter (XNNPACK), 1 and 2 threads.

    python benchmarks/bench_latency.py float.tflite int8.tflite [--runs 50] [--json out.json]

Reports the median wall time per invocation of each model and the ratio of each model to the first (the float
reference), measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List

import numpy as np


def ready_interpreter(model, threads: int, warmup: int = 5):
    """A LiteRT interpreter (XNNPACK) for a model path or flatbuffer bytes, its input set to a fixed random tensor
    and ``warmup`` invocations run."""
    from qfrewrite.tflite_inspect import interpreter

    it = interpreter(model if isinstance(model, (bytes, bytearray)) else str(model), num_threads=threads)
    inp = it.get_input_details()[0]
    rng = np.random.default_rng(0)
    if np.issubdtype(inp["dtype"], np.integer):
        info = np.iinfo(inp["dtype"])
        x = rng.integers(info.min, info.max, size=inp["shape"], dtype=inp["dtype"])
    else:
        x = rng.uniform(-1, 1, size=inp["shape"]).astype(inp["dtype"])
    it.set_tensor(inp["index"], x)
    for _ in range(warmup):
        it.invoke()
    return it


def median_invoke(it, runs: int) -> float:
    """Median seconds per ``invoke()`` over ``runs`` invocations."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        it.invoke()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_model(path: str, threads: int, runs: int, warmup: int = 5) -> float:
    """Median seconds per ``invoke()`` of the model at ``path`` with ``threads`` threads."""
    return median_invoke(ready_interpreter(path, threads, warmup), runs)


def bench(paths: List[str], runs: int = 50, threads=(1, 2)) -> List[Dict]:
    rows = []
    for t in threads:
        base = None
        for p in paths:
            sec = time_model(p, t, runs)
            base = sec if base is None else base
            rows.append({"file": Path(p).name, "threads": t, "ms": sec * 1e3, "speedup_vs_first": base / sec})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="TFLite files; the first is the reference")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = bench(args.models, args.runs)
    for r in rows:
        print(f"{r['file']:<40} threads={r['threads']}  {r['ms']:8.2f} ms  x{r['speedup_vs_first']:.2f} vs first")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
