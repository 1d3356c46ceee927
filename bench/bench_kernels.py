#!/usr/bin/env python
"""Benchmarks of c2i_fast.kernels against their baselines — one entry point, a registry of cases.

    python bench/bench_kernels.py [--quick] [--out bench/results/kernels-<device>.json] [--only REGEX]
                                  [--ops lowrank,clustered,reconstruct,rsvd] [--sweep] [--tiny]

Ops and baselines (every case times all of its implementations in the same run):
    lowrank      c2i.lowrank_matmul (op; Triton on CUDA, torch reference elsewhere), triton.launcher (no op
                 dispatch), dense.matmul (x @ Wᵀ, cuBLAS/MKL), two_linear (two nn.Linear)
    clustered    c2i.clustered_lowrank_matmul, c2i.lowrank_matmul@equal_params (unclustered, same #params),
                 torch.loop (per-cluster loop, eager), torch.loop.compiled, torch._grouped_mm, dense.matmul
    reconstruct  c2i.clustered_reconstruct (a layer stack), torch.loop, dense.bmm@equal_params
    rsvd         c2i.randomized_svd (batched), reference.batched (the torch reference), torch.linalg.svd,
                 torch.svd_lowrank.loop, cupy.linalg.svd (cuSOLVER) where cupy is installed

Shapes are real layer sizes (weight (out, in)): Llama-2-7B 11008×4096 / 4096×11008 / 4096×4096, GPT-J 16384×4096,
Gemma-7B 24576×3072, and (CPU --quick) SmolLM2-135M 1536×576 / 576×576, Gemma-3-270M 2048×640. ρ is the kept-rank
fraction: r = max(1, ⌊ρ·min(m, n)⌋), per cluster ⌊ρ·min(|c|, n)⌋ (k equal row blocks of a random permutation).

Timing: CUDA — triton.testing.do_bench quantiles (median, p20, p80), warm-up excluded; calls over 0.5 s are
timed individually (3 runs) with CUDA events. CPU — time.perf_counter per call after one warm-up call, median/
p20/p80. Ceilings are measured in the same run: copy bandwidth (clone of a large buffer, bytes read + written)
and dense matmul rate; every implementation reports GB/s and TFLOP/s achieved and the fraction of the roofline
max(bytes/BW, flops/peak). The GPU goals of the kernels are printed at the end as ratios read off this run.
Without CUDA the Triton rows are skipped (stated reason) and the c2i ops run their torch reference.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # busy-waiting OpenMP threads collapse on a shared CPU

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import REPO, load_kernels  # noqa: E402

K = load_kernels()
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NO_CUDA = "no CUDA device (Triton kernels need a GPU; the c2i.* rows time the torch reference)"

# ------------------------------------------------------------------------------------------------ shapes

GPU_SHAPES = {  # name: (m = out_features, n = in_features)
    "llama2-7b.mlp.up": (11008, 4096),
    "llama2-7b.mlp.down": (4096, 11008),
    "llama2-7b.attn.q": (4096, 4096),
    "gptj-6b.mlp.fc_in": (16384, 4096),
    "gemma-7b.mlp.up": (24576, 3072),
}
CPU_SHAPES = {"smollm2-135m.mlp.up": (1536, 576), "gemma3-270m.mlp.up": (2048, 640)}
TINY_SHAPES = {"tiny": (96, 64)}


def plan(mode: str) -> dict:
    """Which shapes/tokens/ρ/k/batches each op runs in a mode."""
    if mode == "tiny":
        return dict(shapes=TINY_SHAPES, tokens=[1, 16], rhos=[0.1], ks=[1, 2], clustered_rhos=[0.1],
                    recon_batch=2, rsvd=[("tiny", (96, 64), 2, 0.1)], min_time=0.002, compile=False)
    if mode == "quick" and not CUDA:
        return dict(shapes=CPU_SHAPES, tokens=[1, 16, 128], rhos=[0.1, 0.3], ks=[1, 8], clustered_rhos=[0.1],
                    recon_batch=2, rsvd=[("smollm2-135m.attn.q", (576, 576), 4, 0.1),
                                         ("smollm2-135m.mlp.up", (1536, 576), 2, 0.1)],
                    min_time=0.05, compile=False)
    if mode == "quick":
        return dict(shapes={k: GPU_SHAPES[k] for k in ("llama2-7b.mlp.up", "llama2-7b.attn.q")},
                    tokens=[1, 16, 4096], rhos=[0.1], ks=[1, 8], clustered_rhos=[0.1], recon_batch=4,
                    rsvd=[("llama2-7b.attn.q", (4096, 4096), 4, 0.1)], min_time=0.1, compile=True)
    shapes = GPU_SHAPES if CUDA else {**CPU_SHAPES, "llama2-7b.attn.q": (4096, 4096)}
    rsvd = ([("llama2-7b.attn.q", (4096, 4096), 8, rho) for rho in (0.01, 0.1)]
            + [("llama2-7b.mlp.up", (11008, 4096), 4, 0.1)]) if CUDA else \
        [("smollm2-135m.mlp.up", (1536, 576), 8, rho) for rho in (0.01, 0.1)]
    return dict(shapes=shapes, tokens=[1, 16, 128, 4096], rhos=[0.01, 0.1, 0.3], ks=[1, 2, 4, 8],
                clustered_rhos=[0.1], contiguous=True, recon_batch=8 if CUDA else 2, rsvd=rsvd, min_time=0.3,
                compile=True)


# ------------------------------------------------------------------------------------------------ timing

def sync():
    if CUDA:
        torch.cuda.synchronize()


def quantiles(times_ms):
    q = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else times_ms * 9
    return {"median_ms": statistics.median(times_ms), "p20_ms": q[1], "p80_ms": q[7], "n": len(times_ms)}


def time_fn(fn, min_time: float) -> dict:
    """Median/p20/p80 wall time of fn() in ms (warm-up excluded)."""
    if CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        sync()
        start.record()
        fn()
        end.record()
        sync()
        est = start.elapsed_time(end)
        if est > 500:          # slow (e.g. a full SVD of a stack): a few individually timed runs
            times = [est]
            for _ in range(2 if est < 5000 else 0):
                start.record()
                fn()
                end.record()
                sync()
                times.append(start.elapsed_time(end))
            return quantiles(times)
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, warmup=max(10, int(200 * min_time)),
                                                rep=max(30, int(1000 * min_time)), quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "n": None}
    fn()
    times, t_end = [], time.perf_counter() + min_time
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


def measure_ceilings(mode: str) -> dict:
    """The device's own copy bandwidth and dense matmul rate, measured now."""
    big = mode == "full" or (CUDA and mode == "quick")
    nbytes = (1 << 30) if CUDA and mode != "tiny" else ((64 << 20) if mode != "tiny" else (8 << 20))
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).normal_()
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), 0.1 if mode != "tiny" else 0.002)
    out = {"copy_bytes": 2 * nbytes, "copy_GBps": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9}
    del x, y
    rates = {}
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if CUDA else [torch.float32]
    for dt in dtypes:
        s = (8192 if dt != torch.float32 else 4096) if CUDA else (1024 if big else (512 if mode == "quick" else 128))
        a = torch.randn(s, s, device=DEVICE).to(dt)
        b = torch.randn(s, s, device=DEVICE).to(dt)
        t = time_fn(lambda: a @ b, 0.1 if mode != "tiny" else 0.002)
        rates[str(dt).replace("torch.", "")] = {"n": s, "TFLOPs": 2 * s ** 3 / (t["median_ms"] * 1e-3) / 1e12}
    out["matmul"] = rates
    out["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return out


# ------------------------------------------------------------------------------------------------ helpers

def model_dtype():
    return torch.bfloat16 if CUDA else torch.float32


def elt(dtype):
    return torch.empty((), dtype=dtype).element_size()


def rank_of(rho, m, n):
    return max(1, int(math.floor(rho * min(m, n))))


def metrics(t_ms, nbytes, flops, ceil, dtype):
    sec = t_ms * 1e-3
    peak = ceil["matmul"].get(str(dtype).replace("torch.", ""), next(iter(ceil["matmul"].values())))["TFLOPs"]
    roof = max(nbytes / (ceil["copy_GBps"] * 1e9), flops / (peak * 1e12))
    return {"GBps": nbytes / sec / 1e9, "TFLOPs": flops / sec / 1e12, "roofline_frac": roof / sec,
            "bytes": nbytes, "flops": flops}


def clusters(m, n, k, rho, dtype, gen_seed=0, rank=None, assign="random"):
    """k equal clusters, rank ⌊ρ·min(m/k, n)⌋ each (or ``rank``). assign='random': rows drawn by a random
    permutation (sorted within each cluster, as k-means output would be); 'contiguous': row blocks."""
    g = torch.Generator().manual_seed(gen_seed)
    sizes = [m // k + (1 if c < m % k else 0) for c in range(k)]
    rc = rank if rank is not None else rank_of(rho, m // k, n)
    ranks = [min(rc, h, n) for h in sizes]
    if assign == "contiguous":
        row_index = torch.arange(m)
    else:
        perm = torch.randperm(m, generator=g)
        bounds = [0] + torch.tensor(sizes).cumsum(0).tolist()
        row_index = torch.cat([perm[a:b].sort().values for a, b in zip(bounds, bounds[1:])])
    row_offsets = torch.tensor([0] + sizes).cumsum(0)
    rank_offsets = torch.tensor([0] + ranks).cumsum(0)
    v_cat = torch.randn(n, int(rank_offsets[-1]), generator=g) / math.sqrt(n)
    u_packed = torch.zeros(m, max(ranks))
    for c, (h, r) in enumerate(zip(sizes, ranks)):
        u_packed[row_offsets[c]:row_offsets[c] + h, :r] = torch.randn(h, r, generator=g) / math.sqrt(r)
    to = lambda t, dt=None: t.to(device=DEVICE, dtype=dt) if dt else t.to(DEVICE)  # noqa: E731
    return dict(v_cat=to(v_cat, dtype), u_packed=to(u_packed, dtype), row_index=to(row_index),
                row_offsets=to(row_offsets), rank_offsets=to(rank_offsets), sizes=sizes, ranks=ranks,
                params=n * int(rank_offsets[-1]) + sum(h * r for h, r in zip(sizes, ranks)))


def triton_or_reason():
    if not K.HAS_TRITON:
        return "triton not installed"
    return None if CUDA else NO_CUDA


# ------------------------------------------------------------------------------------------------ cases

def cases_lowrank(p):
    dt = model_dtype()
    for shape_name, (m, n) in p["shapes"].items():
        for rho in p["rhos"]:
            r = rank_of(rho, m, n)
            for M in p["tokens"]:
                yield dict(op="lowrank", case=f"lowrank/{shape_name}/rho={rho}/M={M}",
                           params=dict(shape=shape_name, m=m, n=n, rho=rho, rank=r, M=M, dtype=str(dt),
                                       param_ratio=r * (m + n) / (m * n)),
                           build=lambda m=m, n=n, r=r, M=M: build_lowrank(m, n, r, M, dt))


def build_lowrank(m, n, r, M, dt):
    x = torch.randn(M, n, device=DEVICE).to(dt)
    u = (torch.randn(m, r, device=DEVICE) / math.sqrt(r)).to(dt)
    v = (torch.randn(n, r, device=DEVICE) / math.sqrt(n)).to(dt)
    b = torch.randn(m, device=DEVICE).to(dt)
    w = (u.float() @ v.float().T).to(dt)
    lin1 = torch.nn.Linear(n, r, bias=False, device=DEVICE, dtype=dt)
    lin2 = torch.nn.Linear(r, m, bias=True, device=DEVICE, dtype=dt)
    with torch.no_grad():
        lin1.weight.copy_(v.T)
        lin2.weight.copy_(u)
        lin2.bias.copy_(b)
    e = elt(dt)
    lr_bytes = e * (M * n + r * (n + m) + M * m + m)
    dense_bytes = e * (M * n + m * n + M * m + m)
    impls = {}
    impls["c2i.lowrank_matmul"] = (lambda: K.lowrank_matmul(x, u, v, None, b), lr_bytes, 2 * M * r * (n + m))
    reason = triton_or_reason()
    if reason is None:
        from importlib import import_module
        launcher = import_module(K.__name__ + ".lowrank").lowrank_matmul_triton
        impls["triton.launcher"] = (lambda: launcher(x, u, v, None, b), lr_bytes, 2 * M * r * (n + m))
    else:
        impls["triton.launcher"] = reason
    impls["dense.matmul"] = (lambda: F.linear(x, w, b), dense_bytes, 2 * M * m * n)
    impls["two_linear"] = (lambda: lin2(lin1(x)), lr_bytes, 2 * M * r * (n + m))
    if SWEEP[0] and reason is None:
        for label, kw in sweep_configs(M):
            impls[f"triton.sweep[{label}]"] = (lambda kw=kw: launcher(x, u, v, None, b, **kw), lr_bytes,
                                              2 * M * r * (n + m))
    check = lambda: rel(K.lowrank_matmul(x, u, v, None, b), F.linear(x.float(), w.float(), b.float()))  # noqa: E731
    return impls, {"check_relerr": check}


SWEEP = [False]


def sweep_configs(M):
    """Launch configurations tried by --sweep (CUDA): stage-2 tiles/stages and stage-1 split for decode,
    tile shapes for prefill. The best one per case is reported; it is data for tuning
    kernels/lowrank.py:xv_config/tu_config, not used automatically."""
    out = []
    if M <= 64:
        for bn in (32, 64, 128):
            for br in (64, 128):
                for st in (3, 5):
                    out.append((f"tu:BN{bn},BR{br},S{st}", dict(tu_cfg=dict(BLOCK_N=bn, BLOCK_R=br, num_stages=st))))
        for sk in (8, 16, 64):
            out.append((f"xv:SPLIT{sk}", dict(split_k=sk)))
        out.append(("tu:lowp", dict(t_mode="lowp")))
    else:
        for bm, bn, br, wp in ((128, 128, 64, 8), (128, 256, 64, 8), (64, 128, 64, 4), (128, 128, 32, 4)):
            out.append((f"tu:{bm}x{bn}x{br},W{wp}",
                        dict(tu_cfg=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, num_warps=wp))))
        for bm, br, bk, wp in ((128, 128, 64, 8), (64, 64, 64, 4), (128, 64, 128, 8)):
            out.append((f"xv:{bm}x{br}x{bk},W{wp}",
                        dict(xv_cfg=dict(BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, num_warps=wp))))
    return out


def cases_clustered(p):
    dt = model_dtype()
    for shape_name, (m, n) in p["shapes"].items():
        for rho in p["clustered_rhos"]:
            for k in p["ks"]:
                for assign in ["random"] + (["contiguous"] if k > 1 and p.get("contiguous") else []):
                    for M in p["tokens"]:
                        yield dict(op="clustered", case=f"clustered/{shape_name}/rho={rho}/k={k}/{assign}/M={M}",
                                   params=dict(shape=shape_name, m=m, n=n, rho=rho, k=k, assign=assign, M=M,
                                               dtype=str(dt)),
                                   build=lambda m=m, n=n, k=k, rho=rho, M=M, assign=assign: build_clustered(
                                       m, n, k, rho, M, dt, p["compile"], assign))


def build_clustered(m, n, k, rho, M, dt, do_compile, assign="random"):
    cl = clusters(m, n, k, rho, dt, assign=assign)
    x = torch.randn(M, n, device=DEVICE).to(dt)
    R, rc = int(cl["rank_offsets"][-1]), max(cl["ranks"])
    r_eq = max(1, round(cl["params"] / (m + n)))
    u_eq = (torch.randn(m, r_eq, device=DEVICE) / math.sqrt(r_eq)).to(dt)
    v_eq = (torch.randn(n, r_eq, device=DEVICE) / math.sqrt(n)).to(dt)
    w = K.clustered_reconstruct(cl["v_cat"], cl["u_packed"], cl["row_index"], cl["row_offsets"], cl["rank_offsets"])
    args = (cl["v_cat"], cl["u_packed"], cl["row_index"], cl["row_offsets"], cl["rank_offsets"])
    e = elt(dt)
    c_bytes = e * (M * n + cl["params"] + M * m)
    c_flops = 2 * M * (n * R + sum(h * r for h, r in zip(cl["sizes"], cl["ranks"])))
    ro, ko = cl["row_offsets"].tolist(), cl["rank_offsets"].tolist()
    idx = [cl["row_index"][ro[c]:ro[c + 1]] for c in range(k)]
    u_c = [cl["u_packed"][ro[c]:ro[c + 1], : ko[c + 1] - ko[c]] for c in range(k)]

    def loop(x):
        t = x @ cl["v_cat"]
        y = x.new_empty(x.shape[0], m)
        for c in range(k):
            y[:, idx[c]] = t[:, ko[c]:ko[c + 1]] @ u_c[c].T
        return y

    impls = {"c2i.clustered_lowrank_matmul": (lambda: K.clustered_lowrank_matmul(x, *args), c_bytes, c_flops),
             "c2i.lowrank_matmul@equal_params": (lambda: K.lowrank_matmul(x, u_eq, v_eq), c_bytes,
                                                 2 * M * r_eq * (n + m)),
             "torch.loop": (lambda: loop(x), c_bytes, c_flops)}
    if do_compile:
        cloop = torch.compile(loop, dynamic=False)
        impls["torch.loop.compiled"] = (lambda: cloop(x), c_bytes, c_flops)
    else:
        impls["torch.loop.compiled"] = "torch.compile baseline skipped in this mode (compile time on CPU)"
    impls["torch._grouped_mm"] = grouped_mm_impl(x, cl, k, m, rc, c_bytes, c_flops)
    impls["dense.matmul"] = (lambda: x @ w.T, e * (M * n + m * n + M * m), 2 * M * m * n)
    check = lambda: rel(K.clustered_lowrank_matmul(x, *args), x.float() @ w.float().T)  # noqa: E731
    return impls, {"check_relerr": check, "rank_per_cluster": rc, "R": R, "rank_equal_params": r_eq,
                   "params": cl["params"], "param_ratio": cl["params"] / (m * n)}


def grouped_mm_impl(x, cl, k, m, rc, nbytes, flops):
    """torch._grouped_mm (3-D × 2-D, groups along the output rows) with every cluster's rank padded to a
    multiple of 8 (alignment); the permuted output is gathered back to the original row order."""
    if not hasattr(torch, "_grouped_mm"):
        return "torch._grouped_mm not in this torch"
    if len(set(cl["ranks"])) != 1:
        return "unequal cluster ranks"
    rp = -(-rc // 8) * 8
    n = x.shape[1]
    v_pad = x.new_zeros(n, k, rp)
    v_pad[:, :, :rc] = cl["v_cat"].view(n, k, rc)
    v_pad = v_pad.view(n, k * rp)
    u_pad_t = x.new_zeros(rp, m)
    u_pad_t[:rc] = cl["u_packed"][:, :rc].T
    offs = cl["row_offsets"][1:].to(torch.int32)
    inv = torch.argsort(cl["row_index"])

    def run():
        t = (x @ v_pad).view(x.shape[0], k, rp).transpose(0, 1)
        return torch._grouped_mm(t, u_pad_t, offs=offs).index_select(1, inv)
    try:
        run()
        sync()
    except Exception as exc:  # noqa: BLE001 - dtype/arch/alignment support varies by build
        return f"torch._grouped_mm failed here: {type(exc).__name__}: {str(exc)[:160]}"
    return (run, nbytes, flops)


def cases_reconstruct(p):
    dt = model_dtype()
    for shape_name, (m, n) in p["shapes"].items():
        for k in [c for c in p["ks"] if c > 1] or [1]:
            for rho in p["clustered_rhos"]:
                yield dict(op="reconstruct", case=f"reconstruct/{shape_name}/rho={rho}/k={k}/B={p['recon_batch']}",
                           params=dict(shape=shape_name, m=m, n=n, rho=rho, k=k, B=p["recon_batch"], dtype=str(dt)),
                           build=lambda m=m, n=n, k=k, rho=rho: build_reconstruct(m, n, k, rho, p["recon_batch"], dt))


def build_reconstruct(m, n, k, rho, B, dt):
    cls = [clusters(m, n, k, rho, dt, gen_seed=b) for b in range(B)]
    v_cat = torch.stack([c["v_cat"] for c in cls])
    u_packed = torch.stack([c["u_packed"] for c in cls])
    row_index = torch.stack([c["row_index"] for c in cls])
    ro, ko = cls[0]["row_offsets"], cls[0]["rank_offsets"]
    r_eq = max(1, round(cls[0]["params"] / (m + n)))
    u_eq = torch.randn(B, m, r_eq, device=DEVICE).to(dt)
    v_eq = torch.randn(B, n, r_eq, device=DEVICE).to(dt)
    e = elt(dt)
    nbytes = e * B * (m * n + cls[0]["params"])
    flops = 2 * B * n * sum(h * r for h, r in zip(cls[0]["sizes"], cls[0]["ranks"]))
    rol, kol = ro.tolist(), ko.tolist()

    def loop():
        w = v_cat.new_empty(B, m, n)
        for b in range(B):
            for c in range(k):
                w[b, row_index[b, rol[c]:rol[c + 1]]] = (u_packed[b, rol[c]:rol[c + 1], : kol[c + 1] - kol[c]]
                                                         @ v_cat[b, :, kol[c]:kol[c + 1]].T)
        return w

    impls = {"c2i.clustered_reconstruct": (lambda: K.clustered_reconstruct(v_cat, u_packed, row_index, ro, ko),
                                           nbytes, flops),
             "torch.loop": (loop, nbytes, flops),
             "dense.bmm@equal_params": (lambda: torch.bmm(u_eq, v_eq.transpose(1, 2)), nbytes,
                                        2 * B * m * n * r_eq)}
    check = lambda: rel(K.clustered_reconstruct(v_cat, u_packed, row_index, ro, ko), loop())  # noqa: E731
    return impls, {"check_relerr": check, "params_per_matrix": cls[0]["params"]}


def cases_rsvd(p):
    for shape_name, (m, n), B, rho in p["rsvd"]:
        r = rank_of(rho, m, n)
        yield dict(op="rsvd", case=f"rsvd/{shape_name}/B={B}/rho={rho}",
                   params=dict(shape=shape_name, m=m, n=n, B=B, rho=rho, rank=r, oversample=8, niter=2,
                               spectrum="σ_i = (i+1)^-0.5, random orthonormal U, V (synthetic)"),
                   build=lambda m=m, n=n, B=B, r=r: build_rsvd(m, n, B, r))


def build_rsvd(m, n, B, r, oversample=8, niter=2):
    p = min(m, n)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    sigma = (torch.arange(p, device=DEVICE, dtype=torch.float32) + 1) ** -0.5
    uu = torch.linalg.qr(torch.randn(B, m, p, device=DEVICE, generator=g))[0]
    vv = torch.linalg.qr(torch.randn(B, n, p, device=DEVICE, generator=g))[0]
    a = (uu * sigma) @ vv.transpose(1, 2)
    del uu, vv
    opt = sigma[r:].double().norm().item()
    ell = min(r + oversample, m, n)
    svd_flops = B * 4 * m * n * ell * (2 * niter + 2)     # the GEMMs with a: (2·niter + 2) products, 2mnℓ each
    nbytes = 4 * B * m * n * (2 * niter + 2)

    def looped_lowrank():
        return [torch.svd_lowrank(a[b], q=ell, niter=niter) for b in range(B)]

    impls = {"c2i.randomized_svd": (lambda: K.randomized_svd(a, r, oversample, niter), nbytes, svd_flops),
             "reference.batched": (lambda: K.naive.randomized_svd(a, r, oversample, niter), nbytes, svd_flops),
             "torch.linalg.svd": (lambda: torch.linalg.svd(a, full_matrices=False), 4 * B * m * n, 0),
             "torch.svd_lowrank.loop": (looped_lowrank, nbytes, svd_flops)}
    try:
        import cupy
        ca = cupy.from_dlpack(a.detach()) if CUDA else None
        impls["cupy.linalg.svd"] = ((lambda: [cupy.linalg.svd(ca[b], full_matrices=False) for b in range(B)],
                                     4 * B * m * n, 0) if CUDA else "cupy needs CUDA")
    except ImportError:
        impls["cupy.linalg.svd"] = "cupy not installed"

    def err_ratio(u, s, v):
        approx = (u[..., :r] * s[..., None, :r]) @ v[..., :r].transpose(-1, -2)
        return ((a - approx).flatten(1).double().norm(dim=1) / opt).max().item()

    def quality():
        q = {"c2i.randomized_svd": err_ratio(*K.randomized_svd(a, r, oversample, niter)),
             "reference.batched": err_ratio(*K.naive.randomized_svd(a, r, oversample, niter))}
        if B * m * n <= 64 * 2 ** 20:      # exact SVD: the optimum by construction, checked where cheap
            U, S, Vh = torch.linalg.svd(a, full_matrices=False)
            q["torch.linalg.svd"] = err_ratio(U, S, Vh.transpose(-1, -2))
        lows = looped_lowrank()
        q["torch.svd_lowrank.loop"] = err_ratio(torch.stack([t[0] for t in lows]), torch.stack([t[1] for t in lows]),
                                                torch.stack([t[2] for t in lows]))
        return q

    return impls, {"err_over_optimum": quality, "optimum_err": opt}


REGISTRY = {"lowrank": cases_lowrank, "clustered": cases_clustered, "reconstruct": cases_reconstruct,
            "rsvd": cases_rsvd}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------ run

def run_case(case, ceil, min_time):
    impls, extra = case["build"]()
    out = {"op": case["op"], "case": case["case"], "params": case["params"], "impls": {}, "info": {}}
    dtype = model_dtype() if case["op"] != "rsvd" else torch.float32
    for name, spec in impls.items():
        if isinstance(spec, str):
            out["impls"][name] = {"skipped": spec}
            continue
        fn, nbytes, flops = spec
        try:
            t = time_fn(fn, min_time)
        except Exception as exc:  # noqa: BLE001 - a baseline failing must not hide the others
            out["impls"][name] = {"skipped": f"failed: {type(exc).__name__}: {str(exc)[:200]}"}
            continue
        out["impls"][name] = {**t, **metrics(t["median_ms"], nbytes, flops, ceil, dtype)}
        if name.startswith("c2i."):
            out["impls"][name]["path"] = "triton" if CUDA and K.HAS_TRITON and K.backend() != "torch" else "torch"
    for key, val in extra.items():
        out["info"][key] = val() if callable(val) else val
    out["ratios"] = ratios(out)
    return out


def t_of(res, name):
    r = res["impls"].get(name, {})
    return r.get("median_ms")


def ratios(res):
    """The ratios the GPU goals are stated in (None where a side is missing)."""
    op, r = res["op"], {}
    div = lambda a, b: (a / b) if (a is not None and b) else None  # noqa: E731
    if op == "lowrank":
        c = t_of(res, "c2i.lowrank_matmul")
        sweep = {k: v["median_ms"] for k, v in res["impls"].items()
                 if k.startswith("triton.sweep") and "median_ms" in v}
        if sweep:
            best = min(sweep, key=sweep.get)
            r["sweep_best"] = best
            r["sweep_best_speedup_vs_default"] = div(t_of(res, "triton.launcher"), sweep[best])
        r["speedup_vs_dense"] = div(t_of(res, "dense.matmul"), c)
        r["speedup_vs_two_linear"] = div(t_of(res, "two_linear"), c)
        r["speedup_launcher_vs_dense"] = div(t_of(res, "dense.matmul"), t_of(res, "triton.launcher"))
        imp = res["impls"].get("c2i.lowrank_matmul", {})
        r["hbm_roofline_frac"] = imp.get("roofline_frac")
        if imp.get("flops") and PEAK[0]:   # time / (2·M·r·(n+m) / measured dense-matmul peak)
            r["over_two_gemm_flop_floor"] = imp["median_ms"] * 1e-3 / (imp["flops"] / PEAK[0])
    elif op == "clustered":
        c = t_of(res, "c2i.clustered_lowrank_matmul")
        r["over_unclustered_equal_params"] = div(c, t_of(res, "c2i.lowrank_matmul@equal_params"))
        r["speedup_vs_torch_loop"] = div(t_of(res, "torch.loop"), c)
        r["speedup_vs_torch_loop_compiled"] = div(t_of(res, "torch.loop.compiled"), c)
        r["speedup_vs_grouped_mm"] = div(t_of(res, "torch._grouped_mm"), c)
        r["speedup_vs_dense"] = div(t_of(res, "dense.matmul"), c)
    elif op == "reconstruct":
        c = t_of(res, "c2i.clustered_reconstruct")
        r["speedup_vs_torch_loop"] = div(t_of(res, "torch.loop"), c)
        r["over_dense_bmm_equal_params"] = div(c, t_of(res, "dense.bmm@equal_params"))
    elif op == "rsvd":
        c = t_of(res, "c2i.randomized_svd")
        r["speedup_vs_linalg_svd"] = div(t_of(res, "torch.linalg.svd"), c)
        r["speedup_vs_svd_lowrank_loop"] = div(t_of(res, "torch.svd_lowrank.loop"), c)
        r["speedup_vs_cupy_svd"] = div(t_of(res, "cupy.linalg.svd"), c)
        r["err_over_optimum"] = res["info"].get("err_over_optimum", {}).get("c2i.randomized_svd")
    return r


PEAK = [None]   # dense-matmul FLOP/s of the model dtype, set in main


def goals(results):
    """The H100 goals, read off this run's Triton rows (not measured where the rows ran the reference)."""
    gpu = CUDA and K.HAS_TRITON and K.backend() != "torch"
    rows = []

    def add(goal, target, values, ok):
        vals = [v for v in values if v is not None]
        status = ("not measured (" + ("no CUDA" if not CUDA else "Triton path not active") + ")") if not gpu else \
            ("no cases in this mode" if not vals else ("met" if all(ok(v) for v in vals) else "NOT met"))
        rows.append({"goal": goal, "target": target, "values": vals, "status": status})

    sel = lambda op, pred: [r for r in results if r["op"] == op and pred(r["params"])]  # noqa: E731
    dec = sel("lowrank", lambda p: p["rho"] == 0.1 and p["M"] <= 16)
    add("lowrank rho=0.1 M<=16: fraction of HBM roofline", ">= 0.80",
        [r["ratios"].get("hbm_roofline_frac") for r in dec], lambda v: v >= 0.8)
    add("lowrank rho=0.1 M<=16: speedup vs dense", ">= 4", [r["ratios"].get("speedup_vs_dense") for r in dec],
        lambda v: v >= 4)
    add("lowrank M=4096: time over two-GEMM FLOP floor", "<= 1.15",
        [r["ratios"].get("over_two_gemm_flop_floor") for r in sel("lowrank", lambda p: p["M"] == 4096)],
        lambda v: v <= 1.15)
    add("clustered k=8: time over unclustered at equal params", "<= 1.25",
        [r["ratios"].get("over_unclustered_equal_params") for r in sel("clustered", lambda p: p["k"] == 8)],
        lambda v: v <= 1.25)
    rs = sel("rsvd", lambda p: True)
    add("batched rSVD: speedup vs torch.linalg.svd", ">= 5", [r["ratios"].get("speedup_vs_linalg_svd") for r in rs],
        lambda v: v >= 5)
    add("batched rSVD: speedup vs looped torch.svd_lowrank", ">= 1.5",
        [r["ratios"].get("speedup_vs_svd_lowrank_loop") for r in rs], lambda v: v >= 1.5)
    add("batched rSVD: reconstruction error over optimum", "<= 1.05",
        [r["ratios"].get("err_over_optimum") for r in rs], lambda v: v <= 1.05)
    return rows


def device_info():
    if CUDA:
        prop = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": prop.name, "sm_count": prop.multi_processor_count,
                "memory_GiB": round(prop.total_memory / 2 ** 30, 1),
                "capability": list(torch.cuda.get_device_capability())}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count()}


def versions():
    v = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    try:
        import cupy
        v["cupy"] = cupy.__version__
    except ImportError:
        v["cupy"] = None
    return v


def fmt(v):
    return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--quick", action="store_true", help="small subset (CPU: small shapes, < 2 min)")
    ap.add_argument("--tiny", action="store_true", help="a few tiny shapes, seconds (the test of this script)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels-<device>[-quick].json)")
    ap.add_argument("--only", default=None, help="regex on case names, e.g. 'lowrank/.*M=1$'")
    ap.add_argument("--ops", default=",".join(REGISTRY), help="comma list of ops: " + ",".join(REGISTRY))
    ap.add_argument("--sweep", action="store_true", help="CUDA: also time alternative launch configs (lowrank)")
    args = ap.parse_args(argv)
    SWEEP[0] = bool(args.sweep)
    if args.sweep and not CUDA:
        print("# --sweep ignored: " + NO_CUDA)
    mode = "tiny" if args.tiny else ("quick" if args.quick else "full")
    p = plan(mode)
    torch.manual_seed(0)
    dev = device_info()
    slug = re.sub(r"[^a-z0-9]+", "-", dev["name"].lower()).strip("-") if CUDA else "cpu"
    out_path = Path(args.out) if args.out else REPO / "bench" / "results" / \
        f"kernels-{slug}{'' if mode == 'full' else '-' + mode}.json"
    t_start = time.perf_counter()
    print(f"# c2i_fast kernel bench: mode={mode} device={dev['name']} ({DEVICE}) kernels backend={K.backend()}")
    ceil = measure_ceilings(mode)
    PEAK[0] = ceil["matmul"][str(model_dtype()).replace("torch.", "")]["TFLOPs"] * 1e12
    print(f"# ceilings: copy {ceil['copy_GBps']:.1f} GB/s; matmul "
          + ", ".join(f"{k} {v['TFLOPs']:.2f} TFLOP/s (n={v['n']})" for k, v in ceil["matmul"].items()))
    results, skipped_ops = [], {}
    only = re.compile(args.only) if args.only else None

    def write(complete: bool) -> dict:
        """The JSON so far, replaced atomically after every case: a run cut short (the GPU machine's time
        limit) still leaves every finished case on disk, marked "complete": false."""
        skipped = sorted({f"{name}: {v['skipped']}" for r in results for name, v in r["impls"].items()
                          if "skipped" in v})
        doc = {"schema": "c2i_fast.bench_kernels/1",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "mode": mode, "complete": complete,
               "device": dev, "versions": versions(), "backend": K.backend(),
               "env": {k: os.environ.get(k) for k in ("C2I_KERNELS", "TRITON_INTERPRET", "OMP_WAIT_POLICY")},
               "timing": ("triton.testing.do_bench quantiles (median, p20, p80); >0.5 s calls: 3 event-timed runs, "
                          ">5 s: 1" if CUDA else "time.perf_counter per call after 1 warm-up call; median, p20, p80"),
               "ceilings": ceil, "cases": results, "goals": goals(results), "skipped": skipped,
               "wall_s": time.perf_counter() - t_start}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, out_path)
        return doc
    for op in [o.strip() for o in args.ops.split(",") if o.strip()]:
        for case in REGISTRY[op](p):
            if only and not only.search(case["case"]):
                continue
            res = run_case(case, ceil, p["min_time"])
            results.append(res)
            line = "  ".join(f"{k}={fmt(v.get('median_ms'))}ms" if "median_ms" in v else f"{k}=skip"
                             for k, v in res["impls"].items())
            print(f"{res['case']:<58} {line}")
            rr = "  ".join(f"{k}={fmt(v)}" for k, v in res["ratios"].items() if v is not None)
            if rr:
                print(f"{'':<58} {rr}")
            if CUDA:
                torch.cuda.empty_cache()
            write(complete=False)
    doc = write(complete=True)
    skipped, g = doc["skipped"], doc["goals"]
    print("\n# goals (H100 targets; ratios from this run)")
    for row in g:
        print(f"  {row['goal']:<58} target {row['target']:<8} {row['status']:<10} "
              f"{', '.join(fmt(v) for v in row['values'])}")
    if skipped:
        print("# skipped:\n  " + "\n  ".join(skipped))
    print(f"# wrote {out_path} ({doc['wall_s']:.1f} s)")
    return doc


if __name__ == "__main__":
    main()
