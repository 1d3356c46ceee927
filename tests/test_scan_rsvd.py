"""The scan's randomized SVDs (c2i_fast.scan, ``svd="randomized"``): ΔL̂(ρ) = Σ_{i<k} σᵢgᵢ − ⟨G, W⟩ from the top k
triplets agrees with the full SVD's −Σ_{i≥k} σᵢgᵢ, the grid decides where it is used, and the top-K that reach
the search are the full scan's, with bit-identical scores and ΔL̂."""
from dataclasses import dataclass

import pytest
import torch

import c2i_fast.scan as scan_mod
from c2i_fast.decompose import full_svd
from c2i_fast.errors import C2IError
from c2i_fast.svd import weight_svd


@dataclass
class Ref:
    name: str
    layer: int
    type: str
    w: torch.Tensor
    transposed: bool = False

    @property
    def shape(self):
        return tuple(self.w.shape)

    @property
    def param(self):          # the stored tensor (c2i_fast.svd.weight_svd keys its memo on it)
        return self.w

    def weight(self):
        return self.w

    def svd(self):
        return weight_svd(self.param, transposed=self.transposed, name=self.name)


def _matrix(m, n, decay, seed):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    s = torch.exp(-decay * torch.arange(min(m, n), dtype=torch.float32))
    return (u * s) @ v.T


def test_sketchable_follows_the_grid():
    assert scan_mod._sketchable((576, 1536), [0.1, 0.05, 0.01])
    assert not scan_mod._sketchable((576, 1536), [0.9, 0.1])             # the default grid: full SVDs
    assert not scan_mod._sketchable((576, 1536), [scan_mod.RANDOMIZED_MAX_FRACTION + 0.1])


def test_randomized_delta_agrees_with_the_full_svd():
    grid = [0.1, 0.05, 0.02]
    refs = [Ref(f"m{i}", i, "mlp_down", _matrix(192, 256, 0.1, i)) for i in range(4)]   # a clear gap at k
    grads = {r.name: torch.randn(r.shape, generator=torch.Generator().manual_seed(100 + i))
             for i, r in enumerate(refs)}
    approx = {ms.name: ms for ms in scan_mod._randomized_scans(refs, grads, grid)}
    for r in refs:
        exact = scan_mod._exact_scan(r, full_svd(r.w), grads[r.name], grid, "first_order")
        for rho in grid:
            assert approx[r.name].delta[rho] == pytest.approx(exact.delta[rho], rel=1e-3, abs=1e-3), (r.name, rho)
        assert not approx[r.name].exact and approx[r.name].summary()["svd"] == "randomized"


@pytest.mark.parametrize("shape", [(96, 160), (160, 96), (77, 77), (5, 300)])
def test_gram_delta_is_the_full_svds_up_to_round_off(shape):
    """Every ρ of the default grid, wide, tall, square and a rank-deficient matrix (a zero singular value): the
    Gram scan's ΔL̂ (float32 products) against a float64 SVD reference, relative to the scale of the σᵢgᵢ."""
    grid = [0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01]
    gen = torch.Generator().manual_seed(sum(shape))
    for deficient in (False, True):
        w = _matrix(*shape, 0.05, sum(shape))
        if deficient:
            w[:, 0] = 0.0
            w[0] = w[1]
        g = torch.randn(shape, generator=gen)
        r = Ref("m", 0, "mlp_up", w)
        est = scan_mod._gram_scan(r, g, grid)
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        sg = s * ((u.T @ g.double()) * vh).sum(1)                       # σᵢ gᵢ, float64
        scale = float(sg.abs().sum())
        for rho in grid:
            ref = -float(sg[scan_mod.rank_for(rho, *shape):].sum())
            full32 = scan_mod._exact_scan(r, full_svd(w), g, grid, "first_order").delta[rho]
            # float32 round-off, as the float32 SVD's own (up to 3e-6 of the scale on these matrices)
            assert abs(est.delta[rho] - ref) <= 5e-6 * scale, (shape, deficient, rho)
            assert abs(full32 - ref) <= 5e-6 * scale
        assert est.score == min(est.delta.values()) and not est.exact and est.summary()["svd"] == "gram"
        assert torch.isfinite(est.g_sigma).all()


def test_rescoring_makes_the_top_k_exact():
    grid = [0.1, 0.05]
    refs = [Ref(f"m{i}", i, "attn_q", _matrix(96, 128, 0.02 * (1 + i % 3), i)) for i in range(8)]
    grads = {r.name: torch.randn(r.shape, generator=torch.Generator().manual_seed(i)) for i, r in enumerate(refs)}
    exact = sorted((scan_mod._exact_scan(r, full_svd(r.w), grads[r.name], grid, "first_order") for r in refs),
                   key=lambda x: (x.score, x.name))
    scans = sorted(scan_mod._randomized_scans(refs, grads, grid), key=lambda x: (x.score, x.name))
    svds = {}
    done = scan_mod._rescore(scans, {r.name: r for r in refs}, grads, grid, "first_order", 3, svds)
    assert 3 <= done <= 8 and set(svds) == {ms.name for ms in scans if ms.exact}
    top = scans[:3]
    assert all(ms.exact for ms in top)
    assert [(m.name, m.score, m.delta) for m in top] == [(m.name, m.score, m.delta) for m in exact[:3]]


def test_scan_rejects_an_unknown_svd_mode():
    with pytest.raises(C2IError):
        scan_mod.scan(None, [], [0.1], 1, svd="sketchy")


def test_randomized_and_gram_scans_of_smollm2_keep_the_top_k(smollm2, data_dir):
    """FEVER, 24 rows, a ρ grid the randomized SVD allows, against one full scan: both give the same top-5 set
    and order, bit-identical ΔL̂ and scores for them (a full SVD redone), with fewer full SVDs; the Gram scan
    also ranks every matrix in the full scan's order. Every third of the 210 matrices (each type, every layer
    range) keeps the three scans' SVDs affordable; bench/bench_scan_svd.py ranks all 210 on 100 rows."""
    from c2i_fast.evaluate import Scorer
    from c2i_fast.models import target_matrices
    from c2i_fast.tasks import check_tokenization, load_task, split
    task = check_tokenization(load_task("fever", data_dir), smollm2.tokenizer)
    sc = Scorer(smollm2.model, smollm2.tokenizer, split(task, 24, 8, seed=0)["select"], task.kind)
    refs = target_matrices(smollm2.model)[::3]
    grid = [0.1, 0.05, 0.01]
    full = scan_mod.scan(sc, refs, grid, 5, progress=False, svd="full")
    assert full.svds == {"mode": "full", "full": len(refs), "randomized": 0, "full_redone": 0}
    for mode in ("randomized", "gram"):
        fast = scan_mod.scan(sc, refs, grid, 5, progress=False, svd=mode)
        assert [m.summary() for m in fast.top(5)] == [m.summary() for m in full.top(5)], mode
        assert all(torch.equal(a.svd.s, b.svd.s) for a, b in zip(fast.top(5), full.top(5)))
        assert fast.svds[mode] == len(refs) and fast.svds["full"] == 0 and fast.svds["full_redone"] >= 5
    assert fast.svds["full_redone"] == 10                      # Gram: a full SVD for the best 2 × top-K only
    assert [m.name for m in fast.matrices] == [m.name for m in full.matrices]
    exact = {m.name: m.score for m in full.matrices}
    scale = max(abs(v) for v in exact.values())
    assert all(abs(m.score - exact[m.name]) <= 1e-4 * scale for m in fast.matrices)
