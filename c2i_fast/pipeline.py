"""The one path: load model → task & splits → scan → candidates → search → apply → held-out report → save.

``adapt(config)`` is what ``c2i adapt`` runs; ``laser(config)`` is LASER's exhaustive search in the same
harness; ``evaluate_model`` is ``c2i eval``. Outputs (all written atomically: temp file, then rename)::

    <out>/plan.json            the plan: edits (matrix, ρ, k, method, seed), base-model id and fingerprint
    <out>/adapted.safetensors  the factored matrices only (see c2i_fast.artifacts)
    <out>/report.json          per-candidate scores, base/adapted metrics on selection and held-out sets,
                               majority baseline, timings per phase, layer-pass counts, versions, config
    <out>/journal.jsonl        one line per evaluated candidate (``--resume`` skips those)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from . import distributed
from .artifacts import accounting, save_adapted
from .cache import MetricsCache, base_metrics
from .errors import C2IError
from .evaluate import PrefixCache, Scorer
from .masked import MaskedScorer
from .io import atomic_write_text, versions
from .models import load_model, target_matrices
from .confirm import MIN_CONFIRM_ROWS, RULES, changed_fraction, decide
from .config import AdaptConfig, EvalConfig, LaserConfig, RunConfig  # noqa: F401  (part of this API)
from .report_data import SCHEMA     # the report.json layout build_report writes (report.py reads it)
from .scan import SCAN_SVDS, scan
from .scan_cache import MODES as SCAN_CACHE_MODES, ScanCache, scan_key
from .svd import remembered_svds
from .precision import lowers_precision, search_dtype, search_precision
from .search import (PRUNE_MODES, Candidate, build_candidates, candidate_factors, prune_keep, prune_mode, rank,
                     search)
from .stats import paired_difference, selection_gain_test
from .tasks import check_tokenization, load_task, split, split_with_test
from .transform import Edit, Plan, factorize_, restore_

JOURNAL = "journal.jsonl"
CONFIG = "config.json"
REPORT = "report.json"
_PRUNED_WHY = {"exact": "unable to reach", "race": "beaten by the base or by",
               "halve": "by successive halving, not among"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------
# shared steps
# ---------------------------------------------------------------------------------------------------------
def _log(cfg: RunConfig, msg: str, event: str | None = None, **fields):
    """A human line on stderr (unless quiet) and, with --log-json, one JSON event per line."""
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)
    if event is not None:
        _emit(cfg, event, message=msg, **fields)


def _emit(cfg: RunConfig, event: str, **fields):
    if not cfg.log_json:
        return
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, **fields}, default=str)
    if cfg.log_json == "-":
        print(line, file=sys.stderr, flush=True)
    else:
        with open(cfg.log_json, "a") as f:
            f.write(line + "\n")


def _strip(res: dict) -> dict:
    """Metrics without the per-example lists (those stay out of the report's summary tables)."""
    return {k: v for k, v in res.items() if k not in ("predictions_sum", "predictions_mean", "correct",
                                                      "generations")}


def _held_out_block(base: dict, adapted: dict) -> dict:
    """The report's ``test`` entry: both models' metrics and their paired difference on the same examples."""
    out = {"base": _strip(base), "adapted": _strip(adapted)}
    if "correct" in base and "correct" in adapted:
        out["paired"] = paired_difference(base["correct"], adapted["correct"])
    out["changed"] = changed_fraction(base, adapted)     # fraction of answers the plan changes
    return out


def _check_common(rank_fractions, samples: int, test_size: int, clusters=(1,)) -> None:
    """Cheap argument checks, run before the model is loaded."""
    for rho in rank_fractions:
        if not isinstance(rho, (int, float)) or not 0 < rho <= 1:
            raise C2IError(f"--rank-fractions: ρ={rho} must be in (0, 1]")
    if any((not isinstance(k, int)) or k < 1 for k in clusters):
        raise C2IError(f"--clusters: every k must be an integer ≥ 1, got {list(clusters)}")
    if samples < 1:
        raise C2IError(f"--samples must be ≥ 1, got {samples}")
    if test_size < 1:
        raise C2IError(f"--test-size must be ≥ 1, got {test_size}")


def _prepare(cfg: RunConfig, dtype: str = "float32", device: str | None = None, device_map: str | None = None,
             lm=None, task=None):
    """Load model and task (or take the ``lm`` / ``task`` a caller already has: c2i_fast.notebook); shared by
    adapt, laser and eval."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.progress:
        import transformers
        transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    if task is None:
        task = load_task(cfg.task, cfg.data_dir, cfg.metric)      # data errors before the slow model load
    t0 = time.perf_counter()
    if lm is None:
        if dtype not in DTYPES:
            raise C2IError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if distributed.size() > 1 and device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
        lm = load_model(cfg.model, dtype=DTYPES[dtype], device=device, device_map=device_map)
    t_load = time.perf_counter() - t0
    if lm.is_masked_lm and task.kind != "classification":      # before the scan: c2i_fast.masked scores choices
        raise C2IError(f"{cfg.model} is a masked LM: it is scored at one <mask> token over a task's choices "
                       f"(classification tasks only); {task.name} is a {task.kind} task")
    task = check_tokenization(task, lm.tokenizer)
    return lm, task, t_load


def _scorer(lm, task, examples, cfg: RunConfig) -> Scorer | MaskedScorer:
    if lm.is_masked_lm:        # LASER's RoBERTa scoring: each choice's one token at a <mask> (c2i_fast.masked)
        return MaskedScorer(lm.model, lm.tokenizer, examples, task.kind, batch_tokens=cfg.batch_tokens,
                            scoring=cfg.scoring, max_new_tokens=task.spec.max_new_tokens, task=task.name)
    # the paper-faithful and LASER-faithful modes run every row whole, as those methods' code does
    return Scorer(lm.model, lm.tokenizer, examples, task.kind, batch_tokens=cfg.batch_tokens,
                  scoring=cfg.scoring, max_new_tokens=task.spec.max_new_tokens, share_prefix=cfg.shares_prefix())


def _read_journal(path: Path) -> dict[str, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue            # a torn last line from a kill: that candidate is simply re-run
            done[rec["key"]] = rec["result"]
    return done


def _journal_writer(path: Path):
    def write(c: Candidate):
        if not distributed.is_main():
            return
        # "t" (epoch seconds): when the result was known, so a resumed run's earlier spans can be timed
        line = json.dumps({"key": c.key(), "result": c.result, "t": round(time.time(), 1)}) + "\n"
        with open(path, "a") as f:       # one write of one line, then fsync: a kill leaves whole lines
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    return write


def _on_result(cfg: RunConfig, journal: Path):
    """search()'s callback: each new result goes to the journal and, with --log-json, to the event log."""
    write = _journal_writer(journal)

    def on_result(c: Candidate):
        write(c)
        _emit(cfg, "candidate", **c.summary())
    return on_result


def significance(base: dict, ranked: list[Candidate], seed: int = 0) -> dict | None:
    """How likely the best of the evaluated candidates gains this much on the selection sample by chance
    (:func:`c2i_fast.stats.selection_gain_test`; candidates best first, as :func:`c2i_fast.search.rank` orders
    them). None when a result lacks per-example flags (a journal from an older version)."""
    if not ranked or "correct" not in base or any("correct" not in c.result for c in ranked):
        return None
    return selection_gain_test(base["correct"], [c.result["correct"] for c in ranked], seed=seed)


def gate(best: list[Candidate], final: dict, base: dict, sig: dict | None, gate_p: float | None):
    """The plan and its selection metrics after the significance gate: with ``gate_p`` set, a plan whose
    first edit's gain has max-T p > ``gate_p`` is dropped (the base model is kept)."""
    if gate_p is None or not best or sig is None or sig["p_max"] <= gate_p:
        return best, final, False
    return [], base, True


@contextlib.contextmanager
def plan_applied(model, cands: list[Candidate]) -> Iterator[None]:
    """The candidates' factored modules swapped into ``model`` for the block (factors from
    :func:`c2i_fast.search.candidate_factors`, in plan order), the original modules put back after it, also on
    an error. No candidates: the model as it is."""
    if not cands:
        yield
        return
    factorize_(model, [c.edit for c in cands], factors={c.edit.matrix: candidate_factors(c) for c in cands})
    try:
        yield
    finally:
        restore_(model, [c.edit.matrix for c in cands])


def _conclude(lm, task, test, cfg: RunConfig, best: list[Candidate], plan: Plan, timings: dict,
              save_to: Path | None, others: dict[str, list[Candidate]] | None = None,
              mc: MetricsCache | None = None) -> tuple[dict, dict, dict]:
    """Held-out metrics of the base model and of the plan, then (``save_to``) the saved plan and factors, and
    the plan's accounting, with the plan swapped in once for all three. ``others`` (name → candidates) are
    further plans judged on the same held-out rows against the same base pass (the bench's rule comparison).
    Returns (``test`` block, accounting, {name: test block}).

    An adapted pass starts at its lowest edited layer and replays the prefix the base pass captured there:
    the same computation as :func:`c2i_fast.search.evaluate_candidate` of the last edit on top of the others
    with ``within=False``. The base pass's metrics may come from ``mc`` (:func:`c2i_fast.cache.base_metrics`:
    the prefix is then captured by a pass that stops below the highest start layer)."""
    model = lm.model
    others = others or {}
    t0 = time.perf_counter()
    sc = _scorer(lm, task, test, cfg)
    sc.progress = cfg.progress          # a bar per held-out pass: these are the long evaluations
    starts = {min(c.layer for c in cands) for cands in [best, *others.values()] if cands}
    start = min((c.layer for c in best), default=0)
    cache = PrefixCache() if starts else None
    base, _ = base_metrics(sc, mc, cache, starts if cache is not None else set())
    timings["test_base"] = time.perf_counter() - t0
    adapted = base
    with plan_applied(model, best):
        if best:
            t1 = time.perf_counter()
            adapted = sc.evaluate(cache, start_layer=start)     # one pass from the lowest edited layer
            timings["test_adapted"] = time.perf_counter() - t1
        if save_to is not None:
            if best:
                save_adapted(model, plan, save_to)
            else:
                plan.fingerprint = (mc or MetricsCache(model, enabled=False)).model_fingerprint()
                plan.save(save_to / "plan.json")
        spent = accounting(model, plan) if best else {}
    judged, t2 = {}, time.perf_counter()
    for name, cands in others.items():
        if [c.key() for c in cands] == [c.key() for c in best]:
            judged[name] = _held_out_block(base, adapted)
            continue
        with plan_applied(model, cands):
            other = sc.evaluate(cache, start_layer=min(c.layer for c in cands)) if cands else base
        judged[name] = _held_out_block(base, other)
    if others:
        timings["test_compared"] = time.perf_counter() - t2
    return _held_out_block(base, adapted), spent, judged


def build_report(cfg: RunConfig, task, sizes: dict, plan: Plan, *, search: dict, selection: dict, test: dict,
                 forward_passes: dict, accounting: dict, scan: dict | None = None, **extra) -> dict:
    """``report.json`` (schema :data:`SCHEMA`) of an adapt or laser run, sections in file order::

        schema          this layout's version (c2i_fast.report refuses a newer one)
        config          the run's configuration (RunConfig.to_json)
        versions        c2i_fast.io.versions()
        task            name, kind, source and the split sizes ``sizes`` (adapt: n_select, n_test, draw;
                        laser: n_val, n_test)
        plan            the plan's edits
        scan            (adapt only) loss, loss_kind, score_kind, skipped, matrices (one summary per matrix)
        search          n_candidates, n_evaluated, significance, candidates (summaries in evaluation order);
                        adapt also n_same_factors, rank_correlation_predicted_vs_measured
        selection       base, adapted: metrics on the selection sample (LASER: its validation split)
        test            base, adapted, paired: metrics on the held-out split
        forward_passes  search_layer_passes, layers, search_equivalent_full_passes (adapt: gradient_pass_rows)
        accounting      parameters and bytes before and after (c2i_fast.artifacts.accounting); {} for no edit

        (adapt)         decision: the shipping rule's verdict (c2i_fast.confirm.Decision.summary, with the
                        fraction of answers changed on selection and confirmation); rules (--compare-rules:
                        every rule's plan and held-out block)

    The callers add ``timings`` (seconds per phase) and adapt adds ``draws`` (--draws > 1) and ``world_size``.
    """
    rep = {"schema": SCHEMA, "config": cfg.to_json(), "versions": versions(),
           "task": {"name": task.name, "kind": task.kind, "source": task.source, **sizes},
           "plan": plan.to_json()["edits"]}
    if scan is not None:
        rep["scan"] = scan
    rep.update(search=search, selection=selection, test=test, forward_passes=forward_passes,
               accounting=accounting, **extra)
    return rep


def _passes(layer_passes: int, n_layers: int, **extra) -> dict:
    return {**extra, "search_layer_passes": layer_passes, "layers": n_layers,
            "search_equivalent_full_passes": round(layer_passes / n_layers, 2)}


def resume_config(directory: str, **overrides) -> AdaptConfig:
    """The AdaptConfig of the run in ``directory`` (its config.json), set to resume."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise C2IError(f"--resume {directory}: no {CONFIG} there (was it written by `c2i adapt`?)")
    try:
        d = json.loads(path.read_text())
        d.setdefault("rule", "paper")             # written before the confirmation rule existed
        cfg = AdaptConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except (json.JSONDecodeError, TypeError) as e:
        raise C2IError(f"{path} is not a valid run configuration: {e}") from e
    cfg.resume = True
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


LOSSES = ("auto", "answer", "choice")


def scan_loss(loss: str, kind: str) -> str:
    """The loss the scan ranks matrices by: ``auto`` is the loss over the label choices on a classification task
    (adopted by the rule pre-registered in docs/results.md § "Pre-registered: which loss the scan ranks by": over
    12 SmolLM2 selection draws its shipped edits gained +193 net on the confirmation rows against the answer
    loss's +32) and the gold answer's log-loss elsewhere (no choices to restrict to)."""
    if loss == "auto":
        return "choice" if kind == "classification" else "answer"
    return loss


def adapt(cfg: AdaptConfig, *, lm=None, task=None, test=None) -> dict:
    """Run C2I end to end; returns the report dict (also written to ``<out>/report.json``). ``lm`` (a
    LoadedModel), ``task`` (a Task) and ``test`` (held-out Examples) are for callers that already hold them
    (c2i_fast.notebook): the model is then neither loaded nor left changed."""
    _check_common(cfg.rank_fractions, cfg.samples, cfg.test_size, cfg.clusters)
    if cfg.top_k < 1:
        raise C2IError(f"--top-k must be ≥ 1, got {cfg.top_k}")
    if cfg.draws < 1:
        raise C2IError(f"--draws must be ≥ 1, got {cfg.draws}")
    if cfg.gate_p is not None and not 0.0 <= cfg.gate_p <= 1.0:
        raise C2IError(f"--gate-p must be in [0, 1], got {cfg.gate_p}")
    if cfg.rule not in RULES:
        raise C2IError(f"--rule {cfg.rule!r}: choose one of {', '.join(RULES)}")
    if cfg.confirm_size < 0 or cfg.confirm_top < 1 or not 0.0 < cfg.alpha < 1.0:
        raise C2IError(f"--confirm-size must be ≥ 0 (got {cfg.confirm_size}), --confirm-top ≥ 1 (got "
                       f"{cfg.confirm_top}), --alpha in (0, 1) (got {cfg.alpha})")
    if cfg.only_draw is not None and not 0 <= cfg.only_draw < cfg.draws:
        raise C2IError(f"only_draw={cfg.only_draw} is outside [0, {cfg.draws})")
    if cfg.compose and cfg.rule == "confirm":
        raise C2IError("--compose confirms no composed plan yet: use it with --rule paper")
    if cfg.prune not in PRUNE_MODES:
        raise C2IError(f"--prune {cfg.prune!r}: choose one of {', '.join(PRUNE_MODES)}")
    if cfg.loss not in LOSSES:
        raise C2IError(f"--loss {cfg.loss!r}: choose one of {', '.join(LOSSES)}")
    search_dtype(cfg.search_dtype)
    if cfg.scan_svd not in SCAN_SVDS:
        raise C2IError(f"--scan-svd {cfg.scan_svd!r}: choose one of {', '.join(SCAN_SVDS)}")
    if cfg.scan_cache not in SCAN_CACHE_MODES:
        raise C2IError(f"scan_cache={cfg.scan_cache!r}: choose one of {', '.join(SCAN_CACHE_MODES)}")
    distributed.init()
    out = Path(cfg.out)
    if out.exists() and not cfg.resume and any(out.iterdir()):
        raise C2IError(f"--out {out} exists and is not empty (use --resume {out} to continue a run there)")
    distributed.barrier()          # every rank has checked --out before rank 0 writes into it
    t_start = time.perf_counter()
    lm, task, t_load = _prepare(cfg, cfg.dtype, cfg.device, cfg.device_map, lm=lm, task=task)
    cfg = dataclasses.replace(cfg, loss=scan_loss(cfg.loss, task.kind))     # config.json keeps the loss used
    main_rank = distributed.is_main()
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        saved = {k: v for k, v in cfg.to_json().items() if k not in ("resume", "progress", "threads", "log_json")}
        atomic_write_text(out / CONFIG, json.dumps(saved, indent=2) + "\n")
    if not main_rank:
        cfg.progress, cfg.log_json = False, None      # one voice: rank 0 reports
    timings = {"load": t_load}
    draws = []
    mc = MetricsCache(lm.model, cfg.metrics_cache)
    todo = range(cfg.draws) if cfg.only_draw is None else [cfg.only_draw]
    with remembered_svds():                           # one SVD per matrix for all the draws
        for draw in todo:
            rep = _adapt_one(cfg, lm, task, draw, out, timings if draw == todo[0] else {}, mc, test)
            draws.append(rep)
    report = draws[0]
    if len(draws) > 1:
        accs = [d["test"]["adapted"]["accuracy"] for d in draws]
        gains = [d["test"]["adapted"]["accuracy"] - d["test"]["base"]["accuracy"] for d in draws]
        t = torch.tensor(accs, dtype=torch.float64)
        report["draws"] = {"n": cfg.draws, "plans": [d["plan"] for d in draws], "test_accuracy": accs,
                           "test_gain": gains, "test_paired": [d["test"].get("paired") for d in draws],
                           "mean": float(t.mean()),
                           "std": float(t.std()) if len(accs) > 1 else 0.0,
                           "min": min(accs), "max": max(accs),
                           "selection_p_max": [(d["search"]["significance"] or {}).get("p_max") for d in draws],
                           "shipped": [d["decision"]["shipped"] for d in draws]}
    timings["total"] = time.perf_counter() - t_start
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    report["world_size"] = distributed.size()
    report["metrics_cache"] = mc.stats()
    if main_rank:
        atomic_write_text(out / REPORT, json.dumps(report, indent=2, default=str) + "\n")
    distributed.barrier()
    _emit(cfg, "done", out=str(out), timings=report["timings"])
    return report


def _adapt_one(cfg: AdaptConfig, lm, task, draw: int, out: Path, timings: dict,
               mc: MetricsCache | None = None, test=None) -> dict:
    model = lm.model
    n_confirm = cfg.confirm_size if cfg.rule == "confirm" or cfg.compare_rules else 0
    if test is None:
        splits = split(task, cfg.samples, cfg.test_size, cfg.seed, draw=draw, n_draws=cfg.draws, n_confirm=n_confirm)
    else:                                           # the caller's own held-out rows
        splits = split_with_test(task, test, cfg.samples, cfg.seed, draw=draw, n_draws=cfg.draws, n_confirm=n_confirm)
    refs = target_matrices(model, cfg.types)
    by_name = {r.name: r for r in refs}
    min_rows = min(r.shape[0] for r in refs)
    if max(cfg.clusters) > min_rows:      # checked before the slow scan: any matrix may reach the top-K
        raise C2IError(f"--clusters {max(cfg.clusters)} is invalid: the scanned matrices have as few as "
                       f"{min_rows} rows (need 1 ≤ k ≤ rows)")
    n_layers = max(r.layer for r in target_matrices(model)) + 1
    _log(cfg, f"[c2i] {task.name}: {len(splits['select'])} selection / {len(splits['confirm'])} confirmation / "
              f"{len(splits['test'])} held-out examples; {len(refs)} matrices", "start", task=task.name, draw=draw,
         n_select=len(splits["select"]), n_confirm=len(splits["confirm"]), n_test=len(splits["test"]),
         n_matrices=len(refs))

    sel = _scorer(lm, task, splits["select"], cfg)
    # layer inputs kept for the search; the scan's forward fills it when it can (then it is the base evaluation)
    cache = PrefixCache() if not cfg.dense_candidates else None
    sc, scan_cached = _scan(cfg, sel, refs, cache, mc)
    timings.update({"scan_gradient": sc.seconds["gradient"], "scan_svd": sc.seconds["svd"]})
    top = sc.top(cfg.top_k)
    _log(cfg, "[c2i] top matrices: " + ", ".join(f"{m.name} ({m.score:+.3f})" for m in top), "scan",
         seconds=sc.seconds, loss=sc.loss, top=[m.summary() for m in top])

    t1 = time.perf_counter()
    cands = build_candidates(top, by_name, cfg.rank_fractions, cfg.clusters, cfg.methods, cfg.seed,
                             cfg.progress)
    timings["candidates"] = time.perf_counter() - t1

    journal = out / (JOURNAL if draw == 0 else f"journal.draw{draw}.jsonl")
    done = _read_journal(journal) if cfg.resume else {}
    prune, prune_off = prune_mode(cfg, task, len(splits["confirm"]), MIN_CONFIRM_ROWS)
    keep = prune_keep(cfg)
    lowered = lowers_precision(model, cfg.search_dtype)
    with search_precision(model, cfg.search_dtype):
        t2 = time.perf_counter()
        if lowered:    # the base and the candidates compared in one precision: the scan's fp32 pass is not it
            cache = PrefixCache() if cache is not None else None
            base_sel = base_metrics(sel, None, cache, {m.layer for m in top} if cache is not None else set())[0]
        else:
            base_sel = sc.base if sc.base is not None else base_metrics(
                sel, mc, cache, {m.layer for m in top} if cache is not None else set())[0]
        timings["select_base"] = time.perf_counter() - t2
        _emit(cfg, "selection_base", accuracy=base_sel["accuracy"], log_loss=base_sel["log_loss"])
        res = search(sel, cands, base_sel, cache, n_layers, cfg.max_evals, cfg.compose, cfg.loss, cfg.progress,
                     on_result=_on_result(cfg, journal), done=done, dense=cfg.dense_candidates, prune=prune,
                     keep=keep)
    timings["search"] = res.seconds["search"]
    # over the fully scored candidates: a pruned one has no full correctness vector (its count is recorded)
    sig = significance(base_sel, rank(res.evaluated), cfg.seed)
    if sig is not None and prune != "off":
        sig["pruned"] = res.pruned
    res.best, res.final, gated = gate(res.best, res.final, base_sel, sig, cfg.gate_p)
    if sig is not None:
        sig.update(gate_p=cfg.gate_p, gated=gated)
        _log(cfg, f"[c2i] selection gain {sig['gain']:+d} of {sig['n']} examples ({sig['wins']} fixed, "
                  f"{sig['losses']} broken): p = {sig['p_max']:.3g} that the best of {sig['candidates']} no-effect "
                  f"candidates gains as much (max-T sign-flip test; uncorrected McNemar p = {sig['p_single']:.3g})"
                  + (f"; above --gate-p {cfg.gate_p}: the base model is kept" if gated else ""),
             "significance", **sig)
    n_same = sum(c.same_as is not None for c in res.evaluated)
    _log(cfg, f"[c2i] evaluated {len(res.evaluated)} of {len(cands)} candidates"
              + (f" ({n_same} with the factors of an earlier one: its result, no pass)" if n_same else "")
              + (f"; {res.pruned} stopped early, " + _PRUNED_WHY[prune] + f" the best {keep} "
                 f"({res.row_passes_saved} row·layer passes saved)" if res.pruned else "")
              + "; plan: "
              + (", ".join(f"{c.edit.matrix} ρ={c.edit.rank_fraction} k={c.edit.n_clusters} {c.edit.method}"
                           for c in res.best) or "none beat the base model"), "plan",
         edits=[c.edit.to_dict() for c in res.best], n_evaluated=len(res.evaluated), seconds=res.seconds)

    decisions = _decide(cfg, lm, task, splits["confirm"], res, base_sel, sig, timings, mc)
    shipped = decisions[cfg.rule]
    final = res.final if cfg.rule == "paper" else (shipped.plan[0].result if shipped.plan else base_sel)
    plan = Plan([c.edit for c in shipped.plan], base_model=lm.model_id,
                meta={"task": task.name, "seed": cfg.seed, "draw": draw, "samples": cfg.samples, "rule": cfg.rule})
    others = {name: d.plan for name, d in decisions.items() if name != cfg.rule}
    test, spent, judged = _conclude(lm, task, splits["test"], cfg, shipped.plan, plan, timings,
                                    out if draw == 0 and distributed.is_main() else None, others, mc)
    _emit(cfg, "held_out", **test)
    extra = {"decision": {**shipped.summary(), "changed": _changed(shipped, base_sel, res)}}
    if cfg.compare_rules:
        extra["rules"] = {name: {"plan": [c.edit.to_dict() for c in d.plan], "shipped": d.shipped,
                                 "reason": d.reason, "changed": _changed(d, base_sel, res),
                                 "test": test if name == cfg.rule else judged[name]}
                          for name, d in decisions.items()}
    return build_report(
        cfg, task, {"n_select": len(splits["select"]), "n_test": len(splits["test"]), "draw": draw,
                    "n_confirm": len(splits["confirm"])}, plan,
        scan={"loss": sc.loss, "loss_kind": sc.loss_kind, "score_kind": sc.score_kind, "skipped": sc.skipped,
              "svds": sc.svds, "cache": scan_cached, "matrices": [m.summary() for m in sc.matrices]},
        search={"n_candidates": len(cands), "n_evaluated": len(res.evaluated), "n_same_factors": n_same,
                "rank_correlation_predicted_vs_measured": res.rank_correlation, "significance": sig,
                "dtype": cfg.search_dtype if lowered else str(next(model.parameters()).dtype).removeprefix("torch."),
                "prune": prune, "prune_off_reason": prune_off, "prune_keep": keep, "pruned": res.pruned,
                "row_passes": res.row_passes, "row_passes_saved": res.row_passes_saved,
                "candidates": [c.summary() for c in res.candidates]},
        selection={"base": _strip(base_sel), "adapted": _strip(final)}, test=test,
        forward_passes=_passes(res.forward_layer_passes, n_layers, gradient_pass_rows=sel.forward_rows),
        accounting=spent, **extra)


def _scan(cfg: AdaptConfig, sel, refs, cache: PrefixCache | None, mc: MetricsCache | None):
    """The scan of ``sel``'s rows, from the scan cache (c2i_fast.scan_cache) when it holds it, and whether it
    did: "hit", "miss" (computed, and stored unless the mode is "off") or "off". Under torchrun every rank
    computes its share, so the cache is off there."""
    mode = cfg.scan_cache if distributed.size() == 1 else "off"
    args = (list(cfg.rank_fractions), cfg.top_k, cfg.loss, cfg.score)
    if mode == "off":
        return scan(sel, refs, *args, cfg.progress, checkpointing=cfg.gradient_checkpointing, cache=cache,
                    svd=cfg.scan_svd), "off"
    sccache = ScanCache(mode)
    key = scan_key(mc if mc is not None else MetricsCache(sel.model, enabled=False), sel, refs, *args,
                   cfg.scan_svd, cfg.gradient_checkpointing)
    sc = sccache.get(key)
    if sc is not None:
        _log(cfg, "[c2i] scan read from the scan cache (no gradient pass, no SVDs)", "scan_cache", hit=True)
        return sc, "hit"
    sc = scan(sel, refs, *args, cfg.progress, checkpointing=cfg.gradient_checkpointing, cache=cache,
              svd=cfg.scan_svd)
    sccache.put(key, sc)
    return sc, "miss"


def _decide(cfg: AdaptConfig, lm, task, confirm_rows, res, base_sel: dict, sig: dict | None,
            timings: dict, mc: MetricsCache | None = None) -> dict:
    """The shipping rule's Decision (c2i_fast.confirm.decide), and every rule's with --compare-rules."""
    t0 = time.perf_counter()
    conf = _scorer(lm, task, confirm_rows, cfg) if confirm_rows else None
    ranked = rank(res.evaluated)
    out = {}
    for rule in (RULES if cfg.compare_rules else (cfg.rule,)):
        out[rule] = decide(rule, ranked, base_sel, res.best, conf, top=cfg.confirm_top, alpha=cfg.alpha,
                           significance=sig, mc=mc)
        _log(cfg, f"[c2i] rule {rule}{'' if rule == cfg.rule else ' (compared, not shipped)'}: {out[rule].reason}",
             "decision", **out[rule].summary())
    timings["confirm"] = time.perf_counter() - t0
    return out


def _changed(d, base_sel: dict, res) -> dict:
    """Fraction of answers a decision's plan changes vs the base model, on the selection and confirmation rows
    (None where the plan was not scored there)."""
    if not d.plan:
        return {"selection": 0.0, "confirmation": 0.0 if d.base is not None else None}
    sel = res.final if d.rule == "paper" else d.plan[0].result
    conf = d.confirmed[d.chosen]["changed"] if d.chosen is not None else None
    return {"selection": changed_fraction(base_sel, sel), "confirmation": conf}


# ---------------------------------------------------------------------------------------------------------
# LASER in the same harness
# ---------------------------------------------------------------------------------------------------------
def laser(cfg: LaserConfig, *, lm=None) -> dict:
    """LASER's exhaustive search: every (type ∈ {mlp_in, mlp_out}) × layer × ρ, plain truncated SVD, selected
    by accuracy (ties by log-loss) on a validation split disjoint from the test split. ``lm``: a model already
    loaded (left as it was found), else ``cfg.model`` is loaded.

    Default mode reuses the prefix cache and factored forwards (same numbers, fewer layer passes). With
    ``faithful`` each candidate is a dense rebuild of the weight and a full forward, as in LASER's code.
    """
    _check_common(cfg.rank_fractions, cfg.val_size, cfg.test_size)
    if cfg.prune not in ("off", "exact"):
        raise C2IError(f"--prune {cfg.prune!r}: LASER's search takes off or exact")
    if cfg.prune == "exact" and cfg.faithful:
        raise C2IError("--prune exact needs the factored search (not --faithful)")
    out = Path(cfg.out)
    if out.exists() and not cfg.resume and any(out.iterdir()):
        raise C2IError(f"--out {out} exists and is not empty")
    t_start = time.perf_counter()
    lm, task, t_load = _prepare(cfg, lm=lm)
    timings = {"load": t_load}
    out.mkdir(parents=True, exist_ok=True)
    model = lm.model
    # "select" is LASER's validation split
    splits = split(task, cfg.val_size, cfg.test_size, cfg.seed, draw=cfg.draw, n_draws=cfg.draws)
    refs = target_matrices(model, cfg.types)
    if cfg.layers is not None:
        refs = [r for r in refs if r.layer in set(cfg.layers)]
        if not refs:
            raise C2IError(f"--layers {list(cfg.layers)} selects no matrix")
    n_layers = max(r.layer for r in target_matrices(model)) + 1
    val = _scorer(lm, task, splits["select"], cfg)

    t0 = time.perf_counter()
    cache = None if cfg.faithful else PrefixCache()
    base_val = val.evaluate(cache, capture={r.layer for r in refs})
    timings["val_base"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    # One SVD per matrix serves every ρ; each candidate holds it until the report is written, as the plan's may.
    cands = []
    for r in refs:
        svd = r.svd()
        cands += [Candidate(Edit(r.name, rho), r.layer, float("nan"), svd) for rho in cfg.rank_fractions]
    t_svd = time.perf_counter() - t1
    journal = out / JOURNAL
    # every candidate in the order built and each with its own pass (no ΔL̂ to order by, no twin skipped)
    prune = "off" if task.kind == "generation" else cfg.prune     # generation is scored after the pass
    res = search(val, cands, base_val, cache, n_layers, max_evals=None, progress=cfg.progress,
                 on_result=_on_result(cfg, journal), done=_read_journal(journal) if cfg.resume else {},
                 dense=cfg.faithful, order="given", dedupe=False, prune=prune)
    timings["search"] = time.perf_counter() - t1          # the sweep, its SVDs included
    timings["svd"] = t_svd
    ranked = rank(res.evaluated)
    sig = significance(base_val, ranked, cfg.seed)       # LASER's pick faces the same curse
    if sig is not None and prune != "off":
        sig["pruned"] = res.pruned                       # over the fully scored candidates only
    plan = Plan([c.edit for c in res.best], base_model=lm.model_id,
                meta={"task": task.name, "seed": cfg.seed, "method": "laser"})
    test, spent, _ = _conclude(lm, task, splits["test"], cfg, res.best, plan, timings, out,
                               mc=MetricsCache(model, cfg.metrics_cache))
    timings["total"] = time.perf_counter() - t_start
    report = build_report(
        cfg, task, {"n_val": len(splits["select"]), "n_test": len(splits["test"])}, plan,
        search={"n_candidates": len(cands), "n_evaluated": len(res.evaluated), "significance": sig,
                "prune": prune, "pruned": res.pruned, "row_passes_saved": res.row_passes_saved,
                "candidates": [c.summary() for c in res.candidates]},
        selection={"base": _strip(base_val), "adapted": _strip(res.final)}, test=test,
        forward_passes=_passes(res.forward_layer_passes, n_layers), accounting=spent)
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    atomic_write_text(out / REPORT, json.dumps(report, indent=2, default=str) + "\n")
    _emit(cfg, "done", out=str(out), plan=report["plan"], test=report["test"], timings=report["timings"])
    return report


# ---------------------------------------------------------------------------------------------------------
# c2i eval
# ---------------------------------------------------------------------------------------------------------
def evaluate_model(cfg: EvalConfig, *, lm=None) -> dict:
    """Metrics of the base model (and of an adapted directory, if given) on the held-out split (``lm``: a model
    already loaded, else ``cfg.model`` is loaded)."""
    _check_common((), cfg.samples, cfg.test_size)
    lm, task, t_load = _prepare(cfg, lm=lm)
    splits = split(task, cfg.samples, cfg.test_size, cfg.seed)
    sc = _scorer(lm, task, splits["test"], cfg)
    base, _ = base_metrics(sc, MetricsCache(lm.model, cfg.metrics_cache))
    report = {"task": task.name, "n_test": len(splits["test"]), "versions": versions(), "base": _strip(base)}
    if cfg.plan:
        from .artifacts import load_adapted
        load_adapted(lm.model, cfg.plan)
        try:
            held = _held_out_block(base, sc.evaluate())
        finally:
            restore_(lm.model)
        report["adapted"] = held["adapted"]
        if "paired" in held:
            report["paired"] = held["paired"]
    if cfg.out:
        atomic_write_text(Path(cfg.out), json.dumps(report, indent=2, default=str) + "\n")
    _emit(cfg, "done", **{k: report[k] for k in ("task", "n_test", "base")}, adapted=report.get("adapted"),
          paired=report.get("paired"))
    return report
