"""The speed levers of ``c2i adapt``, one at a time, on the same task and rows: what each saves and whether the
plan changed.

Each variant is a whole ``c2i adapt`` at the defaults (100 selection / 200 confirmation / 500 held-out rows,
top-K 5, 48 evaluations, the confirm rule) on draw 0 of the task; the model is loaded once per process and
every variant pays its own scan (no SVD is shared between variants):

- ``none``:  ``--prune off --no-metrics-cache``: every candidate scored on every selection row, every base pass
  made;
- ``exact``: ``--prune exact`` (the default) with a cold metrics cache (a fresh folder per task): a candidate
  stops once it can no longer reach the best ``--confirm-top``; base passes made and stored;
- ``cache``: as ``exact`` with the cache the ``exact`` run filled: the base passes are read (a second adapt, a
  resume or a draw of the same task);
- ``race``:  ``--prune race`` with that cache: a candidate also stops once it is beaten with confidence;
- ``exact-small``, ``race-small``: the same rules with ``--batch-tokens 256`` and no metrics cache. A stop is
  asked after each batch, and at 4096 tokens a FEVER pass over 100 rows is only a few batches: smaller batches
  give the rules more chances to stop (and cost what smaller matmuls cost);
- ``halve``: ``--prune halve --no-metrics-cache``: successive halving (every candidate on a quarter of the
  rows, the better half on the next quarter, the better half of those on the rest), against ``none``;
- ``gram``: as ``none`` with ``--scan-svd gram`` (the scan's scores from Gram eigendecompositions, a full SVD
  for the best 2 × top-K only); ``fast``: ``halve`` and ``gram`` together (a first run, no cache);
- ``defaults``: ``c2i adapt``'s defaults as they are now (exact pruning, Gram scan, a cold metrics cache);
  ``bf16``: the same with ``--search-dtype bfloat16`` (the base's and the candidates' selection passes with
  bf16 matmuls; scan, confirmation and held-out in fp32);
- ``second``: a second ``c2i adapt`` at the defaults on the same rows, after ``defaults`` filled the metrics and
  scan caches (a user's rerun with another option, or a ``--resume``): the scan and the base passes are read.
  ``defaults`` stores its scan for it (writing it is part of that unit's time);
- ``fastest``: every opt-in speed lever at once on a first run, ``--prune halve --search-dtype bfloat16`` with
  the Gram scan and a cold metrics cache: what a user who accepts another near-tied edit can have today. Run it
  in its own invocation (``--variants fastest``): a "cold" variant after another in the same process reads the
  caches that one filled.

Every variant but ``gram`` and ``fast`` runs ``--scan-svd full`` (the default before ``gram``), so the units
of earlier commits stay comparable.

OpenMP's wait policy is chosen as ``c2i adapt`` chooses it (c2i_fast.openmp: spin on idle cores, PASSIVE beside
other work) and recorded in each unit (``omp_wait_policy``; units without it ran PASSIVE).

A unit is ``<out>/<task>/<variant>.json``, written atomically when it finishes and skipped when present (a
killed run resumes; ``cache`` and ``race`` rerun ``exact``'s cold run first when its cache folder is gone, so
their numbers always follow a filled cache). ``--summary`` prints the table: wall seconds and phases,
selection row-passes (row × layers rerun) and those pruning saved, the plan, the best three candidates the rule
confirmed, the decision and held-out accuracy, each against ``none``.

    python bench/bench_levers.py --model smollm2 --tasks fever,counterfact,bigbench_epistemic_reasoning \
        --threads 2 --out bench/results/levers-smollm2
    python bench/bench_levers.py --out bench/results/levers-smollm2 --summary
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
from typing import NamedTuple

from c2i_fast.openmp import choose_wait_policy, threads_in  # no torch import

# as `c2i adapt` chooses it (before torch loads): the units time what a user's run does on this machine
WAIT_POLICY = choose_wait_policy(threads_in(sys.argv[1:]) or 2)

from c2i_fast.io import atomic_write_text, device_name, versions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit  # noqa: E402

SMALL_BATCH = 256           # tokens per batch of the "-small" variants (default 4096: FEVER's 100 rows in 5 batches)


class Variant(NamedTuple):
    prune: str                  # --prune
    metrics_cache: bool         # --metrics-cache
    cache_state: str | None     # "cold": a fresh folder; "warm": the one the exact run filled; None: no cache
    batch_tokens: int | None    # --batch-tokens (None: the default)
    scan_svd: str = "full"      # --scan-svd
    search_dtype: str = "model"  # --search-dtype
    scan_cache: str = "off"     # AdaptConfig.scan_cache: "off" (pay the scan), "write" (pay and store), "on"


VARIANTS = {
    "none": Variant("off", False, None, None),
    "exact": Variant("exact", True, "cold", None),
    "cache": Variant("exact", True, "warm", None),
    "race": Variant("race", True, "warm", None),
    "exact-small": Variant("exact", False, None, SMALL_BATCH),
    "race-small": Variant("race", False, None, SMALL_BATCH),
    "halve": Variant("halve", False, None, None),
    "gram": Variant("off", False, None, None, "gram"),
    "fast": Variant("halve", False, None, None, "gram"),
    "defaults": Variant("exact", True, "cold", None, "gram", scan_cache="write"),
    "bf16": Variant("exact", True, "cold", None, "gram", "bfloat16"),     # the defaults, search in bf16
    "second": Variant("exact", True, "warm", None, "gram", scan_cache="on"),   # the defaults, run again
    # every opt-in speed lever at once, on a first run: halving and the bf16 search (neither exact)
    "fastest": Variant("halve", True, "cold", None, "gram", "bfloat16"),
}
WARMED_BY = {"second": "defaults"}      # the variant whose run fills the caches (default: "exact")
PHASES = ("scan_gradient", "scan_svd", "candidates", "select_base", "search", "confirm", "test_base",
          "test_adapted")


def unit_from_report(rep: dict, seconds: float) -> dict:
    """What a unit keeps of one run's report.json."""
    s, dec = rep["search"], rep["decision"]
    return {
        "seconds": round(seconds, 1), "batch_tokens": rep["config"].get("batch_tokens"),
        "test_size": rep["task"].get("n_test"), "omp_wait_policy": WAIT_POLICY,
        "timings": {k: rep["timings"].get(k) for k in PHASES if k in rep["timings"]},
        "top_k": [m["matrix"] for m in rep["scan"]["matrices"][:rep["config"]["top_k"]]],
        "search": {k: s.get(k) for k in ("n_candidates", "n_evaluated", "n_same_factors", "prune", "pruned", "dtype",
                                         "row_passes", "row_passes_saved",
                                         "rank_correlation_predicted_vs_measured")},
        "selection_best": [{k: c.get(k) for k in ("matrix", "rank_fraction", "n_clusters", "method")}
                           for c in dec.get("confirmed") or []],
        "plan": rep["plan"], "shipped": dec["shipped"], "reason": dec["reason"],
        "held_out": {"base": rep["test"]["base"]["accuracy"],
                     "adapted": (rep["test"].get("adapted") or rep["test"]["base"])["accuracy"],
                     "paired": rep["test"].get("paired")},
        "metrics_cache": rep.get("metrics_cache"),
    }


def run_variant(args, task: str, variant: str, lm, cache_dir: Path) -> dict:
    from c2i_fast.pipeline import AdaptConfig, adapt
    v = VARIANTS[variant]
    extra = {"batch_tokens": v.batch_tokens} if v.batch_tokens else {}
    work = Path(tempfile.mkdtemp(prefix="c2i-levers-"))
    old = os.environ.get("C2I_CACHE")
    os.environ["C2I_CACHE"] = str(cache_dir)
    try:
        t0 = time.perf_counter()
        rep = adapt(AdaptConfig(model=args.model, task=task, out=str(work / "run"), prune=v.prune,
                                metrics_cache=v.metrics_cache, scan_svd=v.scan_svd, search_dtype=v.search_dtype,
                                threads=args.threads, seed=args.seed,
                                test_size=args.test_size, scan_cache=v.scan_cache,
                                progress=not args.quiet, **extra), lm=lm)
        return unit_from_report(rep, time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if old is None:
            os.environ.pop("C2I_CACHE", None)
        else:
            os.environ["C2I_CACHE"] = old


def summarize(out: Path, against: Path | None = None) -> str:
    """The markdown table of every unit in ``out``, each variant against its task's ``none`` (from ``against``,
    another run's folder, when ``out`` has none: an earlier commit's reference on the same rows)."""
    rows = ["| task | variant | wall s | search s | scan SVD s | base passes s | row-passes | saved | pruned | plan "
            "| same best 3 | shipped | held-out |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        units = {v: json.loads((task_dir / f"{v}.json").read_text()) for v in VARIANTS
                 if (task_dir / f"{v}.json").is_file()}
        ref = units.get("none")
        if ref is None and against is not None and (against / task_dir.name / "none.json").is_file():
            ref = json.loads((against / task_dir.name / "none.json").read_text())
        for v, u in units.items():
            t, s = u["timings"], u["search"]
            base_s = sum(t.get(k) or 0.0 for k in ("select_base", "test_base"))
            plan = ", ".join(f"L{e['matrix'].split('.')[2]} {e['matrix'].split('.')[-1]} ρ={e['rank_fraction']} "
                             f"k={e['n_clusters']}" for e in u["plan"]) or "base"
            same = "—" if ref is None or v == "none" else ("yes" if u["selection_best"] == ref["selection_best"]
                                                           else "**no**")
            ho = u["held_out"]
            rows.append(f"| {task_dir.name} | {v} | {u['seconds']:.0f} | {t.get('search', 0):.0f} "
                        f"| {t.get('scan_svd', 0):.0f} | {base_s:.0f} "
                        f"| {s['row_passes']} | {s.get('row_passes_saved') or 0} | {s.get('pruned') or 0} "
                        f"| {plan} | {same} | {'yes' if u['shipped'] else 'no'} "
                        f"| {100 * ho['base']:.1f}% → {100 * ho['adapted']:.1f}% |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="fever,counterfact,bigbench_epistemic_reasoning")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-size", type=int, default=500, help="held-out rows (c2i adapt's default: 500)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--summary", action="store_true", help="only print the table of --out")
    ap.add_argument("--against", help="with --summary: another run's folder whose `none` units are the reference")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.summary:
        print(summarize(out, Path(args.against) if args.against else None))
        return 0
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {', '.join(bad)} (choose from {', '.join(VARIANTS)})")
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_levers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"model": args.model, "device": device_name(), "threads": args.threads, "versions": versions(),
            "commit": git_commit(), "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    from c2i_fast.models import load_model
    lm = None
    caches = Path(tempfile.mkdtemp(prefix="c2i-levers-cache-"))
    try:
        for task in args.tasks.split(","):
            cache_dir, ran = caches / task, set()      # the variants run here, into this task's cache folder
            for v in variants:
                path = out / task / f"{v}.json"
                if path.is_file():
                    continue
                lm = lm or load_model(args.model)
                filler = WARMED_BY.get(v, "exact")
                if VARIANTS[v].cache_state == "warm" and filler not in ran:   # the caches as that run leaves them
                    print(f"[bench_levers] {task}: filling the caches ({filler})", file=sys.stderr, flush=True)
                    run_variant(args, task, filler, lm, cache_dir)
                    ran.add(filler)
                print(f"[bench_levers] {args.model} {task} {v}", file=sys.stderr, flush=True)
                unit = run_variant(args, task, v, lm, cache_dir)
                ran.add(v)
                unit.update(task=task, variant=v, commit=git_commit(),
                            finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
                atomic_write_text(path, json.dumps(unit, indent=2, default=str) + "\n")
    finally:
        shutil.rmtree(caches, ignore_errors=True)
    print(summarize(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
