"""The rule that decides whether a plan ships: confirm the search's gain on rows it was not picked on.

The search picks the best of dozens of candidates on ~100 selection rows; on a model at chance that winner is
noise (the winner's curse: on FEVER the best of 48 gains 11 points on selection and nothing held out). The
rule below was fixed before any held-out number was looked at; the held-out split is never read by it.

``rule="confirm"`` (the default):

1. Take the best ``top`` candidates of the search (selection order, distinct factors) that beat the base model
   on selection. None → keep the base ("nothing beat the base on selection").
2. Score them and the base model on the *confirmation* rows: a sample of the training portion disjoint from
   the selection sample and from the held-out test (:func:`c2i_fast.tasks.split`'s ``confirm``).
3. The candidate with the most correct confirmation answers is chosen (ties: the selection order).
4. It ships only if it answers more confirmation rows correctly than the base and the exact one-sided
   McNemar p of its gain, multiplied by the number of candidates confirmed (Bonferroni: it was picked on
   these rows among that many), is ≤ ``alpha`` (0.05). Otherwise the base model is kept and the report says
   why.

A task whose training portion leaves fewer than ``MIN_CONFIRM_ROWS`` confirmation rows cannot confirm; the
rule then falls back to the selection sample's own max-T test (:func:`c2i_fast.stats.selection_gain_test`,
which accounts for the best-of-J pick) at the same ``alpha``, and says so.

``rule="paper"`` is C2I's rule: the best on selection, applied if it beats the base (``--gate-p`` may still
gate it on the max-T p).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .cache import MetricsCache, base_metrics
from .evaluate import Scorer, better
from .replay import PrefixCache
from .search import Candidate, evaluate_candidate, factor_signature
from .stats import mcnemar_one_sided, paired_difference

RULES = ("confirm", "paper")
MIN_CONFIRM_ROWS = 50


def answers(res: dict) -> list:
    """Per-example answers of one evaluation: the predicted choice (classification), the generated text
    (generation), else the correctness flag (recall: only whether the greedy answer matched is kept)."""
    for key in (f"predictions_{res.get('scoring', 'mean')}", "generations", "correct"):
        if key in res:
            return list(res[key])
    return []


def changed_fraction(base: dict, adapted: dict) -> float | None:
    """Fraction of examples whose answer differs between two evaluations of the same rows (None if unknown)."""
    a, b = answers(base), answers(adapted)
    if not a or len(a) != len(b):
        return None
    return sum(x != y for x, y in zip(a, b)) / len(a)


@dataclass
class Decision:
    """What the rule decided. ``plan`` is the list of candidates to apply (empty: keep the base model)."""
    rule: str
    plan: list[Candidate]
    shipped: bool
    reason: str
    alpha: float
    n_confirm: int = 0
    fallback: bool = False                     # too few confirmation rows: decided on selection's max-T p
    base: dict | None = None                   # base metrics on the confirmation rows
    confirmed: list[dict] = field(default_factory=list)    # per confirmed candidate: edit, metrics, paired test
    chosen: int | None = None                  # index into ``confirmed``
    p_one_sided: float | None = None
    p_adjusted: float | None = None
    results: list[dict] = field(default_factory=list)      # full metrics per confirmed candidate (not reported)

    def summary(self) -> dict:
        return {"rule": self.rule, "shipped": self.shipped, "reason": self.reason, "alpha": self.alpha,
                "n_confirm": self.n_confirm, "fallback": self.fallback, "confirmed": self.confirmed,
                "chosen": self.chosen, "p_one_sided": self.p_one_sided, "p_adjusted": self.p_adjusted}


def contenders(ranked: list[Candidate], base: dict, top: int) -> list[Candidate]:
    """The best ``top`` candidates (selection order) with distinct factors that beat ``base`` on selection."""
    out, seen = [], set()
    for c in ranked:
        if len(out) >= top:
            break
        if not better(c.result, base):
            break                        # ranked best first: nothing after this beats the base either
        sig = factor_signature(c)
        if sig not in seen:
            seen.add(sig)
            out.append(c)
    return out


def decide(rule: str, ranked: list[Candidate], base_sel: dict, paper_plan: list[Candidate],
           confirm_scorer: Scorer | None, *, top: int = 3, alpha: float = 0.05, significance: dict | None = None,
           use_cache: bool = True, mc: MetricsCache | None = None) -> Decision:
    """Apply ``rule`` to the search's outcome. ``paper_plan`` is the search's own plan (best on selection,
    greedy compositions included, after any --gate-p); ``significance`` the selection max-T test (fallback).
    ``confirm_scorer`` scores the confirmation rows (None or fewer than MIN_CONFIRM_ROWS: fallback). The base
    model's confirmation metrics come from ``mc`` when it holds them (a second run, a resume, the other rule
    under --compare-rules): only the layers below the candidates are then run, to fill the prefix cache."""
    if rule == "paper":
        return Decision("paper", paper_plan, bool(paper_plan),
                        "best on selection beats the base" if paper_plan else "nothing beat the base on selection",
                        alpha)
    picks = contenders(ranked, base_sel, top)
    n = len(confirm_scorer.examples) if confirm_scorer is not None else 0
    if not picks:
        return Decision(rule, [], False, "nothing beat the base on selection", alpha, n_confirm=n)
    if n < MIN_CONFIRM_ROWS:
        p = (significance or {}).get("p_max")
        ok = p is not None and p <= alpha
        why = (f"only {n} confirmation rows (< {MIN_CONFIRM_ROWS}): decided on the selection sample's max-T "
               f"p = {p if p is None else round(p, 4)} {'≤' if ok else '>'} {alpha}")
        return Decision(rule, picks[:1] if ok else [], ok, why, alpha, n_confirm=n, fallback=True,
                        p_adjusted=p)
    cache = PrefixCache() if use_cache else None
    base, _ = base_metrics(confirm_scorer, mc, cache, {c.layer for c in picks} if cache is not None else set())
    results = [evaluate_candidate(confirm_scorer, c, cache, within=False) for c in picks]
    confirmed = []
    for c, res in zip(picks, results):
        pd = paired_difference(base["correct"], res["correct"])
        confirmed.append({**c.edit.to_dict(), "accuracy": res["accuracy"], "log_loss": res["log_loss"],
                          "selection_accuracy": c.result["accuracy"], "paired": pd,
                          "changed": changed_fraction(base, res)})
    gains = [d["paired"]["fixed"] - d["paired"]["broken"] for d in confirmed]
    best = max(range(len(picks)), key=lambda i: (gains[i], -i))
    pd = confirmed[best]["paired"]
    p1 = mcnemar_one_sided(pd["fixed"], pd["broken"]) if gains[best] > 0 else 1.0
    p_adj = min(1.0, p1 * len(picks))
    ok = gains[best] > 0 and p_adj <= alpha
    edit = picks[best].edit
    what = f"{edit.matrix} ρ={edit.rank_fraction} k={edit.n_clusters}"
    if ok:
        why = (f"{what} confirmed on {n} rows: +{gains[best]} correct ({pd['fixed']} fixed, {pd['broken']} broken), "
               f"one-sided p = {p1:.3g} × {len(picks)} candidates = {p_adj:.3g} ≤ {alpha}")
    elif gains[best] <= 0:
        why = f"no candidate gained on {n} confirmation rows (best {what}: {gains[best]:+d} correct): base kept"
    else:
        why = (f"{what} gained {gains[best]:+d} on {n} confirmation rows ({pd['fixed']} fixed, {pd['broken']} "
               f"broken) but p = {p1:.3g} × {len(picks)} = {p_adj:.3g} > {alpha}: base kept")
    return Decision(rule, [picks[best]] if ok else [], ok, why, alpha, n_confirm=n, base=base,
                    confirmed=confirmed, chosen=best, p_one_sided=p1, p_adjusted=p_adj, results=results)
