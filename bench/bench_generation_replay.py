"""The prefix cache on a generation task: a candidate at layer ℓ scored whole (every layer of the teacher-forced
pass and of ``generate()``'s prefill) against scored from ℓ (the layers below replayed from the cache,
c2i_fast.replay.replay_prefill), on the same rows; the two must give the same texts, accuracy and log-loss.

Per layer: LASER's mlp_in candidate (ρ = 0.01) at that layer on the selection rows of ``c2i adapt``'s draw 0, scored
``--repeats`` times each way, the two ways alternating; the best time of each is kept. The base pass that fills
the cache (every listed layer captured) is timed against a base pass without it. One JSON for the run, written
atomically (a few minutes at 1 thread):

    python bench/bench_generation_replay.py --model smollm2 --task hotpotqa --layers 2,8,14,20,26 --threads 1 \
        --out bench/results/generation-replay-smollm2.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from c2i_fast.openmp import choose_wait_policy, threads_in  # no torch import

WAIT_POLICY = choose_wait_policy(threads_in(sys.argv[1:]) or 2)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit  # noqa: E402

SAME = ("accuracy", "log_loss", "generations", "correct")     # what must not change


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="hotpotqa")
    ap.add_argument("--layers", default="2,8,14,20,26", help="one candidate per layer (its mlp_in, ρ 0.01)")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import torch

    from c2i_fast.io import atomic_write_text, device_name, versions
    from c2i_fast.models import load_model, target_matrices
    from c2i_fast.pipeline import AdaptConfig, _scorer
    from c2i_fast.plan import Edit
    from c2i_fast.replay import PrefixCache
    from c2i_fast.search import Candidate, evaluate_candidate
    from c2i_fast.tasks import check_tokenization, load_task, split
    torch.set_num_threads(args.threads)
    task = load_task(args.task)
    if task.kind != "generation":
        raise SystemExit(f"--task {args.task}: a {task.kind} task; this bench is for generation tasks")
    lm = load_model(args.model)
    task = check_tokenization(task, lm.tokenizer)
    cfg = AdaptConfig(model=args.model, task=args.task, out="-", samples=args.samples)
    sc = _scorer(lm, task, split(task, args.samples, cfg.test_size, cfg.seed, n_confirm=cfg.confirm_size)["select"],
                 cfg)
    layers = [int(x) for x in args.layers.split(",")]
    refs = {r.layer: r for r in target_matrices(lm.model, ("mlp_in",))}
    with torch.no_grad():
        base, t_base = timed(sc.evaluate)
        cache = PrefixCache()
        captured, t_capture = timed(lambda: sc.evaluate(cache, capture=set(layers)))
        assert all(captured[k] == base[k] for k in SAME), "the capturing base pass differs from a plain one"
        rows = []
        for layer in layers:
            ref = refs[layer]
            cand = Candidate(Edit(ref.name, 0.01), layer, math.nan, ref.svd())
            times = {"whole": [], "replayed": []}
            results = {}
            for _ in range(args.repeats):
                for way, c in (("whole", None), ("replayed", cache)):
                    results[way], t = timed(lambda: evaluate_candidate(sc, cand, c, within=False))
                    times[way].append(t)
            same = all(results["whole"][k] == results["replayed"][k] for k in SAME)
            row = {"layer": layer, "matrix": ref.name, "same": same,
                   "accuracy": results["whole"]["accuracy"], "log_loss": results["whole"]["log_loss"],
                   "changed_vs_base": sum(a != b for a, b in zip(results["whole"]["generations"], base["generations"])),
                   "seconds_whole": round(min(times["whole"]), 2), "seconds_replayed": round(min(times["replayed"]), 2)}
            row["saved"] = round(1 - row["seconds_replayed"] / row["seconds_whole"], 3)
            rows.append(row)
            print(f"[bench_generation_replay] {json.dumps(row)}", file=sys.stderr, flush=True)
    whole = sum(r["seconds_whole"] for r in rows)
    out = {"model": args.model, "task": args.task, "samples": args.samples, "n_rows": len(sc.examples),
           "max_new_tokens": sc.max_new_tokens, "threads": args.threads, "omp_wait_policy": WAIT_POLICY,
           "repeats": args.repeats, "base_seconds": round(t_base, 2), "base_capture_seconds": round(t_capture, 2),
           "candidates": rows, "all_same": all(r["same"] for r in rows),
           "saved_over_these_layers": round(1 - sum(r["seconds_replayed"] for r in rows) / whole, 3),
           "device": device_name(), "versions": versions(), "commit": git_commit(),
           "command": "python bench/bench_generation_replay.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    atomic_write_text(Path(args.out), json.dumps(out, indent=2) + "\n")
    return 0 if out["all_same"] else 1


if __name__ == "__main__":
    sys.exit(main())
