"""Do the fast defaults ship what the exhaustive evaluation of the same candidates ships? From the table's cells.

c2i_fast's defaults score at most 48 of a task's candidates (first-order order, exact pruning) and confirm the best
three on the confirmation rows. ``--max-evals 0`` scores every one. The results table (bench/bench_tasks.py)
already holds, per task, a ``c2i`` cell that scored every candidate of the same grid on the same selection rows
(the paper's rule, max_evals 0, exact pruning that keeps the best three exact) and a ``c2i_fast`` cell at the
defaults. So the exhaustive evaluation needs no new search: per task this bench writes the C2I cell's candidate
scores as the journal of a fresh ``c2i adapt`` run with the c2i_fast cell's configuration and ``--max-evals 0``,
resumes it (every candidate is in the journal: none is scored again, checked), and lets the confirm rule decide
on the exhaustive ranking: its best three re-scored on the confirmation rows, the shipped plan judged on the
held-out rows. Against the c2i_fast cell: the contenders, the decision, the held-out accuracies.

A task is compared only when both cells exist (a task whose c2i cell is missing or skipped gets no unit yet, so a
later run compares it), ran on the same rows and grid, and the candidates both scored
agree (same accuracy, log-loss to round-off); one whose c2i_fast cell decided without confirmation rows (a small
task: the fallback reads the selection max-T test over every candidate's per-row flags, which a report does
not keep) is written as not comparable, with the reason. One unit per task, ``<out>/<task>.json``, written
atomically and skipped when present.

    python bench/bench_exhaustive.py --cells bench/results/tasks-smollm2 --out bench/results/exhaustive-smollm2
    python bench/bench_exhaustive.py --out bench/results/exhaustive-smollm2 --summary
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from c2i_fast.io import atomic_write_text  # noqa: E402
from _common import git_commit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULT_KEYS = ("accuracy", "log_loss", "accuracy_sum", "accuracy_mean", "choice_loss", "pruned", "rows_scored",
               "correct_so_far")          # what a report keeps of a candidate's selection result
LOG_LOSS_RTOL = 1e-4                       # the same candidate scored by two runs: fp32 round-off at most


def key(c: dict) -> str:
    """A candidate's key as :meth:`c2i_fast.search.Candidate.key` writes it, from its report summary."""
    return f"{c['matrix']}|{c['rank_fraction']}|{c['n_clusters']}|{c['method']}|{c['seed']}"


def journal_lines(report: dict) -> list[str]:
    """The journal a run that scored ``report``'s candidates would have left (one JSON line per candidate; ``n``:
    the selection rows, which the report keeps once, with the base)."""
    n = report["selection"]["base"]["n"]
    return [json.dumps({"key": key(c), "result": {"n": n, **{k: c[k] for k in RESULT_KEYS if k in c}}})
            for c in report["search"]["candidates"] if "accuracy" in c or c.get("pruned")]


def scored(report: dict) -> dict[str, dict]:
    """key → summary of the candidates ``report`` scored in full (pruned ones left out)."""
    return {key(c): c for c in report["search"]["candidates"] if "accuracy" in c and not c.get("pruned")}


def agreement(fast: dict, exhaustive: dict) -> dict:
    """The candidates both reports scored in full: how many, and their largest accuracy / relative log-loss gaps."""
    a, b = scored(fast), scored(exhaustive)
    common = sorted(set(a) & set(b))
    acc = max((abs(a[k]["accuracy"] - b[k]["accuracy"]) for k in common), default=0.0)
    ll = max((abs(a[k]["log_loss"] - b[k]["log_loss"]) / max(abs(b[k]["log_loss"]), 1e-12) for k in common),
             default=0.0)
    return {"common": len(common), "max_abs_accuracy_diff": acc, "max_rel_log_loss_diff": ll,
            "same": acc == 0.0 and ll <= LOG_LOSS_RTOL}


def not_comparable(fast_cell: dict, c2i_cell: dict, fast_rep: dict | None, c2i_rep: dict | None) -> str | None:
    """Why a task's two cells cannot be compared, or None."""
    if fast_cell.get("skipped") or c2i_cell.get("skipped"):
        return "a cell was skipped: " + (fast_cell.get("skipped") or c2i_cell.get("skipped"))
    if fast_rep is None or c2i_rep is None:
        return "a cell has no report beside it (<task>/reports/<method>.json)"
    if c2i_cell.get("max_evals") != 0 or c2i_rep["search"]["n_evaluated"] != c2i_rep["search"]["n_candidates"]:
        return "the c2i cell did not evaluate every candidate"
    if fast_cell.get("settings") != c2i_cell.get("settings") or fast_cell["sizes"]["n_select"] != \
            c2i_cell["sizes"]["n_select"] or fast_cell["sizes"]["n_test"] != c2i_cell["sizes"]["n_test"]:
        return "the cells ran with other settings or sizes"
    if c2i_rep["search"].get("prune") not in ("off", "exact") or \
            (c2i_rep["search"].get("prune") == "exact" and c2i_rep["search"].get("prune_keep", 1) <
             fast_rep["config"].get("confirm_top", 3)):
        return "the c2i cell's pruning does not keep the confirm rule's contenders exact"
    fb, cb = fast_rep["selection"]["base"], c2i_rep["selection"]["base"]
    # the log-loss is compared to float noise: batch layouts (a shared prefix or not) move its 6th digit
    if fb.get("accuracy") != cb.get("accuracy") or fb.get("n") != cb.get("n") or \
            abs(fb.get("log_loss", 0.0) - cb.get("log_loss", 0.0)) > 1e-5 * max(1.0, abs(cb.get("log_loss", 0.0))):
        return "the base model's selection metrics differ: not the same selection rows"
    if fast_rep["decision"].get("fallback"):
        return (f"c2i_fast decided without confirmation rows ({fast_rep['decision']['reason']}); the exhaustive "
                f"fallback needs every candidate's per-row flags, which the c2i cell's report does not keep")
    losses = {r["scan"].get("loss_kind", "answer") for r in (fast_rep, c2i_rep)}
    if len(losses) > 1:
        return "the two scans ranked by different losses (" + " and ".join(sorted(losses)) + "): not the same candidates"
    return None


def contenders(decision: dict) -> list[dict]:
    """The candidates a confirm decision re-scored on the confirmation rows: key, selection and confirmation
    accuracy, paired gain there."""
    return [{"key": key(d), "selection_accuracy": d["selection_accuracy"], "confirmation_accuracy": d["accuracy"],
             "gain": d["paired"]["fixed"] - d["paired"]["broken"]} for d in decision.get("confirmed") or []]


def side(cell: dict, rep: dict) -> dict:
    """One side of the comparison: how many candidates it scored, its contenders and decision, the held-out
    numbers of what it ships."""
    held = cell["held_out"]
    return {"n_evaluated": rep["search"]["n_evaluated"], "n_candidates": rep["search"]["n_candidates"],
            "contenders": contenders(rep["decision"]), "shipped": cell["shipped"], "plan": cell["plan"],
            "reason": cell["reason"], "held_out": held,
            "held_out_gain": held["accuracy"] - held["base_accuracy"]}


def exhaustive_run(fast_rep: dict, c2i_rep: dict, lm, threads: int, quiet: bool) -> dict:
    """``c2i adapt`` with the c2i_fast cell's configuration and ``--max-evals 0``, resumed from a journal of the
    C2I cell's candidate scores: the report of the exhaustive evaluation (nothing scored again: checked)."""
    from c2i_fast.config import AdaptConfig
    from c2i_fast.pipeline import adapt
    work = Path(tempfile.mkdtemp(prefix="c2i-exhaustive-"))
    try:
        run = work / "run"
        run.mkdir()
        (run / "journal.jsonl").write_text("\n".join(journal_lines(c2i_rep)) + "\n")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in fast_rep["config"].items()}
        d.update(out=str(run), max_evals=0, resume=True, threads=threads, progress=not quiet, log_json=None,
                 data_dir=d.get("data_dir"))
        rep = adapt(AdaptConfig(**d), lm=lm)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if rep["search"]["row_passes"] or rep["search"]["n_evaluated"] != c2i_rep["search"]["n_evaluated"]:
        raise RuntimeError(f"the exhaustive run scored candidates of its own ({rep['search']['row_passes']} "
                           f"row-passes, {rep['search']['n_evaluated']} evaluated vs the c2i cell's "
                           f"{c2i_rep['search']['n_evaluated']}): its candidates are not the c2i cell's")
    return rep


def plans_paired(lm, config: dict, fast_plan: list[dict], exh_plan: list[dict]) -> dict:
    """The two shipped plans on the held-out rows, pairwise (fixed: rows the exhaustive plan gets right and the
    fast one wrong). Each plan is applied from its edits as a user's plan.json is; its accuracy is checked against
    its own run's held-out accuracy by the caller. The rows: the cell's split (``config``: its report's)."""
    from c2i_fast.cache import MetricsCache, base_metrics
    from c2i_fast.config import RunConfig
    from c2i_fast.pipeline import _scorer
    from c2i_fast.replay import PrefixCache
    from c2i_fast.stats import paired_difference
    from c2i_fast.tasks import check_tokenization, load_task, split
    from c2i_fast.transform import factorize_, restore_
    task = check_tokenization(load_task(config["task"], config.get("data_dir"), config.get("metric")), lm.tokenizer)
    rows = split(task, config["samples"], config["test_size"], config["seed"], draw=0, n_draws=1,
                 n_confirm=config["confirm_size"])["test"]
    run = RunConfig(**{k: v for k, v in config.items() if k in RunConfig.__dataclass_fields__})
    sc = _scorer(lm, task, rows, run)
    layer = {id(p): min((int(e["matrix"].split(".")[2]) for e in p), default=0) for p in (fast_plan, exh_plan)}
    cache = PrefixCache()
    base, _ = base_metrics(sc, MetricsCache(lm.model, config.get("metrics_cache", True)), cache,
                           {v for v in layer.values()} if cache is not None else set())
    correct = []
    for p in (fast_plan, exh_plan):
        if not p:
            correct.append(list(base["correct"]))
            continue
        factorize_(lm.model, p)
        try:
            correct.append(list(sc.evaluate(cache, start_layer=layer[id(p)])["correct"]))
        finally:
            restore_(lm.model, [e["matrix"] for e in p])
    pd = paired_difference(correct[0], correct[1])
    return {**pd, "fast_accuracy": sum(correct[0]) / len(rows), "exhaustive_accuracy": sum(correct[1]) / len(rows)}


def compare(cells: Path, task: str, lm_of, args, command: str) -> dict:
    """The unit of one task (``lm_of()``: the model, loaded on first use)."""
    from bench_tasks import held_out
    from c2i_fast.io import device_name, versions

    def load(p: Path):
        return json.loads(p.read_text()) if p.is_file() else None
    fast_cell, c2i_cell = load(cells / task / "c2i_fast.json"), load(cells / task / "c2i.json")
    fast_rep, c2i_rep = load(cells / task / "reports/c2i_fast.json"), load(cells / task / "reports/c2i.json")
    unit = {"task": task, "model": (fast_cell or {}).get("model"), "cells": str(cells)}
    why = not_comparable(fast_cell, c2i_cell, fast_rep, c2i_rep)
    if why is None:
        unit["agreement"] = agreement(fast_rep, c2i_rep)
        if not unit["agreement"]["same"]:
            why = f"the candidates both cells scored disagree ({unit['agreement']})"
    if why is not None:
        return {**unit, "comparable": False, "reason": why}
    t0 = time.perf_counter()
    rep = exhaustive_run(fast_rep, c2i_rep, lm_of(), args.threads, args.quiet)
    exh_cell = {"held_out": held_out(rep["test"]), "shipped": rep["decision"]["shipped"], "plan": rep["plan"],
                "reason": rep["decision"]["reason"]}
    fast, exh = side(fast_cell, fast_rep), side(exh_cell, rep)
    both = {c["key"]: c for c in fast["contenders"]} if fast["contenders"] else {}
    same_confirmation = all(c["confirmation_accuracy"] == both[c["key"]]["confirmation_accuracy"]
                            for c in exh["contenders"] if c["key"] in both)
    strip = [{k: v for k, v in e.items() if k != "seed"} for e in exh["plan"]]
    same_plan = strip == [{k: v for k, v in e.items() if k != "seed"} for e in fast["plan"]]
    paired = None
    if not same_plan:           # the two plans on the same held-out rows: fixed = the exhaustive one's gains
        paired = plans_paired(lm_of(), fast_rep["config"], fast["plan"], exh["plan"])
        for name, s in (("fast", fast), ("exhaustive", exh)):
            if not math.isclose(paired[f"{name}_accuracy"], s["held_out"]["accuracy"], abs_tol=1e-12):
                raise RuntimeError(f"{task}: the {name} plan applied from its edits scores "
                                   f"{paired[f'{name}_accuracy']} on the held-out rows, its run {s['held_out']['accuracy']}")
    return {**unit, "comparable": True, "fast": fast, "exhaustive": exh,
            "same_contenders": [c["key"] for c in fast["contenders"]] == [c["key"] for c in exh["contenders"]],
            "same_confirmation_scores": same_confirmation,
            "same_decision": fast["shipped"] == exh["shipped"] and same_plan,
            "held_out_fast_minus_exhaustive": fast["held_out"]["accuracy"] - exh["held_out"]["accuracy"],
            "exhaustive_vs_fast_paired": paired,
            "c2i_search_seconds": c2i_rep["timings"].get("search"),
            "fast_search_seconds": fast_rep["timings"].get("search"),
            "seconds": round(time.perf_counter() - t0, 1), "timings": rep["timings"],
            "provenance": {"device": device_name(), "threads": args.threads, "versions": versions(),
                           "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                           "command": command,
                           "cells_commits": {"c2i_fast": (fast_cell.get("provenance") or {}).get("commit"),
                                             "c2i": (c2i_cell.get("provenance") or {}).get("commit")}}}


def _plan(s: dict) -> str:
    if not s["shipped"]:
        return "base"
    return "; ".join(f"L{e['matrix'].split('.')[2]} {e['matrix'].split('.')[-1]} ρ={e['rank_fraction']} "
                     f"k={e['n_clusters']}" + (f" {e['method']}" if e["n_clusters"] > 1 else "") for e in s["plan"])


def _gain(s: dict) -> str:
    h = s["held_out"]
    return f"{h['base_accuracy']:.1%} → {h['accuracy']:.1%}"


def table(out: Path) -> str:
    """The markdown table of ``out``'s units, and the verdict per task: fast held-out ≥ exhaustive's."""
    rows = ["| task | fast: scored | fast: plan | fast: held-out | exhaustive: scored | exhaustive: plan | "
            "exhaustive: held-out | same contenders | same decision | fast ≥ exhaustive |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(out.glob("*.json")):
        if p.name == "summary.json":
            continue
        u = json.loads(p.read_text())
        if not u["comparable"]:
            rows.append(f"| {u['task']} | not comparable: {u['reason']} |||||||||")
            continue
        f, e = u["fast"], u["exhaustive"]
        diff = u["held_out_fast_minus_exhaustive"]
        pd = u.get("exhaustive_vs_fast_paired")
        verdict = "yes" if diff >= 0 else f"**no** ({diff * 100:+.1f} pts)"
        if pd:
            verdict += f"; exhaustive fixes {pd['fixed']}, breaks {pd['broken']}, p = {pd['p_two_sided']:.2g}"
        rows.append(f"| {u['task']} | {f['n_evaluated']} of {f['n_candidates']} | {_plan(f)} | {_gain(f)} | "
                    f"{e['n_evaluated']} of {e['n_candidates']} | {_plan(e)} | {_gain(e)} | "
                    f"{'yes' if u['same_contenders'] else 'no'} | {'yes' if u['same_decision'] else '**no**'} | "
                    f"{verdict} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", help="a bench_tasks folder, e.g. bench/results/tasks-smollm2")
    ap.add_argument("--tasks", help="comma-separated (default: every task folder of --cells)")
    ap.add_argument("--out", required=True, help="folder of unit JSONs (created)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--summary", action="store_true", help="only print the markdown table of --out")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.summary:
        print(table(out))
        return 0
    if not args.cells:
        ap.error("--cells is required (or --summary)")
    cells = Path(args.cells)
    meta = cells / "meta.json"
    if not meta.is_file():
        print(f"bench_exhaustive: {meta} not found: --cells takes a bench_tasks folder", file=sys.stderr)
        return 2
    model = json.loads(meta.read_text())["model"]
    tasks = args.tasks.split(",") if args.tasks else sorted(p.name for p in cells.iterdir()
                                                            if (p / "c2i_fast.json").is_file())
    command = "python bench/bench_exhaustive.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.mkdir(parents=True, exist_ok=True)
    lm = []

    def lm_of():
        if not lm:
            import torch
            from c2i_fast.models import load_model
            torch.set_num_threads(args.threads)
            lm.append(load_model(model))
        return lm[0]
    for task in tasks:
        path = out / f"{task}.json"
        if path.is_file():
            continue
        cell = cells / task / "c2i.json"
        if not cell.is_file() or json.loads(cell.read_text()).get("skipped"):
            print(f"[bench_exhaustive] {task}: no c2i cell yet (missing or skipped): nothing written, a later run "
                  f"compares it", file=sys.stderr, flush=True)
            continue
        print(f"[bench_exhaustive] {task}", file=sys.stderr, flush=True)
        unit = compare(cells, task, lm_of, args, command)
        atomic_write_text(path, json.dumps(unit, indent=2, default=str) + "\n")
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
