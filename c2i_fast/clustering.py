"""Row clustering for clustered factorizations: contiguous blocks, k-means, projective clustering.

Every function returns labels (m,) int64 in [0, k) for the rows of a weight (m, n); clusters may be empty.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .errors import C2IError
from .svd import GramEigh, count_nonfinite, full_svd, gram_eigh

CLUSTER_METHODS = ("block", "kmeans", "projective")
KMEANS_ITERS = 50            # Lloyd iterations (it stops earlier once the labels no longer change)
PROJECTIVE_ITERS = 20        # alternating assignment / refit iterations per run
PROJECTIVE_RESTARTS = 3      # extra runs from sampled subspaces

def check_k(k: int, m: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= m:
        raise C2IError(f"n_clusters={k!r} must be an integer with 1 <= n_clusters <= {m} (the number of rows)")
    return int(k)



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


def membership(labels: Tensor, c: int) -> bytes:
    """Which rows are in cluster ``c`` (labels (m,) on the CPU), as bytes: the key of a cluster's fit in ``fits``."""
    return (labels == c).numpy().tobytes()


def _subspace_fit(x: Tensor, labels: Tensor, k: int, j: int, old: Tensor | None,
                  fits: dict[bytes, GramEigh] | None = None) -> tuple[Tensor, float, dict[bytes, GramEigh]]:
    """Best j-dim linear subspace per cluster (the span of the top-j right singular vectors of its rows) and the
    objective, from each cluster's Gram eigendecomposition (:func:`c2i_fast.svd.gram_eigh`: a third of an SVD's
    cost, and the subspace is all the assignment needs).

    Returns bases (k, n, j) (zero-padded when a cluster has fewer than j directions), Σ_c Σ_{i>j} σ_{c,i}²
    = Σ_rows ||x - x V_c V_cᵀ||², and each non-empty cluster's :class:`GramEigh` by :func:`membership`. An empty
    cluster keeps its previous basis (``old``) so it can win rows back. A cluster whose rows are a key of
    ``fits`` (an earlier fit on the same ``x``) reuses that eigendecomposition.
    """
    n = x.shape[1]
    bases = x.new_zeros(k, n, j)
    obj = 0.0
    labels = labels.cpu()
    lab = labels.to(x.device)
    new: dict[bytes, GramEigh] = {}
    for c in range(k):
        key = membership(labels, c)
        rows = x[lab == c]
        if rows.shape[0] == 0:
            if old is not None:
                bases[c] = old[c]
            continue
        ge = (fits or {}).get(key)
        if ge is None:
            ge = gram_eigh(rows)
        new[key] = ge
        basis = ge.top_basis(rows, j)
        bases[c, :, :basis.shape[1]] = basis
        obj += ge.tail(basis.shape[1])
    return bases, obj, new


def projective_objective(w: Tensor, labels: Tensor, rank: int) -> float:
    """Σ_c (squared distance of cluster c's rows to their best ``rank``-dim linear subspace), float64, from each
    cluster's SVD.

    This is what projective clustering minimises; it equals the squared Frobenius error of the clustered
    rank-``rank`` reconstruction.
    """
    x = w.detach().float()
    labels = torch.as_tensor(labels, dtype=torch.int64).to(x.device)
    total = 0.0
    for c in range(int(labels.max()) + 1):
        rows = x[labels == c]
        if rows.shape[0]:
            svd = full_svd(rows)
            total += svd.tail_energy(min(rank, svd.p))
    return total


def _projective_labels(x: Tensor, k: int, j: int, init: Tensor, iters: int
                       ) -> tuple[Tensor, float, dict[bytes, GramEigh]]:
    """Alternating projective clustering (Maalouf et al., ICLR 2021): assign every row to the subspace that
    reconstructs it best, refit each subspace (:func:`_subspace_fit`), repeat. Both steps can only lower the
    objective in exact arithmetic; we still keep the best labelling seen so round-off can never make the result
    worse than init. Returns the best labels, their objective and their clusters' Gram eigendecompositions (a
    cluster no row left or joined since the last refit keeps its own).
    """
    x_sq = (x * x).sum(1)
    labels = init.clone()
    bases, obj, fits = _subspace_fit(x, labels, k, j, None)
    best_labels, best_obj, best_fits = labels.clone(), obj, fits
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
        bases, obj, fits = _subspace_fit(x, labels, k, j, bases, fits)
        if obj < best_obj:
            best_labels, best_obj, best_fits = labels.clone(), obj, fits
        else:       # no progress (only possible through round-off): stop, the best is kept
            break
    return best_labels, best_obj, best_fits


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
                    iters: int | None = None, init: str = "kmeans", restarts: int = PROJECTIVE_RESTARTS,
                    fits: dict[bytes, GramEigh] | None = None) -> Tensor:
    """Cluster the m rows of ``w`` (m, n) into ``k`` groups → labels (m,) int64 in [0, k). Clusters may be empty.

    method:
      * ``"block"``      contiguous, nearly equal row blocks (C2I's "simple block splitting");
      * ``"kmeans"``     Euclidean k-means on rows, k-means++ seeding from ``seed`` (default iters 50);
      * ``"projective"`` k linear subspaces of dimension ``rank`` (required), alternating assignment / subspace
                         refit (default iters 20 per run) from ``init`` ("kmeans" or "block") labels, plus
                         ``restarts`` runs from randomly sampled subspaces (seeded); the labelling with the
                         lowest objective wins, so the result is never worse than ``init``. Alternating
                         minimisation stalls in local minima; the restarts are what makes it find planted
                         subspaces. Cost: (1 + restarts) × iters × k Gram eigendecompositions of a
                         cluster's rows at most (no SVD).

    ``fits`` (a dict, projective only) receives the :class:`~c2i_fast.svd.GramEigh` of every cluster of the
    returned labels, by :func:`membership`: :meth:`c2i_fast.decompose.ClusteredSVD.estimate` scores the
    candidates from them without computing them again.
    """
    if w.dim() != 2:
        raise C2IError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    m, n = w.shape
    k = check_k(k, m)
    if method not in CLUSTER_METHODS:
        raise C2IError(f"unknown clustering method {method!r}; choose one of {', '.join(CLUSTER_METHODS)}")
    if method == "block" or k == 1:
        return _block_labels(m, k)
    x = w.detach().float()
    if count_nonfinite(x):
        raise C2IError(f"cannot cluster a {m}x{n} matrix with NaN/Inf entries")
    if method == "kmeans":
        return _kmeans_labels(x, k, seed, KMEANS_ITERS if iters is None else iters)
    if rank is None or isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise C2IError(f"projective clustering needs the subspace dimension rank >= 1, got {rank!r}")
    if init == "kmeans":
        start = _kmeans_labels(x, k, seed, KMEANS_ITERS)
    elif init == "block":
        start = _block_labels(m, k)
    else:
        raise C2IError(f"unknown projective init {init!r}; choose 'kmeans' or 'block'")
    j, its = min(rank, n), PROJECTIVE_ITERS if iters is None else iters
    best, best_obj, best_fits = _projective_labels(x, k, j, start, its)
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    for _ in range(max(0, restarts)):
        lab, obj, lab_fits = _projective_labels(x, k, j, _sampled_subspace_labels(x, k, j, gen), its)
        if obj < best_obj:
            best, best_obj, best_fits = lab, obj, lab_fits
    if fits is not None:
        fits.update(best_fits)
    return best


