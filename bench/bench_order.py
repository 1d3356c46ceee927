"""What ordering by measured candidates could save: the search replayed offline from committed reports.

The speed issue's "order better" lever: use what each scored candidate teaches to skip candidates predicted
hopeless. This bench replays the search of every committed ``c2i adapt`` report (``--reports``, default the
results table's c2i_fast cells) with no model: the same 48 candidates in the same order as the search scores them
(:func:`c2i_fast.search.interleave`'s first ``max_evals``, then deepest layer first, as exact pruning orders them),
each revealing the result its report recorded. A candidate's result does not depend on the order, so a skipping
rule's savings and whether it changes what the confirm rule reads (the best ``--keep`` by accuracy, ties by
log-loss) are exact for these runs. Two rules:

    give-up   skip a candidate when at least ``min`` candidates of its matrix are fully scored and the best of
              them is more than ``margin`` (accuracy) below the bar — the larger of the ``keep``-th best fully
              scored count and the base model's count (:class:`c2i_fast.search.Pruner`'s bar)
    interp    skip a candidate when candidates of its series (matrix, k, method) are scored at a larger and at a
              smaller ρ and both are more than ``margin`` below the bar (the accuracy-over-ρ curve is smooth)

Saved: the row-layer passes the skipped candidates ran in the report (a candidate that exact pruning stopped
counts the rows it ran). Changed: the best ``keep`` differ from the report's. Candidates pruned in the report
have no accuracy and never raise the bar; skipping one is always harmless.

    python bench/bench_order.py --out bench/results/order-offline.json
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from _common import REPO, git_commit
from c2i_fast.io import atomic_write_text
from c2i_fast.search import DEFAULT_RANK_FRACTIONS as RHOS
from c2i_fast.search import interleave as search_interleave

MARGINS = (0.0, 0.02, 0.03, 0.05, 0.08)
MINIMA = (1, 2, 3)
DEFAULT_REPORTS = ("bench/results/tasks-*/*/reports/c2i_fast.json",)


def key(c: dict) -> str:
    return f"{c['matrix']}|{c['rank_fraction']}|{c['n_clusters']}|{c['method']}|{c.get('seed', 0)}"


def interleave(cands: list[dict]) -> list[dict]:
    """The search's own order (:func:`c2i_fast.search.interleave`) on report rows, each seen through the three
    things that order reads: its ΔL̂, its key and its matrix."""
    views = [SimpleNamespace(row=c, predicted=c["predicted_delta"], key=lambda c=c: key(c),
                             edit=SimpleNamespace(matrix=c["matrix"])) for c in cands]
    return [v.row for v in search_interleave(views)]


def scored(c: dict) -> bool:
    """Fully scored, and not a twin (same factors as an earlier candidate: the search counts those once)."""
    return c.get("accuracy") is not None and not c.get("pruned") and not c.get("same_as")


def best(cands: list[dict], keep: int) -> list[str]:
    """The best ``keep`` fully scored candidates: accuracy, ties by log-loss, then key (c2i_fast.search.rank)."""
    return [key(c) for c in sorted((c for c in cands if scored(c)),
                                   key=lambda c: (-c["accuracy"], c["log_loss"], key(c)))[:keep]]


def search_order(report: dict) -> list[dict]:
    """The candidates the report's search scored, in the order it scored them."""
    cands = report["search"]["candidates"]
    evaluated = {key(c) for c in cands if scored(c) or c.get("pruned")}
    order = [c for c in interleave(cands) if key(c) in evaluated]
    if report["search"].get("prune") in ("exact", "race"):
        order = sorted(order, key=lambda c: -c["layer"])          # stable: deepest layer first
    return order


def replay(report: dict, rule: str, margin: float, minimum: int, keep: int = 3) -> dict:
    """Replay the report's search under a skipping rule; what it saved and whether the best ``keep`` changed."""
    n = report["selection"]["base"]["n"]
    n_layers = report["forward_passes"]["layers"]
    floor = round(report["selection"]["base"]["accuracy"] * n)
    order = search_order(report)
    counts: list[int] = []
    seen, skipped = [], []
    for c in order:
        kth = sorted(counts, reverse=True)[keep - 1] if len(counts) >= keep else None
        bar = max(b for b in (kth, floor) if b is not None)
        if skip(rule, c, seen, bar - margin * n, minimum, n):
            skipped.append(c)
            continue
        seen.append(c)
        if scored(c):
            counts.append(round(c["accuracy"] * n))

    def cost(c):
        return (n_layers - c["layer"]) * (c["rows_scored"] if c.get("pruned") else n)
    return {"candidates": len(order), "skipped": len(skipped),
            "row_passes": sum(cost(c) for c in order), "saved": sum(cost(c) for c in skipped),
            "same_best": best(order, keep) == best(seen, keep)}


def skip(rule: str, c: dict, seen: list[dict], below: float, minimum: int, n: int) -> bool:
    """Does ``rule`` skip ``c``, given the fully scored ``seen`` and the count ``below`` which they are hopeless?"""
    if rule == "give-up":
        mine = [round(s["accuracy"] * n) for s in seen if scored(s) and s["matrix"] == c["matrix"]]
        return len(mine) >= minimum and max(mine) < below
    if rule == "interp":
        i = RHOS.index(c["rank_fraction"]) if c["rank_fraction"] in RHOS else None
        series = [s for s in seen if scored(s) and s["matrix"] == c["matrix"] and s["n_clusters"] == c["n_clusters"]
                  and s["method"] == c["method"] and s["rank_fraction"] in RHOS]
        if i is None:
            return False
        lo = [s for s in series if RHOS.index(s["rank_fraction"]) < i]
        hi = [s for s in series if RHOS.index(s["rank_fraction"]) > i]
        return bool(lo and hi) and max(round(s["accuracy"] * n) for s in lo + hi) < below
    raise ValueError(f"rule must be 'give-up' or 'interp', got {rule!r}")


def load_reports(patterns) -> dict[str, dict]:
    out = {}
    for pattern in patterns:
        for p in sorted(glob.glob(str(REPO / pattern) if not Path(pattern).is_absolute() else pattern)):
            r = json.loads(Path(p).read_text())
            if r.get("search", {}).get("candidates") and r["search"].get("n_evaluated", 0) >= 2:
                out[str(Path(p).relative_to(REPO)) if Path(p).is_relative_to(REPO) else p] = r
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reports", nargs="+", default=list(DEFAULT_REPORTS), help="report.json globs")
    ap.add_argument("--keep", type=int, default=3, help="the best candidates the rule reads (--confirm-top)")
    ap.add_argument("--out", help="JSON results file")
    args = ap.parse_args(argv)
    reports = load_reports(args.reports)
    if not reports:
        sys.exit(f"bench_order: error: --reports {args.reports}: no c2i adapt report with scored candidates")
    grid = []
    for rule, minima in (("give-up", MINIMA), ("interp", (1,))):
        for minimum in minima:
            for margin in MARGINS:
                runs = {p: replay(r, rule, margin, minimum, args.keep) for p, r in reports.items()}
                total = sum(u["row_passes"] for u in runs.values())
                grid.append({"rule": rule, "min": minimum, "margin": margin,
                             "saved_fraction": sum(u["saved"] for u in runs.values()) / total,
                             "changed": sorted(p for p, u in runs.items() if not u["same_best"]),
                             "runs": runs})
    print(f"{len(reports)} reports; the best {args.keep} by accuracy compared with each report's own")
    print("| rule | min scored | margin (pts) | row-passes saved | best 3 changed |")
    print("|---|---|---|---|---|")
    for g in grid:
        changed = ", ".join(p.split("/")[2] + "/" + p.split("/")[3] for p in g["changed"]) or "none"
        print(f"| {g['rule']} | {g['min'] if g['rule'] == 'give-up' else '—'} | {g['margin'] * 100:.0f} | "
              f"{g['saved_fraction']:.1%} | {len(g['changed'])} of {len(reports)} ({changed}) |")
    if args.out:
        res = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "command": "python bench/bench_order.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "keep": args.keep, "reports": sorted(reports), "grid": grid}
        atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
