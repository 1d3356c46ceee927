"""Batched randomized SVD (kernels/rsvd.py) against torch.linalg.svd in float64, on three spectra.

Matrices a = U diag(σ) Vᵀ (float64, random orthonormal U, V), B = 3 of 96 × 64, rounded to fp32.
Spectra: fast decay σᵢ = 0.7ⁱ, slow decay σᵢ = (i+1)^-½, nearly flat σ linear from 1 to 0.5.
"opt" is the best rank-k error ‖σ_{>k}‖; err = ‖a − U S Vᵀ‖_F. Stated tolerances (oversample 8, niter 2;
observed maxima over 5 seeds in brackets):

    spectrum   err / opt            max_i |Ŝᵢ − σᵢ| / σᵢ (i < k)
    fast       ≤ 1.001   [1.0000]   ≤ 1e-4  [3e-6]
    slow       ≤ 1.05    [1.011]    ≤ 0.15  [0.053]
    flat       ≤ 1.05    [1.024]    ≤ 0.15  [0.066]

Full rank (k = min(m, n)) is exact: err/‖a‖ ≤ 1e-5. Both paths (Triton GEMMs, interpreted on CPU; and the
torch reference) must meet them, and agree with each other for the same generator.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import assert_close, assert_finite, load_kernels  # noqa: E402

K = load_kernels()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "torch"] if K.HAS_TRITON else ["torch"]

SPECTRA = {
    "fast": lambda p: 0.7 ** torch.arange(p, dtype=torch.float64),
    "slow": lambda p: (torch.arange(p, dtype=torch.float64) + 1) ** -0.5,
    "flat": lambda p: torch.linspace(1.0, 0.5, p, dtype=torch.float64),
}
TOL = {"fast": (1.001, 1e-4), "slow": (1.05, 0.15), "flat": (1.05, 0.15)}


@pytest.fixture(autouse=True)
def one_thread():
    """MKL's LAPACK with 2 busy-waiting OpenMP threads on a loaded 2-core box can take seconds for a tiny QR;
    one thread keeps these tests fast and changes no result."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("C2I_KERNELS", request.param)
    monkeypatch.setenv("C2I_KERNELS_POISON", "1")
    return request.param


def make(b, m, n, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    u = torch.linalg.qr(torch.randn(b, m, p, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(b, n, p, generator=g, dtype=torch.float64))[0]
    return (u * sigma) @ v.transpose(1, 2)


def recon_err(a64, u, s, v):
    approx = (u.double().cpu() * s.double().cpu()[..., None, :]) @ v.double().cpu().transpose(-1, -2)
    return (a64 - approx).flatten(-2).norm(dim=-1)


def check_factors(u, s, v, shape, r):
    *lead, m, n = shape
    assert u.shape == (*lead, m, r) and s.shape == (*lead, r) and v.shape == (*lead, n, r)
    for t, name in ((u, "U"), (s, "S"), (v, "V")):
        assert t.dtype == torch.float32
        assert_finite(t, name)
    eye = torch.eye(r, dtype=torch.float64).expand(*lead, r, r)
    # orthonormal columns: max |UᵀU − I| < 1e-5 (max |I| = 1)
    assert_close(u.double().cpu().transpose(-1, -2) @ u.double().cpu(), eye, 1e-5, name="UᵀU", norm="max")
    assert_close(v.double().cpu().transpose(-1, -2) @ v.double().cpu(), eye, 1e-5, name="VᵀV", norm="max")
    assert (s[..., :-1] >= s[..., 1:]).all()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("rank", [1, 8])
def test_randomized_svd_spectra(backend, spectrum, rank):
    sigma = SPECTRA[spectrum](64)
    a64 = make(3, 96, 64, sigma, seed=rank)
    u, s, v = K.randomized_svd(a64.float().to(DEVICE), rank, oversample=8, niter=2,
                               generator=torch.Generator().manual_seed(0))
    check_factors(u, s, v, a64.shape, rank)
    exact = torch.linalg.svd(a64.float().double())[1][..., :rank]     # of the fp32-rounded input
    err_tol, sv_tol = TOL[spectrum]
    opt = sigma[rank:].norm()
    assert (recon_err(a64, u, s, v) / opt).max() <= err_tol
    assert ((s.double().cpu() - exact).abs() / exact).max() <= sv_tol


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", [(63, 40), (1, 40, 70), (2, 1, 9)], ids=["2d-tall", "wide", "one-row"])
def test_randomized_svd_full_rank_is_exact(backend, shape):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    r = min(shape[-2:])
    u, s, v = K.randomized_svd(a.to(DEVICE), r + 5, oversample=3, niter=1)   # rank > min(m, n) is clipped
    check_factors(u, s, v, a.shape, r)
    assert (recon_err(a.double(), u, s, v) / a.double().flatten(-2).norm(dim=-1)).max() <= 1e-5
    exact = torch.linalg.svdvals(a.double())
    assert ((s.double().cpu() - exact).abs().amax(-1) / exact[..., 0]).max() <= 1e-5


@pytest.mark.skipif(not K.HAS_TRITON, reason="triton not installed")
def test_triton_path_matches_reference(monkeypatch):
    """Same generator ⇒ same sketch ⇒ the two paths agree to rounding (niter 1, slow decay)."""
    a = make(2, 70, 50, SPECTRA["slow"](50), seed=3).float().to(DEVICE)
    out = {}
    for be in ("triton", "torch"):
        monkeypatch.setenv("C2I_KERNELS", be)
        out[be] = K.randomized_svd(a, 6, oversample=4, niter=1, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(out["triton"][1], out["torch"][1], rtol=1e-4, atol=0)
    e = [recon_err(a.double().cpu(), *out[be]) for be in ("triton", "torch")]
    assert torch.allclose(e[0], e[1], rtol=1e-4)


def test_power_iterations_help(monkeypatch):
    monkeypatch.setenv("C2I_KERNELS", BACKENDS[0])
    sigma = SPECTRA["slow"](64)
    a64 = make(2, 96, 64, sigma, seed=4)
    errs = [recon_err(a64, *K.randomized_svd(a64.float().to(DEVICE), 8, oversample=4, niter=q,
                                             generator=torch.Generator().manual_seed(0))).max() for q in (0, 2)]
    assert errs[1] < errs[0]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_randomized_svd_blocks_of_different_heights(backend):
    """Per-cluster blocks (30, 1, 17 rows; 24 columns) of exact rank 6 in one padded batch: singular values
    and U/V must match each block's own exact SVD, rows of U only for the block's real rows."""
    g = torch.Generator().manual_seed(5)
    blocks = [(torch.randn(h, 6, generator=g) * 0.6 ** torch.arange(6.0)) @ torch.randn(6, 24, generator=g)
              for h in (30, 1, 17)]
    padded, heights = K.pad_blocks([b.to(DEVICE) for b in blocks])
    assert padded.shape == (3, 30, 24) and heights == [30, 1, 17] and padded[1, 1:].abs().max() == 0
    out = K.randomized_svd_blocks([b.to(DEVICE) for b in blocks], [5, 5, 3], oversample=4, niter=1)
    for blk, (u, s, v), r in zip(blocks, out, (5, 1, 3)):
        assert u.shape == (blk.shape[0], r) and s.shape == (r,) and v.shape == (24, r)
        exact = torch.linalg.svdvals(blk.double())[:r]
        assert ((s.double().cpu() - exact).abs() / exact[0]).max() <= 1e-5
        best = torch.linalg.svdvals(blk.double())[r:].norm()
        err = recon_err(blk.double(), u, s, v)
        assert err <= 1.001 * best + 1e-5 * blk.double().norm()
    with pytest.raises(ValueError):
        K.randomized_svd_blocks(blocks, [1, 2])


@pytest.mark.skipif(not K.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("mkn", [(1, 1, 1), (63, 70, 17), (5, 0, 9), (40, 100, 33)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_matmul_op(monkeypatch, mkn, transposed, dtype):
    monkeypatch.setenv("C2I_KERNELS", "triton")
    monkeypatch.setenv("C2I_KERNELS_POISON", "1")
    m, k, n = mkn
    g = torch.Generator().manual_seed(6)
    a = torch.randn(2, m, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(2, k, n, generator=g).to(dtype).to(DEVICE)
    if transposed:   # non-contiguous operands: a = (aᵀ)ᵀ views
        a = a.transpose(1, 2).contiguous().transpose(1, 2)
        b = b.transpose(1, 2).contiguous().transpose(1, 2)
    c = torch.ops.c2i.batched_matmul(a, b)
    want = a.double() @ b.double()
    assert c.dtype == torch.float32
    if k:
        assert_close(c, want, 1e-5)
    else:   # an empty sum: exactly zero
        assert_finite(c)
        assert not c.any()
