"""Exact pruning of the search (c2i_fast.search.Pruner, Scorer.evaluate's ``stop``): a candidate stops once even
every remaining selection row answered correctly cannot put it among the best ``keep``; the plan and the best
``keep`` are those of unpruned scoring, and a resumed run gives them too.

The search tests score fake candidates (fixed correctness vectors, batch by batch) through the real search();
the Scorer tests run SmolLM2."""
import random

import pytest

import c2i_fast.search as search_mod
from c2i_fast.evaluate import Scorer, better
from c2i_fast.models import decoder_layers
from c2i_fast.plan import Edit
from c2i_fast.replay import PrefixCache
from c2i_fast.search import Candidate, Pruner, Racer, Stop, rank, search
from c2i_fast.tasks import check_tokenization, load_task, split

N_LAYERS = 30


class FakeScorer:
    def __init__(self, n):
        self.examples = list(range(n))


def _fake(n_cands, n, batches, rng):
    """Candidates with random correctness vectors (some near-duplicates in accuracy) and log-losses."""
    cands, truth = [], {}
    for i in range(n_cands):
        p = rng.choice([0.2, 0.5, 0.6, 0.62, 0.65, 0.7])
        correct = [rng.random() < p for _ in range(n)]
        c = Candidate(Edit(f"model.layers.{20 + i % 5}.mlp.down_proj", 0.1 + i / 1000), 20 + i % 5, -float(i))
        truth[c.key()] = {"n": n, "correct": correct, "accuracy": sum(correct) / n,
                          "log_loss": rng.choice([0.5, 0.6, 0.7]) if rng.random() < 0.5 else rng.random()}
        cands.append(c)
    return cands, truth


def _patch(monkeypatch, truth, batches, calls, likely_wrong=None):
    """evaluate_candidate → the candidate's fixed result, asking ``stop`` after each batch as Scorer.evaluate does."""
    def fake(scorer, c, cache, applied=(), dense=False, within=True, stop=None):
        calls.append(c.key())
        if stop is not None and likely_wrong is not None:        # the base's wrong answers travel with the stop
            assert stop.likely_wrong == likely_wrong
        res = truth[c.key()]
        seen = correct = 0
        for size in batches:
            seen += size
            correct += sum(res["correct"][seen - size:seen])
            outcomes = dict(enumerate(res["correct"][:seen]))
            if stop is not None and seen < res["n"] and stop(correct, res["n"] - seen, outcomes):
                return {"pruned": True, "n": res["n"], "rows_scored": seen, "correct_so_far": correct}
        return dict(res)
    monkeypatch.setattr(search_mod, "evaluate_candidate", fake)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("keep", [1, 3])
def test_pruned_search_keeps_the_plan_and_the_best_keep(monkeypatch, seed, keep):
    rng = random.Random(seed)
    n, batches = 50, [12, 9, 15, 10, 4]
    cands, truth = _fake(24, n, batches, rng)
    n_base = rng.choice([10, 25, 31, 34])                   # below, among and above the candidates' counts
    base = {"n": n, "accuracy": n_base / n, "log_loss": 0.65, "correct": [True] * n_base + [False] * (n - n_base)}
    calls = []
    _patch(monkeypatch, truth, batches, calls, likely_wrong=[not ok for ok in base["correct"]])
    off = search(FakeScorer(n), cands, base, PrefixCache(), N_LAYERS, max_evals=20, progress=False)

    def best_keep(res):         # what the rules read: the best keep that beat the base (contenders; the plan)
        return [c.key() for c in rank(res.evaluated) if better(c.result, base)][:keep]
    full = best_keep(off)
    plan_off = [c.key() for c in off.best]
    for c in cands:
        c.result = None
    journal = []
    on = search(FakeScorer(n), cands, base, PrefixCache(), N_LAYERS, max_evals=20, progress=False,
                prune="exact", keep=keep, on_result=lambda c: journal.append((c.key(), c.result)))
    assert [c.key() for c in on.best] == plan_off
    assert best_keep(on) == full
    layers = [int(k.split(".")[2]) for k, _ in journal]      # the same candidates, the deepest (cheapest) first
    assert layers == sorted(layers, reverse=True) and len(journal) == len(off.evaluated)
    assert on.final == off.final
    pruned = [c for c in on.evaluated if c.pruned]
    assert on.pruned == len(pruned)
    assert on.row_passes_saved == sum((N_LAYERS - c.layer) * (n - c.result["rows_scored"]) for c in pruned)
    assert on.row_passes + on.row_passes_saved == off.row_passes
    bar = max(n_base, sorted((sum(truth[c.key()]["correct"]) for c in rank(off.evaluated)), reverse=True)[keep - 1])
    for c in pruned:                        # provably out: its best case is below the keep-th best
        assert c.result["correct_so_far"] + n - c.result["rows_scored"] < bar
        assert sum(truth[c.key()]["correct"]) < bar
        assert "accuracy" not in c.summary() and c.summary()["pruned"] is True
    # resumed from any prefix of the journal: the same plan, the same pruned candidates, no re-scoring of the done
    cut = rng.randrange(len(journal) + 1)
    for c in cands:
        c.result = None
    calls.clear()
    again = search(FakeScorer(n), cands, base, PrefixCache(), N_LAYERS, max_evals=20, progress=False,
                   prune="exact", keep=keep, done=dict(journal[:cut]))
    assert [c.key() for c in again.best] == plan_off and again.pruned == on.pruned
    assert not set(calls) & {k for k, _ in journal[:cut]}
    # resumed with pruning off: the pruned ones are scored in full
    for c in cands:
        c.result = None
    calls.clear()
    full_again = search(FakeScorer(n), cands, base, PrefixCache(), N_LAYERS, max_evals=20, progress=False,
                        done=dict(journal))
    assert set(calls) == {c.key() for c in pruned} and full_again.pruned == 0
    assert [c.key() for c in full_again.best] == plan_off


def test_pruner_bar_counts_distinct_factors_and_waits_for_keep():
    p = Pruner(2)
    mk = lambda i, k: Candidate(Edit("m.layers.1.mlp.up_proj", 0.1 * (i + 1)), 1, 0.0)   # noqa: E731
    a, b = mk(0, 0), mk(1, 0)
    a.result = {"n": 10, "correct": [True] * 8 + [False] * 2, "accuracy": 0.8, "log_loss": 1.0}
    p.add(a)
    assert p.stop() is None                    # one scored, keep = 2: nothing can be ruled out yet
    p.add(a)                                   # the same factors again (a twin from a journal): counted once
    assert p.bar() is None
    b.result = {"n": 10, "correct": [True] * 6 + [False] * 4, "accuracy": 0.6, "log_loss": 1.0}
    p.add(b)
    assert p.bar() == 6
    stop = p.stop()
    assert stop(1, 4, {}) and not stop(2, 4, {})        # 5 < 6 stops; 6 (a tie in accuracy) goes on: log-loss decides
    pruned = mk(2, 0)
    pruned.result = {"pruned": True, "n": 10, "rows_scored": 4, "correct_so_far": 0}
    p.add(pruned)
    assert p.bar() == 6 and rank([a, b, pruned]) == [a, b]


def test_the_base_model_is_a_bar_from_the_start():
    """A candidate that cannot reach the base's correct count ends below the base: no rule reads it."""
    base = {"n": 10, "correct": [True] * 7 + [False] * 3, "accuracy": 0.7, "log_loss": 1.0}
    p = Pruner(2, base)
    assert p.bar() == 7 and p.stop().bar == 7 and p.stop().likely_wrong == [False] * 7 + [True] * 3
    stop = p.stop()
    assert stop(2, 4, {}) and not stop(3, 4, {})            # 6 < 7 stops; a tie in accuracy goes on (log-loss)
    mk = lambda rho: Candidate(Edit("m.layers.1.mlp.up_proj", rho), 1, 0.0)     # noqa: E731
    for rho, k in ((0.1, 9), (0.2, 8)):
        c = mk(rho)
        c.result = {"n": 10, "correct": [True] * k + [False] * (10 - k), "accuracy": k / 10, "log_loss": 1.0}
        p.add(c)
    assert p.bar() == 8                                     # the 2nd best is above the base: it is the bar now
    assert Pruner(1, {"n": 10, "accuracy": 0.7}).bar() == 7 and Pruner(1, {}).bar() is None


def test_racing_stops_what_is_beaten_paired_and_nothing_else():
    n = 60
    base = {"correct": [True] * 30 + [False] * 30}
    r = Racer(2, base)
    stop = r.stop()                              # nothing scored yet: the base is the reference
    worse = {e: e >= 30 for e in range(24)}      # the base's 24 correct answers all wrong: p = 2^-24
    assert stop(0, n - 24, worse)
    assert not stop(0, n - 10, {e: False for e in range(10)})        # beaten, but fewer than 20 examples seen
    assert stop(12, n - 24, {e: e % 2 == 0 for e in range(24)})      # 0 fixed / 12 broken: p = 2^-12 < 0.01
    swapped = {e: e >= 30 for e in range(18, 42)}                    # 12 fixed / 12 broken: no evidence
    assert not stop(12, n - 24, swapped)
    assert not stop(12, n - 24, {e: e < 30 for e in range(24)})      # = the base on every row so far
    # two fully scored: the 2nd best also becomes a reference (a candidate can be fine against the base, beaten by it)
    mk = lambda rho: Candidate(Edit("m.layers.1.mlp.up_proj", rho), 1, 0.0)    # noqa: E731
    a, b = mk(0.1), mk(0.2)
    a.result = {"n": n, "correct": [True] * 60, "accuracy": 1.0, "log_loss": 0.1}
    b.result = {"n": n, "correct": [True] * 55 + [False] * 5, "accuracy": 55 / 60, "log_loss": 0.2}
    r.add(a)
    r.add(b)
    stop = r.stop()
    like_base = {e: e < 30 for e in range(30)}   # base-like: 30 correct of the first 30, but b got all 30 too
    assert not stop(30, 30, like_base)
    half = {e: e < 15 for e in range(30)}        # 15 broken vs b, 0 fixed: p = 2^-15
    assert stop(15, 30, half)
    assert stop(1, 3, {})                        # and the exact bar still applies (1 + 3 < 55)


def test_race_search_keeps_a_clear_winner_and_saves_passes(monkeypatch):
    rng = random.Random(7)
    n, batches = 100, [20] * 5
    cands, truth = _fake(24, n, batches, rng)
    winner = cands[5]
    truth[winner.key()] = {"n": n, "correct": [True] * 90 + [False] * 10, "accuracy": 0.9, "log_loss": 0.1}
    base = {"n": n, "accuracy": 0.5, "log_loss": 0.65, "correct": [True] * 50 + [False] * 50}
    _patch(monkeypatch, truth, batches, [])
    runs = {}
    for mode in ("exact", "race"):
        for c in cands:
            c.result = None
        runs[mode] = search(FakeScorer(n), cands, base, PrefixCache(), N_LAYERS, max_evals=None,
                            progress=False, prune=mode, keep=3)
    assert [c.key() for c in runs["race"].best] == [winner.key()] == [c.key() for c in runs["exact"].best]
    assert runs["race"].pruned > runs["exact"].pruned
    assert runs["race"].row_passes < runs["exact"].row_passes
    assert runs["race"].row_passes + runs["race"].row_passes_saved == runs["exact"].row_passes + runs["exact"].row_passes_saved


def test_pruning_refuses_what_it_cannot_keep_exact():
    with pytest.raises(ValueError):
        search(FakeScorer(4), [], {}, None, N_LAYERS, compose=1, prune="exact")
    with pytest.raises(ValueError):
        search(FakeScorer(4), [], {}, None, N_LAYERS, prune="maybe")


def _batches(wrong_per_batch, sizes):
    """A Scorer-shaped object (batches of one-row examples) whose examples the base gets wrong as given."""
    from types import SimpleNamespace
    batches, likely_wrong = [], []
    for w, n in zip(wrong_per_batch, sizes):
        batches.append(SimpleNamespace(rows=[SimpleNamespace(example=len(likely_wrong) + i) for i in range(n)]))
        likely_wrong += [True] * w + [False] * (n - w)
    return SimpleNamespace(batches=batches, examples=likely_wrong), likely_wrong


@pytest.mark.parametrize("seed", range(30))
def test_the_stopping_order_runs_the_fewest_rows_that_can_stop_a_pass_first(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 25) for _ in range(rng.randint(2, 9))]
    wrong = [rng.randint(0, n) for n in sizes]
    sc, likely_wrong = _batches(wrong, sizes)
    n, bar = len(likely_wrong), rng.randint(1, len(likely_wrong))
    order = Scorer.stopping_order(sc, likely_wrong, bar)
    assert sorted(order) == list(range(len(sizes)))
    need = min(n - bar, sum(wrong) - 1) + 1
    if need <= 0 or need > sum(wrong):
        assert order == list(range(len(sizes)))
        return
    fewest = min(sum(sizes[i] for i in range(len(sizes)) if m >> i & 1) for m in range(1 << len(sizes))
                 if sum(wrong[i] for i in range(len(sizes)) if m >> i & 1) >= need)
    at, got, rows = 0, 0, 0
    while got < need:
        got, rows, at = got + wrong[order[at]], rows + sizes[order[at]], at + 1
    assert rows == fewest                            # a base-like candidate one answer worse stops there
    assert order[at:] == sorted(order[at:])          # the rest in their own order


def test_the_stopping_order_keeps_a_small_last_batch_last():
    """CounterFact-like: the base is right on 4 of 100, so a pass can stop only before a last batch of fewer
    rows than the bar; the order keeps such a batch last rather than running it first for its density."""
    sizes, wrong = [25, 17, 15, 18, 14, 8, 3], [24, 17, 15, 17, 13, 7, 3]
    sc, likely_wrong = _batches(wrong, sizes)
    assert Scorer.stopping_order(sc, likely_wrong, 8)[-1] == 6
    assert Scorer.stopping_order(sc, likely_wrong, None) == list(range(7))


# -- the Scorer, on SmolLM2 ----------------------------------------------------------------------------
def _scorer(smollm2, data_dir, name, n=40):
    task = check_tokenization(load_task(name, data_dir), smollm2.tokenizer)
    rows = split(task, n, 8, seed=0)["select"]
    return Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind, batch_tokens=600)


@pytest.mark.parametrize("name", ["fever", "counterfact"])
def test_a_stop_that_never_fires_changes_no_bit(smollm2, data_dir, name):
    sc = _scorer(smollm2, data_dir, name)
    assert len(sc.batches) > 2
    asked = []
    plain = sc.evaluate()
    watched = sc.evaluate(stop=lambda correct, remaining, outcomes:        # outcomes is live: keep a copy
                          asked.append((correct, remaining, dict(outcomes))) and False)
    assert watched == plain
    assert len(asked) == len(sc.batches) - 1
    assert all(c + r <= len(sc.examples) and c == sum(o.values()) and len(o) + r == len(sc.examples)
               and all(plain["correct"][e] == ok for e, ok in o.items()) for c, r, o in asked)
    assert asked[-1][0] <= sum(plain["correct"])
    # planned for a candidate one answer worse than the base: another batch order, the same bits
    wrong = [not ok for ok in plain["correct"]]
    bar = sum(plain["correct"]) + 1
    order = sc.stopping_order(wrong, bar)
    assert sorted(order) == list(range(len(sc.batches))) and order != sorted(order)
    asked.clear()
    reordered = sc.evaluate(stop=Stop(lambda correct, remaining, outcomes: asked.append(dict(outcomes)) and False,
                                      bar, wrong))
    assert reordered == plain
    assert set(asked[0]) == {r.example for r in sc.batches[order[0]].rows}


def test_a_stop_ends_the_pass_with_what_it_has_seen(smollm2, data_dir):
    sc = _scorer(smollm2, data_dir, "bigbench_epistemic_reasoning")
    plain = sc.evaluate()
    res = sc.evaluate(stop=lambda correct, remaining, outcomes: True)
    assert res["pruned"] and res["batches_scored"] == 1
    first = {r.example for r in sc.batches[0].rows}
    assert res["rows_scored"] == len(first)
    assert res["correct_so_far"] == sum(plain["correct"][e] for e in first)
    wrong = [not ok for ok in plain["correct"]]
    bar = sum(plain["correct"])
    res = sc.evaluate(stop=Stop(lambda correct, remaining, outcomes: True, bar, wrong))
    first = {r.example for r in sc.batches[sc.stopping_order(wrong, bar)[0]].rows}
    assert res["rows_scored"] == len(first) and res["correct_so_far"] == sum(plain["correct"][e] for e in first)


def test_search_on_smollm2_prunes_without_changing_the_plan(smollm2, data_dir):
    """Plain truncations of two top layers' matrices on 40 FEVER rows: the same plan and best 3, fewer rows."""
    from c2i_fast.decompose import full_svd
    from c2i_fast.models import target_matrices
    sc = _scorer(smollm2, data_dir, "fever")
    model = smollm2.model
    refs = [r for r in target_matrices(model) if r.layer in (27, 28) and r.type in ("mlp_out", "o")]
    cands = [Candidate(Edit(r.name, rho), r.layer, -rho, full_svd(r.weight()))
             for r in refs for rho in (0.9, 0.3, 0.05, 0.01)]
    assert len(cands) == 16
    n_layers = len(decoder_layers(model))
    cache = PrefixCache()
    base = sc.evaluate(cache, capture={27, 28})
    off = search(sc, cands, base, cache, n_layers, max_evals=None, progress=False)
    for c in cands:
        c.result = None
    on = search(sc, cands, base, cache, n_layers, max_evals=None, progress=False, prune="exact", keep=3)
    assert [c.key() for c in on.best] == [c.key() for c in off.best] and on.final == off.final
    beat = lambda res: [c.key() for c in rank(res.evaluated) if better(c.result, base)][:3]     # noqa: E731
    assert beat(on) == beat(off)
    assert on.row_passes + on.row_passes_saved == off.row_passes


def test_the_paper_rule_keeps_only_its_pick_exact():
    from c2i_fast.config import AdaptConfig
    from c2i_fast.search import prune_keep
    assert prune_keep(AdaptConfig(model="m", task="t", out="-", rule="paper")) == 1
    assert prune_keep(AdaptConfig(model="m", task="t", out="-", rule="paper", compare_rules=True)) == 3
    assert prune_keep(AdaptConfig(model="m", task="t", out="-", rule="confirm", confirm_top=4)) == 4
    assert prune_keep(AdaptConfig(model="m", task="t", out="-", rule="paper", keep_best=3)) == 3     # a bench's
    assert prune_keep(AdaptConfig(model="m", task="t", out="-", rule="confirm", keep_best=2)) == 3
