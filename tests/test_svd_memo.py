"""SVDs and Gram eigendecompositions remembered across scans in one process (c2i_fast.svd.remembered_svds /
weight_svd / weight_gram_eigh): reused only for the very tensor, unchanged, at the same thread count; recomputed
after any change, even one written past the version counter; dropped when the block exits or the weight is freed."""
import gc
from types import SimpleNamespace

import pytest
import torch

import c2i_fast.svd as svd_mod
from c2i_fast.svd import full_svd, remembered_svds, weight_gram_eigh, weight_svd
from helpers import tiny_llama


@pytest.fixture(autouse=True)
def _fresh_memo(monkeypatch):
    """Outside any block (conftest keeps one open for the session), with an empty memo."""
    monkeypatch.setattr(svd_mod, "_MEMO_DEPTH", 0)
    monkeypatch.setattr(svd_mod, "_MEMO", {})


def _counting(monkeypatch):
    calls = []
    real = svd_mod.full_svd

    def counted(w, *, name=None):
        calls.append(name)
        return real(w, name=name)
    monkeypatch.setattr(svd_mod, "full_svd", counted)
    return calls


def test_reused_inside_the_block_only(monkeypatch):
    calls = _counting(monkeypatch)
    p = torch.nn.Parameter(torch.randn(7, 5, generator=torch.Generator().manual_seed(0)))
    weight_svd(p)
    weight_svd(p)
    assert len(calls) == 2                                 # outside a block: no memo
    with remembered_svds():
        a = weight_svd(p, name="p")
        with remembered_svds():                            # nested blocks share the memo
            assert weight_svd(p, name="p") is a
        assert weight_svd(p, name="p") is a and len(calls) == 3
        t = weight_svd(p, transposed=True, name="p")       # the transpose is another matrix
        assert t.shape == (5, 7) and len(calls) == 4
    assert not svd_mod._MEMO
    ref = full_svd(p)
    assert torch.equal(a.s, ref.s) and torch.equal(a.u, ref.u) and torch.equal(a.v, ref.v)


def test_any_change_recomputes(monkeypatch):
    calls = _counting(monkeypatch)
    p = torch.nn.Parameter(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
    with remembered_svds():
        a = weight_svd(p)
        with torch.no_grad():
            p.mul_(2.0)                                    # bumps the version counter
        b = weight_svd(p)
        assert b is not a and torch.allclose(b.s, 2 * a.s)
        p.data.copy_(p.data.flip(0) * 0.5)                 # .data writes past the version counter
        c = weight_svd(p)
        assert c is not b and len(calls) == 3
        assert torch.allclose(c.s, a.s, rtol=1e-5)


def test_another_thread_count_recomputes(monkeypatch):
    """LAPACK's SVD of one matrix differs in the last bits between 1 and 2 threads: a hit must be what computing
    it now would give, so a thread change recomputes."""
    calls = _counting(monkeypatch)
    p = torch.nn.Parameter(torch.randn(9, 7, generator=torch.Generator().manual_seed(2)))
    threads = torch.get_num_threads()
    try:
        with remembered_svds():
            torch.set_num_threads(1)
            a = weight_svd(p)
            torch.set_num_threads(2)
            b = weight_svd(p)
            assert b is not a and len(calls) == 2
            assert weight_svd(p) is b and len(calls) == 2
    finally:
        torch.set_num_threads(threads)


def test_an_entry_goes_with_its_weight():
    with remembered_svds():
        p = torch.nn.Parameter(torch.randn(4, 3))
        weight_svd(p)
        assert len(svd_mod._MEMO) == 1
        del p
        gc.collect()
        assert not svd_mod._MEMO                            # its id() may now be reused by another tensor


def _counting_eigh(monkeypatch):
    calls = []
    real = torch.linalg.eigh

    def counted(a, *args, **kw):
        calls.append(tuple(a.shape))
        return real(a, *args, **kw)
    monkeypatch.setattr(torch.linalg, "eigh", counted)
    return calls


@pytest.mark.parametrize("shape", [(5, 9), (9, 5)])
def test_gram_eigh_is_remembered_and_is_the_squared_singular_values(monkeypatch, shape):
    calls = _counting_eigh(monkeypatch)
    p = torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(3)))
    with remembered_svds():
        lam, q = weight_gram_eigh(p)
        assert weight_gram_eigh(p)[1] is q and len(calls) == 1
        lt, _ = weight_gram_eigh(p, transposed=True)        # Wᵀ: the same smaller Gram, its own entry
        assert len(calls) == 2 and torch.equal(lt, lam)
        assert weight_svd(p).s.shape == (5,)               # the SVD has its own entry too
        with torch.no_grad():
            p.mul_(3.0)
        lam3, _ = weight_gram_eigh(p)
        assert len(calls) == 3 and torch.allclose(lam3, 9 * lam, rtol=1e-5)
    assert not svd_mod._MEMO
    s64 = torch.linalg.svdvals(p.detach().double()) / 3
    assert lam.shape == (5,) and q.shape == (5, 5) and torch.all(lam[:-1] >= lam[1:])
    assert torch.allclose(lam, s64 ** 2, rtol=1e-4, atol=1e-5)


def _tiny_llama_scorers():
    """A tiny random Llama (mechanics only), its target matrices, and a factory of Scorers on 6 yes/no rows."""
    from c2i_fast.evaluate import Scorer
    from c2i_fast.models import target_matrices
    from c2i_fast.tasks import Example
    model = tiny_llama()

    class Tok:
        pad_token_id, eos_token_id, bos_token_id = 0, 1, None

        def __call__(self, text, add_special_tokens=False):
            return SimpleNamespace(input_ids=[2 + (ord(ch) % 60) for ch in text])
    exs = [Example(id=str(i), prompt=f"q{i} is", target=" yes" if i % 2 else " no", choices=(" yes", " no"),
                   label=0 if i % 2 else 1) for i in range(6)]
    refs = target_matrices(model)
    return model, refs, lambda: Scorer(model, Tok(), exs, "classification")


@pytest.mark.parametrize("mode", ["full", "gram"])
def test_a_second_scan_of_the_model_decomposes_nothing(monkeypatch, mode):
    """Two scans of a tiny random Llama (mechanics only): the same scores bit for bit, each weight's SVD (full
    scan) or Gram eigendecomposition (Gram scan, the default) computed once."""
    from c2i_fast.scan import scan
    model, refs, scorer = _tiny_llama_scorers()
    calls = _counting(monkeypatch) if mode == "full" else _counting_eigh(monkeypatch)
    with remembered_svds():
        first = scan(scorer(), refs, [0.5, 0.1], 2, progress=False, svd=mode)
        n = len(calls)
        second = scan(scorer(), refs, [0.5, 0.1], 2, progress=False, svd=mode)
    assert n == len(refs) and len(calls) == n               # the second scan took none
    assert [m.summary() for m in first.matrices] == [m.summary() for m in second.matrices]
