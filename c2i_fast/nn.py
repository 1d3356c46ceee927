"""Factored drop-in replacements for ``nn.Linear`` (and GPT-2's ``Conv1D``).

Both modules keep ``in_features`` / ``out_features`` so code that inspects a linear layer still works, hold
their factors as ``nn.Parameter`` (gradients flow to them) and any integer routing metadata as buffers (so
``.to(dtype)`` leaves it int64 and ``state_dict`` carries it). The forward calls the ``c2i_fast.kernels``
dispatchers: Triton on CUDA, the pure-torch reference elsewhere. Tensor layouts are those of
``kernels/naive.py``; see :mod:`c2i_fast.decompose`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from c2i_fast.kernels import clustered_lowrank_matmul, clustered_reconstruct, lowrank_matmul

from .decompose import SVD, ClusteredFactors, ClusteredSVD, ClusterLayout, LowRankFactors, fit_clusters, full_svd, rank_for
from .errors import C2IError
from .plan import Edit


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (weight stored transposed, (in, out); ``nf`` = out features).

    Matched by name and attribute so that importing this module never imports transformers.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_weight(layer: nn.Module, *, name: str | None = None) -> Tensor:
    """W of ``layer`` in nn.Linear layout (out, in) — a view, not a copy. Linear, Conv1D or a factored module.

    ``name`` (the module's path in its model) goes into the error for any other module type."""
    if isinstance(layer, (LowRankLinear, ClusteredLowRankLinear)):
        return layer.dense_weight()
    if is_conv1d(layer):
        return layer.weight.T
    if isinstance(layer, nn.Linear):
        return layer.weight
    what = f"module {name!r}, a {type(layer).__name__}" if name else f"a {type(layer).__name__}"
    raise C2IError(f"cannot factorize {what}: only nn.Linear and transformers' Conv1D are supported")


def _bias_param(bias: Tensor | None, dtype: torch.dtype | None, device=None) -> nn.Parameter | None:
    # A fresh copy: the factored module must not share storage with the layer it replaces, so restoring the
    # original (or saving with safetensors, which refuses shared tensors) stays independent.
    if bias is None:
        return None
    return nn.Parameter(bias.detach().to(device=device, dtype=dtype).clone())


def _target(shape: tuple[int, int], ref: Tensor, bias: Tensor | None, dtype: torch.dtype | None):
    """(m, n, dtype, device) of the module ``from_factors`` builds: the factors' dtype unless one is asked for,
    their device; a bias must have m entries."""
    m, n = shape
    if bias is not None and bias.shape != (m,):
        raise C2IError(f"bias of shape {tuple(bias.shape)} does not match {m} output features")
    return m, n, dtype or ref.dtype, ref.device


def _fill(mod: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], bias: Tensor | None,
          dtype: torch.dtype, device) -> nn.Module:
    """Give a meta-built factored module its tensors: float ``params`` cast to ``dtype`` on ``device``, int64
    ``buffers``, a copy of ``bias``. Row-major copies whatever the input layout (an SVD's v is a transposed
    view): the fp32 rounding of the forward GEMMs depends on layout, and saved/reloaded factors must compute
    bit-identical outputs."""
    for name, t in params.items():
        setattr(mod, name, nn.Parameter(t.detach().to(device=device, dtype=dtype).clone(
            memory_format=torch.contiguous_format)))
    for name, t in buffers.items():
        setattr(mod, name, t.detach().to(device=device, dtype=torch.int64).contiguous().clone())
    mod.bias = _bias_param(bias, dtype, device)
    return mod


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


class LowRankLinear(nn.Module):
    """``y = (x @ v) @ u.T + bias`` with u: (out_features, r) (S folded in), v: (in_features, r).

    Computes the same function as a ``nn.Linear`` whose weight is ``u @ v.T``; stores (out + in) * r values
    instead of out * in.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.u = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.v = nn.Parameter(torch.zeros(in_features, rank, **kw))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **kw))
        else:
            self.register_parameter("bias", None)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        return lowrank_matmul(x, self.u, self.v, None, self.bias)

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_factors(cls, factors: LowRankFactors, bias: Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "LowRankLinear":
        """Module holding ``factors`` (cast to ``dtype``, default the factors' dtype) and a copy of ``bias``."""
        m, n, dtype, dev = _target(factors.shape, factors.u, bias, dtype)
        mod = cls(n, m, factors.rank, bias=bias is not None, device="meta", dtype=dtype)
        return _fill(mod, {"u": factors.u, "v": factors.v}, {}, bias, dtype, dev)

    @classmethod
    def from_linear(cls, layer: nn.Module, rank_fraction: float | None = None, *, rank: int | None = None,
                    svd: SVD | None = None) -> "LowRankLinear":
        """Rank-r replacement of an nn.Linear or Conv1D (r = rank_for(rank_fraction, out, in) or ``rank``).

        The SVD is taken in fp32 from the layer's weight (or ``svd``, the SVD of that weight in (out, in)
        layout, reused); the factors are stored in the layer's dtype on its device.
        """
        w = linear_weight(layer)
        m, n = w.shape
        if (rank_fraction is None) == (rank is None):
            raise C2IError("give exactly one of rank_fraction and rank")
        r = rank_for(rank_fraction, m, n) if rank is None else rank
        if svd is None:
            svd = full_svd(w)
        elif svd.shape != (m, n):
            raise C2IError(f"SVD of shape {svd.shape} does not match the layer's weight {m}x{n}")
        f = svd.truncate(r).to(device=w.device)
        return cls.from_factors(f, bias=layer.bias, dtype=w.dtype)

    # -- inspection -------------------------------------------------------------------------------------
    def factors(self) -> LowRankFactors:
        """The stored factors (detached, same dtype/device)."""
        return LowRankFactors(self.u.detach(), self.v.detach())

    def dense_weight(self) -> Tensor:
        """W = u @ v.T (out, in), accumulated in fp32, in the module's dtype."""
        return (self.u.float() @ self.v.float().T).to(self.u.dtype)

    def parameter_count(self) -> int:
        """Values stored: (out + in) * r (+ out for the bias)."""
        return sum(p.numel() for p in self.parameters())

    def nbytes(self) -> int:
        """Bytes of every parameter and buffer."""
        return _tensor_bytes(self)

    def extra_repr(self) -> str:
        m, n, r = self.out_features, self.in_features, self.rank
        ratio = (m + n) * r / max(1, m * n)
        return (f"in_features={n}, out_features={m}, rank={r}, bias={self.bias is not None}, "
                f"params={100 * ratio:.1f}% of dense")


class ClusteredLowRankLinear(ClusterLayout, nn.Module):
    """Rows of W in k clusters, cluster c approximated at rank r_c; outputs land at their original rows.

    Parameters: ``v_cat`` (in, R) = [V_1 … V_k]; ``u_packed`` (out, r_max), permuted row j of cluster c holding
    U_c S_c in columns [0, r_c). Buffers (int64): ``row_index`` (out,), ``row_offsets`` (k+1,),
    ``rank_offsets`` (k+1,) — the metadata of ``kernels/naive.py``. Forward: stage 1 one GEMM ``x @ v_cat``,
    stage 2 block-diagonal products scattered to ``row_index``.
    """

    def __init__(self, in_features: int, out_features: int, ranks: Sequence[int], cluster_sizes: Sequence[int],
                 bias: bool = True, device=None, dtype: torch.dtype | None = None):
        """Zero-initialised skeleton (identity permutation) of the right shapes, e.g. for ``load_state_dict``."""
        super().__init__()
        if len(ranks) != len(cluster_sizes) or sum(cluster_sizes) != out_features:
            raise C2IError(f"{len(ranks)} ranks / {len(cluster_sizes)} cluster sizes summing to "
                           f"{sum(cluster_sizes)} do not describe {out_features} rows")
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        k = len(ranks)
        r_max = max(1, max(ranks))
        self.v_cat = nn.Parameter(torch.zeros(in_features, sum(ranks), **kw))
        self.u_packed = nn.Parameter(torch.zeros(out_features, r_max, **kw))
        ro = torch.zeros(k + 1, dtype=torch.int64)
        ro[1:] = torch.cumsum(torch.tensor(list(cluster_sizes), dtype=torch.int64), 0)
        ko = torch.zeros(k + 1, dtype=torch.int64)
        ko[1:] = torch.cumsum(torch.tensor(list(ranks), dtype=torch.int64), 0)
        self.register_buffer("row_index", torch.arange(out_features, dtype=torch.int64, device=device))
        self.register_buffer("row_offsets", ro.to(device))
        self.register_buffer("rank_offsets", ko.to(device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **kw))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        return clustered_lowrank_matmul(x, self.v_cat, self.u_packed, self.row_index, self.row_offsets,
                                        self.rank_offsets, self.bias)

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_factors(cls, factors: ClusteredFactors, bias: Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "ClusteredLowRankLinear":
        """Module holding ``factors`` (float tensors cast to ``dtype``) and a copy of ``bias``."""
        m, n, dtype, dev = _target(factors.shape, factors.v_cat, bias, dtype)
        mod = cls(n, m, factors.ranks, factors.cluster_sizes, bias=bias is not None, device="meta", dtype=dtype)
        return _fill(mod, {"v_cat": factors.v_cat, "u_packed": factors.u_packed},
                     {k: getattr(factors, k) for k in ("row_index", "row_offsets", "rank_offsets")}, bias, dtype, dev)

    @classmethod
    def from_linear(cls, layer: nn.Module, rank_fraction: float, n_clusters: int = 1, method: str = "block",
                    seed: int = 0, *, subspace_rank: int | None = None, iters: int | None = None,
                    restarts: int | None = None, labels: Tensor | None = None,
                    clustered_svd: ClusteredSVD | None = None) -> "ClusteredLowRankLinear":
        """Clustered replacement of an nn.Linear or Conv1D at rank fraction ρ on every cluster.

        Rows are clustered as ``Edit(…, rank_fraction, n_clusters, method, seed, subspace_rank, iters,
        restarts)`` prescribes (:func:`~c2i_fast.decompose.fit_clusters`, the same factors ``factorize_`` makes
        for that edit) unless ``labels`` (out,) or a fitted ``clustered_svd`` of the layer's weight are given.
        Factors are fp32 math, stored in the layer's dtype on its device.
        """
        w = linear_weight(layer)
        m, n = w.shape
        if clustered_svd is None:
            if labels is None:
                edit = Edit("layer", rank_fraction, n_clusters, method, seed, subspace_rank, iters, restarts)
                clustered_svd = fit_clusters(w, edit)
            else:
                clustered_svd = ClusteredSVD.fit(w, labels, n_clusters)
        elif clustered_svd.shape != (m, n):
            raise C2IError(f"clustered SVD of shape {clustered_svd.shape} does not match the weight {m}x{n}")
        f = clustered_svd.factors(rank_fraction).to(device=w.device)
        return cls.from_factors(f, bias=layer.bias, dtype=w.dtype)

    # -- inspection -------------------------------------------------------------------------------------
    def factors(self) -> ClusteredFactors:
        """The stored factors (detached, same dtype/device)."""
        return ClusteredFactors(self.v_cat.detach(), self.u_packed.detach(), self.row_index, self.row_offsets,
                                self.rank_offsets)

    def dense_weight(self) -> Tensor:
        """W (out, in) rebuilt from the clusters, in the module's dtype."""
        return clustered_reconstruct(self.v_cat, self.u_packed, self.row_index, self.row_offsets,
                                     self.rank_offsets)

    def parameter_count(self) -> int:
        """Float values stored: in*R + out*r_max (+ out for the bias). Index bytes are in :meth:`nbytes`."""
        return sum(p.numel() for p in self.parameters())

    def nbytes(self) -> int:
        """Bytes of every parameter and buffer, the int64 routing metadata included."""
        return _tensor_bytes(self)

    def extra_repr(self) -> str:
        m, n = self.out_features, self.in_features
        ratio = (self.v_cat.numel() + self.u_packed.numel()) / max(1, m * n)
        ranks = self.ranks
        rs = f"{ranks}" if len(ranks) <= 8 else f"[{min(ranks)}..{max(ranks)}]"
        return (f"in_features={n}, out_features={m}, n_clusters={self.n_clusters}, ranks={rs}, "
                f"bias={self.bias is not None}, params={100 * ratio:.1f}% of dense")


FACTORED_TYPES = (LowRankLinear, ClusteredLowRankLinear)
