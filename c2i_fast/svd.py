"""Thin SVD in fp32 with driver fallbacks, and the rank rule: one SVD per matrix serves every rank fraction ρ.

Layout: a dense weight ``W`` is ``(m, n) = (out_features, in_features)``; ``SVD.u (m, p)``, ``s (p,)``,
``v (n, p)``, p = min(m, n), ``W = u diag(s) v.T``.
"""
from __future__ import annotations

import contextlib
import numbers
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import C2IError


# ---------------------------------------------------------------------------------------------------------
# Thin SVD
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SVD:
    """Thin SVD ``W = u diag(s) v.T`` of an (m, n) matrix, p = min(m, n); fp32.

    u: (m, p) left singular vectors, s: (p,) descending singular values, v: (n, p) right singular vectors.
    """
    u: Tensor
    s: Tensor
    v: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the decomposed matrix."""
        return (self.u.shape[0], self.v.shape[0])

    @property
    def p(self) -> int:
        return self.s.shape[0]

    def truncate(self, rank: int) -> "LowRankFactors":
        """Rank-``rank`` factors (prefix of the triplets), S folded into u. 0 <= rank <= p."""
        if not 0 <= rank <= self.p:
            raise C2IError(f"rank {rank} is outside [0, {self.p}] for a {self.shape[0]}x{self.shape[1]} matrix")
        # Contiguous row-major copies: the GEMM kernel (and so the fp32 rounding) depends on the memory layout,
        # and a reloaded artifact is row-major, so in-memory factors must be too for bit-exact round trips.
        return LowRankFactors(u=(self.u[:, :rank] * self.s[:rank]).contiguous(), v=self.v[:, :rank].contiguous())

    def tail_energy(self, rank: int) -> float:
        """Σ_{i>=rank} σ_i² (float64): the squared Frobenius error of the rank-``rank`` truncation."""
        return float((self.s[rank:].double() ** 2).sum())

    def sigma_grad(self, grad: Tensor) -> Tensor:
        """g = diag(uᵀ G v) (p,): ∂L/∂σ_i for G = ∂L/∂W (m, n), without forming the (p, p) product."""
        return ((self.u.T @ grad) * self.v.T).sum(1)

    def to(self, device=None) -> "SVD":
        return SVD(self.u.to(device), self.s.to(device), self.v.to(device))


def count_nonfinite(x: Tensor) -> int:
    """NaN/Inf entries of ``x``; a finite sum (one cheap reduction) answers 0 without counting."""
    if bool(torch.isfinite(x.sum())):
        return 0
    return int((~torch.isfinite(x)).sum())


def _svd_finite(u: Tensor, s: Tensor, vh: Tensor) -> bool:
    # count_nonfinite's one reduction per factor is ~30x cheaper than isfinite().all() (1536x576: 60 µs vs 2 ms)
    return not any(count_nonfinite(x) for x in (s, u, vh))


def full_svd(w: Tensor, *, name: str | None = None) -> SVD:
    """Thin SVD of ``w`` (m, n) computed in fp32 (``torch.linalg.svd(full_matrices=False)``) → :class:`SVD`.

    LAPACK / cuSOLVER occasionally fail to converge (an exception, or NaNs in the result) on ill-conditioned
    inputs; we then retry with the other CUDA drivers, then in float64 on the CPU, and cast back. Non-finite
    input cannot be decomposed by any driver, so it raises :class:`C2IError` naming ``name`` when given.
    """
    label = f"matrix {name!r}" if name else "matrix"
    if w.dim() != 2:
        raise C2IError(f"{label}: expected a 2-D weight, got shape {tuple(w.shape)}")
    w32 = w.detach().float()
    m, n = w32.shape
    if m == 0 or n == 0:   # torch's SVD of an empty matrix is fine on CPU but not everywhere: be explicit
        return SVD(w32.new_zeros(m, 0), w32.new_zeros(0), w32.new_zeros(n, 0))
    bad = count_nonfinite(w32)
    if bad:
        raise C2IError(f"{label} ({m}x{n}) has {bad} NaN/Inf entries; cannot take its SVD")

    attempts: list[tuple[str, dict]] = [("default", {})]
    if w32.is_cuda:
        attempts += [(d, {"driver": d}) for d in ("gesvd", "gesvdj", "gesvda")]
    errors = []
    # On the CPU LAPACK takes a wide matrix ~1.5x longer than its tall transpose (576x1536: 170 vs 115 ms on one
    # core): decompose Wᵀ = V Σ Uᵀ instead and swap the factors (the same SVD up to round-off and signs).
    flip = not w32.is_cuda and m < n
    for label_try, kw in attempts:
        try:
            u, s, vh = torch.linalg.svd(w32.T if flip else w32, full_matrices=False, **kw)
        except RuntimeError as e:   # e.g. "linalg.svd: The algorithm failed to converge"
            errors.append(f"{label_try}: {e}")
            continue
        if _svd_finite(u, s, vh):
            return SVD(vh.mT.contiguous(), s, u) if flip else SVD(u, s, vh.mT)
        errors.append(f"{label_try}: non-finite result")
    # Last resort: float64 on the CPU (slow, but converges where fp32 iterations stall).
    try:
        u, s, vh = torch.linalg.svd(w32.double().cpu(), full_matrices=False)
    except RuntimeError as e:
        errors.append(f"float64: {e}")
    else:
        if _svd_finite(u, s, vh):
            dev = w32.device
            return SVD(u.float().to(dev), s.float().to(dev), vh.mT.float().to(dev))
        errors.append("float64: non-finite result")
    raise C2IError(f"SVD of {label} ({m}x{n}) failed with every driver: " + "; ".join(errors))


# ---------------------------------------------------------------------------------------------------------
# SVDs of model weights, remembered across runs in one process
# ---------------------------------------------------------------------------------------------------------
_MEMO: dict[tuple[int, bool], tuple[tuple, SVD]] = {}
_MEMO_DEPTH = 0


@contextlib.contextmanager
def remembered_svds():
    """Within this block :func:`weight_svd` keeps every weight's SVD (and :func:`weight_gram_eigh` its Gram
    eigendecomposition), so a second scan of the same model in the same process (``--draws``, the units of a
    bench, a notebook session, the tests) skips the SVD phase. The memo holds U and V of each matrix given a full
    SVD (about 1-2x the model's fp32 size; the scan holds as much while it runs) and Q of each Gram (p² floats,
    p = min(m, n)) and is emptied when the outermost block exits; an entry also goes when its weight is freed."""
    global _MEMO_DEPTH
    _MEMO_DEPTH += 1
    try:
        yield
    finally:
        _MEMO_DEPTH -= 1
        if _MEMO_DEPTH == 0:
            _MEMO.clear()


def _stamp(param: Tensor) -> tuple:
    """What must not have changed for a remembered SVD to be reused: the in-place version counter, a float64 sum
    and sum of squares (``param.data.copy_`` writes past the version counter), and torch's thread count (the
    SVD's last bits depend on it: a hit is what computing it now would give)."""
    w = param.detach().double()
    return (param._version, torch.get_num_threads(), float(w.sum()), float((w * w).sum()))


def _remembered(param: Tensor, what: tuple, compute):
    """``compute()``, or inside :func:`remembered_svds` what it gave before for this very tensor (``what`` names
    the decomposition) when the tensor has not changed since."""
    if not _MEMO_DEPTH:
        return compute()
    key, stamp = (id(param), *what), _stamp(param)
    hit = _MEMO.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = compute()
    if hit is None:                        # id() is reused once the tensor dies: drop its entry then
        weakref.finalize(param, _MEMO.pop, key, None)
    _MEMO[key] = (stamp, value)
    return value


def weight_svd(param: Tensor, *, transposed: bool = False, name: str | None = None) -> SVD:
    """:func:`full_svd` of ``param`` (of ``param.T`` when ``transposed``: a Conv1D weight stored (in, out)); inside
    :func:`remembered_svds`, the SVD computed before for this very tensor when it has not changed since."""
    w = param.T if transposed else param
    return _remembered(param, ("svd", transposed), lambda: full_svd(w, name=name))


def weight_gram_eigh(param: Tensor, *, transposed: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`gram_eigh` of W = ``param`` (``param.T`` when ``transposed``) as (λ, Q): the scan's Gram estimate
    (:func:`c2i_fast.scan._gram_scan`); remembered like :func:`weight_svd` inside :func:`remembered_svds`."""
    def compute():
        ge = gram_eigh((param.T if transposed else param).detach().float())
        return ge.lam, ge.q
    return _remembered(param, ("gram", transposed), compute)


@dataclass
class GramEigh:
    """The smaller Gram matrix of x (c, n), eigendecomposed: x xᵀ = U Σ² Uᵀ when c ≤ n (``left``), else
    xᵀx = V Σ² Vᵀ. λ (p,) float64 = σᵢ², descending, clamped at 0; q (p, p) float32, U or V; p = min(c, n).

    It answers what a first-order score and a best-subspace fit ask of an SVD (σᵢgᵢ, tail energies, the top-j
    right singular subspace) at about a third of the SVD's cost on the CPU: one Gram product and one symmetric
    eigensolver, no singular vectors of the other side. Round-off differs from the SVD's (λ of a float32 Gram):
    fine for ranking and clustering, not for factors, which always come from :func:`full_svd`.
    """
    lam: Tensor
    q: Tensor
    left: bool

    @property
    def p(self) -> int:
        return self.lam.shape[0]

    def sigma_g(self, x: Tensor, grad: Tensor) -> Tensor:
        """(p,) float64 σᵢgᵢ = σᵢ uᵢᵀ G vᵢ for G = ``grad`` (c, n), without a division: uᵢᵀ(G xᵀ)uᵢ when q = U,
        vᵢᵀ(Gᵀx)vᵢ when q = V (x vᵢ = σᵢ uᵢ). They sum to ⟨G, x⟩."""
        m = grad @ x.T if self.left else grad.T @ x                     # (p, p)
        return ((self.q.T @ m) * self.q.T).sum(1).double()

    def top_basis(self, x: Tensor, j: int) -> Tensor:
        """(n, min(j, p)) orthonormal basis of the span of the top right singular vectors of x: V's first
        columns, or (q = U) the Q of xᵀU_j = V_j Σ_j, so that no σᵢ is divided by."""
        jj = min(j, self.p)
        if not self.left:
            return self.q[:, :jj]
        return torch.linalg.qr(x.T @ self.q[:, :jj]).Q

    def tail(self, rank: int) -> float:
        """Σ_{i>=rank} σᵢ² (float64): the squared distance of x's rows to their best rank-``rank`` subspace."""
        return float(self.lam[rank:].sum())


def gram_eigh(x: Tensor) -> GramEigh:
    """:class:`GramEigh` of x (c, n), float32 products (x is cast)."""
    x = x.detach().float()
    c, n = x.shape
    left = c <= n
    a = x if left else x.T                              # (p, q), p ≤ q
    if a.shape[0] == 0:
        return GramEigh(x.new_zeros(0, dtype=torch.float64), x.new_zeros(0, 0), left)
    lam, vecs = torch.linalg.eigh(a @ a.T)              # ascending
    return GramEigh(lam.flip(0).clamp_min(0).double(), vecs.flip(1), left)


def rank_for(rho: float, rows: int, cols: int) -> int:
    """Kept rank for fraction ``rho``: ``max(1, int(rho * min(rows, cols)))``, and 0 for an empty block.

    This is LASER's ``int(min(m, n) * ρ)`` (so e.g. 0.29 * 100 → 28 from float round-off, as in LASER), raised
    to at least 1 so that a tiny ρ on a small block never deletes it.
    """
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not (0.0 < float(rho) <= 1.0):
        raise C2IError(f"rank fraction ρ={rho!r} must be in (0, 1]")
    p = min(int(rows), int(cols))
    if p <= 0:
        return 0
    return max(1, int(p * float(rho)))


# ---------------------------------------------------------------------------------------------------------
# Plain low-rank factors
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LowRankFactors:
    """``W ≈ u @ v.T`` with u: (m, r) (S folded in) and v: (n, r)."""
    u: Tensor
    v: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.v.shape[0])

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def reconstruct(self) -> Tensor:
        """Dense Ŵ (m, n), accumulated in fp32, returned in the factors' dtype."""
        return (self.u.float() @ self.v.float().T).to(self.u.dtype)

    def num_params(self) -> int:
        """Values stored: (m + n) * r."""
        return self.u.numel() + self.v.numel()

    def nbytes(self) -> int:
        return self.u.numel() * self.u.element_size() + self.v.numel() * self.v.element_size()

    def to(self, dtype: torch.dtype | None = None, device=None) -> "LowRankFactors":
        return LowRankFactors(self.u.to(device=device, dtype=dtype), self.v.to(device=device, dtype=dtype))
