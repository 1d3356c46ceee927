"""Factors: plain and clustered low-rank factors, per-cluster SVDs, and :func:`fit`, the one way factors are
made from a weight and an :class:`~c2i_fast.plan.Edit`. All math in fp32. The SVD and the rank rule live in
:mod:`c2i_fast.svd`, row clustering in :mod:`c2i_fast.clustering`.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from .clustering import (CLUSTER_METHODS, KMEANS_ITERS, PROJECTIVE_ITERS, PROJECTIVE_RESTARTS,  # noqa: F401
                         assign_clusters, check_k, membership, projective_objective)
from .errors import C2IError
from .svd import (SVD, GramEigh, LowRankFactors, count_nonfinite, full_svd, gram_eigh,  # noqa: F401  (this module's API too)
                  rank_for)

if TYPE_CHECKING:
    from .plan import Edit


# ---------------------------------------------------------------------------------------------------------
# Clustered factors
# ---------------------------------------------------------------------------------------------------------
class ClusterLayout:
    """k, r_c and |c| read from ``row_offsets`` (k+1,) and ``rank_offsets`` (k+1,): clustered factors and the
    clustered module share this layout."""

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


@dataclass
class ClusteredFactors(ClusterLayout):
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


def _cluster_svds(w32: Tensor, row_index: Tensor, row_offsets: Tensor, name: str | None) -> list[SVD]:
    """The thin SVD of each cluster's rows of w32 (m, n), rows in ``row_index`` order (empty: p = 0)."""
    ri = row_index.to(w32.device)
    out = []
    for c in range(row_offsets.shape[0] - 1):
        r0, r1 = int(row_offsets[c]), int(row_offsets[c + 1])
        out.append(full_svd(w32[ri[r0:r1]], name=f"{name}[cluster {c}]" if name else None))
    return out


class ClusteredSVD:
    """Per-cluster thin SVDs of W's row blocks, computed once; :meth:`factors` slices them for any ρ.

    Attributes: ``shape`` (m, n); ``labels`` (m,) int64; ``row_index`` (m,), ``row_offsets`` (k+1,) int64
    (rows of cluster c in ascending original order); ``svds`` list of k :class:`SVD` (p_c = 0 for an empty
    cluster).

    :meth:`fit` takes the SVDs at once. :meth:`estimate` (the search's candidates) scores every ρ from each
    cluster's Gram eigendecomposition and takes the SVDs only when ``svds`` is first read, i.e. when one of its
    candidates is scored or applied: most fits of a search are never scored.
    """

    def __init__(self, shape: tuple[int, int], labels: Tensor, row_index: Tensor, row_offsets: Tensor,
                 svds: list[SVD] | None, *, weight: Tensor | None = None, name: str | None = None):
        self.shape = shape
        self.labels = labels
        self.row_index = row_index
        self.row_offsets = row_offsets
        self._svds = svds
        self._weight = weight         # W (m, n) fp32 while the SVDs are not taken yet
        self._name = name
        self._sigma_grads: tuple[Tensor, list[Tensor]] | None = None    # (G, per-cluster g), see sigma_grads
        self._spectra: tuple[Tensor, list[Tensor], list[Tensor]] | None = None   # (G, per-cluster σg, λ)
        if svds is None and weight is None:
            raise C2IError("a ClusteredSVD needs its SVDs or the weight to take them from")

    @property
    def n_clusters(self) -> int:
        return self.row_offsets.shape[0] - 1

    @property
    def cluster_sizes(self) -> list[int]:
        return torch.diff(self.row_offsets).tolist()

    @property
    def taken(self) -> bool:
        """Have the per-cluster SVDs been computed?"""
        return self._svds is not None

    @property
    def svds(self) -> list[SVD]:
        """The k per-cluster SVDs, taken on first use for a fit made by :meth:`estimate`."""
        if self._svds is None:
            self._svds = _cluster_svds(self._weight, self.row_index, self.row_offsets, self._name)
            self._weight = None
        return self._svds

    @staticmethod
    def _layout(shape: tuple[int, int], labels: Tensor, n_clusters: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """labels (m,) → (labels, row_index (m,), row_offsets (k+1,)) int64 on the CPU, checked."""
        m = shape[0]
        labels = torch.as_tensor(labels).to(device="cpu", dtype=torch.int64)
        if labels.shape != (m,):
            raise C2IError(f"labels must have shape ({m},), got {tuple(labels.shape)}")
        k = int(labels.max()) + 1 if n_clusters is None else n_clusters
        k = check_k(k, m)
        if int(labels.min()) < 0 or int(labels.max()) >= k:
            raise C2IError(f"cluster labels must lie in [0, {k}); got [{int(labels.min())}, {int(labels.max())}]")
        # Stable sort keeps each cluster's rows in ascending original order: a block clustering then has
        # row_index == arange(m), the identity permutation.
        row_index = torch.sort(labels, stable=True).indices
        row_offsets = torch.zeros(k + 1, dtype=torch.int64)
        row_offsets[1:] = torch.cumsum(torch.bincount(labels, minlength=k), 0)
        return labels, row_index, row_offsets

    @classmethod
    def fit(cls, w: Tensor, labels: Tensor, n_clusters: int | None = None, *,
            name: str | None = None) -> "ClusteredSVD":
        """SVD of each cluster's rows. w: (m, n); labels: (m,) ints in [0, k). k defaults to labels.max()+1."""
        labels, row_index, row_offsets = cls._layout(tuple(w.shape), labels, n_clusters)
        svds = _cluster_svds(w.detach().float(), row_index, row_offsets, name)
        return cls(tuple(w.shape), labels, row_index, row_offsets, svds)

    @classmethod
    def estimate(cls, w: Tensor, labels: Tensor, n_clusters: int, grad: Tensor, *, name: str | None = None,
                 known: dict[bytes, GramEigh] | None = None) -> "ClusteredSVD":
        """A fit whose :meth:`truncation_delta` for ``grad`` (m, n) comes from each cluster's Gram
        eigendecomposition (:class:`~c2i_fast.svd.GramEigh`; ``known``: those projective clustering took of
        these clusters, by :func:`~c2i_fast.clustering.membership`) and whose SVDs are taken from ``w`` (m, n),
        which must not change meanwhile, when first needed. The scores equal :meth:`fit`'s up to round-off;
        the factors are :meth:`fit`'s to the bit."""
        labels, row_index, row_offsets = cls._layout(tuple(w.shape), labels, n_clusters)
        w32, g32 = w.detach().float(), grad.detach().float()
        out = cls(tuple(w.shape), labels, row_index, row_offsets, None, weight=w32, name=name)
        ri = row_index.to(w32.device)
        sg, lam = [], []
        for c in range(out.n_clusters):
            r0, r1 = int(row_offsets[c]), int(row_offsets[c + 1])
            rows = w32[ri[r0:r1]]
            ge = (known or {}).get(membership(labels, c)) if r1 > r0 else None
            ge = ge if ge is not None else gram_eigh(rows)
            sg.append(ge.sigma_g(rows, g32[ri[r0:r1]]))
            lam.append(ge.lam)
        out._spectra = (grad, sg, lam)
        return out

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
        """||W - Ŵ||_F² at ρ: Σ_c Σ_{i>=r_c} σ_{c,i}² (float64; from the Gram spectra until the SVDs are taken)."""
        if self._svds is None:
            return sum(float(lam[r:].sum()) for lam, r in zip(self._spectra[2], self.ranks_for(rho)))
        return sum(svd.tail_energy(r) for svd, r in zip(self.svds, self.ranks_for(rho)))

    def truncation_delta(self, grad: Tensor, rho: float) -> float:
        """First-order loss change ⟨G, Ŵ − W⟩ = −Σ_c Σ_{i>=r_c} σ_{c,i} g_{c,i}, g_{c,i} = u_{c,i}ᵀ G_c v_{c,i}.

        grad: G = ∂L/∂W (m, n) in W's layout. One GEMM per cluster, done once per ``grad`` and kept for the
        next ρ (every ρ reads a tail of the same g_c); no dense Ŵ is formed. A fit made by :meth:`estimate` for
        this ``grad`` sums its Gram spectra's σ_{c,i} g_{c,i} instead (no SVD).
        """
        if self._spectra is not None and self._spectra[0] is grad:
            return -sum(float(sg[r:].sum()) for sg, r in zip(self._spectra[1], self.ranks_for(rho)))
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
# Convenience and first-order estimates
# ---------------------------------------------------------------------------------------------------------
def subspace_rank(edit: "Edit", m: int, n: int) -> int:
    """Projective clustering's subspace dimension for ``edit`` on an (m, n) weight: the edit's own
    ``subspace_rank`` when it records one, else the per-cluster rank of an equal split at its ρ,
    ``rank_for(ρ, ceil(m / k), n)``."""
    if edit.subspace_rank is not None:
        return int(edit.subspace_rank)
    return rank_for(edit.rank_fraction, math.ceil(m / edit.n_clusters), n)


def cluster_labels(w: Tensor, edit: "Edit", fits: dict | None = None) -> Tensor:
    """(m,) cluster of each row of ``w`` (m, n) as ``edit`` prescribes: its k, method, seed, and (None = the
    defaults KMEANS_ITERS, PROJECTIVE_ITERS, PROJECTIVE_RESTARTS) iterations and restarts. ``fits``: see
    :func:`c2i_fast.clustering.assign_clusters`."""
    m, n = w.shape
    rank = subspace_rank(edit, m, n) if edit.method == "projective" else None
    restarts = PROJECTIVE_RESTARTS if edit.restarts is None else edit.restarts
    return assign_clusters(w, edit.n_clusters, edit.method, rank=rank, seed=edit.seed, iters=edit.iters,
                           restarts=restarts, fits=fits)


def fit_clusters(w: Tensor, edit: "Edit", *, name: str | None = None) -> ClusteredSVD:
    """The rows of ``w`` (m, n) clustered as ``edit`` prescribes, each cluster's SVD taken: serves every ρ."""
    return ClusteredSVD.fit(w, cluster_labels(w, edit), edit.n_clusters, name=name)


def fit(w: Tensor | None, edit: "Edit", source: SVD | ClusteredSVD | None = None, *,
        name: str | None = None) -> LowRankFactors | ClusteredFactors:
    """The factors of ``edit`` for weight ``w`` (m, n), fp32: the only way factors are made from a weight.

    k = 1: the rank-``rank_for(ρ, m, n)`` truncated SVD. k > 1: the rows clustered by :func:`cluster_labels`,
    each cluster truncated at ``rank_for(ρ, |c|, n)``. ``source`` — the :class:`SVD` of ``w`` (k = 1) or the
    :class:`ClusteredSVD` that :func:`fit_clusters` returns for this edit's clustering (k > 1) — spares the
    decomposition (``w`` may then be None); the search passes the one it scored, ``factorize_`` and
    ``c2i apply`` recompute it, and both give the same bits.
    """
    k = edit.n_clusters
    if source is None and w is None:
        raise C2IError("fit needs the weight or a precomputed decomposition")
    if w is not None:
        check_k(k, w.shape[0])
        if source is not None and tuple(source.shape) != tuple(w.shape):
            raise C2IError(f"decomposition of shape {tuple(source.shape)} does not match "
                           f"{'weight of ' + repr(name) if name else 'the weight'} {w.shape[0]}x{w.shape[1]}")
    if k == 1:
        if source is not None and not isinstance(source, SVD):
            raise C2IError(f"a plain edit needs an SVD, got {type(source).__name__}")
        svd = source if source is not None else full_svd(w, name=name)
        return svd.truncate(rank_for(edit.rank_fraction, *svd.shape))
    if source is not None and not (isinstance(source, ClusteredSVD) and source.n_clusters == k):
        raise C2IError(f"a {k}-cluster edit needs a ClusteredSVD with {k} clusters, got {type(source).__name__}")
    fitted = source if source is not None else fit_clusters(w, edit, name=name)
    return fitted.factors(edit.rank_fraction)


def decompose(w: Tensor, rho: float, n_clusters: int = 1, method: str = "block", seed: int = 0,
              svd: SVD | None = None, *, name: str | None = None) -> LowRankFactors | ClusteredFactors:
    """Factors of ``w`` (m, n) at rank fraction ρ with the clustering's defaults: :func:`fit` of
    ``Edit(name, ρ, k, method, seed)`` (``svd`` reused for k = 1)."""
    from .plan import Edit          # plan validates with this module's rank_for: imported here, not at the top
    m, n = w.shape
    edit = Edit(name or "matrix", rho, check_k(n_clusters, m), method, seed)
    return fit(w, edit, svd if n_clusters == 1 else None, name=name)


def first_order_delta(grad: Tensor, w: Tensor, w_hat: Tensor) -> float:
    """⟨G, Ŵ − W⟩ accumulated in float64: the first-order loss change of replacing W by Ŵ (all (m, n))."""
    return float((grad.detach().double() * (w_hat.detach().double() - w.detach().double())).sum())


def truncation_delta(svd: SVD, g_sigma: Tensor, rank: int) -> float:
    """First-order loss change of truncating to ``rank``: −Σ_{i>=rank} σ_i g_i (float64).

    ``g_sigma`` (p,) holds g_i = u_iᵀ G v_i = ∂L/∂σ_i. Equal to :func:`first_order_delta` with Ŵ the truncation.
    """
    return -float((svd.s[rank:].double() * g_sigma[rank:].double().to(svd.s.device)).sum())
