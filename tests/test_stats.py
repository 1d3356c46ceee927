"""The selection-gain test: exact McNemar tail, max-T p-values that control the false-positive rate for the
best of J no-effect candidates, detection of a real effect, and the --gate-p plan gate."""
import math

import pytest
import torch

from c2i_fast.errors import C2IError
from c2i_fast.pipeline import gate, significance
from c2i_fast.search import Candidate
from c2i_fast.stats import mcnemar_one_sided, mcnemar_two_sided, paired_difference, selection_gain_test
from c2i_fast.transform import Edit


def test_mcnemar_tail_is_the_binomial_tail():
    assert mcnemar_one_sided(0, 0) == 1.0
    assert mcnemar_one_sided(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_one_sided(0, 5) == 1.0
    assert mcnemar_one_sided(3, 1) == pytest.approx((math.comb(4, 3) + 1) / 16)


def test_two_sided_mcnemar_doubles_the_larger_tail_and_caps_at_one():
    assert mcnemar_two_sided(5, 0) == pytest.approx(2 / 32) == mcnemar_two_sided(0, 5)
    assert mcnemar_two_sided(3, 3) == 1.0 and mcnemar_two_sided(0, 0) == 1.0
    # 11 vs 2 discordant: 2 · P(X ≥ 11), X ~ Bin(13, ½), summed by hand
    assert mcnemar_two_sided(11, 2) == pytest.approx(2 * sum(math.comb(13, k) for k in range(11, 14)) / 2 ** 13)


def test_paired_difference_counts_the_discordant_examples_and_their_spread():
    base = [True, True, False, False, True, False, True, False, False, False]
    adapted = [True, False, True, True, True, False, True, True, False, False]     # 3 fixed, 1 broken
    r = paired_difference(base, adapted)
    n = 10
    assert (r["n"], r["fixed"], r["broken"]) == (n, 3, 1)
    assert r["difference"] == pytest.approx(sum(adapted) / n - sum(base) / n)
    d = torch.tensor(adapted, dtype=torch.float64) - torch.tensor(base, dtype=torch.float64)
    assert r["se"] == pytest.approx(math.sqrt(d.var(unbiased=False).item() / n))    # population var of d, /n
    assert r["ci95"] == pytest.approx([r["difference"] - 1.96 * r["se"], r["difference"] + 1.96 * r["se"]])
    assert r["p_two_sided"] == pytest.approx(mcnemar_two_sided(3, 1))
    same = paired_difference(base, base)
    assert (same["fixed"], same["broken"], same["difference"], same["se"], same["p_two_sided"]) == (0, 0, 0, 0, 1)
    assert paired_difference([], []) is None
    with pytest.raises(C2IError, match="3 adapted correctness flags, 2 base"):
        paired_difference([True, False], [True, False, True])


def test_paired_standard_error_follows_how_many_answers_change():
    # 500 examples, half right; the edit changes 10 answers (6 fixed, 4 broken). One accuracy's SE is ±2.2 pts,
    # the paired difference's about ±0.6: the number a reader needs to judge "−0.2 pts".
    base = [i % 2 == 0 for i in range(500)]
    adapted = list(base)
    for i in range(1, 13, 2)[:6]:
        adapted[i] = True
    for i in range(0, 8, 2)[:4]:
        adapted[i] = False
    r = paired_difference(base, adapted)
    assert (r["fixed"], r["broken"]) == (6, 4)
    assert r["se"] < 0.3 * math.sqrt(0.25 / 500)
    # and the other way: an edit that reshuffles 200 of 500 answers (100 each way) is noisier than one accuracy
    shuffled = [not b if i < 200 else b for i, b in enumerate(base)]
    r = paired_difference(base, shuffled)
    assert (r["fixed"], r["broken"], r["difference"]) == (100, 100, 0.0)
    assert r["se"] == pytest.approx(math.sqrt(0.4 / 500)) and r["se"] > math.sqrt(0.25 / 500)


def _noise(j: int, n: int, gen: torch.Generator, flip: float = 0.3):
    """Base correctness and J candidates that flip a random `flip` share of examples, symmetric in sign."""
    base = torch.rand(n, generator=gen) < 0.5
    cands = []
    for _ in range(j):
        flips = torch.rand(n, generator=gen) < flip
        cands.append((base ^ flips).tolist())
    return base.tolist(), cands


def test_false_positive_rate_for_the_best_of_many_no_effect_candidates():
    # 24 candidates that flip answers at random (under H0 a flip is as likely to fix as to break) — with a
    # symmetric base (half right), a fix and a break are equally likely. The max-T p must be roughly uniform:
    # about 5% of such datasets below 0.05, while the uncorrected p of the best is small far more often.
    gen = torch.Generator().manual_seed(1)
    p_max, p_single = [], []
    for s in range(150):
        base, cands = _noise(24, 100, gen)
        r = selection_gain_test(base, cands, n_permutations=400, seed=s)
        p_max.append(r["p_max"])
        p_single.append(r["p_single"])
    frac_max = sum(p < 0.05 for p in p_max) / len(p_max)
    frac_single = sum(p < 0.05 for p in p_single) / len(p_single)
    assert frac_max <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / len(p_max))      # ≤ ~10% of 150
    assert frac_single > 4 * max(frac_max, 0.05)                            # the winner's curse, uncorrected


def test_a_real_effect_is_detected():
    gen = torch.Generator().manual_seed(2)
    base, cands = _noise(20, 100, gen, flip=0.1)
    good = list(base)
    fixed = 0
    for i, c in enumerate(good):          # one edit fixes 15 wrong answers and breaks none
        if not c and fixed < 15:
            good[i], fixed = True, fixed + 1
    r = selection_gain_test(base, [good] + cands, n_permutations=2000)
    assert r["gain"] == 15 and r["wins"] == 15 and r["losses"] == 0
    assert r["p_single"] == pytest.approx(2.0 ** -15)
    assert r["p_max"] == pytest.approx(1 / 2001)     # no sign flip of the others reaches 15
    assert r["candidates"] == 21 and r["n"] == 100


def test_one_candidate_matches_the_exact_mcnemar_p():
    base = [False] * 30 + [True] * 30
    cand = [True] * 9 + [False] * 21 + [True] * 27 + [False] * 3      # 9 fixed, 3 broken: gain 6
    r = selection_gain_test(base, [cand], n_permutations=40000, seed=3)
    assert (r["gain"], r["wins"], r["losses"]) == (6, 9, 3)
    assert r["p_max"] == pytest.approx(r["p_single"], abs=0.01)
    assert r["p_max"] >= r["p_single"] - 0.01


def test_no_gain_is_p_one_and_bad_input_is_an_error():
    base = [True, False, True]
    r = selection_gain_test(base, [[True, False, False], [True, False, True]])
    assert r["gain"] == 0 and r["p_max"] == 1.0 and r["p_single"] == 1.0
    assert selection_gain_test(base, []) is None
    with pytest.raises(C2IError, match="candidate 1 has 2 correctness flags"):
        selection_gain_test(base, [[True] * 3, [True] * 2])
    with pytest.raises(C2IError, match="n_permutations"):
        selection_gain_test(base, [[True] * 3], n_permutations=0)


def _cand(name: str, correct: list[bool], acc: float) -> Candidate:
    c = Candidate(Edit(name, 0.1), 0, 0.0)
    c.result = {"accuracy": acc, "log_loss": 1.0, "correct": correct}
    return c


def test_gate_drops_a_plan_whose_gain_is_not_significant():
    base = {"accuracy": 0.5, "log_loss": 1.0, "correct": [True, False] * 10}
    c = _cand("m", [True] * 11 + [False] + [True, False] * 4, 0.6)
    sig = significance(base, [c])
    assert sig["gain"] == sum(c.result["correct"]) - 10
    assert gate([c], c.result, base, sig, None) == ([c], c.result, False)          # off: kept
    assert gate([c], c.result, base, sig, 1.0) == ([c], c.result, False)           # p ≤ 1 always
    assert gate([c], c.result, base, sig, 0.0) == ([], base, True)                 # p > 0 always
    assert gate([], base, base, sig, 0.0) == ([], base, False)                     # nothing to drop
    old = _cand("m", [True] * 20, 1.0)
    del old.result["correct"]                                                      # journal of an old run
    assert significance(base, [old]) is None
