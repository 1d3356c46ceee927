"""Successive halving of the search (``prune="halve"``, c2i_fast.search.halve): every candidate on the first
quarter of the selection rows, the better half on the next quarter, the better half of those on the rest.

The search tests score fake candidates (fixed correctness vectors and per-example losses, batch by batch)
through the real search(); the SmolLM2 test checks that a finalist's result assembled round by round is the
result of one full pass."""
import random
from types import SimpleNamespace

import pytest

import c2i_fast.search as search_mod
from c2i_fast.models import decoder_layers
from c2i_fast.plan import Edit
from c2i_fast.replay import PrefixCache
from c2i_fast.search import Candidate, evaluate_candidate, halving_rounds, rank, search

N_LAYERS = 30


class FakeScorer:
    """Batches of consecutive examples (one row each); a pair is (batch, candidate key)."""

    def __init__(self, sizes, truth):
        self.truth = truth
        self.examples = list(range(sum(sizes)))
        self.batches, at = [], 0
        for s in sizes:
            self.batches.append(SimpleNamespace(rows=[SimpleNamespace(example=e) for e in range(at, at + s)]))
            at += s

    def _seen(self, pairs):
        return [r.example for b, _ in pairs for r in b.rows]

    def standing(self, pairs):
        key = pairs[0][1]
        seen = self._seen(pairs)
        t = self.truth[key]
        return len(seen), sum(t["correct"][e] for e in seen), sum(t["losses"][e] for e in seen) / len(seen)

    def pruned_result(self, scored, correct, batches):
        return {"pruned": True, "n": len(self.examples), "rows_scored": scored, "correct_so_far": correct,
                "batches_scored": batches, "batches": len(self.batches)}

    def metrics(self, pairs):
        assert sorted(self._seen(pairs)) == self.examples          # a finalist has seen every row
        t = self.truth[pairs[0][1]]
        return {"n": len(self.examples), "correct": list(t["correct"]), "accuracy": sum(t["correct"]) / len(t["correct"]),
                "log_loss": sum(t["losses"]) / len(t["losses"])}


def _fake(n_cands, n, rng):
    cands, truth = [], {}
    for i in range(n_cands):
        p = rng.choice([0.3, 0.5, 0.55, 0.6])
        correct = [rng.random() < p for _ in range(n)]
        c = Candidate(Edit(f"model.layers.{20 + i % 5}.mlp.down_proj", 0.1 + i / 1000), 20 + i % 5, -float(i))
        truth[c.key()] = {"correct": correct, "losses": [rng.random() for _ in range(n)]}
        cands.append(c)
    return cands, truth


def _patch(monkeypatch, calls):
    def fake(scorer, c, cache, only):
        calls.append((c.key(), tuple(only)))
        return [(scorer.batches[i], c.key()) for i in only]
    monkeypatch.setattr(search_mod, "score_batches", fake)

    def full(scorer, c, cache, applied=(), dense=False, within=True, stop=None):
        return scorer.metrics([(b, c.key()) for b in scorer.batches])
    monkeypatch.setattr(search_mod, "evaluate_candidate", full)


@pytest.mark.parametrize("sizes, expected", [
    ([10] * 10, [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9]]),      # 30 ≥ 25, 50 ≥ 50, the rest
    ([60, 20, 20], [[0], [1, 2]]),                           # the first batch is past a half: rounds merge
    ([100], [[0]]),                                          # one batch: nothing to halve
    ([1, 1, 1, 1], [[0], [1], [2, 3]]),
])
def test_rounds_cover_every_batch_once_in_order(sizes, expected):
    sc = FakeScorer(sizes, {})
    assert halving_rounds(sc) == expected


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("keep", [1, 3])
def test_halving_keeps_the_better_half_each_round(monkeypatch, seed, keep):
    rng = random.Random(seed)
    n, sizes = 100, [20] * 5                       # rounds: batches {0, 1}, {2}, {3, 4}
    cands, truth = _fake(24, n, rng)
    calls, journal = [], []
    _patch(monkeypatch, calls)
    sc = FakeScorer(sizes, truth)
    base = {"n": n, "accuracy": 0.2, "log_loss": 9.0, "correct": [True] * 20 + [False] * 80}
    res = search(sc, cands, base, PrefixCache(), N_LAYERS, max_evals=None, progress=False, prune="halve",
                 keep=keep, on_result=lambda c: journal.append(c.key()))
    assert sorted(journal) == sorted(c.key() for c in cands)              # each result journaled once
    full = [c for c in res.evaluated if not c.pruned]
    assert len(full) == max(keep, 6)                                       # 24 → 12 → 6 (never below keep)
    first = [c for c in cands if c.result.get("halved") == 0]
    second = [c for c in cands if c.result.get("halved") == 1]
    assert len(first) == 12 and len(second) == 6

    def standing(c, upto):
        seen = range(upto)
        return (sum(truth[c.key()]["correct"][e] for e in seen), -sum(truth[c.key()]["losses"][e] for e in seen))
    # everyone who went on stood at least as well as everyone who left, on the rows scored when they left
    assert min(standing(c, 40) for c in second + full) >= max(standing(c, 40) for c in first)
    assert min(standing(c, 60) for c in full) >= max(standing(c, 60) for c in second)
    assert all(c.result["rows_scored"] == 40 and c.result["correct_so_far"] == standing(c, 40)[0] for c in first)
    # the passes: 24 × 40 rows, 12 × 20, 6 × 40, each over the layers at and above the candidate's
    assert res.row_passes == sum((N_LAYERS - c.layer) * (40 if c in first else 60 if c in second else 100)
                                 for c in cands)
    assert res.pruned == 18 and res.row_passes_saved == sum((N_LAYERS - c.layer) * (n - c.result["rows_scored"])
                                                            for c in first + second)
    off = search(sc, cands, base, PrefixCache(), N_LAYERS, max_evals=None, progress=False)
    assert res.row_passes + res.row_passes_saved == off.row_passes
    assert res.best and res.best[0] in full and res.best[0] == rank(res.evaluated)[0]


def test_a_clear_winner_survives_and_a_resumed_search_keeps_what_it_had(monkeypatch):
    rng = random.Random(3)
    n = 100
    cands, truth = _fake(16, n, rng)
    winner = cands[9]
    truth[winner.key()]["correct"] = [True] * 90 + [False] * 10
    _patch(monkeypatch, [])
    sc = FakeScorer([25] * 4, truth)
    base = {"n": n, "accuracy": 0.5, "log_loss": 9.0, "correct": [True] * 50 + [False] * 50}
    res = search(sc, cands, base, PrefixCache(), N_LAYERS, max_evals=None, progress=False, prune="halve", keep=3)
    assert [c.key() for c in res.best] == [winner.key()]
    done = {c.key(): dict(c.result) for c in cands[:5]}
    calls = []
    _patch(monkeypatch, calls)
    for c in cands:
        c.result = None
    again = search(sc, cands, base, PrefixCache(), N_LAYERS, max_evals=None, progress=False, prune="halve",
                   keep=3, done=done)
    assert {k for k, _ in calls} == {c.key() for c in cands[5:]}            # the journaled five not rescored
    assert all(cands[i].result == done[cands[i].key()] for i in range(5))
    assert [c.key() for c in again.best] == [winner.key()]


def test_halving_refuses_what_it_cannot_do():
    with pytest.raises(ValueError):
        search(FakeScorer([4], {}), [], {}, None, N_LAYERS, compose=1, prune="halve")


def test_a_finalist_assembled_round_by_round_is_one_full_pass(smollm2, data_dir):
    """Truncations of two top-layer matrices on 40 FEVER rows (3 batches, 3 rounds): every finalist's result equals its
    plain evaluation bit for bit, and a dropped one's count is its plain count on the rows it saw."""
    from c2i_fast.decompose import full_svd
    from c2i_fast.evaluate import Scorer
    from c2i_fast.models import target_matrices
    from c2i_fast.tasks import check_tokenization, load_task, split
    task = check_tokenization(load_task("fever", data_dir), smollm2.tokenizer)
    sc = Scorer(smollm2.model, smollm2.tokenizer, split(task, 40, 8, seed=0)["select"], task.kind, batch_tokens=600)
    model = smollm2.model
    refs = [r for r in target_matrices(model) if r.layer in (27, 28) and r.type in ("mlp_out", "o")]
    cands = [Candidate(Edit(r.name, rho), r.layer, -rho, full_svd(r.weight()))
             for r in refs for rho in (0.9, 0.3, 0.05, 0.01)]
    assert len(cands) == 16
    cache = PrefixCache()
    base = sc.evaluate(cache, capture={27, 28})
    assert len(halving_rounds(sc)) == 3
    res = search(sc, cands, base, cache, len(decoder_layers(model)), max_evals=None, progress=False,
                 prune="halve", keep=3)
    halved = {c.key(): dict(c.result) for c in cands}
    full = [c for c in cands if not c.pruned]
    assert len(full) == 4 and res.pruned == 12                  # 16 → 8 → 4
    for c in cands:
        plain = evaluate_candidate(sc, c, cache)
        if c.key() in {f.key() for f in full}:
            assert halved[c.key()] == plain
        else:
            seen = {r.example for i in sum(halving_rounds(sc)[:halved[c.key()]["halved"] + 1], [])
                    for r in sc.batches[i].rows}
            assert halved[c.key()]["rows_scored"] == len(seen)
            assert halved[c.key()]["correct_so_far"] == sum(plain["correct"][e] for e in seen)
