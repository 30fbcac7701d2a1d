"""Scratch experiment: all layers W4 per channel with learned-rounding variants (base, hsearch: per-row
clipping ratio from the H-weighted error of nearest rounding, 26 ratios 1..0.5, then GPTQ + refine on it; search7:
GPTQ + refine at 7 ratios 1..0.6, each row keeping the lowest error; sweepsN: N refine sweeps).

    VIEW=dfq python benchmarks/experiments/w4_rounding_variants.py torchvision_v2 base hsearch sweeps10 search7
"""
import sys, time; sys.path.insert(0, __import__("os").path.dirname(__file__))
import logging, os  # noqa: E401
import numpy as np
from w4_rounding_harness import (R, build, classify, make_hsearch_rounder, make_search_rounder, quantize_eval2,
                             setup)
logging.basicConfig(level=logging.WARNING)
name = sys.argv[1]
which = sys.argv[2:]
work, moments, ftop, data, evals, offset = setup(name)
classes = ["first", "depthwise", "pointwise", "classifier", "conv"]
all4 = {c: 4 for c in classes}
def db(s, e): return 10*np.log10(s/e) if e > 0 else float('inf')
def show(info, cls):
    rows = sorted(info.items(), key=lambda kv: db(kv[1][2], kv[1][1]))[:8]
    for k, v in rows:
        print(f"   {k[:40]:40s} {cls[k]:10s} near {db(v[2], v[0]):6.2f} chosen {db(v[2], v[1]):6.2f} dB" + (f" alpha {v[3]:.3f}" if len(v) > 3 else ""))
cls = classify(work)
for lab in which:
    t = time.time()
    if lab == "base":
        rounder = None
    elif lab.startswith("search"):  # search7
        k = int(lab[6:] or 7)
        rounder = make_search_rounder([1.0] + list(np.linspace(1.0, 0.6, k + 1)[1:]))
    elif lab.startswith("hsearch"):
        rounder = make_hsearch_rounder(list(np.linspace(1.0, 0.5, 26)))
    elif lab.startswith("sweeps"):
        sw = int(lab[6:])
        rounder = lambda w, h, grid: R.round_rows(w, h, grid, sweeps=sw)
    g, info = build(work, moments, all4, rounder=rounder)
    tr = time.time() - t
    acc, agree, sq = quantize_eval2(g, data, evals, offset, work)
    print(f"{name} {os.environ.get('VIEW','dfq')} all4 {lab}: top1 {acc:.1f} agree {agree:.1f} sqnr {sq:.2f} (float {ftop:.1f}) build {tr:.0f}s total {time.time()-t:.0f}s", flush=True)
    show(info, cls)
