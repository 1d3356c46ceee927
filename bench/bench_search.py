"""Search-speed bench: LASER vs paper-faithful C2I vs c2i_fast, same model, task and hardware, one run.

    (a) LASER as LASER does it: exhaustive {mlp_in, mlp_out} × every layer × ρ grid, dense rebuild + full
        forward per candidate, selected on a validation split. On a CPU the full grid takes hours: with
        --laser-subset N only a seeded random subset of N candidates is timed faithfully and the time is
        extrapolated to the full grid (the table says so). Its *selection* (plan, held-out accuracy) comes from
        the same exhaustive grid run with the prefix-cached evaluator, which gives the same metrics.
    (b) paper-faithful C2I: gradient selection + 100 samples, but dense rebuild and full forwards, every
        candidate of the grid evaluated (no first-order pruning).
    (c) c2i_fast as built (factored forwards, prefix cache, first-order ordering, --max-evals).

    python bench/bench_search.py --task fever --out bench/results/search-cpu-fever.json [--laser-subset 24]

Reports wall time, forward passes in layer-passes, the selected plan and held-out accuracy of each, and the
ratios. Writes JSON (device, versions, date) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from c2i_fast.pipeline import AdaptConfig, LaserConfig, adapt, device_name, laser, versions  # noqa: E402


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="c2i-bench-"))
    common = dict(model=args.model, task=args.task, test_size=args.test_size, seed=args.seed, progress=False,
                  threads=args.threads)
    rows = {}
    try:
        # (c) c2i_fast
        t = time.perf_counter()
        c = adapt(AdaptConfig(out=str(work / "c"), samples=args.samples, top_k=args.top_k,
                              max_evals=args.max_evals, **common))
        rows["c2i_fast"] = _row(c, time.perf_counter() - t)
        # (b) paper-faithful C2I: same scan, every candidate, dense rebuild + full forward
        if not args.skip_paper_faithful:
            t = time.perf_counter()
            b = adapt(AdaptConfig(out=str(work / "b"), samples=args.samples, top_k=args.top_k, max_evals=0,
                                  dense_candidates=True, **common))
            rows["c2i_paper_faithful"] = _row(b, time.perf_counter() - t)
        # (a) LASER: selection over the full grid with the exact cached evaluator ...
        layers = tuple(args.laser_layers) if args.laser_layers else None
        if args.laser_report:      # reuse a finished `c2i laser` run with the same model/task/seed/sizes
            a = json.loads(Path(args.laser_report).read_text())
            for k, want in (("task", args.task), ("val_size", args.laser_val_size), ("test_size", args.test_size),
                            ("seed", args.seed)):
                got = a["task"]["name"] if k == "task" else a["config"][k]
                if got != want:
                    raise SystemExit(f"--laser-report {args.laser_report}: {k} is {got!r}, this bench uses {want!r}")
            fast_s = a["timings"]["total"]
        else:
            t = time.perf_counter()
            a = laser(LaserConfig(out=str(work / "a"), val_size=args.laser_val_size, layers=layers, **common))
            fast_s = time.perf_counter() - t
        rows["laser_cached_evaluator"] = _row(a, fast_s)
        # ... and LASER's own cost measured faithfully on a random subset, extrapolated to the grid.
        n_grid = a["search"]["n_candidates"]
        cands = a["search"]["candidates"]
        rng = random.Random(args.seed)
        subset = rng.sample(cands, min(args.laser_subset, len(cands)))
        t = time.perf_counter()
        per = _faithful_subset_seconds(args, subset, work)
        measured = time.perf_counter() - t
        overhead = a["timings"]["total"] - a["timings"]["search"]
        rows["laser_faithful"] = {**rows["laser_cached_evaluator"],
                                  "wall_seconds": overhead + per * n_grid,
                                  "extrapolated": True,
                                  "note": f"{len(subset)} of {n_grid} candidates timed ({measured:.1f} s, "
                                          f"{per:.2f} s each) and extrapolated to the full grid",
                                  "layer_passes": n_grid * a["forward_passes"]["layers"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows["c2i_fast"]["wall_seconds"]
    for r in rows.values():
        r["time_vs_c2i_fast"] = r["wall_seconds"] / base
    return {"device": device_name(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "versions": versions(), "args": vars(args), "rows": rows}


def _faithful_subset_seconds(args, subset: list[dict], work: Path) -> float:
    """Mean seconds per candidate of LASER's own way (dense rebuild, full forward) on ``subset``."""
    from c2i_fast.decompose import full_svd
    from c2i_fast.evaluate import Scorer
    from c2i_fast.models import find_matrix, load_model
    from c2i_fast.search import Candidate, evaluate_candidate
    from c2i_fast.tasks import check_tokenization, load_task, split
    from c2i_fast.transform import Edit
    lm = load_model(args.model)
    task = check_tokenization(load_task(args.task), lm.tokenizer)
    val = split(task, args.laser_val_size, args.test_size, args.seed)["select"]
    sc = Scorer(lm.model, lm.tokenizer, val, task.kind, max_new_tokens=task.spec.max_new_tokens)
    t = time.perf_counter()
    for c in subset:
        ref = find_matrix(lm.model, c["matrix"])
        svd = full_svd(ref.weight(), name=ref.name)          # LASER decomposes per candidate
        evaluate_candidate(sc, Candidate(Edit(c["matrix"], c["rank_fraction"]), ref.layer, 0.0, svd), None,
                           dense=True)
    return (time.perf_counter() - t) / max(1, len(subset))


def _row(rep: dict, wall: float) -> dict:
    return {"wall_seconds": wall, "layer_passes": rep["forward_passes"]["search_layer_passes"],
            "n_evaluated": rep["search"]["n_evaluated"], "plan": rep["plan"],
            "test_base_accuracy": rep["test"]["base"]["accuracy"],
            "test_adapted_accuracy": rep["test"]["adapted"]["accuracy"],
            "test_majority": rep["test"]["base"]["majority"]["accuracy"], "timings": rep["timings"]}


def table(res: dict) -> str:
    lines = [f"device: {res['device']} ({res['threads']} threads), {res['date']}, task {res['args']['task']}",
             "| search | wall s | × c2i_fast | layer-passes | evaluated | held-out base → adapted (majority) | plan |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        plan = "; ".join(f"{e['matrix']} ρ={e['rank_fraction']} k={e['n_clusters']} {e['method']}"
                         for e in r["plan"]) or "none"
        ext = " (extrapolated)" if r.get("extrapolated") else ""
        lines.append(f"| {name} | {r['wall_seconds']:.1f}{ext} | {r['time_vs_c2i_fast']:.1f} | {r['layer_passes']} "
                     f"| {r['n_evaluated']} | {r['test_base_accuracy']:.3f} → {r['test_adapted_accuracy']:.3f} "
                     f"({r['test_majority']:.3f}) | {plan} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="fever")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--max-evals", type=int, default=48)
    ap.add_argument("--laser-val-size", type=int, default=100)
    ap.add_argument("--laser-layers", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--laser-subset", type=int, default=16)
    ap.add_argument("--laser-report", help="report.json of a finished `c2i laser` run to reuse for (a)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-paper-faithful", action="store_true", help="leave out (b)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(table(res))


if __name__ == "__main__":
    main()
