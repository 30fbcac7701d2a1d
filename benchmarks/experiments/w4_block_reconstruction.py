"""Scratch experiment, kept as run: does block reconstruction (AdaRound's soft rounding trained on a block's output,
BRECQ-style) recover the 4-bit accuracy that layer-wise learned rounding leaves?

dfq's function-keeping passes, then LearnedRounding (GPTQ) and InsertFakeQuant at the given bits and granularity:
the starting point. The quantized graph is cut into blocks where a single value is live (a residual block cannot be
cut inside) with at least ``MIN_LAYERS`` weighted layers each. Block by block in graph order, the block's kernels
become ``s * clip(floor(w / s) + h(V), 0, n)`` (``w`` the float kernel, ``h`` AdaRound's rectified sigmoid of a
trained ``V``, initialised at the GPTQ codes), and ``V`` is trained with Adam on

    ``mean_batch,pixels sum_channels (block_q(x_q) - block_f(x_f))^2 + lam * sum (1 - |2h - 1|^beta)``

(``x_q`` the block's input in the quantized model with the blocks before it already set, ``block_f(x_f)`` the float
model's output there; activation FakeQuants kept, straight-through; ``beta`` annealed from 20 to 2 after a 20%
warm-up), ``ITERS`` steps of ``BATCH`` images. Each block then keeps its hard rounding (``V >= 0``) when that
lowers its output error on the calibration images, else the GPTQ codes. Simulated top-1 on the 500 odd-position
images, before and after.

    python benchmarks/experiments/w4_block_reconstruction.py torchvision_v2 4 per_channel ITERS [LR] [MIN_LAYERS]

``NIMG`` (environment) limits the calibration images the reconstruction uses (default 500), ``ACTQ=0`` keeps the
activations float while training (not run with this script; the library's weight-only version is
``LearnedRounding(blocks=True)``). Run on the 2-core machine, 2026-12-03 (500 images, activations quantized, 18
blocks of 3 layers, the last of 2): GPTQ alone 75.8 simulated top-1 (float 83.6); 20 steps per block 76.0 (39 s,
before the base followed the GPTQ codes); 500 steps at LR 1e-2 79.4 (368 s), at 3e-2 79.8 (388 s), at 1e-1 79.4
(377 s, the lowest block errors). The first block (stem, depthwise and projection at 112 x 112) kept its GPTQ
rounding in every run: its trained rounding had a higher error.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np  # noqa: E402

from benchmarks.bench_passes import top1  # noqa: E402
from benchmarks.common import load_shared_model  # noqa: E402
from qfrewrite import recipes  # noqa: E402
from qfrewrite.backend.tf_lowering import lower, lower_node  # noqa: E402
from qfrewrite.ir import WEIGHTED_OPS, Op, set_kernel  # noqa: E402
from qfrewrite.numerics.quantize import nudge  # noqa: E402
from qfrewrite.pass_infra import Context  # noqa: E402
from qfrewrite.passes import CorrectBias, InsertFakeQuant, LearnedRounding  # noqa: E402
from qfrewrite.spec import QuantSpec  # noqa: E402

import tensorflow as tf  # noqa: E402

name, bits, gran, iters = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
LR = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-2
MIN_LAYERS = int(sys.argv[6]) if len(sys.argv) > 6 else 3
BATCH, LAM, WARM = 32, 0.01, 0.2
NIMG = int(os.environ.get("NIMG", "500"))  # calibration images used by the reconstruction
ACTQ = os.environ.get("ACTQ", "1") == "1"  # 0: the activations stay float while training (weight-only reconstruction)
ZETA, GAMMA = 1.1, -0.1

graph, offset, calib, evals = load_shared_model(name, 500, 500)
spec = QuantSpec(weights=gran, weight_bits=bits)
work = graph.copy()
ctx = Context(data=calib, spec=spec)
for p in recipes.dfq(spec=spec, quantize=False):
    if isinstance(p, (CorrectBias, LearnedRounding)):
        continue
    if p.run(work, ctx).modified:
        ctx.invalidate()
t0 = time.time()
q = work.copy()
ctx = Context(data=calib, spec=spec)
LearnedRounding().run(q, ctx)
ctx.invalidate()
InsertFakeQuant().run(q, ctx)
print("gptq + fakequant", round(time.time() - t0), "s", flush=True)
base_top1 = top1(q, evals, offset, quantize=True)
print("float", top1(work, evals, offset, quantize=False), "int (GPTQ)", base_top1, flush=True)


def float_name(v):
    """The float graph's value that a quantized-graph value stands for (through FakeQuants)."""
    while v.producer is not None and v.producer.op is Op.FAKE_QUANT:
        v = v.producer.inputs[0]
    return v.name


order = q.topological_order()
last_use = {}
for i, n in enumerate(order):
    for v in n.inputs:
        if not v.is_const:
            last_use[v.name] = i
for v in q.outputs:
    last_use[v.name] = len(order)
blocks, cur, live = [], [], {v.name for v in q.inputs}
for i, n in enumerate(order):
    cur.append(n)
    live.add(n.output.name)
    live = {v for v in live if last_use.get(v, -1) > i}
    weighted = sum(m.op in WEIGHTED_OPS for m in cur)
    if (len(live) == 1 and weighted >= MIN_LAYERS) or i == len(order) - 1:
        blocks.append(cur)
        cur = []
print(len(blocks), "blocks:", [sum(m.op in WEIGHTED_OPS for m in b) for b in blocks], flush=True)

x_all = calib.preprocess(calib.images[:NIMG])
wnames = {n.name for n in work}
targets = []
for b in blocks:
    out = b[-1].output
    targets.append(work.outputs[0].name if q.is_output(out) else float_name(out))
missing = [t for t in targets if t not in {v.name for v in work.values()}]
assert not missing, missing
f_out = {t: [] for t in targets}
for s in range(0, len(x_all), 50):
    _, taps = lower(work, [tf.constant(x_all[s:s + 50])], taps=targets)
    for t in targets:
        f_out[t].append(taps[t].numpy())
f_out = {t: np.concatenate(v) for t, v in f_out.items()}


def grid_of(node):
    fq = node.weight_quant
    nlo, _, step = nudge(np.asarray(fq.lo), np.asarray(fq.hi), fq.bits, fq.narrow_range)
    n = 2 ** fq.bits - 1 - (1 if fq.narrow_range else 0)
    shape = node.weight.const.shape
    if len(fq.lo) == 1:
        bshape = (1,) * len(shape)
    elif node.op is Op.DEPTHWISE_CONV2D:
        bshape = (1, 1, shape[2], shape[3])
    else:
        bshape = (1,) * (len(shape) - 1) + (shape[-1],)
    return nlo.reshape(bshape).astype(np.float32), step.reshape(bshape).astype(np.float32), n


def h_of(v):
    return tf.clip_by_value(tf.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def run_block(block, x, kernels, actq=True):
    env = {}
    first = True
    for node in block:
        args = []
        for v in node.inputs:
            if v.is_const:
                args.append(tf.constant(v.const))
            elif v.name in env:
                args.append(env[v.name])
            else:
                assert first or v.name == block_input_name, (node.name, v.name)
                args.append(x)
        first = False
        if node.name in kernels:
            env[node.output.name] = lower_node(node, args, quantize=False, kernel=kernels[node.name])
        else:
            env[node.output.name] = lower_node(node, args, quantize=actq)
    return env[block[-1].output.name]


xq = x_all
t_all = time.time()
for bi, block in enumerate(blocks):
    tb = time.time()
    produced = {n.output.name for n in block}
    ins = {v.name for n in block for v in n.inputs if not v.is_const and v.name not in produced}
    assert len(ins) == 1, ins
    block_input_name = ins.pop()
    layers = [n for n in block if n.op in WEIGHTED_OPS and n.weight_quant is not None]
    y_f = f_out[targets[bi]]
    if not layers:
        xq = np.concatenate([run_block(block, tf.constant(xq[s:s + 50]), {}).numpy() for s in range(0, len(xq), 50)])
        continue
    consts, vs = {}, {}
    for n in layers:
        nlo, step, nmax = grid_of(n)
        wf = work.node(n.name).weight.const.astype(np.float32) if n.name in wnames else n.weight.const
        if wf.shape != n.weight.const.shape:
            wf = n.weight.const
        floor = np.floor((wf - nlo) / step)
        codes = np.clip(np.round((n.weight.const - nlo) / step), 0, nmax)
        # GPTQ may have moved a weight more than one step from the float value: the base then follows the code
        floor = np.where(codes > floor + 1, codes - 1, np.where(codes < floor, codes, floor))
        init = np.where(codes - floor >= 0.5, 2.0, -2.0).astype(np.float32)
        consts[n.name] = (tf.constant(nlo), tf.constant(step), tf.constant(floor.astype(np.float32)), float(nmax),
                          codes)
        vs[n.name] = tf.Variable(init)

    def kernels(hard=False, gptq=False):
        out = {}
        for k, (nlo, step, floor, nmax, codes) in consts.items():
            if gptq:
                c = tf.constant(codes.astype(np.float32))
            else:
                h = tf.cast(vs[k] >= 0, tf.float32) if hard else h_of(vs[k])
                c = tf.clip_by_value(floor + h, 0.0, nmax)
            out[k] = nlo + c * step
        return out

    opt = tf.keras.optimizers.Adam(LR)

    @tf.function
    def step_fn(x, y, beta, lam):
        with tf.GradientTape() as tape:
            out = run_block(block, x, kernels(), ACTQ)
            rec = tf.reduce_mean(tf.reduce_sum(tf.square(out - y), axis=-1))
            reg = tf.add_n([tf.reduce_sum(1.0 - tf.pow(tf.abs(2.0 * h_of(v) - 1.0), beta)) for v in vs.values()])
            loss = rec + lam * reg
        grads = tape.gradient(loss, list(vs.values()))
        opt.apply_gradients(zip(grads, list(vs.values())))

        return rec

    def block_error(ks, actq=True):
        err, outs = 0.0, []
        for s in range(0, len(xq), 50):
            o = run_block(block, tf.constant(xq[s:s + 50]), ks, actq).numpy()
            outs.append(o)
            err += float(np.sum((o - y_f[s:s + 50]) ** 2))
        return err / len(xq), np.concatenate(outs)

    e_gptq, out_gptq = block_error(kernels(gptq=True))
    rng = np.random.default_rng(bi)
    for it in range(iters):
        idx = rng.choice(len(xq), BATCH, replace=False)
        frac = it / max(iters, 1)
        if frac < WARM:
            beta, lam = 20.0, 0.0
        else:
            beta, lam = 20.0 - (20.0 - 2.0) * (frac - WARM) / (1 - WARM), LAM
        step_fn(tf.constant(xq[idx]), tf.constant(y_f[idx]), tf.constant(beta), tf.constant(lam))
    e_hard, out_hard = block_error(kernels(hard=True))
    e_soft, _ = block_error(kernels())
    flat = np.concatenate([h_of(v).numpy().ravel() for v in vs.values()])
    undecided = float(np.mean((flat > 0.05) & (flat < 0.95)))
    keep = e_hard < e_gptq
    final = kernels(hard=True) if keep else kernels(gptq=True)
    for n in layers:
        set_kernel(q, n, final[n.name].numpy().astype(np.float32), "block reconstructed")
    xq = out_hard if keep else out_gptq
    print(f"block {bi} ({len(layers)} layers): error GPTQ {e_gptq:.4g} -> blocks {e_hard:.4g} "
          f"({'kept' if keep else 'GPTQ kept'}; soft {e_soft:.4g}, {100 * undecided:.1f}% undecided), "
          f"{time.time() - tb:.1f} s", flush=True)
q.remove_unused()
print("reconstruction", round(time.time() - t_all), "s; int top-1 GPTQ", base_top1, "-> blocks",
      top1(q, evals, offset, quantize=True), flush=True)
