"""The search's precision (``c2i adapt --search-dtype``) on real tasks: how much faster the selection passes
run in bf16, and how far their answers move from fp32's.

Per task: the selection rows of ``c2i adapt``'s draw 0 (100 by default), the scan at the defaults, and the
first ``--candidates`` candidates in the search's own order (:func:`c2i_fast.search.interleave`), each scored
as the search scores it (prefix cache filled by the base pass, factored forward from its layer) under three
precisions, each with its own base pass and cache (candidate by candidate, the precisions in turn):

- ``fp32``: the model as loaded (``--search-dtype model``);
- ``autocast``: what ``--search-dtype bfloat16`` runs (bf16 matmuls, LM head at full precision);
- ``bf16-weights``: every parameter cast to bf16 for the pass (the LM head too), for comparison only.

Per precision: seconds of the base pass and of the candidates' passes, and per candidate its accuracy,
log-loss and "flips" (selection answers whose correctness differs from the fp32 pass of the same candidate);
then whether the best ``--confirm-top`` by (accuracy, log-loss) are fp32's. One JSON per task, written
atomically, skipped when present:

    python bench/bench_precision.py --model smollm2 --tasks fever,counterfact --threads 1 \\
        --out bench/results/precision-smollm2
    python bench/bench_precision.py --out bench/results/precision-smollm2 --summary
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from c2i_fast.openmp import choose_wait_policy, threads_in  # no torch import

WAIT_POLICY = choose_wait_policy(threads_in(sys.argv[1:]) or 2)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit, scanned_selection  # noqa: E402

MODES = ("fp32", "autocast", "bf16-weights")


@contextmanager
def bf16_weights(model):
    """Every floating parameter's data in bf16 for the block, the original tensors put back after."""
    import torch
    saved = []
    try:
        with torch.no_grad():
            for p in model.parameters():
                if p.dtype == torch.float32:
                    saved.append((p, p.data))
                    p.data = p.data.to(torch.bfloat16)
        yield
    finally:
        for p, data in saved:
            p.data = data


def precision(mode: str, model):
    from c2i_fast.precision import search_precision
    return {"fp32": nullcontext(), "autocast": search_precision(model, "bfloat16"),
            "bf16-weights": bf16_weights(model)}[mode]


def measure_task(args, lm, name: str) -> dict:
    """One task's unit: the scan, then base + candidates under each precision."""
    from c2i_fast.replay import PrefixCache
    from c2i_fast.search import build_candidates, evaluate_candidate, interleave
    cfg, sel, refs, top = scanned_selection(args.model, lm, name, args.samples)
    cands = interleave(build_candidates(top, {r.name: r for r in refs}, cfg.rank_fractions, cfg.clusters,
                                        cfg.methods, cfg.seed, progress=False))[:args.candidates]
    layers = {m.layer for m in top}
    out, caches = {}, {}
    for mode in MODES:
        caches[mode] = PrefixCache()
        with precision(mode, lm.model):
            t0 = time.perf_counter()
            base = sel.evaluate(caches[mode], capture=layers)
        out[mode] = {"base": {"seconds": round(time.perf_counter() - t0, 3), "accuracy": base["accuracy"],
                              "log_loss": base["log_loss"], "correct": base["correct"]}, "candidates": []}
    # candidate by candidate, every precision in turn: other load on the machine slows each mode alike
    for c in cands:
        for mode in MODES:
            with precision(mode, lm.model):
                t1 = time.perf_counter()
                r = evaluate_candidate(sel, c, caches[mode])
                seconds = time.perf_counter() - t1
            out[mode]["candidates"].append({**c.edit.to_dict(), "layer": c.layer, "seconds": round(seconds, 3),
                                            "accuracy": r["accuracy"], "log_loss": r["log_loss"],
                                            "correct": r["correct"]})
    ref = out["fp32"]
    for mode in MODES:
        m = out[mode]
        m["base"]["flips"] = sum(a != b for a, b in zip(m["base"]["correct"], ref["base"]["correct"]))
        for c, c32 in zip(m["candidates"], ref["candidates"]):
            c["flips"] = sum(a != b for a, b in zip(c["correct"], c32["correct"]))
            c["accuracy_delta"] = c["accuracy"] - c32["accuracy"]
        cs = m["candidates"]
        order = sorted(range(len(cands)), key=lambda i: (-cs[i]["accuracy"], cs[i]["log_loss"], i))
        m["best"] = order[:args.confirm_top]
        m["candidate_seconds"] = round(sum(c["seconds"] for c in m["candidates"]), 2)
        m["flips_total"] = sum(c["flips"] for c in m["candidates"])
    for mode in MODES:
        out[mode]["same_best"] = out[mode]["best"] == ref["best"]
        for row in [out[mode]["base"], *out[mode]["candidates"]]:
            row.pop("correct")
    return {"task": name, "n_select": len(sel.examples), "n_candidates": len(cands), "top_k": [m.name for m in top],
            "modes": out}


def summary(out: Path) -> str:
    lines = ["| task | precision | base pass s | candidates s | speed-up | flips (base) | flips (candidates) | "
             "max Δacc | same best 3 |", "|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(out.glob("*.json")):
        if f.name == "meta.json":
            continue
        u = json.loads(f.read_text())
        ref = u["modes"]["fp32"]
        for mode, m in u["modes"].items():
            n = len(m["candidates"])
            lines.append(
                f"| {u['task']} | {mode} | {m['base']['seconds']:.1f} | {m['candidate_seconds']:.1f} | "
                f"{ref['candidate_seconds'] / m['candidate_seconds']:.2f}× | "
                f"{m['base']['flips']} of {u['n_select']} | "
                f"{m['flips_total']} of {n * u['n_select']} | "
                f"{max(abs(c['accuracy_delta']) for c in m['candidates']) * 100:.0f} pts | "
                f"{'yes' if m['same_best'] else '**no**'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="fever,counterfact")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--candidates", type=int, default=12, help="the search's first N candidates (default 12)")
    ap.add_argument("--confirm-top", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="folder of unit JSONs (created)")
    ap.add_argument("--summary", action="store_true", help="only print the table")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.summary:
        print(summary(out))
        return 0
    import torch

    from c2i_fast.io import atomic_write_text, device_name, versions
    from c2i_fast.models import load_model
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    todo = [t for t in args.tasks.split(",") if not (out / f"{t}.json").is_file()]
    lm = load_model(args.model) if todo else None
    for name in todo:
        t0 = time.perf_counter()
        unit = measure_task(args, lm, name)
        unit.update(seconds=round(time.perf_counter() - t0, 1), model=args.model, threads=args.threads,
                    omp_wait_policy=WAIT_POLICY, device=device_name(), versions=versions(), commit=git_commit(),
                    command="python bench/bench_precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        atomic_write_text(out / f"{name}.json", json.dumps(unit, indent=2) + "\n")
        print(f"bench_precision: {name} done ({unit['seconds']} s)", flush=True)
    print(summary(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
