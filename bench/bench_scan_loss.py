"""Which loss the scan ranks matrices by: the answer's log-loss (``--loss answer``, the default) or the loss over
the label choices only (``--loss choice``), on the selection rows of draw 0.

For each task it runs the scan twice on the same 100 selection rows (as ``c2i adapt`` splits them: seed 0, 200
confirmation rows asked for), with the default ρ grid and the Gram scan, and reports for each loss the top-K
matrices, the overlap of the two top-K sets, the Spearman correlation of the two orders over every matrix, and the
rank under each loss of the matrices named with ``--watch`` (e.g. the matrix another method's search picked). No
candidate is scored and no held-out row is read: the ranking is all this measures.

    python bench/bench_scan_loss.py --tasks bias_in_bios_gender --watch model.layers.26.mlp.gate_proj \\
        --threads 2 --out bench/results/scan-loss-smollm2.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from _common import git_commit
from c2i_fast.evaluate import Scorer
from c2i_fast.io import atomic_write_text, device_name, versions
from c2i_fast.config import MATRIX_TYPES
from c2i_fast.models import load_model, target_matrices
from c2i_fast.scan import scan
from c2i_fast.search import DEFAULT_RANK_FRACTIONS, spearman
from c2i_fast.tasks import check_tokenization, load_task, split

LOSSES = ("answer", "choice")


def ranks(names: list[str]) -> dict[str, int]:
    """Matrix → its 1-based place in a best-first list."""
    return {n: i + 1 for i, n in enumerate(names)}


def compare(orders: dict[str, list[str]], top_k: int, watch: list[str]) -> dict:
    """Two best-first orders of the same matrices: their top-K overlap, Spearman over all, and watched ranks."""
    a, b = (orders[loss] for loss in LOSSES)
    ra, rb = ranks(a), ranks(b)
    common = [n for n in a if n in rb]
    return {"top_k": top_k, "top": {loss: orders[loss][:top_k] for loss in LOSSES},
            "top_overlap": len(set(a[:top_k]) & set(b[:top_k])),
            "spearman": spearman([ra[n] for n in common], [rb[n] for n in common]),
            "watch": {n: {loss: ranks(orders[loss]).get(n) for loss in LOSSES} for n in watch}}


def measure(lm, task_name: str, top_k: int, watch: list[str], seed: int, samples: int = 100) -> dict:
    task = check_tokenization(load_task(task_name), lm.tokenizer)
    rows = split(task, samples, 500, seed, n_confirm=200)["select"]
    refs = target_matrices(lm.model, MATRIX_TYPES)         # c2i adapt's default --types
    if task.kind != "classification":
        raise SystemExit(f"bench_scan_loss: error: --tasks {task_name}: the choice loss needs a classification task")
    orders, seconds = {}, {}
    for loss in LOSSES:
        sc = Scorer(lm.model, lm.tokenizer, rows, task.kind)
        t = time.perf_counter()
        res = scan(sc, refs, list(DEFAULT_RANK_FRACTIONS), top_k, loss_kind=loss, progress=False, svd="gram")
        seconds[loss] = time.perf_counter() - t
        orders[loss] = [m.name for m in res.matrices]
    return {"task": task_name, "rows": len(rows), "matrices": len(refs), "seconds": seconds,
            **compare(orders, top_k, watch), "orders": orders}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="bias_in_bios_gender", help="comma-separated classification tasks")
    ap.add_argument("--watch", default="", help="comma-separated matrix names whose rank to report")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--samples", type=int, default=100, help="selection rows (c2i adapt's --samples)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", help="JSON results file (written atomically)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    watch = [w for w in args.watch.split(",") if w]
    lm = load_model(args.model)
    known = {r.name for r in target_matrices(lm.model)}
    bad = [w for w in watch if w not in known]
    if bad:
        sys.exit(f"bench_scan_loss: error: --watch {', '.join(bad)}: no such matrix in {args.model}")
    res = {"model": args.model, "device": device_name(), "threads": torch.get_num_threads(), "versions": versions(),
           "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "command": "python bench/bench_scan_loss.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "tasks": {t: measure(lm, t, args.top_k, watch, args.seed, args.samples) for t in args.tasks.split(",")}}
    for t, r in res["tasks"].items():
        print(f"{t}: top-{r['top_k']} overlap {r['top_overlap']}, Spearman {r['spearman']:.2f} over "
              f"{r['matrices']} matrices; scan {r['seconds']['answer']:.0f} s / {r['seconds']['choice']:.0f} s")
        for loss in LOSSES:
            print(f"  {loss}: {', '.join(r['top'][loss])}")
        for n, rk in r["watch"].items():
            print(f"  {n}: rank {rk['answer']} (answer), {rk['choice']} (choice)")
    if args.out:
        atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
