"""How much more could exact pruning stop under another order? The search replayed from a ``--prune off`` run.

Exact pruning (:class:`c2i_fast.search.Pruner`) stops a candidate's selection pass once its correct answers so far
plus every example still to come fall below the bar (the larger of the third-best fully scored count and the base
model's). What it saves depends on three choices that never change a decision: the order in which the candidates
are scored (a bar that rises early stops more), which examples each pass scores first (its batch order,
:meth:`c2i_fast.evaluate.Scorer.stopping_order`, planned from a guess of where the candidate errs), and the batch
boundaries (a pass stops after a batch only). This bench runs ``c2i adapt --prune off`` once per task (every one of
the 48 candidates scored on every selection row, with its per-example flags in the journal) and replays the search
with no model under:

    order      deepest-first   today's: the 48 first-order picks, deepest layer first (the cheapest passes first)
               predicted       the first-order interleave (best predicted ΔL̂ first, matrices round-robin)
               probe           each matrix's best-predicted candidate first (deepest first), then deepest-first
               oracle          the finally best first: an upper bound no rule reaches (it reads the outcome)
    guess      base            today's: the candidate errs where the base model errs
               matrix          where the last candidate scored on the same matrix erred (as far as it was scored)

For every (order, guess) it counts the row·layer passes (rows scored × layers rerun) and the candidates stopped.
The replay uses the Scorer's own batches and ``stopping_order``, and the bar exactly as the Pruner keeps it; the
deepest-first / base row is today's search and matches a ``--prune exact`` run of the same candidates. Every
rule replayed here is exact: the fully scored candidates, so the best three and the decision, are the same.

Per task ``<out>/<task>.json`` (written atomically, skipped when present) and the run it replays,
``<out>/<task>/run/{journal.jsonl,report.json}`` (kept so the replay reruns without the model's passes).

    python bench/bench_prune_order.py --model smollm2 --tasks fever,truthfulqa,bias_in_bios_gender --threads 1 \
        --out bench/results/prune-order-smollm2
    python bench/bench_prune_order.py --out bench/results/prune-order-smollm2 --summary
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _common import git_commit  # noqa: E402
from bench_order import interleave, key  # noqa: E402
from c2i_fast.io import atomic_write_text  # noqa: E402

ORDERS = ("deepest-first", "predicted", "probe", "oracle")
GUESSES = ("base", "matrix")
KEEP = 3                      # the defaults' confirm_top: the Pruner keeps the best three exact


def run_prune_off(model: str, task: str, threads: int, run: Path) -> dict:
    """``c2i adapt`` at its defaults but ``--prune off`` into ``run`` (resumed from its journal when killed)."""
    from c2i_fast.config import AdaptConfig
    from c2i_fast.pipeline import adapt
    if (run / "report.json").is_file():
        return json.loads((run / "report.json").read_text())
    resume = (run / "journal.jsonl").is_file()
    report = adapt(AdaptConfig(model=model, task=task, out=str(run), prune="off", threads=threads,
                               progress=False, resume=resume))
    for extra in ("report", "plan.json"):            # the HTML report and the plan: not needed to replay
        p = run / extra
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return report


def flags_and_batches(model: str, report: dict):
    """The base model's per-example flags on the selection rows and the selection Scorer (its batches and
    ``stopping_order``), built as ``c2i adapt`` builds them for the report's configuration."""
    from c2i_fast.config import AdaptConfig
    from c2i_fast.pipeline import _scorer
    from c2i_fast.models import load_model
    from c2i_fast.tasks import check_tokenization, load_task, split
    cfg = report["config"]
    lm = load_model(model)
    task = check_tokenization(load_task(cfg["task"], cfg.get("data_dir")), lm.tokenizer)
    n_confirm = cfg["confirm_size"] if cfg["rule"] == "confirm" or cfg["compare_rules"] else 0   # as adapt splits
    splits = split(task, cfg["samples"], cfg["test_size"], cfg["seed"], draw=0, n_draws=cfg["draws"],
                   n_confirm=n_confirm)
    fields = set(AdaptConfig.__dataclass_fields__)
    scorer = _scorer(lm, task, splits["select"], AdaptConfig(**{k: v for k, v in cfg.items() if k in fields}))
    base = scorer.evaluate()
    if round(base["accuracy"] * base["n"]) != round(report["selection"]["base"]["accuracy"] * base["n"]):
        raise SystemExit(f"bench_prune_order: error: the base model's selection accuracy {base['accuracy']} is not "
                         f"the run's {report['selection']['base']['accuracy']}: not the same rows or model")
    return [bool(x) for x in base["correct"]], scorer


def read_journal(run: Path) -> dict[str, dict]:
    out = {}
    for line in (run / "journal.jsonl").read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            out[d["key"]] = d
    return out


def orders(todo: list[dict], flags: dict[str, list[bool]]) -> dict[str, list[dict]]:
    """Each ORDERS name → the candidates ``todo`` (the interleave's first ``max_evals``) in that order."""
    deep = sorted(todo, key=lambda c: -c["layer"])                  # stable: the interleave within a layer
    firsts: dict[str, dict] = {}
    for c in todo:
        firsts.setdefault(c["matrix"], c)
    probe = sorted(firsts.values(), key=lambda c: -c["layer"])
    probe += [c for c in deep if all(c is not f for f in probe)]
    oracle = sorted(todo, key=lambda c: -sum(flags[key(c)]))
    return {"deepest-first": deep, "predicted": list(todo), "probe": probe, "oracle": oracle}


def replay(order: list[dict], flags: dict[str, list[bool]], twin_of: dict[str, str], base: list[bool],
           scorer, n_layers: int, guess: str) -> dict:
    """The exact-pruned search over ``order``: row·layer passes run, candidates stopped, best three."""
    n, floor = len(base), sum(base)
    per_batch = [[r.example for r in b.rows] for b in scorer.batches]
    if sum(map(len, per_batch)) != n:        # an example over several rows completes with its last: not replayed
        raise SystemExit("bench_prune_order: error: the replay needs one row per example (packed choices)")
    counts: list[int] = []
    scored_groups: set[str] = set()
    last: dict[str, list[bool]] = {}
    row_passes, stopped, full = 0, 0, []
    for c in order:
        k = key(c)
        group = twin_of.get(k, k)
        if group in scored_groups:       # the factors of one scored before: its result, no pass
            continue
        scored_groups.add(group)
        f = flags[k]
        kth = sorted(counts, reverse=True)[KEEP - 1] if len(counts) >= KEEP else None
        bar = floor if kth is None else max(kth, floor)
        right = last.get(c["matrix"], base) if guess == "matrix" else base
        seen, correct, rows, cut = set(), 0, 0, False
        for bi in scorer.stopping_order([not x for x in right], bar):
            rows += len(per_batch[bi])
            for e in per_batch[bi]:
                if e not in seen:
                    seen.add(e)
                    correct += f[e]
            if len(seen) < n and correct + (n - len(seen)) < bar:
                cut = True
                break
        row_passes += rows * (n_layers - c["layer"])
        if cut:
            stopped += 1
            guessed = list(last.get(c["matrix"], base))
            for e in seen:
                guessed[e] = f[e]
            last[c["matrix"]] = guessed
        else:
            counts.append(sum(f))
            last[c["matrix"]] = f
            full.append(c)
    best = sorted(full, key=lambda c: (-c["accuracy"], c["log_loss"], key(c)))[:KEEP]
    return {"row_passes": row_passes, "stopped": stopped, "best": [key(c) for c in best]}


def bench_task(args, task: str) -> dict:
    run = Path(args.out) / task / "run"
    t0 = time.time()
    report = run_prune_off(args.model, task, args.threads, run)
    journal = read_journal(run)
    todo = [c for c in interleave(report["search"]["candidates"]) if key(c) in journal]
    flags = {key(c): [bool(x) for x in journal[key(c)]["result"]["correct"]] for c in todo}
    for c in todo:
        c.update(accuracy=journal[key(c)]["result"]["accuracy"], log_loss=journal[key(c)]["result"]["log_loss"])
    twin_of: dict[str, str] = {}
    for c in todo:
        other = c.get("same_as")        # the report's (the journal holds the result only)
        if other:                      # one group per set of equal factors, named by its first member
            root = twin_of.get(other, other)
            twin_of[key(c)] = root
            twin_of.setdefault(other, root)
    base, scorer = flags_and_batches(args.model, report)
    n_layers = report["forward_passes"]["layers"]
    full = sum(len(base) * (n_layers - c["layer"]) for c in todo if not c.get("same_as"))
    rows = []
    for name, order in orders(todo, flags).items():
        for guess in GUESSES:
            r = replay(order, flags, twin_of, base, scorer, n_layers, guess)
            rows.append({"order": name, "guess": guess, **r, "saved": round(1 - r["row_passes"] / full, 4)})
    today = rows[0]["best"]
    for r in rows:
        r["same_best"] = r.pop("best") == today
    return {"task": task, "model": args.model, "n_select": len(base), "base_correct": sum(base),
            "candidates": len(todo), "row_passes_unpruned": full, "batches": [len(b.rows) for b in scorer.batches],
            "rows": rows, "run_config": {k: report["config"][k] for k in ("loss", "max_evals", "top_k", "seed")},
            "commit": git_commit(), "seconds": round(time.time() - t0, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}


def summary(out: Path) -> str:
    lines = ["| task | base / n | order | guess | row-passes | saved vs unpruned | stopped | best 3 as today |",
             "|---|---|---|---|---|---|---|---|"]
    for p in sorted(out.glob("*.json")):
        u = json.loads(p.read_text())
        for r in u["rows"]:
            lines.append(f"| {u['task']} | {u['base_correct']} / {u['n_select']} | {r['order']} | {r['guess']} | "
                         f"{r['row_passes']:,} | {r['saved']:.1%} | {r['stopped']} | "
                         f"{'yes' if r['same_best'] else '**no**'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="fever,truthfulqa,bias_in_bios_gender")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--summary", action="store_true", help="print the table of the units in --out and exit")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.summary:
        print(summary(out))
        return
    import torch
    torch.set_num_threads(args.threads)
    for task in [t for t in args.tasks.split(",") if t]:
        unit = out / f"{task}.json"
        if unit.is_file():
            print(f"{task}: done ({unit})")
            continue
        atomic_write_text(unit, json.dumps(bench_task(args, task), indent=1) + "\n")
        print(f"{task}: wrote {unit}", flush=True)
    print(summary(out))


if __name__ == "__main__":
    main()
