"""Pure-torch references for every op in ``c2i_fast.kernels``.

They are the CPU path of the library and the oracle of the kernel tests. Readability first.

Conventions (shared by every op; see also ``kernels/__init__.py``)
-------------------------------------------------------------------
A dense weight ``W`` has PyTorch's ``nn.Linear`` layout ``(m, n) = (out_features, in_features)``
and a forward ``y = x @ W.T``. Its rank-``r`` factors are ``W ≈ U diag(S) Vᵀ`` with

    u : (m, r)      left singular vectors (optionally with S already folded in: u = U * S)
    s : (r,) | None singular values, or None when folded into ``u``
    v : (n, r)      right singular vectors

so ``y = ((x @ v) * s) @ u.T``.

Clustered factors (rows of W split into k clusters, each with its own rank r_c):

    row_index   : (m,)  int64   original row of each *permuted* row; rows of cluster c are
                                 row_index[row_offsets[c]:row_offsets[c+1]]
    row_offsets : (k+1,) int64  cluster boundaries in permuted-row space (row_offsets[-1] == m)
    rank_offsets: (k+1,) int64  cluster boundaries in the concatenated rank space (R = rank_offsets[-1])
    v_cat       : (n, R)        [V_1 … V_k] side by side; V_c = v_cat[:, rank_offsets[c]:rank_offsets[c+1]]
    u_packed    : (m, r_max)    permuted row j of cluster c holds its r_c coefficients in columns
                                 [0, r_c), S_c already folded in; columns ≥ r_c are zero
                                 (r_max = max_c r_c, at least 1 so the tensor is never 0-wide)

Empty clusters (row_offsets[c] == row_offsets[c+1]) and rank-0 clusters are allowed.
"""
from __future__ import annotations

import torch


def lowrank_matmul(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   s: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = ((x @ v) * s) @ u.T + bias.   x: (..., n), u: (m, r), v: (n, r), s: (r,), bias: (m,) -> (..., m).

    Accumulates in fp32 and returns x's dtype.
    """
    t = x.float() @ v.float()
    if s is not None:
        t = t * s.float()
    y = t @ u.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def clustered_lowrank_matmul(x: torch.Tensor, v_cat: torch.Tensor, u_packed: torch.Tensor,
                             row_index: torch.Tensor, row_offsets: torch.Tensor,
                             rank_offsets: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Clustered low-rank forward. x: (..., n) -> (..., m), outputs at their original row positions.

    Stage 1 is one GEMM ``t = x @ v_cat`` (..., R); stage 2 multiplies each cluster's slice of t with
    its rows of ``u_packed`` and scatters the result to ``row_index``.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()
    t = x2 @ v_cat.float()                                   # (M, R)
    m = u_packed.shape[0]
    y_perm = x2.new_zeros(x2.shape[0], m)                     # (M, m) in permuted-row order
    ro, ko = row_offsets.tolist(), rank_offsets.tolist()
    for c in range(len(ro) - 1):
        r0, r1, k0, k1 = ro[c], ro[c + 1], ko[c], ko[c + 1]
        if r1 > r0 and k1 > k0:
            y_perm[:, r0:r1] = t[:, k0:k1] @ u_packed[r0:r1, : k1 - k0].float().T
    y = y_perm.index_select(1, torch.argsort(row_index))      # y[:, row_index] = y_perm (a gather: faster)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, m).to(x.dtype)


def clustered_reconstruct(v_cat: torch.Tensor, u_packed: torch.Tensor, row_index: torch.Tensor,
                          row_offsets: torch.Tensor, rank_offsets: torch.Tensor) -> torch.Tensor:
    """Dense Ŵ (m, n) from clustered factors (same metadata as ``clustered_lowrank_matmul``).

    A leading batch dimension (B, …) is accepted on v_cat/u_packed and on row_index (a 1-D row_index is
    shared by the batch) when the offsets are shared; returns (B, m, n) then.
    """
    if v_cat.dim() == 3:
        if v_cat.shape[0] == 0:
            return v_cat.new_empty(0, u_packed.shape[1], v_cat.shape[1])
        idx = row_index if row_index.dim() == 2 else row_index.expand(v_cat.shape[0], -1)
        return torch.stack([clustered_reconstruct(v_cat[b], u_packed[b], idx[b], row_offsets,
                                                  rank_offsets) for b in range(v_cat.shape[0])])
    n, m = v_cat.shape[0], u_packed.shape[0]
    w_perm = v_cat.new_zeros(m, n, dtype=torch.float32)
    ro, ko = row_offsets.tolist(), rank_offsets.tolist()
    for c in range(len(ro) - 1):
        r0, r1, k0, k1 = ro[c], ro[c + 1], ko[c], ko[c + 1]
        if r1 > r0 and k1 > k0:
            w_perm[r0:r1] = u_packed[r0:r1, : k1 - k0].float() @ v_cat[:, k0:k1].float().T
    w = w_perm.index_select(0, torch.argsort(row_index))      # w[row_index] = w_perm
    return w.to(v_cat.dtype)


def gaussian_sketch(b: int, n: int, ell: int, generator: torch.Generator | None,
                    device: torch.device | str) -> torch.Tensor:
    """(b, n, ell) fp32 standard normal test matrix, drawn on ``generator``'s device (CPU when no generator
    is given and ``device`` is the CPU, else on ``device``) and moved to ``device``. The same generator state
    gives the same sketch on every path."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(b, n, ell, generator=generator, dtype=torch.float32, device=gen_device).to(device)


def randomized_svd(a: torch.Tensor, rank: int, oversample: int = 8, niter: int = 2,
                   generator: torch.Generator | None = None):
    """Batched randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 with QR re-orthonormalisation).

    a: (B, m, n) or (m, n), fp32 math. Returns U (B, m, rank), S (B, rank), V (B, n, rank), matching the
    leading shape of ``a``.
    """
    squeeze = a.dim() == 2
    a = (a[None] if squeeze else a).float()
    b, m, n = a.shape
    ell = min(rank + oversample, m, n)
    omega = gaussian_sketch(b, n, ell, generator, a.device)
    q, _ = torch.linalg.qr(a @ omega)                          # (B, m, ell)
    for _ in range(niter):
        z, _ = torch.linalg.qr(a.transpose(1, 2) @ q)          # (B, n, ell)
        q, _ = torch.linalg.qr(a @ z)                          # (B, m, ell)
    core = q.transpose(1, 2) @ a                               # (B, ell, n)
    uc, s, vh = torch.linalg.svd(core, full_matrices=False)
    u = (q @ uc)[..., :rank]
    s, v = s[..., :rank], vh.transpose(1, 2)[..., :rank]
    if squeeze:
        return u[0], s[0], v[0]
    return u, s, v
