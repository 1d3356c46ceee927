"""The shipping rule (c2i_fast.confirm) on synthetic evaluations: no model, every branch of the decision."""
from __future__ import annotations

import pytest

from c2i_fast import confirm as C
from c2i_fast.plan import Edit
from c2i_fast.search import Candidate


def _res(correct, loss=1.0, preds=None):
    return {"accuracy": sum(correct) / len(correct), "log_loss": loss, "correct": list(correct),
            "scoring": "mean", "predictions_mean": preds if preds is not None else [int(c) for c in correct]}


def _cand(name, sel_correct, loss=1.0):
    c = Candidate(Edit(name, 0.1), layer=3, predicted=0.0)
    c.result = _res(sel_correct, loss)
    return c


class _Scorer:
    """Stands in for a Scorer on the confirmation rows: base correctness given, candidates looked up by matrix."""
    def __init__(self, base, by_matrix):
        self.examples = [None] * len(base)
        self.base, self.by_matrix = base, by_matrix

    def evaluate(self, cache=None, capture=frozenset(), generate=True):
        self.passes = getattr(self, "passes", 0) + 1
        return _res(self.base)

    def capture(self, cache, layers):
        self.captured = set(layers)


@pytest.fixture
def fake_eval(monkeypatch):
    monkeypatch.setattr(C, "evaluate_candidate",
                        lambda scorer, c, cache, within=True: _res(scorer.by_matrix[c.edit.matrix]))


SEL_BASE = _res([True] * 50 + [False] * 50)


def test_paper_rule_keeps_the_search_plan():
    a = _cand("a", [True] * 60 + [False] * 40)
    d = C.decide("paper", [a], SEL_BASE, [a], None)
    assert d.plan == [a] and d.shipped and d.rule == "paper"
    d = C.decide("paper", [a], SEL_BASE, [], None)
    assert d.plan == [] and not d.shipped


def test_nothing_beat_the_base_on_selection(fake_eval):
    a = _cand("a", [True] * 50 + [False] * 50, loss=2.0)           # same accuracy, worse loss
    d = C.decide("confirm", [a], SEL_BASE, [], _Scorer([True] * 100, {}))
    assert not d.shipped and d.plan == [] and "nothing beat" in d.reason


def test_a_real_gain_ships_and_the_best_on_confirmation_is_chosen(fake_eval):
    a = _cand("a", [True] * 70 + [False] * 30)                     # best on selection …
    b = _cand("b", [True] * 65 + [False] * 35)                     # … but b confirms better
    base = [True] * 100 + [False] * 100
    conf = {"a": [True] * 102 + [False] * 98,                      # +2: noise
            "b": [True] * 100 + [True] * 20 + [False] * 80}        # +20 fixed, 0 broken
    d = C.decide("confirm", [a, b], SEL_BASE, [a], _Scorer(base, conf), top=3)
    assert d.shipped and d.plan == [b] and d.chosen == 1 and d.n_confirm == 200
    assert d.p_one_sided == pytest.approx(0.5 ** 20) and d.p_adjusted == pytest.approx(2 * 0.5 ** 20)
    assert d.confirmed[1]["paired"]["fixed"] == 20 and d.confirmed[1]["changed"] == pytest.approx(0.1)
    assert d.summary()["shipped"] is True


def test_a_small_gain_is_not_shipped(fake_eval):
    a = _cand("a", [True] * 70 + [False] * 30)
    base = [True] * 100 + [False] * 100
    # 12 fixed, 6 broken: one-sided p ≈ 0.12 > 0.05
    conf = {"a": [True] * 94 + [False] * 6 + [True] * 12 + [False] * 88}
    d = C.decide("confirm", [a], SEL_BASE, [a], _Scorer(base, conf))
    assert not d.shipped and d.plan == [] and "base kept" in d.reason
    assert d.p_adjusted == pytest.approx(C.mcnemar_one_sided(12, 6))


def test_a_loss_on_confirmation_is_not_shipped(fake_eval):
    a = _cand("a", [True] * 70 + [False] * 30)
    base = [True] * 100 + [False] * 100
    d = C.decide("confirm", [a], SEL_BASE, [a], _Scorer(base, {"a": [True] * 90 + [False] * 110}))
    assert not d.shipped and "no candidate gained" in d.reason and d.p_one_sided == 1.0


def test_bonferroni_counts_the_candidates_confirmed(fake_eval):
    cands = [_cand(n, [True] * (70 - i) + [False] * (30 + i)) for i, n in enumerate("abcd")]
    base = [True] * 100 + [False] * 100
    conf = {n: [True] * 100 + [True] * 7 + [False] * 93 for n in "abcd"}        # 7 fixed, 0 broken: p = 1/128
    d = C.decide("confirm", cands, SEL_BASE, cands[:1], _Scorer(base, conf), top=3)
    assert len(d.confirmed) == 3 and d.chosen == 0                 # ties go to the selection order
    assert d.p_adjusted == pytest.approx(3 / 128) and d.shipped
    d = C.decide("confirm", cands, SEL_BASE, cands[:1], _Scorer(base, conf), top=3, alpha=0.02)
    assert not d.shipped                                           # 3/128 = 0.023 > 0.02


def test_too_few_confirmation_rows_fall_back_to_the_max_t_test():
    a = _cand("a", [True] * 70 + [False] * 30)
    small = _Scorer([True] * 10, {})
    d = C.decide("confirm", [a], SEL_BASE, [a], small, significance={"p_max": 0.01})
    assert d.fallback and d.shipped and d.plan == [a] and "only 10 confirmation rows" in d.reason
    d = C.decide("confirm", [a], SEL_BASE, [a], None, significance={"p_max": 0.3})
    assert d.fallback and not d.shipped and d.n_confirm == 0


def test_changed_fraction_reads_the_answers():
    assert C.changed_fraction(_res([True, False], preds=[0, 1]), _res([True, True], preds=[0, 0])) == 0.5
    gen_a, gen_b = {"generations": ["x", "y"]}, {"generations": ["x", "z"]}
    assert C.changed_fraction(gen_a, gen_b) == 0.5
    assert C.changed_fraction({}, {}) is None


class _Metrics:
    """Stands in for a MetricsCache: one stored result, every lookup counted."""
    def __init__(self, stored=None):
        self.stored, self.gets, self.puts = stored, 0, 0

    def get(self, scorer, generate=True):
        self.gets += 1
        return self.stored

    def put(self, scorer, result, generate=True):
        self.puts += 1
        self.stored = result


def test_the_base_confirmation_pass_is_read_from_the_metrics_cache(fake_eval):
    a = _cand("a", [True] * 70 + [False] * 30)
    base = [True] * 100 + [False] * 100
    conf = {"a": [True] * 130 + [False] * 70}
    first, mc = _Scorer(base, conf), _Metrics()
    d1 = C.decide("confirm", [a], SEL_BASE, [], first, mc=mc)
    assert first.passes == 1 and mc.puts == 1                        # a miss: the pass runs and is stored
    second = _Scorer([False] * 200, conf)                             # its own pass would say otherwise
    d2 = C.decide("confirm", [a], SEL_BASE, [], second, mc=mc)
    assert getattr(second, "passes", 0) == 0 and second.captured == {3}   # only the prefix cache is filled
    assert d2.base == d1.base and d2.shipped and d2.p_one_sided == d1.p_one_sided
