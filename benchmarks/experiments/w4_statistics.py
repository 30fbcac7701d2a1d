"""Scratch experiment, kept as run: does matching the quantized model's per-channel output statistics to float's,
layer by layer in topological order (BatchNorm re-estimation for a folded graph), recover 4-bit accuracy?

dfq's function-keeping passes, then LearnedRounding and InsertFakeQuant at the given bits and granularity; then for
each weighted layer, with every layer before it already matched, the simulated int8 graph up to the layer is run on
``N`` calibration images and its output channels moved to float's mean (``mean``: the bias shifted) or mean and
standard deviation (``meanstd``: also the channel's kernel and weight grid scaled by ``sigma_f / sigma_q``, clipped
to [0.5, 2], per-channel weights only). Simulated top-1 on the 500 odd-position images.

    python benchmarks/experiments/w4_statistics.py torchvision_v2 4 per_channel mean,meanstd 128
"""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
from benchmarks.common import load_shared_model
from benchmarks.bench_passes import top1
from qfrewrite import recipes
from qfrewrite.spec import QuantSpec
from qfrewrite.pass_infra import Context
from qfrewrite.passes import CorrectBias, LearnedRounding, InsertFakeQuant
from qfrewrite.ir import WEIGHTED_OPS, FakeQuantAttrs, layer_kind, set_kernel, set_bias
from qfrewrite.backend.executor import ReducingExecutor, Reduction
from qfrewrite.numerics.kernels import scale_out

name = sys.argv[1]
bits = int(sys.argv[2])
gran = sys.argv[3]
modes = sys.argv[4].split(",")  # mean, meanstd
nstat = int(sys.argv[5]) if len(sys.argv) > 5 else 128
graph, offset, calib, evals = load_shared_model(name, 500, 500)
spec = QuantSpec(weights=gran, weight_bits=bits)
work = graph.copy()
ctx = Context(data=calib, spec=spec)
for p in recipes.dfq(spec=spec, quantize=False):
    if isinstance(p, (CorrectBias, LearnedRounding)):
        continue
    if p.run(work, ctx).modified:
        ctx.invalidate()
t = time.time()
q = work.copy()
ctx = Context(data=calib, spec=spec)
LearnedRounding().run(q, ctx)
ctx.invalidate()
InsertFakeQuant().run(q, ctx)
print("rounded+fq", round(time.time() - t), "s", flush=True)
print("float", top1(work, evals, offset, quantize=False), "int", top1(q, evals, offset, quantize=True), flush=True)

x = calib.preprocess(calib.images[np.linspace(0, len(calib) - 1, nstat).astype(int)])
known = {v for n in work.topological_order() for v in [n.output.name]}
layers = [n for n in q.topological_order() if n.op in WEIGHTED_OPS and n.weight_quant is not None
          and n.output.name in known]
print(len(layers), "layers matched", flush=True)


def moments(g, names, quantize, prefix=False):
    if prefix:
        g = g.copy()
        g.outputs = [g.value(names[0])]
        g.remove_unused()
    ex = ReducingExecutor(g, {n: Reduction(sum=True, sumsq=True) for n in names}, quantize=quantize)
    acc = {}
    for s in range(0, len(x), 32):
        r = ex(x[s:s + 32])
        for n in names:
            a = acc.setdefault(n, [0, 0, 0])
            a[0] += r[n]["sum"].astype(np.float64); a[1] += r[n]["sumsq"].astype(np.float64); a[2] += r[n]["count"]
    out = {}
    for n, (s1, s2, c) in acc.items():
        m = s1 / c
        out[n] = (m, np.sqrt(np.maximum(s2 / c - m * m, 0)))
    return out


ref = moments(work, [n.output.name for n in layers], False)
for mode in modes:
    g = q.copy()
    t = time.time()
    for layer in layers:
        node = g.node(layer.name)
        mq, sq = moments(g, [node.output.name], True, prefix=True)[node.output.name]
        mf, sf = ref[node.output.name]
        kind = layer_kind(node)
        fq = node.weight_quant
        alpha = np.ones_like(mf)
        if mode == "meanstd" and len(fq.lo) > 1:
            alpha = np.where(sq > 1e-6 * max(sq.max(), 1e-12), sf / np.maximum(sq, 1e-12), 1.0)
            alpha = np.clip(alpha, 0.5, 2.0)
        k, b = scale_out(node.weight.const, node.bias.const if node.bias is not None else np.zeros_like(mf), 1.0 / alpha, kind)
        b = b.astype(np.float64) - alpha * mq + mf
        set_kernel(g, node, k, "matched")
        set_bias(g, node, b.astype(np.float32), "matched")
        if len(fq.lo) > 1:
            node.weight_quant = FakeQuantAttrs(lo=tuple(float(v) for v in np.asarray(fq.lo) * alpha),
                                               hi=tuple(float(v) for v in np.asarray(fq.hi) * alpha), bits=fq.bits,
                                               narrow_range=fq.narrow_range, axis=fq.axis)
    g.remove_unused()
    print(mode, "seconds", round(time.time() - t), "int top-1", top1(g, evals, offset, quantize=True), flush=True)
