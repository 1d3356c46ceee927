"""The scan's SVD phase, ``--scan-svd gram`` against ``full``, on real tasks: seconds, and whether the matrices
rank the same (the whole order and the top-K), with the largest score difference relative to the largest score.

Per task: the selection rows of ``c2i adapt``'s draw 0 (100 rows by default), the default ρ grid, both modes on
the same gradient pass setup (each mode runs its own pass). One JSON for the run, written atomically:

    python bench/bench_scan_svd.py --model smollm2 --threads 2 --out bench/results/scan-svd-smollm2.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from c2i_fast.openmp import choose_wait_policy, threads_in  # no torch import

WAIT_POLICY = choose_wait_policy(threads_in(sys.argv[1:]) or 2)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="fever,counterfact,bigbench_epistemic_reasoning")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import torch

    import c2i_fast.scan as scan_mod
    from c2i_fast.io import atomic_write_text, device_name, versions
    from c2i_fast.models import load_model, target_matrices
    from c2i_fast.pipeline import AdaptConfig, _scorer
    from c2i_fast.search import DEFAULT_RANK_FRACTIONS
    from c2i_fast.tasks import check_tokenization, load_task, split
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    refs = target_matrices(lm.model)
    rows = {}
    for name in args.tasks.split(","):
        cfg = AdaptConfig(model=args.model, task=name, out="-", samples=args.samples)
        task = check_tokenization(load_task(name), lm.tokenizer)
        sel = _scorer(lm, task, split(task, args.samples, cfg.test_size, cfg.seed, n_confirm=cfg.confirm_size)["select"],
                      cfg)
        res = {}
        for mode in ("gram", "full"):
            res[mode] = scan_mod.scan(sel, refs, list(DEFAULT_RANK_FRACTIONS), args.top_k, progress=False, svd=mode)
        full = {m.name: m.score for m in res["full"].matrices}
        scale = max(abs(v) for v in full.values())
        rows[name] = {
            "seconds": {mode: {k: round(v, 2) for k, v in r.seconds.items()} for mode, r in res.items()},
            "svds": {mode: r.svds for mode, r in res.items()},
            "same_order": [m.name for m in res["gram"].matrices] == [m.name for m in res["full"].matrices],
            "same_top_k": [m.summary() for m in res["gram"].top(args.top_k)]
                          == [m.summary() for m in res["full"].top(args.top_k)],
            "max_score_difference_over_max_score": max(abs(m.score - full[m.name]) for m in res["gram"].matrices)
                                                   / scale,
            "top_k": [m.name for m in res["full"].top(args.top_k)]}
        print(f"[bench_scan_svd] {name}: {json.dumps(rows[name])}", file=sys.stderr, flush=True)
    out = {"model": args.model, "samples": args.samples, "threads": args.threads, "omp_wait_policy": WAIT_POLICY,
           "tasks": rows, "device": device_name(), "versions": versions(), "commit": git_commit(),
           "command": "python bench/bench_scan_svd.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    atomic_write_text(Path(args.out), json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
