"""Factored modules: forward == dense reconstruction, Conv1D, gradients, dtype moves, state_dict round trip."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from c2i_fast.decompose import ClusteredSVD, assign_clusters, full_svd, rank_for
from c2i_fast.errors import C2IError
from c2i_fast.nn import ClusteredLowRankLinear, LowRankLinear, linear_weight
from helpers import assert_close

SHAPES = [(63, 500), (500, 63), (1, 5), (7, 1), (32, 32)]   # (out, in)


def _linear(out_f, in_f, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _ref(x, mod):
    """Dense float64 forward with the module's own reconstructed weight."""
    y = x.double() @ mod.dense_weight().double().T
    return y + mod.bias.double() if mod.bias is not None else y


def _cluster_counts(m):
    return sorted({1, min(4, m), m})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rho", [0.1, 1.0])
def test_lowrank_forward_matches_dense_reconstruction(shape, bias, rho):
    lin = _linear(*shape, bias=bias)
    mod = LowRankLinear.from_linear(lin, rho)
    assert mod.in_features == shape[1] and mod.out_features == shape[0]
    assert mod.rank == rank_for(rho, *shape)
    x = torch.randn(2, 3, shape[1])
    y = mod(x)
    assert y.shape == (2, 3, shape[0]) and y.dtype == torch.float32
    assert_close(y, _ref(x, mod), 1e-5)
    if rho == 1.0:   # full rank: the same function as the layer it replaces
        assert_close(y, lin(x), 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["block", "kmeans", "projective"])
def test_clustered_forward_matches_dense_reconstruction(shape, bias, method):
    lin = _linear(*shape, bias=bias, seed=1)
    x = torch.randn(4, shape[1])
    for k in _cluster_counts(shape[0]):
        mod = ClusteredLowRankLinear.from_linear(lin, 0.3, k, method, seed=0)
        assert mod.n_clusters == k and mod.out_features == shape[0]
        y = mod(x)
        assert y.shape == (4, shape[0])
        assert_close(y, _ref(x, mod), 1e-5)
        if k == shape[0]:    # one row per cluster, rank 1 each: exact
            assert_close(y, lin(x), 1e-5)


def test_clustered_with_empty_clusters():
    lin = _linear(9, 6, seed=2)
    labels = torch.tensor([0, 2, 0, 2, 2, 0, 0, 2, 2])
    mod = ClusteredLowRankLinear.from_linear(lin, 1.0, 4, labels=labels)
    assert mod.cluster_sizes == [4, 0, 5, 0] and mod.ranks[1] == 0 and mod.ranks[3] == 0
    x = torch.randn(3, 6)
    assert_close(mod(x), lin(x), 1e-5)      # ρ = 1 on the non-empty clusters: exact
    assert_close(mod(x), _ref(x, mod), 1e-5)


@pytest.mark.parametrize("clustered", [False, True])
def test_conv1d_replacement_computes_the_same_function(clustered):
    torch.manual_seed(3)
    conv = Conv1D(nf=48, nx=20)                 # weight (in, out) = Wᵀ
    nn.init.normal_(conv.bias)
    assert torch.equal(linear_weight(conv), conv.weight.T)
    x = torch.randn(2, 5, 20)
    if clustered:
        mod = ClusteredLowRankLinear.from_linear(conv, 1.0, 4, "kmeans")
    else:
        mod = LowRankLinear.from_linear(conv, 1.0)
    assert mod.in_features == 20 and mod.out_features == 48
    assert_close(mod(x), conv(x), 1e-5)
    low = LowRankLinear.from_linear(conv, 0.25)
    assert_close(low(x), _ref(x, low), 1e-5)


def test_from_linear_reuses_svd_and_checks_shape():
    lin = _linear(40, 30)
    svd = full_svd(lin.weight)
    a = LowRankLinear.from_linear(lin, 0.2, svd=svd)
    b = LowRankLinear.from_linear(lin, rank=a.rank)
    assert torch.allclose(a.dense_weight(), b.dense_weight(), atol=1e-5)
    with pytest.raises(C2IError):
        LowRankLinear.from_linear(_linear(30, 40), 0.2, svd=svd)
    with pytest.raises(C2IError):
        LowRankLinear.from_linear(nn.Embedding(4, 4), 0.5)
    cs = ClusteredSVD.fit(lin.weight, assign_clusters(lin.weight, 3, "kmeans"), 3)
    c = ClusteredLowRankLinear.from_linear(lin, 0.5, 3, clustered_svd=cs)
    assert c.ranks == cs.ranks_for(0.5)


def test_gradients_flow_to_factors():
    lin = _linear(24, 16)
    x = torch.randn(5, 16)
    for mod, names in ((LowRankLinear.from_linear(lin, 0.5), ("u", "v", "bias")),
                       (ClusteredLowRankLinear.from_linear(lin, 0.5, 3, "kmeans"), ("v_cat", "u_packed", "bias"))):
        mod(x).square().sum().backward()
        for n in names:
            g = getattr(mod, n).grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n


@pytest.mark.parametrize("clustered", [False, True])
def test_dtype_moves(clustered):
    lin = _linear(24, 16)
    mod = (ClusteredLowRankLinear.from_linear(lin, 0.5, 3, "kmeans") if clustered
           else LowRankLinear.from_linear(lin, 0.5))
    x = torch.randn(3, 16)
    y32 = mod(x)
    h = mod.to(torch.float16)
    for p in h.parameters():
        assert p.dtype == torch.float16
    for b in h.buffers():
        assert b.dtype == torch.int64          # routing metadata is never cast
    y16 = h(x.half())
    assert y16.dtype == torch.float16
    assert_close(y16, y32, 3e-3)
    assert h.dense_weight().dtype == torch.float16


def test_factors_are_stored_in_the_layer_dtype():
    lin = _linear(24, 16).to(torch.bfloat16)
    mod = LowRankLinear.from_linear(lin, 0.5)
    assert mod.u.dtype == mod.v.dtype == mod.bias.dtype == torch.bfloat16
    c = ClusteredLowRankLinear.from_linear(lin, 0.5, 2)
    assert c.v_cat.dtype == torch.bfloat16 and c.row_index.dtype == torch.int64


def test_state_dict_round_trip():
    lin = _linear(30, 20)
    x = torch.randn(4, 20)
    a = LowRankLinear.from_linear(lin, 0.3)
    assert set(a.state_dict()) == {"u", "v", "bias"}
    # row-major whatever the SVD's layout: reloaded (row-major) factors then round identically
    assert a.u.is_contiguous() and a.v.is_contiguous()
    a2 = LowRankLinear(20, 30, a.rank)
    a2.load_state_dict(a.state_dict())
    assert torch.equal(a2(x), a(x))
    c = ClusteredLowRankLinear.from_linear(lin, 0.3, 4, "kmeans")
    assert set(c.state_dict()) == {"v_cat", "u_packed", "bias", "row_index", "row_offsets", "rank_offsets"}
    c2 = ClusteredLowRankLinear(20, 30, c.ranks, c.cluster_sizes)
    c2.load_state_dict(c.state_dict())
    assert torch.equal(c2(x), c(x))


def test_bias_is_a_copy_not_shared():
    lin = _linear(8, 6)
    mod = LowRankLinear.from_linear(lin, 0.5)
    with torch.no_grad():
        mod.bias.add_(1.0)
    assert not torch.equal(mod.bias, lin.bias)


def test_counts_and_repr():
    lin = _linear(64, 32, bias=False)
    mod = LowRankLinear.from_linear(lin, 0.25)          # rank 8
    assert mod.parameter_count() == (64 + 32) * 8
    assert mod.nbytes() == 4 * (64 + 32) * 8
    assert "rank=8" in repr(mod) and "% of dense" in repr(mod)
    c = ClusteredLowRankLinear.from_linear(lin, 0.25, 4)   # 4 blocks of 16 rows: rank 4 each
    assert c.ranks == [4, 4, 4, 4]
    assert c.parameter_count() == 32 * 16 + 64 * 4
    assert c.nbytes() == 4 * c.parameter_count() + 8 * (64 + 5 + 5)
    assert "n_clusters=4" in repr(c) and "% of dense" in repr(c)
