"""Decompositions: SVD, rank choice, clustering, per-cluster SVD, first-order estimates.

Errors are compared with float64 references; "round-off" tolerances are relative to ||W||_F (fp32 ≈ 1e-5).
"""
import math

import pytest
import torch

from c2i_fast.decompose import (SVD, ClusteredFactors, ClusteredSVD, LowRankFactors, assign_clusters,
                                decompose, first_order_delta, full_svd, projective_objective, rank_for,
                                truncation_delta)
from c2i_fast.errors import C2IError
from c2i_fast.kernels import clustered_lowrank_matmul

SHAPES = [(1, 5), (5, 1), (63, 500), (500, 63), (64, 64)]
METHODS = ["block", "kmeans", "projective"]


def _w(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g)


def _tail_err(block: torch.Tensor, rank: int) -> float:
    """Eckart–Young optimum ||B - B_r||_F from a float64 SVD."""
    s = torch.linalg.svdvals(block.double())
    return float(s[rank:].pow(2).sum().sqrt())


def _fro(a, b) -> float:
    return float((a.double() - b.double()).norm())


# ------------------------------------------------------------------------------------------------ full_svd
@pytest.mark.parametrize("shape", SHAPES)
def test_full_svd_is_a_thin_svd(shape):
    w = _w(*shape)
    s = full_svd(w)
    p = min(shape)
    assert s.u.shape == (shape[0], p) and s.s.shape == (p,) and s.v.shape == (shape[1], p)
    assert s.u.dtype == s.s.dtype == s.v.dtype == torch.float32
    assert _fro(s.u * s.s @ s.v.T, w) <= 1e-5 * float(w.norm())
    assert torch.all(s.s[:-1] >= s.s[1:])
    eye = torch.eye(p, dtype=torch.float64)
    assert torch.allclose(s.u.double().T @ s.u.double(), eye, atol=1e-5)
    assert torch.allclose(s.v.double().T @ s.v.double(), eye, atol=1e-5)


def test_full_svd_casts_half_input_to_fp32():
    s = full_svd(_w(20, 30).half())
    assert s.u.dtype == torch.float32


def test_full_svd_nonfinite_names_matrix():
    w = _w(8, 8)
    w[3, 4] = float("nan")
    with pytest.raises(C2IError, match="model.layers.3.mlp.up_proj"):
        full_svd(w, name="model.layers.3.mlp.up_proj")
    w[3, 4] = float("inf")
    with pytest.raises(C2IError, match="NaN/Inf"):
        full_svd(w)


# ------------------------------------------------------------------------------------------------ rank_for
def test_rank_for_values():
    assert rank_for(0.1, 1536, 576) == 57          # LASER: int(576 * 0.1)
    assert rank_for(0.01, 4096, 16384) == 40       # LASER's GPT-J example
    assert rank_for(0.01, 63, 500) == 1            # floor is 0, raised to 1
    assert rank_for(1.0, 63, 500) == 63
    assert rank_for(0.5, 0, 500) == 0              # empty cluster
    assert rank_for(1, 10, 10) == 10


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_rank_for_rejects_bad_rho(rho):
    with pytest.raises(C2IError, match="must be in"):
        rank_for(rho, 10, 10)


# ------------------------------------------------------------------------------------------------ truncation
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rho", [0.01, 0.1, 0.5, 1.0])
def test_truncation_error_is_eckart_young_optimum(shape, rho):
    w = _w(*shape, seed=1)
    f = decompose(w, rho)
    assert isinstance(f, LowRankFactors)
    r = rank_for(rho, *shape)
    assert f.rank == r and f.u.shape == (shape[0], r) and f.v.shape == (shape[1], r)
    err = _fro(f.reconstruct(), w)
    assert abs(err - _tail_err(w, r)) <= 2e-5 * float(w.norm())
    if rho == 1.0:
        assert err <= 1e-5 * float(w.norm())
    assert f.num_params() == (shape[0] + shape[1]) * r
    assert f.nbytes() == 4 * f.num_params()


def test_truncation_ranks_are_prefixes_of_one_svd():
    w = _w(63, 500)
    s = full_svd(w)
    small, big = s.truncate(rank_for(0.2, 63, 500)), s.truncate(rank_for(0.5, 63, 500))
    r = small.rank
    assert torch.equal(small.u, big.u[:, :r]) and torch.equal(small.v, big.v[:, :r])
    # decompose reuses a given SVD instead of recomputing it
    assert torch.equal(decompose(w, 0.2, svd=s).u, small.u)
    with pytest.raises(C2IError):
        decompose(w.T, 0.2, svd=s)


def test_svd_truncate_rejects_bad_rank():
    s = full_svd(_w(5, 7))
    with pytest.raises(C2IError):
        s.truncate(6)


# ------------------------------------------------------------------------------------------------ clustering
def test_block_labels_are_contiguous_nearly_equal_chunks():
    labels = assign_clusters(_w(10, 3), 4, "block")
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert labels.dtype == torch.int64


@pytest.mark.parametrize("method", METHODS)
def test_bad_n_clusters_raises(method):
    w = _w(6, 4)
    for k in (0, 7, -1):
        with pytest.raises(C2IError, match="n_clusters"):
            assign_clusters(w, k, method, rank=1)
    with pytest.raises(C2IError, match="n_clusters"):
        decompose(w, 0.5, n_clusters=7, method=method)


def test_unknown_method_and_missing_projective_rank():
    with pytest.raises(C2IError, match="method"):
        assign_clusters(_w(6, 4), 2, "spectral")
    with pytest.raises(C2IError, match="rank"):
        assign_clusters(_w(6, 4), 2, "projective")


def _subspace_data(k=3, rows_per=40, n=30, j=2, seed=0, noise=1e-3):
    """Rows drawn from k random j-dim subspaces, interleaved so contiguous blocks mix them."""
    g = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(n, j, generator=g))[0] for _ in range(k)]
    rows, truth = [], []
    for i in range(rows_per * k):
        c = i % k
        rows.append(torch.randn(j, generator=g) @ bases[c].T * (1 + i % 5))
        truth.append(c)
    w = torch.stack(rows) + noise * torch.randn(rows_per * k, n, generator=g)
    return w, torch.tensor(truth)


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(4, 20, generator=g) * 10
    truth = torch.arange(80) % 4
    w = centers[truth] + 0.1 * torch.randn(80, 20, generator=g)
    a = assign_clusters(w, 4, "kmeans", seed=7)
    assert torch.equal(a, assign_clusters(w, 4, "kmeans", seed=7))
    assert _same_partition(a, truth)


def test_projective_does_not_increase_objective_and_finds_subspaces():
    w, truth = _subspace_data()
    j = 2
    block = assign_clusters(w, 3, "block")
    for init in ("block", "kmeans"):
        start = block if init == "block" else assign_clusters(w, 3, "kmeans", seed=0)
        lab = assign_clusters(w, 3, "projective", rank=j, seed=0, init=init)
        assert projective_objective(w, lab, j) <= projective_objective(w, start, j) * (1 + 1e-6)
        assert torch.equal(lab, assign_clusters(w, 3, "projective", rank=j, seed=0, init=init))
    # Alternating minimisation alone stalls in a local minimum from blocks; random-subspace restarts find the
    # planted subspaces, which then fit to the noise level (contiguous blocks mix them and cannot).
    lab = assign_clusters(w, 3, "projective", rank=j, seed=0, init="block", restarts=8)
    assert projective_objective(w, lab, j) < 1e-2 * projective_objective(w, block, j)
    assert _same_partition(lab, truth)


def test_projective_clustering_takes_no_svd_and_the_fit_one_per_cluster(monkeypatch):
    """Projective clustering refits its subspaces from Gram eigendecompositions (no SVD) and hands them on by
    cluster; fit_clusters then takes exactly one SVD per cluster."""
    import c2i_fast.clustering as clustering
    import c2i_fast.decompose as decompose
    from c2i_fast.decompose import fit_clusters
    from c2i_fast.plan import Edit
    from c2i_fast.svd import GramEigh
    w, _ = _subspace_data(seed=2)
    calls = []

    def counting(rows, *a, **k):
        calls.append(tuple(rows.shape))
        return full_svd(rows, *a, **k)
    monkeypatch.setattr(clustering, "full_svd", counting)
    monkeypatch.setattr(decompose, "full_svd", counting)
    for restarts in (0, 2):
        fits: dict = {}
        labels = assign_clusters(w, 3, "projective", rank=2, seed=0, iters=5, restarts=restarts, fits=fits)
        assert calls == [] and len(fits) == 3 and all(isinstance(f, GramEigh) for f in fits.values())
        fitted = fit_clusters(w, Edit("w", 0.1, 3, "projective", 0, subspace_rank=2, iters=5, restarts=restarts))
        assert len(calls) == 3 and torch.equal(fitted.labels, labels)
        calls.clear()


@pytest.mark.parametrize("shape", [(60, 24), (24, 60), (7, 7)])
def test_gram_eigh_answers_what_the_svd_does(shape):
    """σᵢgᵢ, tail energies and the top-j subspace from the smaller Gram match a float64 SVD, on both sides."""
    from c2i_fast.svd import gram_eigh
    w, g = _w(*shape, seed=3), _w(*shape, seed=4)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    ge = gram_eigh(w)
    assert ge.p == min(shape) and ge.lam.dtype == torch.float64
    scale = float(s[0] ** 2)
    assert torch.allclose(ge.lam, s ** 2, rtol=0, atol=1e-5 * scale)
    ref_sg = s * ((u.T @ g.double()) * vh).sum(1)                      # σᵢ uᵢᵀ G vᵢ
    assert torch.allclose(ge.sigma_g(w, g), ref_sg, rtol=0, atol=1e-4 * float(ref_sg.abs().max()))
    for r in (0, 1, min(shape) // 2):
        assert math.isclose(ge.tail(r), float((s[r:] ** 2).sum()), rel_tol=1e-4, abs_tol=1e-5 * scale)
    j = max(1, min(shape) // 3)
    b = ge.top_basis(w, j).double()
    assert b.shape == (shape[1], j) and torch.allclose(b.T @ b, torch.eye(j, dtype=torch.float64), atol=1e-5)
    ref = vh[:j].T
    assert torch.allclose(b @ b.T, ref @ ref.T, atol=1e-4)              # the same subspace (its basis may rotate)
    empty = gram_eigh(w[:0])
    assert empty.p == 0 and empty.sigma_g(w[:0], g[:0]).shape == (0,)


@pytest.mark.parametrize("method", METHODS)
def test_estimated_fit_scores_like_the_fit_and_takes_its_svds_on_first_use(monkeypatch, method):
    """ClusteredSVD.estimate: every ρ's ΔL̂ and tail energy as the SVD-based fit's up to round-off, no SVD until
    the factors are asked for, then the fit's factors to the bit."""
    import c2i_fast.decompose as decompose
    w, g = _w(90, 40, seed=5), _w(90, 40, seed=6)
    fits: dict = {}
    labels = assign_clusters(w, 4, method, rank=3, seed=0, iters=5, restarts=0, fits=fits)
    calls = []

    def counting(rows, *a, **k):
        calls.append(1)
        return full_svd(rows, *a, **k)
    monkeypatch.setattr(decompose, "full_svd", counting)
    est = ClusteredSVD.estimate(w, labels, 4, g, known=fits)
    assert calls == [] and not est.taken
    fresh = ClusteredSVD.fit(w, labels, 4)
    calls.clear()
    scale = float(w.norm() * g.norm())
    for rho in (0.9, 0.5, 0.1, 0.01):
        assert math.isclose(est.truncation_delta(g, rho), fresh.truncation_delta(g, rho), rel_tol=1e-4,
                            abs_tol=1e-5 * scale)
        assert math.isclose(est.tail_energy(rho), fresh.tail_energy(rho), rel_tol=1e-4,
                            abs_tol=1e-5 * float(w.norm()) ** 2)
        ref = first_order_delta(g, w, fresh.factors(rho).reconstruct())
        assert math.isclose(est.truncation_delta(g, rho), ref, rel_tol=1e-3, abs_tol=1e-4 * scale)
    assert calls == [] and not est.taken
    for rho in (0.5, 0.1):
        assert torch.equal(est.factors(rho).reconstruct(), fresh.factors(rho).reconstruct())
    assert len(calls) == 4 and est.taken          # one SVD per cluster, once
    est.factors(0.9)
    assert len(calls) == 4


def test_projective_objective_equals_clustered_reconstruction_error():
    w, _ = _subspace_data(seed=1)
    lab = assign_clusters(w, 3, "projective", rank=2, init="block")
    cs = ClusteredSVD.fit(w, lab, 3)
    f = cs.factors_with_ranks([2, 2, 2])
    assert math.isclose(_fro(f.reconstruct(), w) ** 2, projective_objective(w, lab, 2), rel_tol=1e-3, abs_tol=1e-6)


# ------------------------------------------------------------------------------------------------ clustered SVD
@pytest.mark.parametrize("shape", [(63, 500), (500, 63), (64, 64)])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rho", [0.01, 0.3, 1.0])
def test_clustered_reconstruction_is_optimal_per_block(shape, method, rho):
    m, n = shape
    w = _w(m, n, seed=2)
    k = 4
    # one restart keeps projective cheap here: this test is about the factors, not the clustering quality
    labels = assign_clusters(w, k, method, rank=rank_for(rho, math.ceil(m / k), n), seed=0, restarts=1)
    cs = ClusteredSVD.fit(w, labels, k)
    f = cs.factors(rho)
    assert isinstance(f, ClusteredFactors) and f.shape == (m, n) and f.n_clusters == k
    w_hat = f.reconstruct()
    assert w_hat.shape == (m, n)
    total_opt = 0.0
    for c in range(k):
        rows = (labels == c).nonzero()[:, 0]
        r = rank_for(rho, len(rows), n)
        assert f.ranks[c] == r
        if len(rows) == 0:
            continue
        opt = _tail_err(w[rows], r)
        total_opt += opt ** 2
        assert abs(_fro(w_hat[rows], w[rows]) - opt) <= 2e-5 * float(w.norm())
    assert math.isclose(cs.tail_energy(rho), total_opt, rel_tol=1e-4, abs_tol=1e-6 * float(w.norm()) ** 2)
    if rho == 1.0:
        assert _fro(w_hat, w) <= 1e-5 * float(w.norm())
    # the clustered forward (reference kernel) agrees with the reconstruction
    x = _w(3, n, seed=9)
    y = clustered_lowrank_matmul(x, f.v_cat, f.u_packed, f.row_index, f.row_offsets, f.rank_offsets)
    assert _fro(y, x.double() @ w_hat.double().T) <= 1e-5 * float((x.double() @ w_hat.double().T).norm())


def test_clustered_metadata_layout():
    w = _w(10, 7)
    labels = torch.tensor([1, 0, 1, 2, 0, 1, 2, 2, 2, 0])
    f = ClusteredSVD.fit(w, labels, 3).factors(0.5)
    assert f.row_offsets.tolist() == [0, 3, 6, 10]
    assert f.row_index.tolist() == [1, 4, 9, 0, 2, 5, 3, 6, 7, 8]     # clusters in order, rows ascending
    assert f.ranks == [1, 1, 2] and f.rank_offsets.tolist() == [0, 1, 2, 4]
    assert f.v_cat.shape == (7, 4) and f.u_packed.shape == (10, 2)
    assert torch.all(f.u_packed[:6, 1] == 0)            # padding beyond r_c is zero
    assert torch.equal(f.labels(), labels)
    for t in (f.row_index, f.row_offsets, f.rank_offsets):
        assert t.dtype == torch.int64
    # honest sizes: every stored float value, plus int64 index bytes
    assert f.num_params() == 7 * 4 + 10 * 2
    assert f.num_effective_params() == (7 + 3) * 1 + (7 + 3) * 1 + (7 + 4) * 2
    assert f.index_nbytes() == 8 * (10 + 4 + 4)
    assert f.nbytes() == 4 * f.num_params() + f.index_nbytes()
    h = f.to(torch.float16)
    assert h.v_cat.dtype == h.u_packed.dtype == torch.float16 and h.row_index.dtype == torch.int64


def test_clustered_ranks_are_prefixes():
    w = _w(63, 500)
    cs = ClusteredSVD.fit(w, assign_clusters(w, 4, "kmeans"), 4)
    a, b = cs.factors(0.2), cs.factors(0.5)
    for c in range(4):
        ra, rb = a.ranks[c], b.ranks[c]
        ka, kb = a.rank_offsets[c].item(), b.rank_offsets[c].item()
        assert torch.equal(a.v_cat[:, ka:ka + ra], b.v_cat[:, kb:kb + ra])
        assert rb >= ra
    assert torch.equal(a.u_packed[:, :min(a.ranks)], b.u_packed[:, :min(a.ranks)])


def test_single_cluster_equals_plain_truncation():
    w = _w(63, 500)
    plain = decompose(w, 0.3)
    one = ClusteredSVD.fit(w, torch.zeros(63, dtype=torch.int64), 1).factors(0.3)
    assert one.ranks == [plain.rank]
    assert _fro(one.reconstruct(), plain.reconstruct()) <= 1e-5 * float(w.norm())
    assert isinstance(decompose(w, 0.3, n_clusters=1, method="kmeans"), LowRankFactors)


def test_every_row_its_own_cluster_is_exact():
    w = _w(12, 9)
    f = decompose(w, 0.01, n_clusters=12, method="block")
    assert f.ranks == [1] * 12
    assert _fro(f.reconstruct(), w) <= 1e-5 * float(w.norm())


def test_empty_clusters():
    w = _w(9, 6)
    labels = torch.tensor([0, 2, 0, 2, 2, 0, 0, 2, 2])     # clusters 1 and 3 empty
    cs = ClusteredSVD.fit(w, labels, 4)
    f = cs.factors(0.5)
    assert f.cluster_sizes == [4, 0, 5, 0] and f.ranks == [2, 0, 2, 0]
    for c, r in ((0, 2), (2, 2)):
        rows = (labels == c).nonzero()[:, 0]
        assert abs(_fro(f.reconstruct()[rows], w[rows]) - _tail_err(w[rows], r)) <= 2e-5 * float(w.norm())
    x = _w(2, 6, seed=4)
    y = clustered_lowrank_matmul(x, f.v_cat, f.u_packed, f.row_index, f.row_offsets, f.rank_offsets)
    assert _fro(y, x.double() @ f.reconstruct().double().T) <= 1e-5 * float(y.norm())
    with pytest.raises(C2IError):
        ClusteredSVD.fit(w, labels, 2)          # labels outside [0, k)


# ------------------------------------------------------------------------------------------------ first order
def test_truncation_delta_matches_first_order_delta():
    w, g = _w(40, 30), _w(40, 30, seed=5)
    s = full_svd(w)
    g_sigma = ((s.u.T @ g) * s.v.T).sum(1)              # diag(Uᵀ G V)
    for r in (1, 10, 30):
        exact = first_order_delta(g, w, s.truncate(r).reconstruct())
        assert math.isclose(truncation_delta(s, g_sigma, r), exact, rel_tol=1e-4, abs_tol=1e-3)
    assert truncation_delta(s, g_sigma, 30) == 0.0


def test_clustered_truncation_delta_matches_first_order_delta():
    w, g = _w(40, 30), _w(40, 30, seed=6)
    cs = ClusteredSVD.fit(w, assign_clusters(w, 3, "kmeans"), 3)
    for rho in (0.1, 0.5):
        exact = first_order_delta(g, w, cs.factors(rho).reconstruct())
        assert math.isclose(cs.truncation_delta(g, rho), exact, rel_tol=1e-4, abs_tol=1e-3)


def test_svd_dataclass_helpers():
    s = full_svd(_w(6, 4))
    assert isinstance(s, SVD) and s.shape == (6, 4) and s.p == 4
    assert math.isclose(s.tail_energy(0), float(_w(6, 4).double().pow(2).sum()), rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------ property
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 9), k=st.integers(1, 12), rho=st.floats(0.01, 1.0),
       seed=st.integers(0, 2**16))
def test_any_labelling_gives_per_block_optimal_factors(m, n, k, rho, seed):
    k = min(k, m)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g)
    labels = torch.randint(0, k, (m,), generator=g)       # arbitrary, possibly with empty clusters
    f = ClusteredSVD.fit(w, labels, k).factors(rho)
    assert f.u_packed.shape == (m, max(1, max(f.ranks))) and f.v_cat.shape == (n, sum(f.ranks))
    w_hat = f.reconstruct()
    for c in range(k):
        rows = (labels == c).nonzero()[:, 0]
        if len(rows):
            opt = _tail_err(w[rows], rank_for(rho, len(rows), n))
            assert abs(_fro(w_hat[rows], w[rows]) - opt) <= 1e-5 * (1 + float(w.norm()))


def test_count_nonfinite_and_svd_check():
    from c2i_fast.svd import _svd_finite, count_nonfinite
    x = torch.randn(37, 11)
    assert count_nonfinite(x) == 0
    big = torch.full((4, 4), 3e38)             # finite entries whose sum overflows: counted, not guessed
    assert count_nonfinite(big) == 0
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[5, 3] = bad
        y[36, 10] = bad
        assert count_nonfinite(y) == 2
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        assert _svd_finite(u, s, vh)
        u[3, 2] = bad
        assert not _svd_finite(u, s, vh)
