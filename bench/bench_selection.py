"""Selection-rule bench: does the plan that ships hold up on held-out rows? Paper rule vs the confirmation rule
(and LASER in the same harness, where asked), paired with the base model on the same held-out rows.

One unit per (task, draw): ``c2i adapt --draws N`` split (disjoint selection samples, one held-out set per
task), the search run once, then both rules decided (``--compare-rules``) and every rule's plan judged on the
held-out rows: fixed / broken, Δ with its 95% interval, exact McNemar p, fraction of answers changed. LASER
(``--laser-layers``) selects on the same draw's selection rows with its ρ grid on {mlp_in, mlp_out} of those
layers. Each unit is written atomically to ``<out>/<task>/draw<d>.json`` when it finishes and skipped when it
exists, so a killed run resumes; ``--summary`` rewrites ``<out>/summary.json`` and prints the markdown table.

    python bench/bench_selection.py --model smollm2 --tasks fever,counterfact --draws 5 \
        --out bench/results/selection-smollm2
    python bench/bench_selection.py --model qwen2.5-coder-1.5b --tasks fever --draws 2 --test-size 300 \
        --top-k 3 --max-evals 16 --laser-layers 17-27 --out bench/results/selection-qwen2.5-coder-1.5b
    python bench/bench_selection.py --model smollm2 --tasks counterfact --draws 5 --prune halve \
        --out bench/results/selection-smollm2-halve
    python bench/bench_selection.py --out bench/results/selection-smollm2 --summary
    python bench/bench_selection.py --out bench/results/selection-smollm2-halve --summary \
        --against bench/results/selection-smollm2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from c2i_fast.io import atomic_write_text, device_name, versions  # noqa: E402
from c2i_fast.precision import SEARCH_DTYPES  # noqa: E402
from c2i_fast.search import PRUNE_MODES  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit, parse_layers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORSE_P = 0.05          # a draw "ships a significantly worse plan": held-out Δ < 0 with McNemar p < this


def _held_out(test: dict) -> dict:
    """The held-out numbers a unit keeps of one plan: accuracies, the paired test, answers changed."""
    pd = test.get("paired") or {}
    return {"base_accuracy": test["base"]["accuracy"], "accuracy": test["adapted"]["accuracy"],
            "majority": test["base"].get("majority"), "n": test["base"]["n"],
            "fixed": pd.get("fixed"), "broken": pd.get("broken"), "difference": pd.get("difference"),
            "ci95": pd.get("ci95"), "p_two_sided": pd.get("p_two_sided"), "changed": test.get("changed"),
            "log_loss_base": test["base"]["log_loss"], "log_loss": test["adapted"]["log_loss"]}


def _unit(rep: dict, task: str, draw: int, seconds: float) -> dict:
    """What a unit keeps of one ``c2i adapt --compare-rules`` report."""
    return {
        "task": task, "draw": draw, "seconds": round(seconds, 1),
        "sizes": {k: rep["task"].get(k) for k in ("n_select", "n_confirm", "n_test")},
        "selection_base_accuracy": rep["selection"]["base"]["accuracy"],
        "significance": rep["search"]["significance"], "n_evaluated": rep["search"]["n_evaluated"],
        "search": {k: rep["search"].get(k) for k in ("prune", "pruned", "row_passes", "row_passes_saved",
                                                     "dtype")},
        "decision": rep["decision"], "timings": rep["timings"],
        "rules": {name: {"plan": r["plan"], "shipped": r["shipped"], "reason": r["reason"],
                         "changed": r["changed"], "held_out": _held_out(r["test"])}
                  for name, r in rep["rules"].items()},
    }


def run_unit(args, task: str, draw: int, lm=None, work: Path | None = None) -> dict:
    """One (task, draw). ``lm``: the model, loaded once for every unit (the SVDs of its weights are then
    computed once too, under :func:`c2i_fast.svd.remembered_svds`); None loads it here. ``work``: where the run
    is kept (its journal is what :func:`run_exhaustive` resumes); None: a temporary folder, removed."""
    from c2i_fast.pipeline import AdaptConfig, LaserConfig, adapt, laser
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="c2i-selection-")) if own else work
    try:
        t0 = time.perf_counter()
        rep = adapt(AdaptConfig(
            model=args.model, task=task, out=str(work / "adapt"), samples=args.samples, test_size=args.test_size,
            top_k=args.top_k, max_evals=args.max_evals, draws=args.draws, only_draw=draw, seed=args.seed,
            rule="confirm", compare_rules=True, confirm_size=args.confirm_size, threads=args.threads,
            prune=args.prune, search_dtype=args.search_dtype, loss=args.loss, progress=not args.quiet,
            scan_cache="off"), lm=lm)                    # each unit's search time includes its own scan
        unit = _unit(rep, task, draw, time.perf_counter() - t0)
        if args.laser_layers and task in (args.laser_tasks or args.tasks).split(","):
            t1 = time.perf_counter()
            lrep = laser(LaserConfig(
                model=args.model, task=task, out=str(work / "laser"), val_size=args.samples,
                test_size=args.test_size, layers=parse_layers(args.laser_layers), seed=args.seed, draw=draw,
                draws=args.draws, threads=args.threads, progress=not args.quiet), lm=lm)
            unit["rules"]["laser"] = {"plan": lrep["plan"], "shipped": bool(lrep["plan"]),
                                      "reason": f"LASER grid: layers {args.laser_layers} × {{mlp_in, mlp_out}} × "
                                                f"{len(lrep['config']['rank_fractions'])} ρ, best on the same "
                                                f"{lrep['task']['n_val']} selection rows",
                                      "changed": None, "held_out": _held_out(lrep["test"]),
                                      "seconds": round(time.perf_counter() - t1, 1)}
        return unit
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def constant_predictions(journal: dict[str, dict], first: int) -> dict:
    """Of the fully scored candidates in a run's journal (key → result), how many predict one and the same label
    on every selection row (on a classification task at chance, an edit that collapses the model onto one label
    scores the majority rate); ``first``: of the journal's first ``first`` lines (the fast run's)."""
    def const(r):
        p = r.get("predictions_sum")
        return p is not None and len(p) > 0 and len(set(p)) == 1
    results = list(journal.values())
    full = [r for r in results if not r.get("pruned") and "predictions_sum" in r]
    return {"fully_scored": len(full), "constant": sum(map(const, full)),
            "fully_scored_first": sum(not r.get("pruned") and "predictions_sum" in r for r in results[:first]),
            "constant_first": sum(map(const, (r for r in results[:first] if not r.get("pruned"))))}


def run_exhaustive(args, task: str, draw: int, lm, work: Path, fast: dict) -> dict:
    """The same (task, draw) with ``--max-evals 0``: every candidate scored, by resuming the fast unit's run in
    ``work`` (its journal holds the candidates it scored; none is scored again). Exact: the exhaustive order is
    the fast one continued (the fast run scored the first ``max_evals`` of it), and exact pruning only ever
    stops a candidate that cannot be among the best ``keep`` of a subset of what the exhaustive run scores, so
    cannot be among the best of all. Without the fast run's folder (another machine) the run starts fresh.
    ``timings.search`` is the whole exhaustive search: the fast unit's plus the rest (``search_rest``), while
    ``search.row_passes`` counts the rest only (add the fast unit's for the whole). The unit keeps every
    candidate's summary in the search's (interleave) order, the fast run's ``max_evals`` first (``candidates``:
    ΔL̂, selection accuracy and losses, or the rows scored before a stop) and how many of them answer every
    selection row with the same label (:func:`constant_predictions`). ``resumed_from.cut_short``: an earlier
    exhaustive run of this unit was killed, so ``timings.search`` leaves out its passes (a lower bound)."""
    from c2i_fast.pipeline import CONFIG, JOURNAL, AdaptConfig, _read_journal, adapt, resume_config
    t0 = time.perf_counter()
    run = work / "adapt"
    journal = run / (JOURNAL if draw == 0 else f"journal.draw{draw}.jsonl")
    resumed = (run / CONFIG).is_file()
    # an earlier exhaustive run of this unit was cut short: its passes' time is not in this run's search time
    cut_short = resumed and len(_read_journal(journal)) > fast["n_evaluated"]
    if resumed:
        cfg = resume_config(str(run), max_evals=0, threads=args.threads, progress=not args.quiet)
    else:
        shutil.rmtree(run, ignore_errors=True)
        cfg = AdaptConfig(
            model=args.model, task=task, out=str(run), samples=args.samples, test_size=args.test_size,
            top_k=args.top_k, max_evals=0, draws=args.draws, only_draw=draw, seed=args.seed, rule="confirm",
            compare_rules=True, confirm_size=args.confirm_size, threads=args.threads, prune=args.prune,
            search_dtype=args.search_dtype, loss=args.loss, progress=not args.quiet, scan_cache="off")
    rep = adapt(cfg, lm=lm)
    unit = _unit(rep, task, draw, time.perf_counter() - t0 + (fast["seconds"] if resumed else 0.0))
    if resumed:
        unit["timings"]["search_rest"] = unit["timings"]["search"]
        unit["timings"]["search"] = round(fast["timings"]["search"] + unit["timings"]["search"], 2)
        unit["resumed_from"] = {"n_evaluated": fast["n_evaluated"], "search": fast["timings"]["search"],
                                "cut_short": cut_short}
    unit["constant_predictions"] = constant_predictions(_read_journal(journal), fast["n_evaluated"])
    # every candidate's ΔL̂ and selection scores: what an offline study of the order reads
    unit["candidates"] = rep["search"]["candidates"]
    return unit


def summarize(out: Path) -> dict:
    """Per task and rule over the finished draws: held-out Δ per draw, its mean, draws shipped, draws
    significantly worse than the base (Δ < 0, p < 0.05)."""
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    tasks = {}
    for f in sorted(out.glob("*/draw*.json")):
        u = json.loads(f.read_text())
        t = tasks.setdefault(u["task"], {})
        for name, r in u["rules"].items():
            s = t.setdefault(name, {"draws": [], "delta": [], "shipped": 0, "worse": 0, "p": [], "changed": [],
                                    "fixed": [], "broken": [], "base_accuracy": []})
            h = r["held_out"]
            s["draws"].append(u["draw"])
            s["fixed"].append(h["fixed"])
            s["broken"].append(h["broken"])
            s["base_accuracy"].append(h["base_accuracy"])
            s["delta"].append(h["difference"])
            s["p"].append(h["p_two_sided"])
            s["changed"].append(h["changed"])
            s["shipped"] += bool(r["shipped"])
            s["worse"] += bool(h["difference"] is not None and h["difference"] < 0 and h["p_two_sided"] is not None
                               and h["p_two_sided"] < WORSE_P)
    for t in tasks.values():
        for s in t.values():
            d = [x for x in s["delta"] if x is not None]
            s["mean_delta"] = sum(d) / len(d) if d else None
    return {"meta": meta, "tasks": tasks}


def markdown(summary: dict) -> str:
    """The docs' table: per task and rule, each finished draw's held-out Δ, fixed / broken and McNemar p."""
    model = (summary.get("meta") or {}).get("model", "?")
    n_draws = ((summary.get("meta") or {}).get("settings") or {}).get("draws", "?")
    rows = ["| model | task | rule | draws done | shipped | held-out Δ per draw (pts) | mean Δ | fixed / broken | "
            "McNemar p | answers changed | sig. worse |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pts(x):
        return "–" if x is None else ("0" if x == 0 else f"{100 * x:+.1f}")
    for task, rules in summary["tasks"].items():
        for name in [r for r in ("paper", "confirm", "laser") if r in rules]:
            s = rules[name]
            if s["mean_delta"] is None:
                continue
            ch = [c for c in s["changed"] if c is not None]
            base = sorted({round(100 * b, 1) for b in s.get("base_accuracy", []) if b is not None})
            label = f"{task} (base {', '.join(f'{b:.1f}%' for b in base)})" if base and name == "paper" else task
            if ch:      # units written before the per-draw counts were kept leave those columns empty
                rule = "**confirm**" if name == "confirm" else name
                counts = ", ".join(f"{f} / {b}" for f, b in zip(s.get("fixed", []), s.get("broken", [])))
                ps = ", ".join("–" if p is None else f"{p:.2g}" for p in s["p"])
                changed = f"{100 * sum(ch) / len(ch):.1f}%"
            else:
                rule, counts, ps, changed = name, "", "", "–"
            rows.append(f"| {model} | {label} | {rule} | {len(s['draws'])} of {n_draws} | {s['shipped']} "
                        f"| {', '.join(pts(x) for x in s['delta'])} | {100 * s['mean_delta']:+.2f} | {counts} "
                        f"| {ps} | {changed} | {s['worse']} |")
    return "\n".join(rows)


def _edits(plans: list[dict]) -> list[tuple]:
    return [(e["matrix"], e["rank_fraction"], e["n_clusters"], e["method"]) for e in plans]


def confirmation_net(unit: dict) -> int:
    """Fixed − broken on the confirmation rows of the edit the confirm rule shipped; 0 when it kept the base.
    Selection and confirmation rows only: a comparison of two settings by this never looks at held-out rows."""
    d = unit["decision"]
    if not d.get("shipped") or d.get("chosen") is None:
        return 0
    paired = d["confirmed"][d["chosen"]].get("paired") or {}
    return int(paired.get("fixed", 0)) - int(paired.get("broken", 0))


def compare(out: Path, other: Path) -> str:
    """Markdown: every (task, draw) finished in both folders (e.g. ``--prune halve`` against the default), side
    by side: search seconds and row-passes, whether the candidates confirmed, the shipped edit's net fixes on the
    confirmation rows, each rule's plan and its held-out Δ are the same; then the totals of shipped units and of
    confirmation-row net fixes per folder."""
    rows = ["| task | draw | search s | row-passes | same confirmed | confirmation net | confirm plan same | "
            "confirm held-out Δ (pts) | paper plan same | paper held-out Δ (pts) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    totals = {"other": [0, 0], "this": [0, 0]}          # [units shipped, confirmation-row net fixes]

    def pts(x):
        return "–" if x is None else ("0" if x == 0 else f"{100 * x:+.1f}")
    for f in sorted(out.glob("*/draw*.json")):
        g = other / f.parent.name / f.name
        if not g.is_file():
            continue
        a, b = json.loads(g.read_text()), json.loads(f.read_text())        # a: the other folder, b: this one
        passes = [(u.get("search") or {}).get("row_passes") for u in (a, b)]
        resumed = b.get("resumed_from")
        if resumed is not None and passes[1] is not None and passes[0] is not None:
            passes[1] += passes[0]                 # an exhaustive unit counts its own passes after the fast run's
        low = "≥ " if (resumed or {}).get("cut_short") else ""      # an earlier run of the unit was killed
        same_conf = _edits(a["decision"]["confirmed"]) == _edits(b["decision"]["confirmed"])
        nets = [confirmation_net(u) for u in (a, b)]
        for key, u, net in (("other", a, nets[0]), ("this", b, nets[1])):
            totals[key][0] += bool(u["decision"].get("shipped"))
            totals[key][1] += net
        cells = [f"{a['timings']['search']:.0f} → {low}{b['timings']['search']:.0f}",
                 " → ".join("–" if p is None else str(p) for p in passes[:1])
                 + " → " + ("–" if passes[1] is None else f"{low}{passes[1]}"), "yes" if same_conf else "**no**",
                 f"{nets[0]:+d} → {nets[1]:+d}"]
        for rule in ("confirm", "paper"):
            ra, rb = a["rules"][rule], b["rules"][rule]
            same = _edits(ra["plan"]) == _edits(rb["plan"])
            cells += ["yes" if same else "**no**",
                      f"{pts(ra['held_out']['difference'])} → {pts(rb['held_out']['difference'])}"]
        rows.append(f"| {b['task']} | {b['draw']} | " + " | ".join(cells) + " |")
    rows.append(f"\nShipped by the confirm rule: {totals['other'][0]} → {totals['this'][0]} units; confirmation-row "
                f"net fixes of the shipped edits: {totals['other'][1]:+d} → {totals['this'][1]:+d} ({other} → {out}).")
    return "\n".join(rows)


def order_table(out: Path) -> str | None:
    """Markdown, for folders whose units keep every candidate (``--exhaustive-out``): per (task, draw), the
    Spearman correlation of the first-order ΔL̂ with the measured loss the scan ranked by (over the fully scored:
    exact pruning stops some, the worst on accuracy), where the confirmed three sit in the search's order (the
    fast run scores the first ``max_evals``), and the best selection accuracy in the first ``max_evals`` against
    all. Selection rows only. None when no unit keeps its candidates."""
    from c2i_fast.search import spearman
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    fast_n = 48
    for r in meta.get("runs", []):          # the fast unit's --max-evals, from the command that wrote the folder
        cmd = r.get("command", "").split()
        if "--max-evals" in cmd:
            fast_n = int(cmd[cmd.index("--max-evals") + 1])
    rows = [f"| task | draw | candidates (fully scored) | Spearman ΔL̂ vs measured loss | confirmed three at | "
            f"best selection acc., first {fast_n} | best, all |", "|---|---|---|---|---|---|---|"]
    for f in sorted(out.glob("*/draw*.json")):
        u = json.loads(f.read_text())
        cs = u.get("candidates")
        if not cs:
            continue
        n = (u.get("resumed_from") or {}).get("n_evaluated", fast_n)
        full = [c for c in cs if not c.get("pruned") and c.get("accuracy") is not None]
        loss = "choice_loss" if full and all("choice_loss" in c for c in full) else "log_loss"
        rho = spearman([c["predicted_delta"] for c in full], [c[loss] for c in full])
        where = {tuple(_edits([c])[0]): i for i, c in enumerate(cs)}
        at = [where.get(e) for e in _edits(u["decision"]["confirmed"])]
        best = [max((c["accuracy"] for c in part if not c.get("pruned") and c.get("accuracy") is not None),
                    default=None) for part in (cs[:n], cs)]
        rows.append(f"| {u['task']} | {u['draw']} | {len(cs)} ({len(full)}) | "
                    f"{'–' if rho is None else f'{rho:+.2f}'} ({loss.replace('_', ' ')}) | "
                    f"{', '.join('–' if i is None else str(i + 1) for i in at)} | "
                    + " | ".join('–' if b is None else f"{100 * b:.0f}%" for b in best) + " |")
    return "\n".join(rows) if len(rows) > 2 else None


def _open_folder(out: Path, model: str, settings: dict, command: str, threads: int) -> bool:
    """Create or reopen a folder of units; False (and a message) when it holds units of other settings."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "device": device_name(), "threads": threads, "versions": versions(),
            "commit": git_commit(), "command": command, "settings": settings}
    meta_path = out / "meta.json"
    run = {k: meta[k] for k in ("commit", "command", "device", "threads")}
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        # folders written before --prune / --search-dtype / --loss existed ran the defaults
        if ({"prune": "exact", "search_dtype": "model", "loss": "answer", **old.get("settings", {})} != settings
                or old.get("model") != model):
            print(f"bench_selection: {out} holds units made with other settings ({old.get('settings')}); "
                  f"use another --out", file=sys.stderr)
            return False
        meta["runs"] = old.get("runs", []) + [run]
    else:
        meta["runs"] = [run]
    meta["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return True


def _runs_folder(exh: Path) -> Path:
    """``<exhaustive-out>/.runs``: the fast runs an exhaustive unit resumes, ignored by git (their own .gitignore)."""
    runs = exh / ".runs"
    runs.mkdir(parents=True, exist_ok=True)
    if not (runs / ".gitignore").is_file():
        (runs / ".gitignore").write_text("*\n")
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="fever", help="comma-separated task names")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--only-draws", help="draws of the --draws split to run here (e.g. 1,3 or 2-4), so "
                                         "two processes can share a folder; the split is still --draws's")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--confirm-size", type=int, default=200)
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--max-evals", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prune", default="exact", choices=PRUNE_MODES,
                    help="the search's pruning (c2i adapt --prune); compare rules' held-out numbers across folders")
    ap.add_argument("--search-dtype", default="model", choices=SEARCH_DTYPES,
                    help="the search's precision (c2i adapt --search-dtype)")
    ap.add_argument("--loss", default="answer", choices=["answer", "choice", "auto"],
                    help="the scan's loss (c2i adapt --loss; this bench's default stays answer, so older folders "
                         "compare)")
    ap.add_argument("--laser-layers", help="also LASER in the same harness on these layers, e.g. 17-27")
    ap.add_argument("--laser-tasks", help="LASER on these tasks only (default: every task)")
    ap.add_argument("--out", required=True, help="folder of unit JSONs (created)")
    ap.add_argument("--summary", action="store_true", help="only rewrite summary.json and print the table")
    ap.add_argument("--against", help="with --summary: also compare each draw with the same draw in this folder")
    ap.add_argument("--exhaustive-out", help="also every candidate (--max-evals 0) per unit, into this folder, by "
                                             "resuming the unit's own run (the fast defaults against the "
                                             "exhaustive evaluation of the same candidates, for the price of one)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    exh = Path(args.exhaustive_out) if args.exhaustive_out else None
    if exh is not None and (args.max_evals == 0 or args.prune not in ("exact", "off") or args.laser_layers):
        print("bench_selection: --exhaustive-out resumes a --max-evals N > 0 unit with --prune exact or off, without LASER",
              file=sys.stderr)
        return 2
    try:                                        # the layer-list syntax: "1,3" or "2-4"
        only = sorted(set(parse_layers(args.only_draws) or range(args.draws)))
    except ValueError:
        only = None
    if only is None or any(not 0 <= d < args.draws for d in only):
        print(f"bench_selection: --only-draws {args.only_draws!r}: draws in 0..{args.draws - 1}, as 1,3 or 2-4",
              file=sys.stderr)
        return 2
    if not args.summary:
        command = "python bench/bench_selection.py " + " ".join(sys.argv[1:] if argv is None else argv)
        settings = {k: getattr(args, k) for k in ("samples", "confirm_size", "test_size", "top_k", "max_evals",
                                                  "seed", "draws", "laser_layers", "laser_tasks", "prune",
                                                  "search_dtype", "loss")}
        for folder, st in [(out, settings)] + ([(exh, {**settings, "max_evals": 0})] if exh else []):
            if not _open_folder(folder, args.model, st, command, args.threads):
                return 2
        from c2i_fast.models import load_model
        from c2i_fast.svd import remembered_svds
        lm = None
        with remembered_svds():
            for draw in only:                           # draw-major: every task gets its first draws early
                for task in args.tasks.split(","):
                    path = out / task / f"draw{draw}.json"
                    exh_path = exh / task / f"draw{draw}.json" if exh else None
                    if path.is_file() and (exh_path is None or exh_path.is_file()):
                        continue
                    lm = lm or load_model(args.model)
                    # the fast run's folder, kept until the exhaustive unit resumed it (git ignores it)
                    work = _runs_folder(exh) / task / f"draw{draw}" if exh else None
                    if not path.is_file():
                        print(f"[bench_selection] {args.model} {task} draw {draw}", file=sys.stderr, flush=True)
                        if work is not None:
                            shutil.rmtree(work, ignore_errors=True)       # a fast run cut short: start again
                            work.mkdir(parents=True)
                        unit = run_unit(args, task, draw, lm, work)
                        unit.update(commit=git_commit(), finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
                        atomic_write_text(path, json.dumps(unit, indent=2, default=str) + "\n")
                    if exh_path is not None:
                        print(f"[bench_selection] {args.model} {task} draw {draw}: every candidate",
                              file=sys.stderr, flush=True)
                        fast = json.loads(path.read_text())
                        unit = run_exhaustive(args, task, draw, lm, work, fast)
                        unit.update(commit=git_commit(), finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
                        atomic_write_text(exh_path, json.dumps(unit, indent=2, default=str) + "\n")
                        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(out)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(markdown(summary))
    order = order_table(out)
    if order:
        print("\n" + order)
    if args.against:
        print("\n" + compare(out, Path(args.against)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
