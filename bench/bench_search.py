"""Search-speed bench: LASER vs paper-faithful C2I vs c2i_fast — same model, task, hardware and thread count.

    (a) LASER as LASER does it: every {mlp_in, mlp_out} × layer × ρ (8 values) candidate gets a fresh SVD, a
        dense rebuild and a full forward over LASER's validation split (the first 20 % of the task file) the
        way its decoder scripts (pratyushasharma/laser, src/intervention_<llm>_<task>.py) run it: one example
        at a time, one forward per choice when a choice is several tokens, logits and a log-softmax over the
        whole vocabulary at every position. The full grid takes many hours here, so a seeded random subset
        of --laser-subset candidates is timed that way on --laser-rows seeded rows of that split and the time
        is extrapolated to the full grid and split (the table says "extrapolated"). A batched variant (our
        batching, packed choices and last-position logits, same dense full forward) is timed on the same
        subset as a kinder baseline. LASER's scripts in fact score the whole task file for every candidate
        and split the predictions afterwards; the goal counts its validation split only (the JSON also
        gives the whole-file figure).
        Its *selection* (plan, held-out accuracy) is LASER's exhaustive grid selected on the same 100 rows c2i
        selects on, run with the exact prefix-cached evaluator: pass the report.json of a finished
        `c2i laser --val-size 100 --test-size T --seed S` run with --laser-report, or the bench runs it.
    (b) paper-faithful C2I: the same gradient scan, top-K and candidate grid as (c), but every candidate is
        evaluated with a dense rebuild and a full forward, no first-order ordering or --max-evals. The first
        --paper-subset candidates are timed that way (a dense full forward costs the same at every layer) and
        the time is extrapolated to the whole grid; scan, candidate and held-out phases are (c)'s own.
    (c) c2i_fast as built: `c2i adapt` defaults (factored forwards, prefix cache, first-order order,
        --max-evals 48), timed end to end.

    python bench/bench_search.py --task fever --threads 1 --laser-report runs/laser-fever/report.json \
        --out bench/results/search-cpu-fever.json

On a GPU (bench/gpu_session.sh): `--device cuda`, and `--model random:.gpu/models/smollm2` — SmolLM2's
architecture and tokenizer with seeded random weights, since its 93 MB weight file cannot travel to that machine
(64 MiB per call). Times and work counts are those of the real shapes; selections and accuracies then mean
nothing, and the table says so.

Work is counted in row·layer-passes (rows of text × transformer layers run), which does not depend on the
hardware. Writes JSON (device, threads, versions, date, every measured piece) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from _common import git_commit  # noqa: E402
from c2i_fast.evaluate import Scorer  # noqa: E402
from c2i_fast.io import device_name, versions  # noqa: E402
from c2i_fast.models import RANDOM_PREFIX  # noqa: E402
from c2i_fast.pipeline import AdaptConfig, LaserConfig, adapt, laser  # noqa: E402

LASER_VAL_FRACTION = 0.2          # LASER selects on the first 20 % of each dataset (METHOD.md §2.3)


# The speed issue's (#22) goals for the search bench: c2i_fast's wall time against each other search's.
SPEED_GOALS = {"c_vs_laser_faithful_speedup": ("LASER as its code runs", 1000),
               "c_vs_laser_batched_speedup": ("LASER batched in our harness", 200),
               "c_vs_paper_faithful_speedup": ("paper-faithful C2I", 10)}


def speed_goals_met(goals: dict) -> dict:
    """Each speed ratio in ``goals`` against :data:`SPEED_GOALS` (True / False)."""
    return {k: goals[k] >= need for k, (_, need) in SPEED_GOALS.items()}


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="c2i-bench-"))
    load0 = os.getloadavg()          # other jobs on the machine inflate every row's time alike
    t_bench = time.perf_counter()
    common = dict(model=args.model, task=args.task, seed=args.seed, progress=False, threads=args.threads,
                  device=args.device, dtype=args.dtype)
    adapt_only = dict(scan_cache="off")     # every row pays its own scan, however often the bench runs
    rows, pieces = {}, {}
    try:
        # (c) c2i_fast, end to end
        t = time.perf_counter()
        c = adapt(AdaptConfig(out=str(work / "c"), samples=args.samples, top_k=args.top_k,
                              max_evals=args.max_evals, test_size=args.test_size, **common, **adapt_only))
        c_wall = time.perf_counter() - t
        n_layers = c["forward_passes"]["layers"]
        rows["c2i_fast"] = {**_selection(c), "wall_seconds": c_wall, "extrapolated": False,
                            "n_evaluated": c["search"]["n_evaluated"], "rows_per_pass": c["task"]["n_select"],
                            "n_same_factors": c["search"].get("n_same_factors", 0),
                            "layer_passes": c["forward_passes"]["search_layer_passes"],
                            "note": f"{c['search']['n_evaluated']} of {c['search']['n_candidates']} candidates "
                                    f"evaluated ({c['search'].get('n_same_factors', 0)} with an earlier one's "
                                    f"factors, not rerun), factored, from their layer up"}
        # (b) paper-faithful C2I: first --paper-subset candidates dense + full forward, extrapolated to the grid
        b = adapt(AdaptConfig(out=str(work / "b"), samples=args.samples, top_k=args.top_k,
                              max_evals=args.paper_subset, dense_candidates=True, test_size=args.samples, loss="answer",
                              **common, **adapt_only))
        per_b = b["timings"]["search"] / max(1, b["search"]["n_evaluated"])
        n_grid_c = c["search"]["n_candidates"]
        shared = c_wall - c["timings"]["search"]
        pieces["paper_faithful"] = {"timed_candidates": b["search"]["n_evaluated"], "seconds_per_candidate": per_b,
                                    "grid": n_grid_c, "shared_phases_seconds": shared}
        rows["c2i_paper_faithful"] = {
            "wall_seconds": shared + per_b * n_grid_c, "extrapolated": True, "n_evaluated": n_grid_c,
            "rows_per_pass": c["task"]["n_select"], "layer_passes": n_grid_c * n_layers, "plan": None,
            "note": f"{b['search']['n_evaluated']} of {n_grid_c} candidates timed ({per_b:.2f} s each, dense "
                    f"full forward), extrapolated; scan/candidates/held-out phases as (c)"}
        # (a) LASER's cost the way LASER runs it, timed on a seeded subset and extrapolated ...
        f = _laser_faithful(args, args.laser_layers)
        pieces["laser_faithful"] = f
        load_end, t_wait = os.getloadavg(), time.perf_counter()     # before any wait for --laser-report
        # ... and its selection: the exhaustive grid on the same 100 rows (exact cached evaluator)
        a = None
        if args.laser_report:
            a = json.loads(_wait_for(Path(args.laser_report)).read_text())
            pieces["waited_for_laser_report_seconds"] = time.perf_counter() - t_wait
            for k, want in (("task", args.task), ("val_size", args.samples), ("test_size", args.test_size),
                            ("seed", args.seed)):
                got = a["task"]["name"] if k == "task" else a["config"][k]
                if got != want:
                    raise SystemExit(f"--laser-report {args.laser_report}: {k} is {got!r}, this bench uses {want!r}")
        elif not args.no_laser_selection:
            layers = tuple(args.laser_layers) if args.laser_layers else None     # smoke runs only
            laser_common = {k: common[k] for k in ("model", "task", "seed", "progress", "threads")}
            a = laser(LaserConfig(out=str(work / "a"), val_size=args.samples, test_size=args.test_size,
                                  layers=layers, **laser_common))      # LaserConfig has no dtype/device
        if a is not None:
            rows["laser_cached_evaluator"] = {
                **_selection(a), "wall_seconds": a["timings"]["total"], "extrapolated": False,
                "n_evaluated": a["search"]["n_candidates"], "rows_per_pass": a["task"]["n_val"],
                "layer_passes": a["forward_passes"]["search_layer_passes"],
                "note": "LASER's grid in our harness (prefix cache, factored), selected on the same 100 rows as (c)"}
            sel, overhead = _selection(a), a["timings"]["total"] - a["timings"]["search"] - a["timings"]["val_base"]
        else:
            sel = {"plan": None, "n_test": c["task"]["n_test"]}
            overhead = sum(c["timings"].get(k, 0.0) for k in ("load", "test_base", "test_adapted"))
        for name, key, how in (("laser_faithful", "batch1", "LASER's code path: one example at a time, a forward per "
                                                          "choice, every position's log-softmax"),
                               ("laser_batched", "batched", "batched (ours), kinder to LASER")):
            val_pass = f[key]["forward_seconds_per_row"] * f["n_val"]
            rows[name] = {**sel, "wall_seconds": overhead + val_pass + f["grid"] * (f["svd_seconds"] + val_pass),
                          "extrapolated": True, "n_evaluated": f["grid"], "rows_per_pass": f["n_val"],
                          "layer_passes": f["grid"] * n_layers,
                          "note": f"{len(f['subset'])} of {f['grid']} candidates × {f['n_rows_timed']} of "
                                  f"{f['n_val']} validation rows timed ({how}), extrapolated",
                          # LASER's scripts score the whole file per candidate and split afterwards
                          "whole_file_seconds": overhead + f["grid"] * (
                              f["svd_seconds"] + f[key]["forward_seconds_per_row"] * f["n_file"])}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in rows.values():
        r["row_layer_passes"] = r["layer_passes"] * r["rows_per_pass"]
        r["time_vs_c2i_fast"] = r["wall_seconds"] / rows["c2i_fast"]["wall_seconds"]
    goals = {"c_vs_laser_faithful_speedup": rows["laser_faithful"]["time_vs_c2i_fast"],
             "c_vs_laser_batched_speedup": rows["laser_batched"]["time_vs_c2i_fast"],
             "c_vs_paper_faithful_speedup": rows["c2i_paper_faithful"]["time_vs_c2i_fast"],
             # random weights (GPU runs): accuracies mean nothing, so the accuracy goal is not judged
             "held_out_c_minus_laser": None if rows["laser_faithful"]["plan"] is None
             or str(args.model).startswith(RANDOM_PREFIX) else
                 rows["c2i_fast"]["test_adapted_accuracy"] - rows["laser_faithful"]["test_adapted_accuracy"]}
    goals["met"] = {**speed_goals_met(goals),
                    "accuracy_ge_laser": None if goals["held_out_c_minus_laser"] is None else
                        goals["held_out_c_minus_laser"] >= 0}
    return {"device": device_name(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_start": load0, "load_average_end": load_end,
            "bench_seconds": time.perf_counter() - t_bench - pieces.get("waited_for_laser_report_seconds", 0.0),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(), "commit": git_commit(),
            "args": vars(args),
            "rows": rows, "pieces": pieces, "goals": goals}


def _wait_for(path: Path) -> Path:
    """The report of a `c2i laser` run that may still be running (it is written last, atomically)."""
    if not path.exists():
        print(f"waiting for {path} ...", flush=True)
    while not path.exists():
        time.sleep(30)
    return path


def _selection(rep: dict) -> dict:
    return {"plan": rep["plan"], "test_base_accuracy": rep["test"]["base"]["accuracy"],
            "test_adapted_accuracy": rep["test"]["adapted"]["accuracy"],
            "test_majority": rep["test"]["base"]["majority"]["accuracy"], "n_test": rep["task"]["n_test"],
            "test_paired_vs_base": rep["test"].get("paired"),
            "timings": rep["timings"], "significance": rep["search"].get("significance")}


class LaserCodePath(Scorer):
    """A Scorer that computes what LASER's decoder scripts compute per example: one forward per row (per
    example, or per choice when unpacked) and ``log_softmax(model(ids).logits[0], dim=1)`` — logits and
    log-probs at every position, not only the scored ones (the metrics read the same numbers, so accuracy and
    log-loss are unchanged; only the cost is LASER's)."""

    def __init__(self, *args, **kwargs):
        # LASER runs every row whole: no shared prefix, and the answer's last token is fed too
        super().__init__(*args, **{**kwargs, "share_prefix": False, "trim": False})

    def _build_batches(self):
        return [self._pad([r]) for r in self.rows]

    def _logits(self, b, prefix_kv=None):
        dev = self._device()
        out = self.model(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev),
                         position_ids=b.position_ids.to(dev), use_cache=False)
        logp = torch.log_softmax(out.logits.float(), dim=-1)           # (B, T, V), as LASER's code
        return logp[:, self.read_columns(b)]                           # the columns the metrics read


def _laser_faithful(args, layers=None) -> dict:
    """LASER's own way on a seeded subset: per candidate a fresh full SVD, dense rebuild, full forward over
    seeded rows of its validation split (first 20 % of the task file): LASER's code path at batch 1 (one
    forward per choice, every position's log-softmax) and ours batched (packed choices, scored positions)."""
    from c2i_fast.decompose import full_svd
    from c2i_fast.models import LASER_TYPES, find_matrix, load_model, target_matrices
    from c2i_fast.search import DEFAULT_RANK_FRACTIONS, Candidate, evaluate_candidate
    from c2i_fast.tasks import check_tokenization, load_task
    from c2i_fast.transform import Edit
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    task = check_tokenization(load_task(args.task), lm.tokenizer)
    n_val = int(LASER_VAL_FRACTION * len(task.examples))
    rng = random.Random(args.seed)
    rows = rng.sample(task.examples[:n_val], min(args.laser_rows, n_val))
    grid = [{"matrix": r.name, "rank_fraction": rho} for r in target_matrices(lm.model, LASER_TYPES)
            if layers is None or r.layer in layers for rho in DEFAULT_RANK_FRACTIONS]
    subset = rng.sample(grid, min(args.laser_subset, len(grid)))
    out = {"n_val": n_val, "n_file": len(task.examples), "n_rows_timed": len(rows), "grid": len(grid),
           "subset": [f"{c['matrix']} rho={c['rank_fraction']}" for c in subset]}
    svd_s = []
    for key, cls, pack in (("batch1", LaserCodePath, False), ("batched", Scorer, True)):
        sc = cls(lm.model, lm.tokenizer, rows, task.kind, batch_tokens=4096, pack_choices=pack,
                 max_new_tokens=task.spec.max_new_tokens, share_prefix=False)   # LASER runs rows whole
        fwd = []
        for c in subset:
            ref = find_matrix(lm.model, c["matrix"])
            _sync()
            t = time.perf_counter()
            svd = full_svd(ref.weight(), name=ref.name)       # LASER decomposes for every candidate
            _sync()
            svd_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            evaluate_candidate(sc, Candidate(Edit(c["matrix"], c["rank_fraction"]), ref.layer, 0.0, svd), None,
                               dense=True)
            _sync()
            fwd.append(time.perf_counter() - t)
        out[key] = {"forward_seconds": fwd, "forward_seconds_per_row": statistics.mean(fwd) / len(rows),
                    "forward_rows_per_example": len(sc.rows) / len(rows)}
    out["svd_seconds"] = statistics.mean(svd_s)
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()   # CUDA work is asynchronous: time it, not its queueing


def table(res: dict) -> str:
    a = res["args"]
    random_weights = str(a["model"]).startswith(RANDOM_PREFIX)
    lines = [f"{res['device']}, {res['threads']} thread(s), {res['date']}; SmolLM2 ({a['model']}"
             + (", RANDOM weights: timings only, selections and accuracies mean nothing" if random_weights else "")
             + f"; {a.get('dtype', 'float32')}), task "
             f"{a['task']}, seed {a['seed']}, {a['samples']} selection rows, held-out "
             f"{res['rows']['c2i_fast']['n_test']} rows, top-k {a['top_k']}, max-evals {a['max_evals']}",
             "| search | wall s | × c2i_fast | candidates | examples/pass | example·layer-passes | held-out base → adapted "
             "(majority) | plan |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        missing = "selection not run" if name.startswith("laser") else "not run in full"
        plan = missing if r["plan"] is None else ("; ".join(
            f"{e['matrix'].replace('model.layers.', 'L')} ρ={e['rank_fraction']} k={e['n_clusters']} {e['method']}"
            for e in r["plan"]) or "none (base kept)")
        acc = "—" if r["plan"] is None else (f"{r['test_base_accuracy']:.3f} → {r['test_adapted_accuracy']:.3f} "
                                            f"({r['test_majority']:.3f})")
        ext = " (extrap.)" if r["extrapolated"] else ""
        lines.append(f"| {name} | {r['wall_seconds']:.0f}{ext} | {r['time_vs_c2i_fast']:.1f} | {r['n_evaluated']} "
                     f"| {r['rows_per_pass']} | {r['row_layer_passes']:,} | {acc} | {plan} |")
    g = res["goals"]
    met = speed_goals_met(g)            # judged against today's goals, also for a file written under older ones

    def verdict(key: str) -> str:
        return f"goal ≥ {SPEED_GOALS[key][1]:g}×: {'met' if met[key] else 'NOT met'}"
    lines.append(f"\nc2i_fast is {g['c_vs_laser_faithful_speedup']:.0f}× faster than LASER as its code runs "
                 f"({verdict('c_vs_laser_faithful_speedup')}), "
                 f"{g['c_vs_laser_batched_speedup']:.0f}× faster than batched LASER "
                 f"({verdict('c_vs_laser_batched_speedup')}), "
                 f"{g['c_vs_paper_faithful_speedup']:.1f}× faster than paper-faithful C2I "
                 f"({verdict('c_vs_paper_faithful_speedup')}); " + (
                     "held-out accuracy not judged (random weights)" if random_weights else
                     "LASER's selection not run" if g["held_out_c_minus_laser"] is None else
                     f"held-out accuracy c2i_fast − LASER = {g['held_out_c_minus_laser']:+.3f} (goal ≥ 0: "
                     f"{'met' if g['met']['accuracy_ge_laser'] else 'NOT met'})"))
    for name, r in res["rows"].items():
        sig = r.get("significance")
        if sig:
            lines.append(f"{name}: selection gain {sig['gain']:+d} of {sig['n']} ({sig['wins']} fixed, "
                         f"{sig['losses']} broken), max-T p = {sig['p_max']:.3g} against the best of "
                         f"{sig['candidates']} no-effect candidates (uncorrected McNemar p = {sig['p_single']:.3g})"
                         + (f"; with --gate-p 0.05 the base model is kept (held-out {r['test_base_accuracy']:.3f})"
                            if r.get("plan") and sig["p_max"] > 0.05 else "") + ".")
    w = res["rows"]["laser_faithful"].get("whole_file_seconds")
    if w:
        lines.append(f"LASER's scripts score the whole task file ({res['pieces']['laser_faithful']['n_file']} "
                     f"examples) for every candidate and split afterwards: {w:.0f} s as its code runs, "
                     f"{w / res['rows']['c2i_fast']['wall_seconds']:.0f}× c2i_fast (the goal counts the "
                     f"validation split only).")
    lines.append(f"load average {res['load_average_start'][0]:.1f} → {res['load_average_end'][0]:.1f} on "
                 f"{res['cpu_count']} CPUs; this bench ran {res.get('bench_seconds', float('nan')) / 60:.0f} min")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="fever")
    ap.add_argument("--samples", type=int, default=100, help="selection rows of (b), (c) and LASER's selection")
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--max-evals", type=int, default=48)
    ap.add_argument("--paper-subset", type=int, default=8, help="(b) candidates timed")
    ap.add_argument("--laser-subset", type=int, default=4, help="(a) candidates timed LASER's way")
    ap.add_argument("--laser-rows", type=int, default=100, help="(a) validation rows per timed candidate")
    ap.add_argument("--laser-report", help="report.json of a finished `c2i laser` run to reuse for (a)")
    ap.add_argument("--no-laser-selection", action="store_true",
                    help="time (a) only; leave out LASER's exhaustive selection (plan, held-out accuracy)")
    ap.add_argument("--laser-layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="restrict LASER's grid (smoke runs only; the table is then not LASER's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="model weights of every row (SVDs and accumulation stay fp32)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--table-only", action="store_true", help="print the table of an existing --out JSON")
    args = ap.parse_args()
    if args.table_only:
        print(table(json.loads(Path(args.out).read_text())))
        return
    res = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(table(res))


if __name__ == "__main__":
    main()
