"""Fused low-rank matmul  y = ((x V) S) Uᵀ + bias   (Triton kernels → launcher → c2i::lowrank_matmul).

Tensors (M = tokens = prod(x.shape[:-1]), n = in_features, m = out_features, r = rank)
-------------------------------------------------------------------------------------
    x    : (..., n)  fp16 | bf16 | fp32     flattened to (M, n); any strides
    v    : (n, r)    right factor           cast to x.dtype by the launcher if it differs
    u    : (m, r)    left factor            (S may already be folded in: then s is None)
    s    : (r,)      optional, loaded as fp32
    bias : (m,)      optional, loaded as fp32
    t    : (M, r)    fp32 intermediate x @ v (stage 1 → stage 2); never leaves the op
    y    : (..., m)  x.dtype

Two kernels, fp32 accumulation in both:
    stage 1  ``_lowrank_fwd_xv_kernel``  t = x @ v. Grid (M/BM, r/BR, SPLIT_K). For few tokens (decode) the K = n
             loop is split over SPLIT_K programs that ``atomic_add`` into a zeroed t, so enough programs
             stream V to fill the GPU; for many tokens (prefill) SPLIT_K = 1 and t is stored directly.
    stage 2  ``_lowrank_fwd_tu_kernel``  y = (t * s) @ uᵀ + bias. Grid over (M/BM)·(m/BN) tiles, grouped
             along M (GROUP_M) for L2 reuse of u. T_MODE (how t meets u in the dot; named constants T_LOWP,
             T_SPLIT, T_FP32 below): decode ('split') writes t·s = t_hi + t_lo as two
             16-bit numbers and runs two tensor-core dots (t kept to ~fp32 accuracy; the kernel is bound by
             reading u anyway); prefill ('lowp') rounds t·s to u's dtype for one 16-bit dot, as two
             chained nn.Linear would; fp32 inputs ('fp32') use fp32 dots.
fp32 dots use 'tf32x3' (three TF32 tensor-core products, ~fp32 accuracy) unless torch allows TF32.

Backward (``register_autograd``): torch ops, fp32, with gx = lowrank_matmul(gy, v, u, s) reusing the op.
"""
from __future__ import annotations

import torch

from . import naive
from .utils import alloc, device_sms, dot_precision, launchable, next_pow2, tl, triton, use_triton

# --------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------

# The stage-2 kernels' T_MODE: how the fp32 intermediate t meets the 16-bit (or fp32) u in tl.dot. The launchers
# name them ('lowp' | 'split' | 'fp32', see T_MODES); the kernels compare against these constexprs.
T_MODES = {"lowp": 0, "split": 1, "fp32": 2}
T_LOWP = tl.constexpr(T_MODES["lowp"])     # t rounded to u's dtype: one 16-bit dot (prefill; as two nn.Linear)
T_SPLIT = tl.constexpr(T_MODES["split"])   # t = t_hi + t_lo, both 16-bit: two dots, t kept to ~fp32 (decode)
T_FP32 = tl.constexpr(T_MODES["fp32"])     # fp32 operands: one dot at INPUT_PRECISION ('tf32x3' | 'tf32')


@triton.jit
def _lowrank_fwd_xv_kernel(x_ptr, v_ptr, t_ptr, M, K, R,
                           stride_xm, stride_xk, stride_vk, stride_vr, stride_tm, stride_tr,
                           K_PER_SPLIT,
                           BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                           SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """t[M, R] (fp32) (+)= x[M, K] @ v[K, R] over this program's K range."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                     mask=(offs_m[:, None] < M) & (kk[None, :] < k_hi), other=0.0)
        vb = tl.load(v_ptr + kk[:, None] * stride_vk + offs_r[None, :] * stride_vr,
                     mask=(kk[:, None] < k_hi) & (offs_r[None, :] < R), other=0.0)
        acc = tl.dot(xa, vb, acc, input_precision=INPUT_PRECISION)
    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
    t_mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    if SPLIT_K == 1:
        tl.store(t_ptrs, acc, mask=t_mask)
    else:
        tl.atomic_add(t_ptrs, acc, mask=t_mask)


@triton.jit
def _lowrank_fwd_tu_kernel(t_ptr, s_ptr, u_ptr, b_ptr, y_ptr, M, N, R,
                           stride_tm, stride_tr, stride_un, stride_ur, stride_ym, stride_yn,
                           HAS_S: tl.constexpr, HAS_BIAS: tl.constexpr, T_MODE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                           GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """y[M, N] = (t[M, R] * s[R]) @ u[N, R]ᵀ + bias[N], cast to y's dtype. T_MODE: T_LOWP | T_SPLIT | T_FP32."""
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        ta = tl.load(t_ptr + offs_m[:, None] * stride_tm + rr[None, :] * stride_tr,
                     mask=(offs_m[:, None] < M) & (rr[None, :] < R), other=0.0)
        if HAS_S:
            ta = ta * tl.load(s_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :]
        ub = tl.load(u_ptr + rr[:, None] * stride_ur + offs_n[None, :] * stride_un,
                     mask=(rr[:, None] < R) & (offs_n[None, :] < N), other=0.0)
        if T_MODE == T_FP32:
            acc = tl.dot(ta, ub.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        elif T_MODE == T_SPLIT:
            t_hi = ta.to(ub.dtype)
            acc = tl.dot(t_hi, ub, acc)
            acc = tl.dot((ta - t_hi.to(tl.float32)).to(ub.dtype), ub, acc)
        else:                # T_LOWP
            acc = tl.dot(ta.to(ub.dtype), ub, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------

DECODE_MAX_M = 64   # at or below this many tokens: split-K stage 1, t kept to fp32 accuracy in stage 2


def _block(n: int, cap: int) -> int:
    """Power of two ≥ 16 (tl.dot's minimum) covering n, at most cap."""
    return max(16, min(cap, next_pow2(n)))


def xv_config(M: int, K: int, R: int, dtype: torch.dtype, sms: int) -> dict:
    """Stage-1 launch configuration (untuned heuristics: see bench/bench_kernels.py --sweep on a GPU)."""
    wide = dtype == torch.float32
    if M <= DECODE_MAX_M:
        cfg = dict(BLOCK_M=_block(M, 64), BLOCK_R=_block(R, 64), BLOCK_K=64 if wide else 128,
                   num_warps=4, num_stages=3 if wide else 4)
    elif wide:
        cfg = dict(BLOCK_M=64, BLOCK_R=_block(R, 64), BLOCK_K=32, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_R=_block(R, 64), BLOCK_K=64, num_warps=8, num_stages=3)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(R, cfg["BLOCK_R"])
    k_blocks = max(1, triton.cdiv(K, cfg["BLOCK_K"]))
    cfg["SPLIT_K"] = 1 if tiles >= sms else min(k_blocks, triton.cdiv(2 * sms, tiles))
    return cfg


def tu_config(M: int, N: int, R: int, dtype: torch.dtype) -> dict:
    """Stage-2 launch configuration (untuned heuristics)."""
    if dtype == torch.float32:
        return dict(BLOCK_M=_block(M, 64), BLOCK_N=64, BLOCK_R=_block(R, 32), num_warps=4, num_stages=3,
                    T_MODE="fp32")
    if M <= DECODE_MAX_M:
        # BLOCK_R ≤ 64: at 128 the split mode's two dots spill registers with triton 3.6 (ptxas: 255 registers
        # + 524 bytes of spills on sm_90; none with 3.9) — the GPU machine's triton. See compile_check.
        return dict(BLOCK_M=_block(M, 64), BLOCK_N=64, BLOCK_R=_block(R, 64), num_warps=4, num_stages=4,
                    T_MODE="split")
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=_block(R, 64), num_warps=8, num_stages=3, T_MODE="lowp")


def xv(x2: torch.Tensor, v: torch.Tensor, **cfg) -> torch.Tensor:
    """Stage 1: t = x2 @ v in fp32. x2: (M, K), v: (K, R) of the same dtype -> (M, R) fp32.

    ``cfg`` overrides entries of ``xv_config`` (SPLIT_K=1: tiled path, > 1: split-K with atomics).
    """
    M, K = x2.shape
    R = v.shape[1]
    if M == 0 or R == 0:
        return torch.zeros(M, R, dtype=torch.float32, device=x2.device)
    c = {**xv_config(M, K, R, x2.dtype, device_sms(x2)), **{k: v_ for k, v_ in cfg.items() if v_ is not None}}
    k_blocks = max(1, triton.cdiv(K, c["BLOCK_K"]))
    split_k = max(1, min(int(c["SPLIT_K"]), k_blocks))
    k_per_split = triton.cdiv(k_blocks, split_k) * c["BLOCK_K"]
    split_k = max(1, triton.cdiv(K, k_per_split))
    t = (torch.zeros if split_k > 1 else alloc)((M, R), dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(R, c["BLOCK_R"]), split_k)
    launchable(_lowrank_fwd_xv_kernel)[grid](
        x2, v, t, M, K, R,
        x2.stride(0), x2.stride(1), v.stride(0), v.stride(1), t.stride(0), t.stride(1),
        k_per_split,
        BLOCK_M=c["BLOCK_M"], BLOCK_R=c["BLOCK_R"], BLOCK_K=c["BLOCK_K"], SPLIT_K=split_k,
        INPUT_PRECISION=dot_precision(x2.dtype), num_warps=c["num_warps"], num_stages=c["num_stages"])
    return t


def tu(t: torch.Tensor, u: torch.Tensor, s: torch.Tensor | None, bias: torch.Tensor | None,
       out_dtype: torch.dtype, **cfg) -> torch.Tensor:
    """Stage 2: y = (t * s) @ u.T + bias. t: (M, R) fp32, u: (N, R) -> (M, N) out_dtype.
    ``cfg`` overrides entries of ``tu_config`` (T_MODE: 'lowp' | 'split' | 'fp32')."""
    M, R = t.shape
    N = u.shape[0]
    y = alloc((M, N), out_dtype, t.device)
    if M == 0 or N == 0:
        return y
    c = {**tu_config(M, N, R, u.dtype), **{k: v_ for k, v_ in cfg.items() if v_ is not None}}
    mode = T_MODES[c["T_MODE"]]
    grid = (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)
    launchable(_lowrank_fwd_tu_kernel)[grid](
        t, s if s is not None else t, u, bias if bias is not None else t, y, M, N, R,
        t.stride(0), t.stride(1), u.stride(0), u.stride(1), y.stride(0), y.stride(1),
        HAS_S=s is not None, HAS_BIAS=bias is not None, T_MODE=mode,
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_R=c["BLOCK_R"], GROUP_M=8,
        INPUT_PRECISION=dot_precision(torch.float32), num_warps=c["num_warps"], num_stages=c["num_stages"])
    return y


def lowrank_matmul_triton(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                          s: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                          split_k: int | None = None, t_mode: str | None = None,
                          xv_cfg: dict | None = None, tu_cfg: dict | None = None) -> torch.Tensor:
    """Triton forward; same contract as ``naive.lowrank_matmul``. ``split_k``, ``t_mode`` and the
    ``xv_cfg``/``tu_cfg`` dicts override the launch heuristics (tests and ``bench --sweep``)."""
    n, m = x.shape[-1], u.shape[0]
    x2 = x.reshape(-1, n)
    v = v.to(x.dtype)
    u = u.to(x.dtype)
    if u.shape[1] == 0:
        y = torch.zeros(x2.shape[0], m, dtype=torch.float32, device=x.device)
        y = (y + bias.float() if bias is not None else y).to(x.dtype)
    else:
        t = xv(x2, v, **{**(xv_cfg or {}), "SPLIT_K": split_k})
        y = tu(t, u, s, bias, x.dtype, **{**(tu_cfg or {}), "T_MODE": t_mode})
    return y.reshape(*x.shape[:-1], m)


# --------------------------------------------------------------------------------------------------------
# Registered op + autograd
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("c2i::lowrank_matmul", mutates_args=())
def lowrank_matmul_op(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                      s: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(x):
        return lowrank_matmul_triton(x, u, v, s, bias)
    return naive.lowrank_matmul(x, u, v, s, bias)


@lowrank_matmul_op.register_fake
def _(x, u, v, s=None, bias=None):
    return x.new_empty(*x.shape[:-1], u.shape[0])


def _setup_context(ctx, inputs, output):
    x, u, v, s, bias = (*inputs, None, None)[:5]   # trailing None defaults may be dropped
    ctx.save_for_backward(x, u, v, s)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, gy):
    x, u, v, s = ctx.saved_tensors
    need_x, need_u, need_v, need_s, need_b = (*ctx.needs_input_grad, False, False)[:5]
    n, m = x.shape[-1], u.shape[0]
    gx = gu = gv = gs = gb = None
    if need_x:  # dx = ((gy @ u) * s) @ v.T  — itself a low-rank matmul
        gx = lowrank_matmul_op(gy.to(x.dtype), v, u, s, None)
    if need_u or need_v or need_s or need_b:
        x2, g2 = x.reshape(-1, n).float(), gy.reshape(-1, m).float()
        uf, vf = u.float(), v.float()
        sf = s.float() if s is not None else None
        if need_u or need_s:
            xv_ = x2 @ vf                                      # (M, r)
        if need_v or need_s:
            gu_ = g2 @ uf                                      # (M, r)
        if need_u:
            gu = (g2.T @ (xv_ * sf if sf is not None else xv_)).to(u.dtype)
        if need_v:
            gv = (x2.T @ (gu_ * sf if sf is not None else gu_)).to(v.dtype)
        if need_s:
            gs = (xv_ * gu_).sum(0).to(s.dtype)
        if need_b:
            gb = g2.sum(0).to(ctx.bias_dtype)
    return gx, gu, gv, gs, gb


lowrank_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def lowrank_matmul(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   s: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = ((x @ v) * s) @ u.T + bias (see ``naive.lowrank_matmul``); Triton on CUDA, reference elsewhere."""
    return lowrank_matmul_op(x, u, v, s, bias)
