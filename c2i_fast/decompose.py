"""Decompositions: thin SVD, rank choice, row clustering and per-cluster SVD. All math in fp32.

One SVD per matrix (or per cluster) serves every rank fraction ρ: the rank-r factors are the first r singular
triplets, so a search over a ρ grid slices prefixes of one decomposition and never recomputes it.

Layouts follow ``kernels/naive.py`` exactly (see that module's docstring):

* a dense weight ``W`` is ``(m, n) = (out_features, in_features)``, forward ``y = x @ W.T``;
* plain factors: ``u (m, r)`` with S folded in (``u = U * S``) and ``v (n, r)``, ``W ≈ u @ v.T``;
* clustered factors (rows of W split into k clusters, cluster c with rank r_c):

      row_index    (m,)    int64  original row of each *permuted* row
      row_offsets  (k+1,)  int64  cluster boundaries in permuted-row space (row_offsets[-1] == m)
      rank_offsets (k+1,)  int64  cluster boundaries in concatenated rank space (R = rank_offsets[-1])
      v_cat        (n, R)         [V_1 … V_k] side by side
      u_packed     (m, r_max)     permuted row j of cluster c holds U_c S_c in columns [0, r_c), zeros after;
                                  r_max = max(1, max_c r_c)

Results are fp32; callers cast to the model dtype when they store factors in a module.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .errors import C2IError

CLUSTER_METHODS = ("block", "kmeans", "projective")


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


# ---------------------------------------------------------------------------------------------------------
# Clustered factors
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ClusteredFactors:
    """Rows of W in k clusters, each with its own truncated SVD; metadata exactly as in ``kernels/naive.py``.

    v_cat (n, R), u_packed (m, r_max) float; row_index (m,), row_offsets (k+1,), rank_offsets (k+1,) int64.
    """
    v_cat: Tensor
    u_packed: Tensor
    row_index: Tensor
    row_offsets: Tensor
    rank_offsets: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u_packed.shape[0], self.v_cat.shape[0])

    @property
    def n_clusters(self) -> int:
        return self.row_offsets.shape[0] - 1

    @property
    def ranks(self) -> list[int]:
        """r_c per cluster."""
        return torch.diff(self.rank_offsets).tolist()

    @property
    def cluster_sizes(self) -> list[int]:
        """|c| per cluster."""
        return torch.diff(self.row_offsets).tolist()

    def labels(self) -> Tensor:
        """(m,) int64 cluster of each original row (inverse of the permutation)."""
        sizes = torch.diff(self.row_offsets.cpu())
        lab = torch.repeat_interleave(torch.arange(self.n_clusters), sizes)
        out = torch.empty_like(lab)
        out[self.row_index.cpu()] = lab
        return out

    def reconstruct(self) -> Tensor:
        """Dense Ŵ (m, n) in the factors' dtype (via ``c2i_fast.kernels.clustered_reconstruct``)."""
        from c2i_fast.kernels import clustered_reconstruct
        return clustered_reconstruct(self.v_cat, self.u_packed, self.row_index, self.row_offsets,
                                     self.rank_offsets)

    def num_params(self) -> int:
        """Float values actually stored: n*R (v_cat) + m*r_max (u_packed, zero padding included).

        The int64 index tensors are not parameters; they are counted in :meth:`index_nbytes`.
        """
        return self.v_cat.numel() + self.u_packed.numel()

    def num_effective_params(self) -> int:
        """Values a perfectly packed layout would need: Σ_c (n + |c|) r_c (no padding)."""
        n = self.v_cat.shape[0]
        return sum((n + sz) * r for sz, r in zip(self.cluster_sizes, self.ranks))

    def index_nbytes(self) -> int:
        """Bytes of the routing metadata (row_index, row_offsets, rank_offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.row_index, self.row_offsets, self.rank_offsets))

    def nbytes(self) -> int:
        """All bytes stored: float values plus index metadata."""
        vals = sum(t.numel() * t.element_size() for t in (self.v_cat, self.u_packed))
        return vals + self.index_nbytes()

    def to(self, dtype: torch.dtype | None = None, device=None) -> "ClusteredFactors":
        """Cast the float tensors to ``dtype``; move everything to ``device``. Index tensors stay int64."""
        return ClusteredFactors(self.v_cat.to(device=device, dtype=dtype),
                                self.u_packed.to(device=device, dtype=dtype),
                                self.row_index.to(device), self.row_offsets.to(device),
                                self.rank_offsets.to(device))


def _check_k(k: int, m: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= m:
        raise C2IError(f"n_clusters={k!r} must be an integer with 1 <= n_clusters <= {m} (the number of rows)")
    return int(k)


class ClusteredSVD:
    """Per-cluster thin SVDs of W's row blocks, computed once; :meth:`factors` slices them for any ρ.

    Attributes: ``shape`` (m, n); ``labels`` (m,) int64; ``row_index`` (m,), ``row_offsets`` (k+1,) int64
    (rows of cluster c in ascending original order); ``svds`` list of k :class:`SVD` (p_c = 0 for an empty
    cluster).
    """

    def __init__(self, shape: tuple[int, int], labels: Tensor, row_index: Tensor, row_offsets: Tensor,
                 svds: list[SVD]):
        self.shape = shape
        self.labels = labels
        self.row_index = row_index
        self.row_offsets = row_offsets
        self.svds = svds
        self._sigma_grads: tuple[Tensor, list[Tensor]] | None = None    # (G, per-cluster g), see sigma_grads

    @property
    def n_clusters(self) -> int:
        return len(self.svds)

    @property
    def cluster_sizes(self) -> list[int]:
        return torch.diff(self.row_offsets).tolist()

    @classmethod
    def fit(cls, w: Tensor, labels: Tensor, n_clusters: int | None = None, *, name: str | None = None
            ) -> "ClusteredSVD":
        """SVD of each cluster's rows. w: (m, n); labels: (m,) ints in [0, k). k defaults to labels.max()+1."""
        m, n = w.shape
        labels = torch.as_tensor(labels).to(device="cpu", dtype=torch.int64)
        if labels.shape != (m,):
            raise C2IError(f"labels must have shape ({m},), got {tuple(labels.shape)}")
        k = int(labels.max()) + 1 if n_clusters is None else n_clusters
        k = _check_k(k, m)
        if int(labels.min()) < 0 or int(labels.max()) >= k:
            raise C2IError(f"cluster labels must lie in [0, {k}); got [{int(labels.min())}, {int(labels.max())}]")
        # Stable sort keeps each cluster's rows in ascending original order: a block clustering then has
        # row_index == arange(m), the identity permutation.
        row_index = torch.sort(labels, stable=True).indices
        sizes = torch.bincount(labels, minlength=k)
        row_offsets = torch.zeros(k + 1, dtype=torch.int64)
        row_offsets[1:] = torch.cumsum(sizes, 0)
        w32 = w.detach().float()
        ri = row_index.to(w32.device)
        svds = []
        for c in range(k):
            r0, r1 = int(row_offsets[c]), int(row_offsets[c + 1])
            svds.append(full_svd(w32[ri[r0:r1]], name=f"{name}[cluster {c}]" if name else None))
        return cls((m, n), labels, row_index, row_offsets, svds)

    def ranks_for(self, rho: float) -> list[int]:
        """r_c = rank_for(ρ, |c|, n), 0 for an empty cluster: the same ρ on every block."""
        n = self.shape[1]
        return [rank_for(rho, sz, n) for sz in self.cluster_sizes]

    def factors(self, rho: float) -> ClusteredFactors:
        """Clustered factors at rank fraction ρ (prefixes of the stored per-cluster SVDs), fp32."""
        return self.factors_with_ranks(self.ranks_for(rho))

    def factors_with_ranks(self, ranks: Sequence[int]) -> ClusteredFactors:
        """Clustered factors with explicit per-cluster ranks r_c (0 <= r_c <= p_c)."""
        m, n = self.shape
        if len(ranks) != self.n_clusters:
            raise C2IError(f"need {self.n_clusters} per-cluster ranks, got {len(ranks)}")
        dev = self.svds[0].u.device if self.svds else torch.device("cpu")
        r_max = max(1, max(ranks))
        u_packed = torch.zeros(m, r_max, device=dev)
        v_parts = []
        for c, (svd, r) in enumerate(zip(self.svds, ranks)):
            if not 0 <= r <= svd.p:
                raise C2IError(f"rank {r} of cluster {c} is outside [0, {svd.p}]")
            r0, r1 = int(self.row_offsets[c]), int(self.row_offsets[c + 1])
            if r > 0:
                u_packed[r0:r1, :r] = svd.u[:, :r] * svd.s[:r]
                v_parts.append(svd.v[:, :r])
        v_cat = torch.cat(v_parts, 1) if v_parts else torch.zeros(n, 0, device=dev)
        rank_offsets = torch.zeros(self.n_clusters + 1, dtype=torch.int64)
        rank_offsets[1:] = torch.cumsum(torch.tensor(list(ranks), dtype=torch.int64), 0)
        return ClusteredFactors(v_cat.contiguous(), u_packed, self.row_index.to(dev), self.row_offsets.to(dev),
                                rank_offsets.to(dev))

    def tail_energy(self, rho: float) -> float:
        """||W - Ŵ||_F² at ρ: Σ_c Σ_{i>=r_c} σ_{c,i}² (float64)."""
        return sum(svd.tail_energy(r) for svd, r in zip(self.svds, self.ranks_for(rho)))

    def truncation_delta(self, grad: Tensor, rho: float) -> float:
        """First-order loss change ⟨G, Ŵ − W⟩ = −Σ_c Σ_{i>=r_c} σ_{c,i} g_{c,i}, g_{c,i} = u_{c,i}ᵀ G_c v_{c,i}.

        grad: G = ∂L/∂W (m, n) in W's layout. One GEMM per cluster, done once per ``grad`` and kept for the
        next ρ (every ρ reads a tail of the same g_c); no dense Ŵ is formed.
        """
        total = 0.0
        for svd, g_sigma, r in zip(self.svds, self.sigma_grads(grad), self.ranks_for(rho)):
            total += truncation_delta(svd, g_sigma, r)
        return total

    def sigma_grads(self, grad: Tensor) -> list[Tensor]:
        """Per cluster, g_c = diag(U_cᵀ G_c V_c) (p_c,): ∂L/∂σ_{c,i}; computed once per ``grad`` tensor."""
        if self._sigma_grads is not None and self._sigma_grads[0] is grad:
            return self._sigma_grads[1]
        g32 = grad.detach().float()
        ri = self.row_index.to(g32.device)
        out = []
        for c, svd in enumerate(self.svds):
            r0, r1 = int(self.row_offsets[c]), int(self.row_offsets[c + 1])
            out.append(svd.sigma_grad(g32[ri[r0:r1]]))          # G_c: G's (|c|, n) rows of cluster c
        self._sigma_grads = (grad, out)
        return out


# ---------------------------------------------------------------------------------------------------------
# Row clustering
# ---------------------------------------------------------------------------------------------------------
def _block_labels(m: int, k: int) -> Tensor:
    """Contiguous blocks: the split of arange(m) into k nearly equal chunks (torch.tensor_split: larger first)."""
    labels = torch.empty(m, dtype=torch.int64)
    for c, chunk in enumerate(torch.arange(m).tensor_split(k)):
        labels[chunk] = c
    return labels


def _sq_dists(x: Tensor, centers: Tensor, x_sq: Tensor) -> Tensor:
    """(m, k) squared Euclidean distances ||x_i - c_j||² via the expanded form, clamped at 0."""
    d = x_sq[:, None] - 2.0 * (x @ centers.T) + (centers * centers).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _kmeans_labels(x: Tensor, k: int, seed: int, iters: int) -> Tensor:
    """Lloyd's k-means with k-means++ seeding on the rows of x (m, n) fp32. Deterministic on CPU for a seed.

    Random draws use a CPU generator so that the seeding is identical on every device. A cluster that loses
    all its rows keeps its old center (it may stay empty: callers handle empty clusters).
    """
    m = x.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x_sq = (x * x).sum(1)
    first = int(torch.randint(m, (1,), generator=gen))
    centers = x[first:first + 1].clone()
    d_min = _sq_dists(x, centers, x_sq)[:, 0]
    for _ in range(1, k):
        probs = d_min.double().cpu()
        total = float(probs.sum())
        if total > 0:
            idx = int(torch.multinomial(probs / total, 1, generator=gen))
        else:      # every row coincides with a chosen center: any row will do
            idx = int(torch.randint(m, (1,), generator=gen))
        centers = torch.cat([centers, x[idx:idx + 1]], 0)
        d_min = torch.minimum(d_min, _sq_dists(x, centers[-1:], x_sq)[:, 0])
    labels = _sq_dists(x, centers, x_sq).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        nonempty = counts > 0
        centers = torch.where(nonempty[:, None], sums / counts.clamp_min(1)[:, None], centers)
        new = _sq_dists(x, centers, x_sq).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels.cpu()


def _subspace_fit(x: Tensor, labels: Tensor, k: int, j: int, old: Tensor | None) -> tuple[Tensor, float]:
    """Best j-dim linear subspace per cluster (top-j right singular vectors of its rows) and the objective.

    Returns bases (k, n, j) (zero-padded when a cluster has fewer than j directions) and Σ_c Σ_{i>j} σ_{c,i}²
    = Σ_rows ||x - x V_c V_cᵀ||². An empty cluster keeps its previous basis (``old``) so it can win rows back.
    """
    n = x.shape[1]
    bases = x.new_zeros(k, n, j)
    obj = 0.0
    lab = labels.to(x.device)
    for c in range(k):
        rows = x[lab == c]
        if rows.shape[0] == 0:
            if old is not None:
                bases[c] = old[c]
            continue
        svd = full_svd(rows)
        jj = min(j, svd.p)
        bases[c, :, :jj] = svd.v[:, :jj]
        obj += svd.tail_energy(jj)
    return bases, obj


def projective_objective(w: Tensor, labels: Tensor, rank: int) -> float:
    """Σ_c (squared distance of cluster c's rows to their best ``rank``-dim linear subspace), float64.

    This is what projective clustering minimises; it equals the squared Frobenius error of the clustered
    rank-``rank`` reconstruction.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return _subspace_fit(w.detach().float(), labels, int(labels.max()) + 1, rank, None)[1]


def _projective_labels(x: Tensor, k: int, j: int, init: Tensor, iters: int) -> Tensor:
    """Alternating projective clustering (Maalouf et al., ICLR 2021): assign every row to the subspace that
    reconstructs it best, refit each subspace by SVD, repeat. Both steps can only lower the objective in exact
    arithmetic; we still keep the best labelling seen so round-off can never make the result worse than init.
    """
    x_sq = (x * x).sum(1)
    labels = init.clone()
    bases, obj = _subspace_fit(x, labels, k, j, None)
    best_labels, best_obj = labels.clone(), obj
    tol = 1e-6 * x_sq.clamp_min(1e-30)     # a row moves only for a real gain: avoids oscillating on ties
    for _ in range(iters):
        # ||x V_c||² per row and cluster (larger = smaller residual ||x||² - ||x V_c||²); one GEMM per cluster
        # keeps memory at (m, j) instead of (m, k, j).
        score = torch.stack([(x @ bases[c]).square().sum(1) for c in range(k)], 1)     # (m, k)
        cur = score.gather(1, labels.to(x.device)[:, None])[:, 0]
        top, arg = score.max(1)
        new = torch.where(top > cur + tol, arg, labels.to(x.device)).cpu()
        if torch.equal(new, labels):
            break
        labels = new
        bases, obj = _subspace_fit(x, labels, k, j, bases)
        if obj < best_obj:
            best_labels, best_obj = labels.clone(), obj
        else:       # no progress (only possible through round-off): stop, the best is kept
            break
    return best_labels


def _sampled_subspace_labels(x: Tensor, k: int, j: int, gen: torch.Generator) -> Tensor:
    """RANSAC-style start for projective clustering: k subspaces each spanned by j random rows, rows assigned
    to the best one. Unlike a partition-based start it can land each subspace inside one true cluster."""
    m = x.shape[0]
    pick = torch.randperm(m, generator=gen)
    bases = x.new_zeros(k, x.shape[1], j)
    for c in range(k):
        rows = x[pick[(c * j) % m: (c * j) % m + j].to(x.device)]          # (≤j, n)
        q = torch.linalg.qr(rows.T)[0]                                        # (n, ≤j) orthonormal span
        bases[c, :, :q.shape[1]] = q
    score = torch.stack([(x @ bases[c]).square().sum(1) for c in range(k)], 1)
    return score.argmax(1).cpu()


def assign_clusters(w: Tensor, k: int, method: str = "block", *, rank: int | None = None, seed: int = 0,
                    iters: int | None = None, init: str = "kmeans", restarts: int = 3) -> Tensor:
    """Cluster the m rows of ``w`` (m, n) into ``k`` groups → labels (m,) int64 in [0, k). Clusters may be empty.

    method:
      * ``"block"``      contiguous, nearly equal row blocks (C2I's "simple block splitting");
      * ``"kmeans"``     Euclidean k-means on rows, k-means++ seeding from ``seed`` (default iters 50);
      * ``"projective"`` k linear subspaces of dimension ``rank`` (required), alternating assignment / SVD
                         refit (default iters 20 per run) from ``init`` ("kmeans" or "block") labels, plus
                         ``restarts`` runs from randomly sampled subspaces (seeded); the labelling with the
                         lowest objective wins, so the result is never worse than ``init``. Alternating
                         minimisation stalls in local minima; the restarts are what makes it find planted
                         subspaces. Cost: (1 + restarts) × iters × k SVDs of a cluster's rows at most.
    """
    if w.dim() != 2:
        raise C2IError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    m, n = w.shape
    k = _check_k(k, m)
    if method not in CLUSTER_METHODS:
        raise C2IError(f"unknown clustering method {method!r}; choose one of {', '.join(CLUSTER_METHODS)}")
    if method == "block" or k == 1:
        return _block_labels(m, k)
    x = w.detach().float()
    if count_nonfinite(x):
        raise C2IError(f"cannot cluster a {m}x{n} matrix with NaN/Inf entries")
    if method == "kmeans":
        return _kmeans_labels(x, k, seed, 50 if iters is None else iters)
    if rank is None or isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise C2IError(f"projective clustering needs the subspace dimension rank >= 1, got {rank!r}")
    if init == "kmeans":
        start = _kmeans_labels(x, k, seed, 50)
    elif init == "block":
        start = _block_labels(m, k)
    else:
        raise C2IError(f"unknown projective init {init!r}; choose 'kmeans' or 'block'")
    j, its = min(rank, n), 20 if iters is None else iters
    best = _projective_labels(x, k, j, start, its)
    best_obj = _subspace_fit(x, best, k, j, None)[1]
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    for _ in range(max(0, restarts)):
        lab = _projective_labels(x, k, j, _sampled_subspace_labels(x, k, j, gen), its)
        obj = _subspace_fit(x, lab, k, j, None)[1]
        if obj < best_obj:
            best, best_obj = lab, obj
    return best


# ---------------------------------------------------------------------------------------------------------
# Convenience and first-order estimates
# ---------------------------------------------------------------------------------------------------------
def decompose(w: Tensor, rho: float, n_clusters: int = 1, method: str = "block", seed: int = 0,
              svd: SVD | None = None, *, name: str | None = None) -> LowRankFactors | ClusteredFactors:
    """Factors of ``w`` (m, n) at rank fraction ρ (fp32).

    k = 1 → rank-``rank_for(ρ, m, n)`` truncated SVD (reusing ``svd`` when given). k > 1 → rows clustered with
    ``method``, each cluster truncated at ``rank_for(ρ, |c|, n)``. Projective clustering uses the per-cluster
    rank of an equal split, ``rank_for(ρ, ceil(m/k), n)``, as its subspace dimension.
    """
    m, n = w.shape
    n_clusters = _check_k(n_clusters, m)
    rank_for(rho, m, n)   # validate ρ before any expensive work
    if n_clusters == 1:
        if svd is None:
            svd = full_svd(w, name=name)
        elif svd.shape != (m, n):
            raise C2IError(f"SVD of shape {svd.shape} does not match weight {m}x{n}")
        return svd.truncate(rank_for(rho, m, n))
    labels = assign_clusters(w, n_clusters, method, rank=rank_for(rho, math.ceil(m / n_clusters), n), seed=seed)
    return ClusteredSVD.fit(w, labels, n_clusters, name=name).factors(rho)


def first_order_delta(grad: Tensor, w: Tensor, w_hat: Tensor) -> float:
    """⟨G, Ŵ − W⟩ accumulated in float64: the first-order loss change of replacing W by Ŵ (all (m, n))."""
    return float((grad.detach().double() * (w_hat.detach().double() - w.detach().double())).sum())


def truncation_delta(svd: SVD, g_sigma: Tensor, rank: int) -> float:
    """First-order loss change of truncating to ``rank``: −Σ_{i>=rank} σ_i g_i (float64).

    ``g_sigma`` (p,) holds g_i = u_iᵀ G v_i = ∂L/∂σ_i. Equal to :func:`first_order_delta` with Ŵ the truncation.
    """
    return -float((svd.s[rank:].double() * g_sigma[rank:].double().to(svd.s.device)).sum())
