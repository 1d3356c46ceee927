"""Blockwise clustered reconstruction  Ŵ = scatter_c(U_c V_cᵀ)  (Triton kernel → launcher →
c2i::clustered_reconstruct), for one matrix or a batch of matrices sharing the cluster offsets.

Tensors (B = batch, m = rows of W, n = columns of W, k = clusters, R = Σ r_c, r_max = max r_c ≥ 1)
----------------------------------------------------------------------------------------------------
    v_cat        : (B, n, R) | (n, R)         [V_1 … V_k] side by side (see ``clustered.py``)
    u_packed     : (B, m, r_max) | (m, r_max) permuted row j of cluster c holds r_c coefficients
    row_index    : (B, m) | (m,) int64        original row of permuted row j (a 1-D index is shared by the batch)
    row_offsets  : (k+1,) int64               cluster row bounds in permuted space, shared by the batch
    rank_offsets : (k+1,) int64               cluster column bounds in v_cat, shared by the batch
    w            : (B, m, n) | (m, n)         v_cat.dtype; row row_index[j] = u_packed[j, :r_c] @ V_cᵀ

Kernel ``_clustered_reconstruct_kernel``: grid (m/BLOCK_P, n/BLOCK_N, B). A program owns BLOCK_P consecutive permuted
rows × BLOCK_N columns of one matrix; for each cluster intersecting its rows it accumulates
u_packed[rows ∈ c, :r_c] @ v_cat[cols, slice_c]ᵀ in fp32 (other rows masked to 0), then writes the tile once,
each row to w[b, row_index[b, j], cols] (whole contiguous row segments, so the scatter stays coalesced).
"""
from __future__ import annotations

import torch

from . import naive
from .utils import alloc, dot_precision, launchable, next_pow2, tl, triton, use_triton


@triton.jit
def _clustered_reconstruct_kernel(v_ptr, u_ptr, row_index_ptr, row_offsets_ptr, rank_offsets_ptr, w_ptr,
                                  M, N, NUM_CLUSTERS,
                                  stride_vb, stride_vn, stride_vr, stride_ub, stride_um, stride_ur, stride_ib,
                                  stride_wb, stride_wm, stride_wn,
                                  BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                                  INPUT_PRECISION: tl.constexpr):
    """w[b, row_index[b, p], cols] = u_packed[b, p, :r_c] @ v_cat[b, cols, slice of cluster(p)]ᵀ for the tile."""
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    p_lo = pid_p * BLOCK_P
    p_hi = tl.minimum(p_lo + BLOCK_P, M)
    offs_p = p_lo + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    v_base = v_ptr + b * stride_vb
    u_base = u_ptr + b * stride_ub
    acc = tl.full((BLOCK_P, BLOCK_N), 0.0, dtype=tl.float32)
    for c in range(0, NUM_CLUSTERS):
        r0 = tl.load(row_offsets_ptr + c).to(tl.int32)
        r1 = tl.load(row_offsets_ptr + c + 1).to(tl.int32)
        if (r1 > p_lo) & (r0 < p_hi):
            k0 = tl.load(rank_offsets_ptr + c).to(tl.int32)
            rc = tl.load(rank_offsets_ptr + c + 1).to(tl.int32) - k0
            rows_in = (offs_p >= r0) & (offs_p < r1)
            for j in range(0, rc, BLOCK_R):
                rr = j + offs_r
                ua = tl.load(u_base + offs_p[:, None] * stride_um + rr[None, :] * stride_ur,
                             mask=rows_in[:, None] & (rr[None, :] < rc), other=0.0)
                vb = tl.load(v_base + (k0 + rr)[:, None] * stride_vr + offs_n[None, :] * stride_vn,
                             mask=(rr[:, None] < rc) & (offs_n[None, :] < N), other=0.0)
                acc = tl.dot(ua, vb, acc, input_precision=INPUT_PRECISION)
    p_ok = offs_p < M
    dst = tl.load(row_index_ptr + b * stride_ib + offs_p, mask=p_ok, other=0)
    tl.store(w_ptr + b * stride_wb + dst[:, None] * stride_wm + offs_n[None, :] * stride_wn,
             acc.to(w_ptr.dtype.element_ty), mask=p_ok[:, None] & (offs_n[None, :] < N))


def clustered_reconstruct_triton(v_cat, u_packed, row_index, row_offsets, rank_offsets) -> torch.Tensor:
    """Triton path; same contract as ``naive.clustered_reconstruct``."""
    squeeze = v_cat.dim() == 2
    if squeeze:
        v_cat, u_packed = v_cat[None], u_packed[None]
    B, n, _ = v_cat.shape
    m = u_packed.shape[1]
    u_packed = u_packed.to(v_cat.dtype)
    w = alloc((B, m, n), v_cat.dtype, v_cat.device)
    if B and m and n:
        stride_ib = row_index.stride(0) if row_index.dim() == 2 else 0
        block_p, block_n = 64, 64
        # fp32 rank slices of 16: at 32 the fp32 tile spills with triton 3.6 (24 bytes on sm_90; compile_check)
        block_r = max(16, min(16 if v_cat.dtype == torch.float32 else 64, next_pow2(u_packed.shape[2])))
        grid = (triton.cdiv(m, block_p), triton.cdiv(n, block_n), B)
        launchable(_clustered_reconstruct_kernel)[grid](
            v_cat, u_packed, row_index, row_offsets, rank_offsets, w, m, n, row_offsets.numel() - 1,
            v_cat.stride(0), v_cat.stride(1), v_cat.stride(2), u_packed.stride(0), u_packed.stride(1),
            u_packed.stride(2), stride_ib, w.stride(0), w.stride(1), w.stride(2),
            BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_R=block_r, INPUT_PRECISION=dot_precision(v_cat.dtype),
            num_warps=4, num_stages=3)
    return w[0] if squeeze else w


@torch.library.custom_op("c2i::clustered_reconstruct", mutates_args=())
def clustered_reconstruct_op(v_cat: torch.Tensor, u_packed: torch.Tensor, row_index: torch.Tensor,
                             row_offsets: torch.Tensor, rank_offsets: torch.Tensor) -> torch.Tensor:
    if use_triton(v_cat):
        return clustered_reconstruct_triton(v_cat, u_packed, row_index, row_offsets, rank_offsets)
    return naive.clustered_reconstruct(v_cat, u_packed, row_index, row_offsets, rank_offsets)


@clustered_reconstruct_op.register_fake
def _(v_cat, u_packed, row_index, row_offsets, rank_offsets):
    return v_cat.new_empty(*v_cat.shape[:-2], u_packed.shape[-2], v_cat.shape[-2])


def _setup_context(ctx, inputs, output):
    v_cat, u_packed, row_index, row_offsets, rank_offsets = inputs
    ctx.save_for_backward(v_cat, u_packed, row_index, row_offsets, rank_offsets)


def _backward(ctx, gw):
    """Torch ops, fp32: per cluster gU_c = gŴ_c V_c, gV_c = gŴ_cᵀ U_c (gŴ_c = rows of cluster c)."""
    v_cat, u_packed, row_index, row_offsets, rank_offsets = ctx.saved_tensors
    squeeze = v_cat.dim() == 2
    vf = (v_cat[None] if squeeze else v_cat).float()
    uf = (u_packed[None] if squeeze else u_packed).float()
    g = (gw[None] if squeeze else gw).float()
    idx = row_index if row_index.dim() == 2 else row_index.expand(g.shape[0], -1)
    g_perm = torch.gather(g, 1, idx[..., None].expand(-1, -1, g.shape[2]))   # (B, m, n) permuted rows
    gu, gv = torch.zeros_like(uf), torch.zeros_like(vf)
    ro, ko = row_offsets.tolist(), rank_offsets.tolist()
    for r0, r1, k0, k1 in zip(ro, ro[1:], ko, ko[1:]):
        if r1 > r0 and k1 > k0:
            gu[:, r0:r1, : k1 - k0] = g_perm[:, r0:r1] @ vf[:, :, k0:k1]
            gv[:, :, k0:k1] = g_perm[:, r0:r1].transpose(1, 2) @ uf[:, r0:r1, : k1 - k0]
    if squeeze:
        gu, gv = gu[0], gv[0]
    return gv.to(v_cat.dtype), gu.to(u_packed.dtype), None, None, None


clustered_reconstruct_op.register_autograd(_backward, setup_context=_setup_context)


def clustered_reconstruct(v_cat, u_packed, row_index, row_offsets, rank_offsets) -> torch.Tensor:
    """Dense Ŵ from clustered factors (see ``naive.clustered_reconstruct``); Triton on CUDA, reference
    elsewhere. Differentiable w.r.t. v_cat and u_packed."""
    return clustered_reconstruct_op(v_cat, u_packed, row_index, row_offsets, rank_offsets)
