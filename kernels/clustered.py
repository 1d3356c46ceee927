"""Clustered low-rank matmul  (Triton kernels → launcher → c2i::clustered_lowrank_matmul).

The rows of W (m, n) are split into k clusters; cluster c owns rows row_index[row_offsets[c]:row_offsets[c+1]]
and has its own rank r_c. y = x Ŵᵀ with Ŵ[row] = U_c[row] V_cᵀ.

Tensors (M = tokens, n = in_features, m = out_features, k = clusters, R = Σ r_c, r_max = max r_c ≥ 1)
------------------------------------------------------------------------------------------------------
    x            : (..., n)     fp16 | bf16 | fp32, flattened to (M, n)
    v_cat        : (n, R)       [V_1 … V_k]; V_c = v_cat[:, rank_offsets[c]:rank_offsets[c+1]]
    u_packed     : (m, r_max)   permuted row j of cluster c: its r_c coefficients (S_c folded in) in
                                columns [0, r_c); columns ≥ r_c are ignored (zero by convention)
    row_index    : (m,)  int64  original output row of permuted row j
    row_offsets  : (k+1,) int64 cluster c = permuted rows [row_offsets[c], row_offsets[c+1]); [-1] == m
    rank_offsets : (k+1,) int64 cluster c = columns [rank_offsets[c], rank_offsets[c+1]) of v_cat / t
    bias         : (m,)         optional, indexed by *original* row
    t            : (M, R) fp32  stage-1 result x @ v_cat (internal)
    y            : (..., m)     x.dtype, every row at its original position

Stage 1 is the low-rank matmul's ``_lowrank_fwd_xv_kernel`` (one GEMM against all clusters' V side by side;
split-K for decode). Stage 2 ``_clustered_fwd_tu_kernel`` is a segmented GEMM: a program owns BLOCK_M tokens × BLOCK_N
consecutive *permuted* rows; for every cluster that intersects its rows (usually one, two at a boundary) it
accumulates t[:, cluster's rank slice] @ u_packed[rows of that cluster, :r_c]ᵀ, rows of other clusters
masked to zero, then scatters the finished columns to y[:, row_index[rows]] (and adds bias[row_index]).
Empty clusters are skipped; rank-0 clusters leave their rows at bias (or 0). Each y element is written once.
No host synchronisation: the cluster bounds are read inside the kernel.
Cost note: the scatter writes y's columns at row_index — coalesced when clusters are contiguous row blocks
(or row_index is sorted within clusters and dense), scattered 2-byte writes for an arbitrary permutation.
That matters only for prefill (large M); there the alternative is to fold the static permutation into the
next layer's input columns and pass row_index = arange(m).

Backward (``register_autograd``): torch ops in fp32, one loop over clusters (reads the offsets on the host).
"""
from __future__ import annotations

import torch

from . import naive
from .lowrank import T_FP32, T_MODES, T_SPLIT, tu_config, xv
from .utils import alloc, dot_precision, launchable, tl, triton, use_triton


@triton.jit
def _clustered_fwd_tu_kernel(t_ptr, u_ptr, row_index_ptr, row_offsets_ptr, rank_offsets_ptr, b_ptr, y_ptr,
                             M, N, NUM_CLUSTERS,
                             stride_tm, stride_tr, stride_un, stride_ur, stride_ym, stride_yn,
                             HAS_BIAS: tl.constexpr, T_MODE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                             GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """y[:, row_index[p]] = t[:, rank slice of cluster(p)] @ u_packed[p, :r_c]ᵀ (+ bias) for the tile's p.
    T_MODE: lowrank's T_LOWP | T_SPLIT | T_FP32."""
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_lo = pid_n * BLOCK_N
    p_hi = tl.minimum(p_lo + BLOCK_N, N)
    offs_p = p_lo + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for c in range(0, NUM_CLUSTERS):
        r0 = tl.load(row_offsets_ptr + c).to(tl.int32)
        r1 = tl.load(row_offsets_ptr + c + 1).to(tl.int32)
        if (r1 > p_lo) & (r0 < p_hi):
            k0 = tl.load(rank_offsets_ptr + c).to(tl.int32)
            rc = tl.load(rank_offsets_ptr + c + 1).to(tl.int32) - k0
            rows_in = (offs_p >= r0) & (offs_p < r1)
            for j in range(0, rc, BLOCK_R):
                rr = j + offs_r
                ta = tl.load(t_ptr + offs_m[:, None] * stride_tm + (k0 + rr)[None, :] * stride_tr,
                             mask=(offs_m[:, None] < M) & (rr[None, :] < rc), other=0.0)
                ub = tl.load(u_ptr + rr[:, None] * stride_ur + offs_p[None, :] * stride_un,
                             mask=(rr[:, None] < rc) & rows_in[None, :], other=0.0)
                if T_MODE == T_FP32:
                    acc = tl.dot(ta, ub.to(tl.float32), acc, input_precision=INPUT_PRECISION)
                elif T_MODE == T_SPLIT:
                    t_hi = ta.to(ub.dtype)
                    acc = tl.dot(t_hi, ub, acc)
                    acc = tl.dot((ta - t_hi.to(tl.float32)).to(ub.dtype), ub, acc)
                else:        # T_LOWP
                    acc = tl.dot(ta.to(ub.dtype), ub, acc)
    p_ok = offs_p < N
    dst = tl.load(row_index_ptr + offs_p, mask=p_ok, other=0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + dst, mask=p_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + dst[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & p_ok[None, :])


def clustered_tu(t: torch.Tensor, u_packed: torch.Tensor, row_index: torch.Tensor,
                 row_offsets: torch.Tensor, rank_offsets: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, **cfg) -> torch.Tensor:
    """Stage 2. t: (M, R) fp32 -> y (M, m) out_dtype at original row positions. ``cfg`` overrides entries
    of ``lowrank.tu_config`` (the same tiles, but 64 columns wide in prefill; BLOCK_R covers r_max instead of
    R)."""
    M = t.shape[0]
    N, r_max = u_packed.shape
    y = alloc((M, N), out_dtype, t.device)
    if M == 0 or N == 0:
        return y
    c = tu_config(M, N, r_max, u_packed.dtype)
    if c["T_MODE"] == "lowp":
        # The cluster loop's masks and offsets cost registers the plain kernel does not need: a 128×128 tile
        # spills with triton 3.6 (256 bytes on sm_90); 128×64 does not, with 3.6 or 3.9 (compile_check).
        c["BLOCK_N"] = 64
    c.update({k: v for k, v in cfg.items() if v is not None})
    grid = (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)
    launchable(_clustered_fwd_tu_kernel)[grid](
        t, u_packed, row_index, row_offsets, rank_offsets, bias if bias is not None else t, y,
        M, N, row_offsets.numel() - 1,
        t.stride(0), t.stride(1), u_packed.stride(0), u_packed.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, T_MODE=T_MODES[c["T_MODE"]],
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_R=c["BLOCK_R"], GROUP_M=8,
        INPUT_PRECISION=dot_precision(torch.float32), num_warps=c["num_warps"], num_stages=c["num_stages"])
    return y


def clustered_lowrank_matmul_triton(x, v_cat, u_packed, row_index, row_offsets, rank_offsets, bias=None, *,
                                    split_k: int | None = None, t_mode: str | None = None,
                                    xv_cfg: dict | None = None, tu_cfg: dict | None = None) -> torch.Tensor:
    """Triton forward; same contract as ``naive.clustered_lowrank_matmul``; keyword overrides as in
    ``lowrank.lowrank_matmul_triton``."""
    n, m = x.shape[-1], u_packed.shape[0]
    x2 = x.reshape(-1, n)
    t = xv(x2, v_cat.to(x.dtype), **{**(xv_cfg or {}), "SPLIT_K": split_k})
    y = clustered_tu(t, u_packed.to(x.dtype), row_index, row_offsets, rank_offsets, bias, x.dtype,
                     **{**(tu_cfg or {}), "T_MODE": t_mode})
    return y.reshape(*x.shape[:-1], m)


@torch.library.custom_op("c2i::clustered_lowrank_matmul", mutates_args=())
def clustered_lowrank_matmul_op(x: torch.Tensor, v_cat: torch.Tensor, u_packed: torch.Tensor,
                                row_index: torch.Tensor, row_offsets: torch.Tensor, rank_offsets: torch.Tensor,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(x):
        return clustered_lowrank_matmul_triton(x, v_cat, u_packed, row_index, row_offsets, rank_offsets, bias)
    return naive.clustered_lowrank_matmul(x, v_cat, u_packed, row_index, row_offsets, rank_offsets, bias)


@clustered_lowrank_matmul_op.register_fake
def _(x, v_cat, u_packed, row_index, row_offsets, rank_offsets, bias=None):
    return x.new_empty(*x.shape[:-1], u_packed.shape[0])


def _setup_context(ctx, inputs, output):
    x, v_cat, u_packed, row_index, row_offsets, rank_offsets, bias = (*inputs, None)[:7]
    ctx.save_for_backward(x, v_cat, u_packed, row_index, row_offsets, rank_offsets)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, gy):
    x, v_cat, u_packed, row_index, row_offsets, rank_offsets = ctx.saved_tensors
    need_x, need_v, need_u, _, _, _, need_b = (*ctx.needs_input_grad, False)[:7]
    n, m = x.shape[-1], u_packed.shape[0]
    x2, g2 = x.reshape(-1, n).float(), gy.reshape(-1, m).float()
    g_perm = g2[:, row_index]                                  # (M, m) in permuted-row order
    vf, uf = v_cat.float(), u_packed.float()
    t = x2 @ vf if need_u else None                            # (M, R)
    gt = x2.new_zeros(x2.shape[0], vf.shape[1])               # dL/dt
    gu = torch.zeros_like(uf) if need_u else None
    ro, ko = row_offsets.tolist(), rank_offsets.tolist()
    for r0, r1, k0, k1 in zip(ro, ro[1:], ko, ko[1:]):
        if r1 > r0 and k1 > k0:
            gt[:, k0:k1] = g_perm[:, r0:r1] @ uf[r0:r1, : k1 - k0]
            if need_u:
                gu[r0:r1, : k1 - k0] = g_perm[:, r0:r1].T @ t[:, k0:k1]
    gx = (gt @ vf.T).reshape(x.shape).to(x.dtype) if need_x else None
    gv = (x2.T @ gt).to(v_cat.dtype) if need_v else None
    gu = gu.to(u_packed.dtype) if need_u else None
    gb = g2.sum(0).to(ctx.bias_dtype) if need_b else None
    return gx, gv, gu, None, None, None, gb


clustered_lowrank_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def clustered_lowrank_matmul(x, v_cat, u_packed, row_index, row_offsets, rank_offsets, bias=None):
    """Clustered low-rank forward (see ``naive.clustered_lowrank_matmul``); Triton on CUDA, reference
    elsewhere."""
    return clustered_lowrank_matmul_op(x, v_cat, u_packed, row_index, row_offsets, rank_offsets, bias)
