"""Scratch experiments on 4-bit weights (W4 per channel on torchvision_v2), kept as run: the helpers of
w4_rounding_variants.py. Not part of the library; uses LearnedRounding's private _grid. The patch moments are cached
under $W4_ROUNDING_CACHE (default /tmp/w4_rounding_cache)."""
import sys, time, pickle, os
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]; sys.path.insert(0, str(REPO))
import numpy as np
from benchmarks.common import load_shared_model
from benchmarks.bench_passes import top1
from qfrewrite import recipes
from qfrewrite.spec import QuantSpec
from qfrewrite.pass_infra import Context
from qfrewrite.passes import CorrectBias, LearnedRounding, InsertFakeQuant
from qfrewrite.ir import WEIGHTED_OPS, layer_kind, set_kernel, set_bias
from qfrewrite.analysis.patch_moments import gather_patch_moments
from qfrewrite.numerics.kernels import as_rows, from_rows
from qfrewrite.quant.weights import weight_quant_attrs
from passes.learned_rounding import _grid
from qfrewrite.numerics import rounding as R


CACHE = Path(os.environ.get("W4_ROUNDING_CACHE", "/tmp/w4_rounding_cache")); CACHE.mkdir(exist_ok=True)

def setup(name, n_calib=500, n_eval=500, view=None):
    view = view or os.environ.get("VIEW", "dfq")
    graph, offset, calib, evals = load_shared_model(name, n_calib, n_eval)
    ck = CACHE / f"{name}_{n_calib}_{view}.pkl"
    spec = QuantSpec(weights="per_channel")
    data = calib
    work = graph.copy()
    ctx = Context(data=data, spec=spec)
    for p in getattr(recipes, view)(spec=spec, quantize=False):
        if isinstance(p, (CorrectBias, LearnedRounding)):
            continue
        if p.run(work, ctx).modified:
            ctx.invalidate()
    if ck.exists():
        moments, ftop = pickle.load(open(ck, "rb"))
    else:
        ftop = top1(graph, evals, offset, quantize=False)
        t = time.time()
        moments = gather_patch_moments(work, data)
        print("moments", time.time() - t, flush=True)
        pickle.dump((moments, ftop), open(ck, "wb"))
    return work, moments, ftop, data, evals, offset

def classify(graph):
    """layer -> class: first, depthwise, pointwise, classifier, conv(other)"""
    nodes = [n for n in graph.topological_order() if n.op in WEIGHTED_OPS and n.weight is not None]
    out = {}
    for i, n in enumerate(nodes):
        k = layer_kind(n)
        if i == 0: out[n.name] = "first"
        elif k == "depthwise": out[n.name] = "depthwise"
        elif k == "dense" or n is nodes[-1]: out[n.name] = "classifier"
        elif n.weight.const.shape[:2] == (1, 1): out[n.name] = "pointwise"
        else: out[n.name] = "conv"
    return out

def round_layer(node, fq, p, rounder, correct_bias=True):
    kind = layer_kind(node)
    w = as_rows(node.weight.const.astype(np.float64), kind)
    grid = _grid(node, fq, w.shape)
    h = p.second_moment(centered=correct_bias)
    q, e_near, e_ch, learned = rounder(w, h, grid)
    return q, e_near, e_ch

def build(work, moments, bits_of, granularity="per_channel", rounding="learned", rounder=None, scaler=None):
    """bits_of: class->bits. scaler(node, w_rows, h, bits, kind) -> fq or None"""
    g = work.copy()
    cls = classify(g)
    rounder = rounder or (lambda w, h, grid: R.round_rows(w, h, grid))
    info = {}
    for n in g.find(*WEIGHTED_OPS):
        if n.weight is None or n.weight.const is None: continue
        bits = bits_of[cls[n.name]]
        fq = weight_quant_attrs(n, granularity, "minmax", bits)
        p = moments[n.name]
        if scaler is not None:
            fq = scaler(n, p, bits, granularity) or fq
        n.weight_quant = fq
        if rounding == "nearest_bc" or rounding == "learned":
            kind = layer_kind(n)
            w = as_rows(n.weight.const.astype(np.float64), kind)
            grid = _grid(n, fq, w.shape)
            h = p.second_moment(centered=True)
            if rounding == "learned":
                q, e_near, e_ch, _ = rounder(w, h, grid)
            else:
                q = R.nearest(w, grid); e_near = e_ch = R.row_errors(q - w, h)
            info[n.name] = (float(e_near.sum()), float(e_ch.sum()), float(R.row_errors(w, h).sum()))
            if getattr(rounder, "alphas", None):
                a = rounder.alphas.pop().reshape(-1)
                from qfrewrite.ir import FakeQuantAttrs
                lo = np.asarray(fq.lo) * (a if len(fq.lo) > 1 else a[:1])
                fq = FakeQuantAttrs(lo=tuple(float(v) for v in lo), hi=tuple(float(-v) for v in lo), bits=fq.bits,
                                    narrow_range=fq.narrow_range, axis=fq.axis)
                n.weight_quant = fq
                info[n.name] = info[n.name] + (float(np.mean(a)),)
            set_kernel(g, n, from_rows(q, n.weight.const.shape, kind), "rounded")
            shift = (np.einsum("...rk,...k->...r", q, p.mean) - np.einsum("...rk,...k->...r", w, p.mean)).reshape(-1)
            base = n.bias.const.astype(np.float64) if n.bias is not None else 0.0
            set_bias(g, n, base - shift, "rounded")
    g.remove_unused()
    return g, info

def quantize_eval(g, data, evals, offset, granularity="per_channel"):
    ctx = Context(data=data, spec=QuantSpec(weights=granularity))
    InsertFakeQuant().run(g, ctx)
    return top1(g, evals, offset, quantize=True)

def scaled_grid(grid, alpha):
    """Grid with step scaled by alpha (symmetric: nlo = -n/2*step)."""
    step = grid.step * alpha
    nlo = -(grid.n / 2) * step
    return R.Grid(nlo, step, grid.n)

def make_search_rounder(alphas, per_row=True, inner=None):
    inner = inner or (lambda w, h, grid: R.round_rows(w, h, grid))
    def rounder(w, h, grid):
        best = None
        e_near0 = None
        for a in alphas:
            g = scaled_grid(grid, a) if a != 1.0 else grid
            q, e_near, e_ch, _ = inner(w, h, g)
            if a == 1.0:
                e_near0 = e_near
            if best is None:
                best = [q, e_ch, np.full(e_ch.shape, a)]
            else:
                if per_row and grid.step.size > 1:
                    b = e_ch < best[1]
                    best[0] = np.where(b[..., None], q, best[0]); best[1] = np.where(b, e_ch, best[1])
                    best[2] = np.where(b, a, best[2])
                elif e_ch.sum() < best[1].sum():
                    best = [q, e_ch, np.full(e_ch.shape, a)]
        rounder.alphas.append(best[2])
        return best[0], e_near0, best[1], None
    rounder.alphas = []
    return rounder

def logits(graph, images, quantize, batch=50):
    from qfrewrite.backend.executor import Executor
    ex = Executor(graph, quantize=quantize)
    outs = []
    for s in range(0, len(images), batch):
        x = images.preprocess(images.images[s:s + batch])
        outs.append(np.asarray(ex(x)[0]).reshape(len(x), -1))
    return np.concatenate(outs)

_FLOAT = {}
def quantize_eval2(g, data, evals, offset, ref_graph, granularity="per_channel"):
    """top1, agreement with float top-1, output SQNR dB vs float logits"""
    key = id(ref_graph)
    if key not in _FLOAT:
        _FLOAT[key] = logits(ref_graph, evals, False)
    f = _FLOAT[key]
    ctx = Context(data=data, spec=QuantSpec(weights=granularity))
    InsertFakeQuant().run(g, ctx)
    q = logits(g, evals, True)
    acc = 100.0 * np.mean(q.argmax(-1) - offset == evals.labels)
    agree = 100.0 * np.mean(q.argmax(-1) == f.argmax(-1))
    sq = 10 * np.log10(np.sum(f ** 2) / np.sum((q - f) ** 2))
    return acc, agree, sq

def make_hsearch_rounder(alphas, inner=None):
    """alpha per row chosen by the H-weighted error of nearest rounding, then inner rounding on that grid"""
    inner = inner or (lambda w, h, grid: R.round_rows(w, h, grid))
    def rounder(w, h, grid):
        best_e, best_a = None, None
        for a in alphas:
            g = scaled_grid(grid, a)
            e = R.row_errors(R.nearest(w, g) - w, h)
            if grid.step.size == 1:
                e = np.full(e.shape, e.sum())
            if best_e is None:
                best_e, best_a = e, np.full(e.shape, a)
            else:
                b = e < best_e
                best_e = np.where(b, e, best_e); best_a = np.where(b, a, best_a)
        g = R.Grid(-(grid.n / 2) * grid.step * best_a[..., None] if grid.step.size > 1 else -(grid.n / 2) * grid.step * best_a.reshape(-1)[:1],
                   grid.step * (best_a[..., None] if grid.step.size > 1 else best_a.reshape(-1)[:1]), grid.n)
        q, e_near, e_ch, _ = inner(w, h, g)
        e_near0 = R.row_errors(R.nearest(w, grid) - w, h)
        better = e_ch < e_near0
        q = np.where(better[..., None], q, R.nearest(w, grid))
        rounder.alphas.append(np.where(better, best_a, 1.0))
        return q, e_near0, np.where(better, e_ch, e_near0), None
    rounder.alphas = []
    return rounder
