"""Batched randomized SVD (Halko–Martinsson–Tropp, Alg. 4.4) with its GEMMs in a Triton batched matmul
(``_batched_matmul_kernel`` → ``bmm_triton`` → c2i::batched_matmul); QR and the small core SVD run in torch.
fp32 throughout.

Tensors (B = batch, m × n = matrix, ℓ = min(rank + oversample, m, n) = sketch width)
---------------------------------------------------------------------------------------
    a      : (B, m, n) | (m, n)   the matrices, up-cast to fp32
    omega  : (B, n, ℓ)            Gaussian test matrix (drawn from ``generator``'s device like the reference)
    q      : (B, m, ℓ)            orthonormal basis of range(a), refined by ``niter`` power iterations
                                  q ← qr(a qr(aᵀ q)) (re-orthonormalised after every product)
    q2, r2 : (B, n, ℓ), (B, ℓ, ℓ) qr(aᵀ q): the core qᵀa = r2ᵀ q2ᵀ, so only the ℓ × ℓ matrix r2ᵀ is SVD'd
    U, S, V: (B, m, r), (B, r), (B, n, r)  r = min(rank, m, n);  a ≈ U diag(S) Vᵀ

Blocks of different heights (the clusters of one matrix): ``pad_blocks`` stacks (h_c, n) blocks into
(k, h_max, n) with zero rows at the bottom — zero rows change neither the singular values nor V, and
their rows of U are (numerically) zero — and ``randomized_svd_blocks`` returns one (U_c, S_c, V_c) per block.

Kernel ``_batched_matmul_kernel``: c[i] = a[i] @ b[i] for any strides (so aᵀ costs nothing), fp32 accumulate
and output, grid ((M/BM)·(N/BN) grouped along M, B). fp32 operands use 'tf32x3' dots (~fp32 accuracy; see
``utils.dot_precision``) unless torch.backends.cuda.matmul.allow_tf32 is set.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import naive
from .utils import alloc, dot_precision, launchable, tl, triton, use_triton


@triton.jit
def _batched_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                           stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
                           stride_cb, stride_cm, stride_cn,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """c[i] (M, N) fp32 = a[i] (M, K) @ b[i] (K, N) for this program's output tile of batch entry i."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + bid * stride_ab
    b_base = b_ptr + bid * stride_bb
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        aa = tl.load(a_base + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                     mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        bb = tl.load(b_base + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                     mask=(kk[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(aa.to(tl.float32), bb.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    tl.store(c_ptr + bid * stride_cb + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def bmm_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: (B, M, K), b: (B, K, N), any strides/dtypes -> (B, M, N) fp32."""
    B, M, K = a.shape
    N = b.shape[2]
    c = alloc((B, M, N), torch.float32, a.device)
    if B == 0 or M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    block_m = 64 if M > 32 else (32 if M > 16 else 16)
    block_n = 64 if N > 32 else (32 if N > 16 else 16)
    block_k = 32
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), B)
    launchable(_batched_matmul_kernel)[grid](
        a, b, c, M, N, K,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1), c.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        INPUT_PRECISION=dot_precision(torch.float32), num_warps=4, num_stages=3)
    return c


@torch.library.custom_op("c2i::batched_matmul", mutates_args=())
def batched_matmul_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, M, K) @ (B, K, N) -> (B, M, N) in fp32."""
    if use_triton(a):
        return bmm_triton(a, b)
    return torch.bmm(a.float(), b.float())


@batched_matmul_op.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], a.shape[1], b.shape[2], dtype=torch.float32)


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y)[0]


def randomized_svd_triton(a: torch.Tensor, rank: int, oversample: int = 8, niter: int = 2,
                          generator: torch.Generator | None = None):
    """Same contract as ``naive.randomized_svd``; every product with ``a`` goes through ``bmm_triton``."""
    squeeze = a.dim() == 2
    a = (a[None] if squeeze else a).float()
    b, m, n = a.shape
    ell = min(rank + oversample, m, n)
    at = a.transpose(1, 2)
    omega = naive.gaussian_sketch(b, n, ell, generator, a.device)
    q = _orth(bmm_triton(a, omega))                                # (B, m, ell)
    for _ in range(niter):
        q = _orth(bmm_triton(a, _orth(bmm_triton(at, q))))
    q2, r2 = torch.linalg.qr(bmm_triton(at, q))                    # aᵀq = q2 r2  ⇒  qᵀa = r2ᵀ q2ᵀ
    uc, s, vch = torch.linalg.svd(r2.transpose(1, 2))              # small ℓ × ℓ core
    r = min(rank, ell)
    u = bmm_triton(q, uc[..., :r])
    v = bmm_triton(q2, vch.transpose(1, 2)[..., :r])
    s = s[..., :r]
    if squeeze:
        return u[0], s[0], v[0]
    return u, s, v


def randomized_svd(a: torch.Tensor, rank: int, oversample: int = 8, niter: int = 2,
                   generator: torch.Generator | None = None):
    """Batched randomized SVD (see ``naive.randomized_svd``): a (B, m, n) | (m, n) -> U, S, V.
    Triton GEMMs on CUDA, the reference elsewhere."""
    if use_triton(a):
        return randomized_svd_triton(a, rank, oversample, niter, generator)
    return naive.randomized_svd(a, rank, oversample, niter, generator)


def pad_blocks(blocks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Stack blocks (h_c, n) into (k, h_max, n) fp32, zero rows at the bottom; returns it and the heights."""
    if not blocks:
        raise ValueError("pad_blocks needs at least one block")
    n = blocks[0].shape[1]
    heights = [int(blk.shape[0]) for blk in blocks]
    out = blocks[0].new_zeros(len(blocks), max(max(heights), 1), n, dtype=torch.float32)
    for c, blk in enumerate(blocks):
        if blk.shape[1] != n:
            raise ValueError(f"block {c} has {blk.shape[1]} columns, expected {n}")
        out[c, : heights[c]] = blk
    return out, heights


def randomized_svd_blocks(blocks: Sequence[torch.Tensor], rank: int | Sequence[int], oversample: int = 8,
                          niter: int = 2, generator: torch.Generator | None = None):
    """Randomized SVD of blocks with the same width and different heights (e.g. the row clusters of one
    weight) in one batched call. ``rank``: one for all or one per block. Returns a list of
    (U_c (h_c, r_c), S_c (r_c,), V_c (n, r_c)) with r_c = min(rank_c, h_c, n)."""
    a, heights = pad_blocks(blocks)
    ranks = [int(rank)] * len(blocks) if isinstance(rank, int) else [int(r) for r in rank]
    if len(ranks) != len(blocks):
        raise ValueError(f"{len(ranks)} ranks for {len(blocks)} blocks")
    u, s, v = randomized_svd(a, max(ranks), oversample, niter, generator)
    n = a.shape[2]
    out = []
    for c, (h, r) in enumerate(zip(heights, ranks)):
        r = min(r, h, n, s.shape[1])
        out.append((u[c, :h, :r], s[c, :r], v[c, :, :r]))
    return out
