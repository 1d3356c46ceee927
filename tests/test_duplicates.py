"""Candidates with the same factors are scored once (c2i_fast.search.duplicates), on the real SmolLM2.

Two ways a grid repeats itself: rank_for saturates at 1 on small blocks (a 24-row cluster keeps rank 1 at ρ = 0.05
and at ρ = 0.01), and projective clustering returns its k-means start when alternating does not lower its
objective (4 of the 48 candidates evaluated on epistemic reasoning at the defaults, 7 on CounterFact).
"""
import itertools

import torch

import c2i_fast.search as search_mod
from c2i_fast.decompose import full_svd
from c2i_fast.evaluate import Scorer
from c2i_fast.models import decoder_layers, target_matrices
from c2i_fast.replay import PrefixCache
from c2i_fast.scan import MatrixScan
from c2i_fast.search import candidate_factors, build_candidates, duplicates, factor_signature, search
from c2i_fast.tasks import check_tokenization, load_task, split

LAYER = 20
MATRIX = f"model.layers.{LAYER}.self_attn.k_proj"       # 192 x 576: k = 8 gives 24-row blocks


def _candidates(model, rank_fractions, clusters, methods):
    refs = {r.name: r for r in target_matrices(model)}
    w = refs[MATRIX].weight().detach().float()
    svd = full_svd(w)
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))    # ΔL̂ only orders; any G will do
    ms = MatrixScan(MATRIX, LAYER, refs[MATRIX].type, tuple(w.shape), svd.sigma_grad(grad),
                    {r: 0.0 for r in rank_fractions}, 0.0, svd, grad)
    return build_candidates([ms], refs, rank_fractions, clusters, methods, progress=False)


def _tensors(f):
    return [t for t in vars(f).values() if isinstance(t, torch.Tensor)]


def test_same_signature_exactly_when_same_factors(smollm2):
    """Equal signatures ⇒ bitwise-equal factors (and one shared fit for equal partitions); different
    signatures ⇒ different reconstructions. The saturated-rank pair is among the duplicates."""
    cands = _candidates(smollm2.model, (0.1, 0.05, 0.01), (1, 8), ("block", "kmeans", "projective"))
    key = {c.key(): c for c in cands}
    saturated = (key[f"{MATRIX}|0.05|8|block|0"], key[f"{MATRIX}|0.01|8|block|0"])
    assert factor_signature(saturated[0]) == factor_signature(saturated[1])
    assert factor_signature(key[f"{MATRIX}|0.05|1|block|0"]) != factor_signature(key[f"{MATRIX}|0.01|1|block|0"])
    for a, b in itertools.combinations(cands, 2):
        fa, fb = candidate_factors(a), candidate_factors(b)
        if factor_signature(a) == factor_signature(b):
            ta, tb = _tensors(fa), _tensors(fb)
            assert ta and len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb)), (a.key(), b.key())
            assert a.predicted == b.predicted
            if a.edit.method != b.edit.method:
                assert a.source is b.source          # same partition from two methods: fitted once
        else:
            assert not torch.equal(fa.reconstruct(), fb.reconstruct()), (a.key(), b.key())
    same = duplicates(cands)
    i, j = cands.index(saturated[1]), cands.index(saturated[0])
    assert same[i] == j
    for i, j in same.items():
        assert j < i and j not in same and factor_signature(cands[i]) == factor_signature(cands[j])


def test_search_scores_each_distinct_factorization_once(smollm2, data_dir, monkeypatch):
    """A duplicate keeps its slot of max_evals and gets its twin's result without a pass; that result is what
    scoring it would give (bitwise: same factors), the journal gets every candidate, the plan is unchanged."""
    task = check_tokenization(load_task("bigbench_epistemic_reasoning", data_dir), smollm2.tokenizer)
    rows = split(task, 12, 4, seed=0)["select"]
    model = smollm2.model
    sc = Scorer(model, smollm2.tokenizer, rows, task.kind, batch_tokens=300)
    cache = PrefixCache()
    base = sc.evaluate(cache, capture={LAYER})
    cands = _candidates(model, (0.05, 0.01), (1, 8), ("block",))
    assert len(cands) == 4 and len(duplicates(cands)) == 1
    calls = []
    real = search_mod.evaluate_candidate
    monkeypatch.setattr(search_mod, "evaluate_candidate", lambda s, c, *a, **k: calls.append(c.key()) or real(s, c, *a, **k))
    journal = []
    n_layers = len(decoder_layers(model))
    res = search(sc, cands, base, cache, n_layers, max_evals=None, progress=False, on_result=journal.append)
    assert len(calls) == 3 and len(journal) == 4 and all(c.result is not None for c in res.evaluated)
    assert res.forward_layer_passes == 3 * (n_layers - LAYER)
    dup = next(c for c in res.evaluated if c.same_as is not None)
    assert journal[-1] is dup and dup.summary()["same_as"] == dup.same_as and dup.key() not in calls
    twin = next(c for c in res.evaluated if c.key() == dup.same_as)
    direct = real(sc, dup, cache)
    for r in (dup.result, twin.result):
        assert r["correct"] == direct["correct"] and r["accuracy"] == direct["accuracy"]
        assert r["log_loss"] == direct["log_loss"] and r["choice_loss"] == direct["choice_loss"]
    # a resumed run takes the journal's results and evaluates nothing
    calls.clear()
    fresh = _candidates(model, (0.05, 0.01), (1, 8), ("block",))
    again = search(sc, fresh, base, cache, n_layers, progress=False,
                   done={c.key(): c.result for c in res.evaluated})
    assert calls == [] and [c.key() for c in again.best] == [c.key() for c in res.best]


def test_a_search_takes_the_svds_of_the_fits_it_scores_and_no_others(smollm2, data_dir):
    """build_candidates scores every clustering from Gram eigendecompositions; a fit's SVDs are taken when one of
    its candidates is scored, and they are the SVDs `c2i apply` takes (fit from the edit alone): the same bits."""
    from c2i_fast.decompose import ClusteredSVD, fit
    task = check_tokenization(load_task("bigbench_epistemic_reasoning", data_dir), smollm2.tokenizer)
    sc = Scorer(smollm2.model, smollm2.tokenizer, split(task, 8, 4, seed=0)["select"], task.kind, batch_tokens=300)
    cache = PrefixCache()
    base = sc.evaluate(cache, capture={LAYER})
    cands = [c for c in _candidates(smollm2.model, (0.05, 0.01), (2, 4), ("block", "kmeans"))
             if c.edit.n_clusters > 1]                     # (k = 1 is always built: the scan's own SVD)
    fits = {id(c.source): c.source for c in cands}
    assert all(isinstance(f, ClusteredSVD) and not f.taken for f in fits.values()) and len(fits) >= 3
    res = search(sc, cands, base, cache, len(decoder_layers(smollm2.model)), max_evals=2, progress=False)
    scored = {id(c.source) for c in res.evaluated}
    assert len(res.evaluated) == 2 and all(f.taken == (i in scored) for i, f in fits.items())
    w = {r.name: r for r in target_matrices(smollm2.model)}[MATRIX].weight()
    for c in res.evaluated:
        assert torch.equal(candidate_factors(c).reconstruct(), fit(w, c.edit).reconstruct())


def test_dense_paper_faithful_search_scores_every_grid_point(smollm2, data_dir, monkeypatch):
    """The paper-faithful / LASER way (dense=True, the speed bench's baselines) evaluates duplicates too."""
    task = check_tokenization(load_task("fever", data_dir), smollm2.tokenizer)
    rows = split(task, 6, 4, seed=0)["select"]
    sc = Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind, share_prefix=False)
    base = sc.evaluate()
    cands = _candidates(smollm2.model, (0.05, 0.01), (8,), ("block",))
    calls = []
    real = search_mod.evaluate_candidate
    monkeypatch.setattr(search_mod, "evaluate_candidate", lambda s, c, *a, **k: calls.append(c.key()) or real(s, c, *a, **k))
    assert duplicates(cands)
    search(sc, cands, base, None, len(decoder_layers(smollm2.model)), progress=False, dense=True)
    assert len(calls) == len(cands)
