"""Is a selection gain more than the best of many no-effect edits would show?

The search scores J candidates on the same n selection examples and keeps the most accurate one. Even edits with
no systematic effect show a "gain" that way (the winner's curse). On FEVER, for example, the best of 48 gains
11 points on 100 selection examples and nothing on the held-out split.

:func:`selection_gain_test` is the single-step max-T permutation test (Westfall & Young, 1993) on paired
per-example correctness. Each candidate j gives differences d_ji = c_ji − b_i ∈ {−1, 0, 1} against the base
model. Under H0 no edit changes the chance of answering an example correctly, so every example's differences
are symmetric in sign (McNemar's assumption). Flipping the sign of example i's differences for all candidates
together keeps their correlation and gives one null draw of T = max_j Σ_i d_ji. Then
p = (1 + #{T* ≥ T_obs}) / (1 + N), which accounts for having picked the best of J. ``p_single`` is the exact
one-sided McNemar p of the chosen candidate alone, with no correction for the choice.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .errors import C2IError


def mcnemar_one_sided(wins: int, losses: int) -> float:
    """P(X ≥ wins) for X ~ Binomial(wins + losses, ½): the exact one-sided McNemar test."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def mcnemar_two_sided(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p: 2 · P(X ≥ max(fixed, broken)) for X ~ Binomial(fixed + broken, ½), capped at 1."""
    return min(1.0, 2 * mcnemar_one_sided(max(fixed, broken), min(fixed, broken)))


def paired_difference(base_correct: Sequence[bool], adapted_correct: Sequence[bool]) -> dict | None:
    """Held-out accuracy difference of two models on the same examples, judged pairwise.

    The standard error of one accuracy (√(a(1−a)/n), ±2.2 points at n = 500 near a = ½) is the wrong yardstick
    for a difference measured on the same examples: only the examples one model gets right and the other wrong
    carry it, so the paired error is smaller when few answers change and larger when many do (an edit that
    reshuffles 43% of FEVER's answers: ±2.9 points at n = 500). With
    d_i = c_i − b_i ∈ {−1, 0, 1}: difference = mean(d), its standard error √(var(d)/n), a normal 95% interval,
    and the exact two-sided McNemar p on the discordant examples. Returns None for no examples.
    Keys: n, fixed (adapted right, base wrong), broken (the reverse), difference, se, ci95 (low, high), p_two_sided.
    """
    n = len(base_correct)
    if len(adapted_correct) != n:
        raise C2IError(f"paired difference: {len(adapted_correct)} adapted correctness flags, {n} base ones")
    if n == 0:
        return None
    fixed = sum(1 for b, a in zip(base_correct, adapted_correct) if a and not b)
    broken = sum(1 for b, a in zip(base_correct, adapted_correct) if b and not a)
    diff = (fixed - broken) / n
    se = math.sqrt(max((fixed + broken) / n - diff * diff, 0.0) / n)
    return {"n": n, "fixed": fixed, "broken": broken, "difference": diff, "se": se,
            "ci95": [diff - 1.96 * se, diff + 1.96 * se], "p_two_sided": mcnemar_two_sided(fixed, broken)}


def selection_gain_test(base_correct: Sequence[bool], candidate_correct: Sequence[Sequence[bool]],
                        n_permutations: int = 10_000, seed: int = 0) -> dict | None:
    """Max-T sign-flip test of the best candidate's gain in correct answers over the base model.

    base_correct: (n,) per-example correctness of the base model. candidate_correct: J rows of (n,), in the order
    the search ranks them; the first row with the largest gain is the one reported (the search's pick when it
    ranks by accuracy). Returns None when there is no candidate.
    Keys: n, candidates, gain (correct answers), wins / losses (examples the pick fixes / breaks), p_single, p_max,
    permutations.
    """
    if not candidate_correct:
        return None
    if n_permutations < 1:
        raise C2IError(f"n_permutations must be ≥ 1, got {n_permutations}")
    n = len(base_correct)
    bad = [j for j, c in enumerate(candidate_correct) if len(c) != n]
    if bad:
        raise C2IError(f"candidate {bad[0]} has {len(candidate_correct[bad[0]])} correctness flags, "
                       f"the base model {n}")
    b = torch.tensor([bool(x) for x in base_correct], dtype=torch.float64)
    d = torch.tensor([[bool(x) for x in c] for c in candidate_correct], dtype=torch.float64) - b   # (J, n)
    gains = d.sum(1)
    pick = int(torch.argmax(gains))          # first of the maxima: the search's order breaks ties
    t_obs = float(gains[pick])
    wins, losses = int((d[pick] > 0).sum()), int((d[pick] < 0).sum())
    if t_obs <= 0:
        p_max = 1.0                          # nothing gained: no evidence to weigh
    else:
        gen = torch.Generator().manual_seed(seed)
        exceed, done = 0, 0
        while done < n_permutations:         # (N, n) signs in chunks: memory stays small for any N
            m = min(4096, n_permutations - done)
            signs = torch.randint(0, 2, (m, n), generator=gen, dtype=torch.float64) * 2 - 1
            t_null = (signs @ d.T).max(1).values
            exceed += int((t_null >= t_obs - 1e-9).sum())
            done += m
        p_max = (1 + exceed) / (1 + n_permutations)
    return {"n": n, "candidates": len(candidate_correct), "gain": int(round(t_obs)), "wins": wins,
            "losses": losses, "p_single": mcnemar_one_sided(wins, losses), "p_max": p_max,
            "permutations": n_permutations}
