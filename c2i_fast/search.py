"""Candidate search: top-K matrices × ρ grid × clusters k × clustering method, each scored on the selection
sample as a factored forward pass (never a dense rebuild), best applied, optional greedy composition.

Every candidate first gets its first-order loss change ΔL̂ = ⟨G, Ŵ − W⟩ from the scan's single gradient (no
forward pass; −Σ_{i>k} σᵢgᵢ for plain truncation, per-cluster tails for clustered). Candidates are evaluated
best ΔL̂ first within each matrix, round-robin across matrices, and ``max_evals`` keeps the first ones. Each evaluation reruns only the layers
at and above the candidate's layer (a :class:`~c2i_fast.replay.PrefixCache` replays the rest). Candidates
whose factors are the same (:func:`factor_signature`) are scored once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import distributed
from .decompose import ClusteredSVD, cluster_labels, fit, rank_for, truncation_delta
from .errors import C2IError
from .evaluate import Scorer, better
from .replay import PrefixCache
from .stats import mcnemar_one_sided
from .models import MatrixRef
from .scan import MatrixScan
from .transform import Edit, factorize_, restore_

DEFAULT_RANK_FRACTIONS = (0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01)
DEFAULT_CLUSTERS = (1, 2, 4, 8)
DEFAULT_METHODS = ("block", "kmeans", "projective")
SEARCH_PROJECTIVE_ITERS = 5        # the search fits projective clustering once per (matrix, k): kept cheap
SEARCH_PROJECTIVE_RESTARTS = 0


@dataclass
class Candidate:
    edit: Edit
    layer: int
    predicted: float                    # first-order ΔL̂ = ⟨G, Ŵ − W⟩
    source: object = None               # SVD (k = 1) or ClusteredSVD the factors come from
    result: dict | None = None          # selection metrics once evaluated
    seconds: float = 0.0
    same_as: str | None = None          # key of an earlier candidate with the same factors (result copied)

    def key(self) -> str:
        e = self.edit
        return f"{e.matrix}|{e.rank_fraction}|{e.n_clusters}|{e.method}|{e.seed}"

    @property
    def pruned(self) -> bool:
        """Was its scoring stopped early (:class:`Pruner`)? Its result then holds no metrics, only how far it got."""
        return self.result is not None and bool(self.result.get("pruned"))

    def summary(self) -> dict:
        d = {**self.edit.to_dict(), "layer": self.layer, "predicted_delta": self.predicted,
             "seconds": round(self.seconds, 4)}
        if self.same_as is not None:
            d["same_as"] = self.same_as
        if self.result is not None:
            d.update({k: self.result[k] for k in ("accuracy", "log_loss", "accuracy_sum", "accuracy_mean",
                                                   "choice_loss", "pruned", "rows_scored", "correct_so_far")
                      if k in self.result})
        return d


def build_candidates(scans: list[MatrixScan], refs: dict[str, MatrixRef], rank_fractions, clusters, methods,
                     seed: int = 0, progress: bool = True) -> list[Candidate]:
    """All (matrix, ρ, k, method) candidates for the scanned top matrices, with their first-order ΔL̂.

    k = 1 is one plain truncated SVD (its method is recorded as "block"; there is nothing to cluster). Labels
    are computed once per (matrix, k, method) and serve every ρ. Every ρ's ΔL̂ comes from the clusters' Gram
    eigendecompositions (:meth:`ClusteredSVD.estimate`); a fit's SVDs are taken only when one of its
    candidates is scored or applied: the search scores a few dozen of the hundreds built.
    """
    for rho in rank_fractions:
        rank_for(rho, 1, 1)
    out: list[Candidate] = []
    for ms in tqdm(scans, desc="candidates", disable=not progress, leave=False):
        # a copy: the fits take their SVDs from it later, whatever the model's weight is by then
        w = refs[ms.name].weight().detach().float().clone()
        m, n = w.shape
        for k in clusters:
            if not isinstance(k, int) or not 1 <= k <= m:
                raise C2IError(f"--clusters {k} is invalid for {ms.name} with {m} rows (need 1 ≤ k ≤ rows)")
        for rho in rank_fractions:
            out.append(Candidate(Edit(ms.name, rho, 1, "block", seed), ms.layer,
                                 truncation_delta(ms.svd, ms.g_sigma, rank_for(rho, m, n)), ms.svd))
        # Projective clustering fits k subspaces of one dimension j. Refitting it for every ρ multiplies its
        # cost by the grid, so it is fitted once per k at the rank of the ρ the scan predicts best for this
        # matrix (argmin of the first-order ΔL̂), with few iterations and no restarts, like block / k-means
        # labels are computed once per k. Each edit records that recipe, so the plan rebuilds these factors.
        best_rho = min(ms.delta, key=lambda r: (ms.delta[r], r)) if ms.delta else min(rank_fractions)
        fits: dict[tuple, ClusteredSVD] = {}      # methods that return the same partition share one fit
        for k in [k for k in clusters if k > 1]:
            for method in methods:
                recipe = {} if method != "projective" else {
                    "subspace_rank": rank_for(best_rho, -(-m // k), n), "iters": SEARCH_PROJECTIVE_ITERS,
                    "restarts": SEARCH_PROJECTIVE_RESTARTS}
                edits = [Edit(ms.name, rho, k, method, seed, **recipe) for rho in rank_fractions]
                taken: dict = {}     # projective clustering's Gram eigendecompositions of its final clusters
                labels = cluster_labels(w, edits[0], taken)
                same = (k, _partition(labels))
                if same not in fits:
                    fits[same] = ClusteredSVD.estimate(w, labels, k, ms.grad, name=ms.name, known=taken)
                fitted = fits[same]
                for e in edits:
                    out.append(Candidate(e, ms.layer, fitted.truncation_delta(ms.grad, e.rank_fraction), fitted))
    return out


def candidate_factors(c: Candidate):
    """The candidate's factors, from the decomposition it was scored with (what ``fit`` rebuilds from its edit)."""
    return fit(None, c.edit, c.source)


def _partition(labels: torch.Tensor) -> bytes:
    """The row → cluster labels as bytes: equal bytes, equal partition (and the same fit)."""
    return labels.to(device="cpu", dtype=torch.int64).numpy().tobytes()


def factor_signature(c: Candidate) -> tuple:
    """What a candidate's factors are a function of: the matrix, the row clustering and every block's kept rank.
    Candidates with one signature have the same factors, hence the same scores. That happens: rank_for
    saturates at 1 on small blocks (a 24-row cluster keeps rank 1 at ρ = 0.05 and at ρ = 0.01), and k-means and
    projective clustering can return the same partition (seen on epistemic reasoning)."""
    e, src = c.edit, c.source
    if src is None:
        return (c.key(),)
    if e.n_clusters == 1:
        return (e.matrix, 1, rank_for(e.rank_fraction, *src.shape))
    return (e.matrix, e.n_clusters, _partition(src.labels), tuple(src.ranks_for(e.rank_fraction)))


def duplicates(todo: list[Candidate]) -> dict[int, int]:
    """index → index of the first earlier candidate in ``todo`` with the same :func:`factor_signature`."""
    first: dict[tuple, int] = {}
    out = {}
    for i, c in enumerate(todo):
        j = first.setdefault(factor_signature(c), i)
        if j != i:
            out[i] = j
    return out


def evaluate_candidate(scorer: Scorer, c: Candidate, cache: PrefixCache | None, applied: list[Candidate] = (),
                       dense: bool = False, within: bool = True, stop=None) -> dict:
    """Swap in the candidate (on top of ``applied``), score it from its lowest edited layer, swap back. A lone
    edit (``within``) also replays what runs before it in its own layer, captured on the first candidate at
    that matrix (:func:`c2i_fast.replay.replay_within`). ``stop`` may end the pass early
    (:meth:`c2i_fast.evaluate.Scorer.evaluate`; not with ``dense``).

    ``dense=True`` is the paper-faithful/LASER way, kept for the speed bench: rebuild Ŵ dense, write it into
    the weight in place and run a full forward (no factored modules, no prefix cache).
    """
    model = scorer.model
    extra = [a for a in applied if a.edit.matrix != c.edit.matrix]
    todo = extra + [c]
    if dense:
        return _evaluate_dense(scorer, todo)
    factorize_(model, [a.edit for a in todo], factors={a.edit.matrix: candidate_factors(a) for a in todo})
    try:
        # Scorer.run falls back to a full pass (capturing the layer) when the cache has no entry for it.
        return scorer.evaluate(cache, start_layer=min(a.layer for a in todo),
                               within=c.edit.matrix if within and not extra else None, stop=stop)
    finally:
        restore_(model, [a.edit.matrix for a in todo])


def _evaluate_dense(scorer: Scorer, todo: list[Candidate]) -> dict:
    from .models import find_matrix
    refs = [find_matrix(scorer.model, a.edit.matrix) for a in todo]
    saved = [r.param.data.clone() for r in refs]
    try:
        with torch.no_grad():
            for a, r in zip(todo, refs):
                w_hat = candidate_factors(a).reconstruct().to(r.param.dtype)
                r.param.data.copy_(w_hat.T if r.transposed else w_hat)
        return scorer.evaluate()
    finally:
        with torch.no_grad():
            for r, w in zip(refs, saved):
                r.param.data.copy_(w)


@dataclass
class SearchResult:
    candidates: list[Candidate]              # in evaluation order (see interleave)
    evaluated: list[Candidate]               # every candidate with a result, pruned ones included
    best: list[Candidate]                    # the plan (empty when nothing beat the base model)
    base: dict
    final: dict                              # selection metrics of the plan
    rank_correlation: float | None
    seconds: dict = field(default_factory=dict)
    forward_layer_passes: int | float = 0    # full-sample layer passes (a pruned pass counts its share of rows)
    prune: str = "off"                       # the pruning rule used (PRUNE_MODES)
    pruned: int = 0                          # candidates whose scoring stopped early
    row_passes: int = 0                      # row·layer passes run by the candidates' evaluations
    row_passes_saved: int = 0                # row·layer passes the pruned candidates did not run


PRUNE_MODES = ("exact", "race", "halve", "off")
RACE_DELTA = 0.01            # --prune race: one-sided McNemar p below which a candidate counts as beaten (per look)
RACE_MIN_EXAMPLES = 20       # … and not before this many selection examples are scored
HALVE_FRACTIONS = (0.25, 0.5, 1.0)   # --prune halve: selection rows scored by the end of each round (cumulative)


def correct_count(result: dict) -> int:
    """Examples answered correctly in a full evaluation result."""
    if "correct" in result:
        return int(sum(result["correct"]))
    return round(result["accuracy"] * result["n"])


@dataclass(frozen=True)
class Stop:
    """The early-stopping test of one candidate's pass (:meth:`c2i_fast.evaluate.Scorer.evaluate`'s ``stop``):
    ``test(correct, remaining, outcomes) -> bool``; its correct-count ``bar`` (the test is true at least when
    correct + remaining < bar); and per example whether the base model answers it wrong (``likely_wrong``, or
    None). With both, the pass orders its batches so that a candidate erring where the base errs reaches its
    stopping point in fewer rows (:meth:`~c2i_fast.evaluate.Scorer.stopping_order`); a pass that is not stopped
    returns the same metrics in any batch order."""
    test: object
    bar: int | None = None
    likely_wrong: list[bool] | None = None

    def __call__(self, correct: int, remaining: int, outcomes=None) -> bool:
        return self.test(correct, remaining, outcomes)


class Pruner:
    """Exact early stopping of a candidate's selection pass. Every decision downstream of the search reads
    the best ``keep`` candidates by accuracy among those that beat the base model (the plan: the best one, if it
    beats the base; :func:`c2i_fast.confirm.contenders`: the best ``confirm_top`` with distinct factors that beat
    it; ties broken by log-loss). A candidate whose correct answers so far plus every example still to come is
    below the ``keep``-th best correct count among the fully scored candidates (distinct factors) ends with
    strictly lower accuracy than ``keep`` others; below the base model's count (``base``), it ends below the base
    and beats it on no tie-break. Either way it is in no such set whatever its log-loss: its pass stops there
    (:meth:`c2i_fast.evaluate.Scorer.evaluate`'s ``stop``). The bar only rises as candidates are added, so a bar
    from any subset of them is safe."""

    def __init__(self, keep: int, base: dict | None = None):
        self.keep = max(1, int(keep))
        self.counts: list[int] = []          # correct counts of fully scored candidates, one per factor signature
        self.seen: set[tuple] = set()
        known = base is not None and ("correct" in base or {"accuracy", "n"} <= base.keys())
        self.floor = correct_count(base) if known else None         # the base model's correct count
        self.likely_wrong = [not ok for ok in base["correct"]] if known and "correct" in base else None

    def add(self, c: Candidate) -> None:
        if c.result is None or c.pruned:
            return
        sig = factor_signature(c)
        if sig not in self.seen:
            self.seen.add(sig)
            self.counts.append(correct_count(c.result))

    def kth(self) -> int | None:
        """The ``keep``-th best correct count so far (None while fewer than ``keep`` are fully scored)."""
        if len(self.counts) < self.keep:
            return None
        return sorted(self.counts, reverse=True)[self.keep - 1]

    def bar(self) -> int | None:
        """The correct count a candidate must reach to matter: the larger of :meth:`kth` and the base's."""
        bars = [b for b in (self.kth(), self.floor) if b is not None]
        return max(bars) if bars else None

    def stop(self) -> Stop | None:
        """The :class:`Stop` for the next candidate's pass, or None (nothing to beat yet)."""
        bar = self.bar()
        if bar is None:
            return None
        return Stop(lambda correct, remaining, outcomes=None: correct + remaining < bar, bar, self.likely_wrong)


class Racer(Pruner):
    """``prune="race"`` (racing, an option: not exact). The :class:`Pruner`'s exact bar, and also: once at least
    ``min_examples`` selection examples are scored, a candidate that is worse on them, paired, than the base
    model or than the ``keep``-th best fully scored candidate, with exact one-sided McNemar p < ``delta``, stops.
    Either way it could not ship: a contender must beat the base (:func:`c2i_fast.confirm.contenders`) and be
    among the best ``keep``. A stopped candidate might still have caught up (the test looks once per batch, at
    ``delta`` each time), so the plan can differ from ``prune="exact"``'s; the search reports how many it
    stopped and the selection bench compares the plans."""

    def __init__(self, keep: int, base: dict, delta: float = RACE_DELTA, min_examples: int = RACE_MIN_EXAMPLES):
        super().__init__(keep, base)
        self.base = list(base["correct"])
        self.delta, self.min_examples = delta, min_examples
        self.vectors: list[list[bool]] = []      # beside Pruner.counts: each one's correctness per example

    def add(self, c: Candidate) -> None:
        if c.result is not None and not c.pruned and "correct" not in c.result:
            return                           # a journal line from before per-example flags: nothing to race with
        n = len(self.counts)
        super().add(c)
        if len(self.counts) > n:
            self.vectors.append(list(c.result["correct"]))

    def beaten(self, outcomes: dict[int, bool], ref: list[bool]) -> bool:
        """Is the candidate (``outcomes``: example → correct, so far) worse than ``ref`` at ``delta``, paired?"""
        fixed = sum(ok and not ref[e] for e, ok in outcomes.items())
        broken = sum(ref[e] and not ok for e, ok in outcomes.items())
        return broken > fixed and mcnemar_one_sided(broken, fixed) < self.delta

    def stop(self) -> Stop:
        bar = self.bar()
        refs = [self.base]
        if self.kth() is not None:   # the keep-th best: its count is kth (the first such in count order)
            refs.append(self.vectors[sorted(range(len(self.counts)), key=lambda i: -self.counts[i])[self.keep - 1]])

        def test(correct, remaining, outcomes):
            if bar is not None and correct + remaining < bar:
                return True
            return len(outcomes) >= self.min_examples and any(self.beaten(outcomes, r) for r in refs)
        return Stop(test, bar, self.likely_wrong)


def halving_rounds(scorer, fractions=HALVE_FRACTIONS) -> list[list[int]]:
    """The batch indices each round of successive halving scores: round r runs the batches that bring the rows
    scored so far to ``fractions[r]`` of all rows (at least one new batch a round; rounds that would add none
    merge). One batch: one round, nothing to halve."""
    total = sum(len(b.rows) for b in scorer.batches)
    rounds, seen, at = [], 0, 0
    for f in fractions:
        now = []
        while at < len(scorer.batches) and seen < f * total:
            now.append(at)
            seen += len(scorer.batches[at].rows)
            at += 1
        if now:
            rounds.append(now)
    return rounds


def score_batches(scorer, c: Candidate, cache: PrefixCache | None, only: list[int]) -> list:
    """The candidate swapped in, the (batch, row stats) pairs of the batches ``only`` (:meth:`Scorer.run`)."""
    factorize_(scorer.model, [c.edit], factors={c.edit.matrix: candidate_factors(c)})
    try:
        return list(scorer.run(cache, start_layer=c.layer, within=c.edit.matrix, only=set(only)))
    finally:
        restore_(scorer.model, [c.edit.matrix])


def _survivors(n: int, keep: int) -> int:
    """How many of ``n`` candidates go on to halving's next round: the better half, never fewer than ``keep``."""
    return min(n, max(keep, -(-n // 2)))


def halve(scorer, todo: list[Candidate], cache: PrefixCache | None, keep: int, rounds: list[list[int]],
          on_result=None, progress: bool = False) -> None:
    """Successive halving (``prune="halve"``; not exact). Every candidate is scored on the first round's
    batches; the better half (correct answers on the examples scored so far, ties by their mean answer loss,
    then by key), never fewer than ``keep``, goes on to the next round's batches, and so on; those left after
    the last round are scored on every batch and get their full result, the others a pruned result
    (:meth:`Scorer.pruned_result`, with ``"halved"``: the round they left after). Sets ``c.result`` and
    ``c.seconds``; ``on_result(c)`` as each candidate's result is final. A candidate that leaves early might
    have won on the rest of the rows: the plan can differ from unpruned scoring's (the confirm rule guards what
    ships)."""
    pairs: dict[str, list] = {c.key(): [] for c in todo}
    alive = list(todo)
    field, batch_passes = len(todo), 0        # the bar counts candidate-batches: this many will run
    for batches in rounds:
        batch_passes += field * len(batches)
        field = _survivors(field, keep)
    bar = tqdm(total=batch_passes, desc="search (halving)", disable=not progress, leave=False)
    for r, batches in enumerate(rounds):
        for c in alive:
            t = time.perf_counter()
            pairs[c.key()] += score_batches(scorer, c, cache, batches)
            c.seconds += time.perf_counter() - t
            bar.update(len(batches))
        if r == len(rounds) - 1:
            break
        standing = {c.key(): scorer.standing(pairs[c.key()]) for c in alive}
        alive.sort(key=lambda c: (-standing[c.key()][1], standing[c.key()][2], c.key()))
        n_next = _survivors(len(alive), keep)
        for c in alive[n_next:]:
            done, correct, _ = standing[c.key()]
            c.result = {**scorer.pruned_result(done, correct, len(pairs[c.key()])), "halved": r}
            if on_result is not None:
                on_result(c)
        alive = alive[:n_next]
    bar.close()
    for c in alive:
        c.result = scorer.metrics(pairs[c.key()])
        if on_result is not None:
            on_result(c)


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when undefined."""
    if len(a) < 3:
        return None

    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = torch.tensor(ranks(a), dtype=torch.float64), torch.tensor(ranks(b), dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else None


def interleave(candidates: list[Candidate]) -> list[Candidate]:
    """Evaluation order: best predicted ΔL̂ first within each matrix, matrices taken round-robin in the order
    of their best candidate. ΔL̂ is on one scale within a matrix, but a single matrix with large gradients
    would otherwise take every slot of ``max_evals`` (seen on FEVER), leaving the other top-K matrices unseen."""
    per: dict[str, list[Candidate]] = {}
    for c in sorted(candidates, key=lambda c: (c.predicted, c.key())):
        per.setdefault(c.edit.matrix, []).append(c)
    queues = list(per.values())
    out = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def rank(evaluated: list[Candidate]) -> list[Candidate]:
    """Best first: higher selection accuracy, ties by lower log-loss, then by key (a stable order). Pruned
    candidates are left out: they are worse than the best ``keep`` (:class:`Pruner`) and have no metrics."""
    return sorted((c for c in evaluated if not c.pruned),
                  key=lambda c: (-c.result["accuracy"], c.result["log_loss"], c.key()))


def search(scorer: Scorer, candidates: list[Candidate], base: dict, cache: PrefixCache | None,
           n_layers: int, max_evals: int | None = None, compose: int = 0, loss_kind: str = "answer",
           progress: bool = True, on_result=None, done: dict[str, dict] | None = None,
           dense: bool = False, order: str = "interleave", dedupe: bool = True, prune: str = "off",
           keep: int = 1) -> SearchResult:
    """Evaluate candidates in :func:`interleave` order (at most ``max_evals``), pick the best that beats the base
    model (accuracy, ties by log-loss), then greedily try to compose up to ``compose`` more edits on other
    matrices, each kept only if it improves the selection score.

    ``done`` maps candidate keys to results already evaluated (a resumed run); ``on_result(candidate)`` is
    called after each new evaluation (the journal). A candidate whose factors equal an earlier one's
    (:func:`factor_signature`) still takes its slot of ``max_evals`` but gets that one's result, with no pass.

    ``order="given"`` evaluates the candidates as listed and ``dedupe=False`` gives every one its own pass:
    LASER's exhaustive sweep, whose candidates have no ΔL̂ to order by (NaN) and are all scored.

    ``prune="exact"`` stops a candidate's pass batch by batch once it cannot be among the best ``keep`` or beat
    ``base`` (:class:`Pruner`) and scores the same candidates deepest layer first (the cheapest passes); the plan
    and the best ``keep`` that beat the base are those of ``prune="off"``.
    ``prune="race"`` also stops one that is already beaten with confidence (:class:`Racer`; not exact).
    ``prune="halve"`` scores the candidates by successive halving over the selection rows (:func:`halve`; not
    exact; one process).
    A pruned candidate's result is marked ``"pruned"`` (journaled like any other, left out of :func:`rank`);
    with ``prune="off"`` a pruned result in ``done`` is scored again. Not with ``dense`` or ``compose`` (the
    greedy composition reads candidates below the best ``keep``).
    """
    if order not in ("interleave", "given"):
        raise ValueError(f"order must be 'interleave' or 'given', got {order!r}")
    if prune not in PRUNE_MODES:
        raise ValueError(f"prune must be one of {PRUNE_MODES}, got {prune!r}")
    if prune != "off" and (dense or compose):
        raise ValueError("pruning needs the factored search without --compose")
    if prune == "halve" and distributed.size() > 1:
        raise ValueError("successive halving runs in one process")
    pruner = Pruner(keep, base) if prune == "exact" else Racer(keep, base) if prune == "race" else None
    t0 = time.perf_counter()
    ordered = interleave(candidates) if order == "interleave" else list(candidates)
    todo = ordered if not max_evals else ordered[:max_evals]
    if pruner is not None and cache is not None and not dense:
        # The same candidates, the cheapest passes (the deepest layers) first: the bar rises before the costly
        # passes run, so more of them stop, and sooner. Which candidates are scored, so every decision, is unchanged.
        todo = sorted(todo, key=lambda c: -c.layer)
    passes = 0
    # no pass for a candidate whose factors were scored already (the dense paper-faithful / LASER way scores all)
    same = duplicates(todo) if dedupe and not dense else {}
    share = set(distributed.mine(len(todo)))          # every index in a single process
    local = {}
    rows, pruned_passes, row_passes = len(getattr(scorer, "examples", ())), 0.0, 0    # selection rows

    def count(c: Candidate) -> None:          # the passes one new evaluation ran
        nonlocal passes, pruned_passes, row_passes
        layers = n_layers - c.layer if cache is not None and not dense else n_layers
        if c.pruned:
            pruned_passes += layers * c.result["rows_scored"] / rows
            row_passes += layers * c.result["rows_scored"]
        else:
            passes += layers
            row_passes += layers * rows
    fresh = []                                # --prune halve: the candidates left to score, in order
    for i, c in enumerate(tqdm(todo, desc="search", disable=not progress or prune == "halve", leave=False)):
        if done and c.key() in done and (pruner is not None or prune == "halve" or not done[c.key()].get("pruned")):
            c.result = done[c.key()]
            if pruner is not None:
                pruner.add(c)
            continue
        if i in same or i not in share:
            continue
        if prune == "halve":
            fresh.append(c)
            continue
        t = time.perf_counter()
        stop = {"stop": pruner.stop()} if pruner is not None else {}      # the unpruned call as it always was
        c.result = evaluate_candidate(scorer, c, cache, dense=dense, **stop)
        c.seconds = time.perf_counter() - t
        count(c)
        if pruner is not None and not c.pruned:
            pruner.add(c)
        local[i] = (c.result, c.seconds)
        if on_result is not None and distributed.size() == 1:
            on_result(c)
    while fresh:
        try:
            halve(scorer, fresh, cache, keep, halving_rounds(scorer), on_result, progress)
            break
        except torch.OutOfMemoryError as e:       # new batches: the halving starts again on them
            scorer.halve_batches(e)
            for c in fresh:
                c.result, c.seconds = None, 0.0
    for c in fresh:
        count(c)
    if distributed.size() > 1:    # every rank gets every result; rank 0 journals them in single-process order
        every = distributed.gather(local)
        passes = sum(distributed.gather({distributed.rank(): passes}).values())
        pruned_passes = sum(distributed.gather({distributed.rank(): pruned_passes}).values())
        row_passes = sum(distributed.gather({distributed.rank(): row_passes}).values())
        for i in sorted(every):
            todo[i].result, todo[i].seconds = every[i]
            if on_result is not None and distributed.is_main():
                on_result(todo[i])
    for i, j in same.items():                          # after the evaluations: one journal order on every rank
        c = todo[i]
        if c.result is None and todo[j].result is not None:
            c.result, c.same_as = dict(todo[j].result), todo[j].key()
            if on_result is not None and distributed.is_main():
                on_result(c)
    evaluated = [c for c in todo if c.result is not None]
    scored = [c for c in evaluated if not c.pruned]
    loss_key = "choice_loss" if loss_kind == "choice" else "log_loss"
    measured = [c.result[loss_key] - base[loss_key] for c in scored]
    rho_corr = spearman([c.predicted for c in scored], measured)
    # stopped passes (resumed ones included: a resumed run reports the counts of one run); not their twins
    cut = [c for c in evaluated if c.pruned and c.same_as is None]
    saved = sum((n_layers - c.layer if cache is not None else n_layers) * (c.result["n"] - c.result["rows_scored"])
                for c in cut)

    ranked = rank(evaluated)
    plan: list[Candidate] = []
    final = base
    if ranked and better(ranked[0].result, base):
        plan, final = [ranked[0]], ranked[0].result
        tries, tried = 0, set()
        for c in ranked[1:]:
            if len(plan) > compose or tries >= 4 * compose:
                break
            sig = factor_signature(c)
            if any(p.edit.matrix == c.edit.matrix for p in plan) or sig in tried:
                continue
            tries += 1
            tried.add(sig)
            res = evaluate_candidate(scorer, c, cache, applied=plan, dense=dense)
            layers = n_layers - min(p.layer for p in plan + [c]) if cache is not None and not dense else n_layers
            passes += layers
            row_passes += layers * rows
            if better(res, final):
                plan.append(c)
                final = res
    if pruned_passes:
        passes = round(passes + pruned_passes, 2)
    return SearchResult(ordered, evaluated, plan, base, final, rho_corr,
                        {"search": time.perf_counter() - t0}, passes, prune, len(cut), row_passes, saved)


def prune_keep(cfg) -> int:
    """How many of the best candidates the run's decisions read, so how many the Pruner must keep exact: the
    paper rule reads the best one only (its plan), the confirm rule re-scores the best ``confirm_top``, and
    ``compare_rules`` decides every rule on one search; ``keep_best`` (a bench's) asks for more."""
    keep = 1 if cfg.rule == "paper" and not cfg.compare_rules else max(1, cfg.confirm_top)
    return max(keep, getattr(cfg, "keep_best", 0))


def prune_mode(cfg, task, n_confirm: int, min_confirm_rows: int) -> tuple[str, str | None]:
    """The pruning rule the search uses, and why it is off where the run asked for it but cannot have it: the
    Pruner keeps exact only what reads the best :func:`prune_keep` candidates by accuracy."""
    if cfg.prune == "off":
        return "off", None
    why = None
    if cfg.gate_p is not None:
        why = "--gate-p reads the max-T test over every candidate's full correctness"
    elif cfg.compose:
        why = "--compose tries candidates below the best few"
    elif cfg.dense_candidates:
        why = "dense candidates are scored in one pass"
    elif cfg.prune == "halve" and distributed.size() > 1:
        why = "successive halving runs in one process"
    elif task.kind == "generation":
        why = "generation tasks are scored by greedy decoding after the pass"
    elif (cfg.rule == "confirm" or cfg.compare_rules) and n_confirm < min_confirm_rows:
        why = (f"with {n_confirm} < {min_confirm_rows} confirmation rows the confirm rule decides on the selection "
               f"max-T test over every candidate")
    return ("off", why) if why else (cfg.prune, None)
