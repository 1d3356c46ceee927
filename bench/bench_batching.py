"""Scoring-pass bench: what the shared prompt prefix and padding-aware batches save on one full forward.

For each task, the 100 selection examples c2i selects on (same split as `c2i adapt`, seed 0) are scored three
ways by the same Scorer, all exact (same metrics):

    whole rows, full batches     every row whole, batches filled up to --batch-tokens (the old layout)
    shared prefix, full batches  the common prompt prefix run once (where it pays, as adapt decides), batches
                                 filled as above
    shared prefix + padding-aware  the default: batches cut where padded tokens + per-batch overhead is least

It prints padded tokens, batches and the seconds of one warm full forward, and checks the log-loss agrees.

    python bench/bench_batching.py --threads 1 --out bench/results/batching-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from _common import best_of  # noqa: E402
from c2i_fast.evaluate import Scorer  # noqa: E402
from c2i_fast.models import load_model  # noqa: E402
from c2i_fast.io import device_name, versions  # noqa: E402
from c2i_fast.tasks import check_tokenization, load_task, split  # noqa: E402

LAYOUTS = (("whole rows, full batches", False, 10 ** 9), ("shared prefix, full batches", True, 10 ** 9),
           ("shared prefix + padding-aware", True, None))


def measure(lm, task_name: str, samples: int, seed: int, repeats: int) -> list[dict]:
    task = check_tokenization(load_task(task_name), lm.tokenizer)
    rows = split(task, samples, 1, seed=seed)["select"]
    out = []
    for name, share, overhead in LAYOUTS:
        sc = Scorer(lm.model, lm.tokenizer, rows, task.kind, share_prefix=share)   # the prefix split as adapt does
        if overhead is not None:                   # then the batches re-cut as full as they go
            sc.batch_overhead = overhead
            sc.batches = sc._build_batches()
        with torch.no_grad():
            res, seconds = best_of(partial(sc.evaluate, generate=False), repeats)
        out.append({"layout": name, "shared_prefix_tokens": len(sc.prefix_ids), "batches": len(sc.batches),
                    "padded_tokens": sum(b.input_ids.numel() for b in sc.batches),
                    "real_tokens": sum(len(r.ids) for r in sc.rows), "seconds": seconds,
                    "log_loss": res["log_loss"], "accuracy": res["accuracy"]})
    base = out[0]
    for r in out:
        if abs(r["log_loss"] - base["log_loss"]) > 1e-4 * abs(base["log_loss"]) or r["accuracy"] != base["accuracy"]:
            raise SystemExit(f"{task_name}: layout {r['layout']!r} scores differently: {r} vs {base}")
        r["speedup"] = base["seconds"] / r["seconds"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["bigbench_epistemic_reasoning", "fever", "counterfact"])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timed forwards per layout (the best is kept)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", help="JSON results file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("smollm2")
    res = {"device": device_name(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "versions": versions(), "args": vars(args),
           "tasks": {t: measure(lm, t, args.samples, args.seed, args.repeats) for t in args.tasks}}
    print(f"{res['device']}, {res['threads']} thread(s), SmolLM2, {args.samples} selection examples, one forward")
    print("| task | layout | shared prefix | batches | padded tokens (real) | s | × |")
    print("|---|---|---|---|---|---|---|")
    for t, rows in res["tasks"].items():
        for r in rows:
            print(f"| {t} | {r['layout']} | {r['shared_prefix_tokens']} | {r['batches']} | {r['padded_tokens']:,} "
                  f"({r['real_tokens']:,}) | {r['seconds']:.2f} | {r['speedup']:.2f} |")
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(args.out)
    return res


if __name__ == "__main__":
    main()
