"""The candidate phase of ``c2i adapt`` (``build_candidates``: clusterings and per-cluster SVDs of the top-K
matrices): seconds, SVDs taken, and a fingerprint of every candidate (its key, first-order ΔL̂ and a hash of its
factors), so two commits' runs can be compared candidate for candidate.

Per task: the selection rows of draw 0 (``--samples``), the scan at the defaults, then the candidates of its
top-K as the search builds them. One JSON per (task, label), written atomically; ``--against FILE`` prints
whether another run (e.g. an earlier commit's, from a worktree) built the very same candidates:

    python bench/bench_candidates.py --tasks fever --samples 24 --out bench/results/candidates-smollm2 --label HEAD
    python bench/bench_candidates.py --out bench/results/candidates-smollm2 --compare before after
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from c2i_fast.openmp import choose_wait_policy, threads_in  # no torch import

WAIT_POLICY = choose_wait_policy(threads_in(sys.argv[1:]) or 1)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit, scanned_selection  # noqa: E402


def measure(args, lm, name: str) -> dict:
    import c2i_fast.clustering as clustering
    import c2i_fast.decompose as decompose
    from c2i_fast.search import build_candidates, candidate_factors
    from c2i_fast.svd import full_svd
    cfg, _, refs, top = scanned_selection(args.model, lm, name, args.samples)
    from c2i_fast.svd import gram_eigh
    taken, grams = [], []

    def counting(*a, **k):          # every SVD the clusterings and the fits take while the candidates are built
        taken.append(1)
        return full_svd(*a, **k)

    def counting_gram(*a, **k):     # every Gram eigendecomposition
        grams.append(1)
        return gram_eigh(*a, **k)
    saved = clustering.full_svd, decompose.full_svd, clustering.gram_eigh, decompose.gram_eigh
    clustering.full_svd = decompose.full_svd = counting
    clustering.gram_eigh = decompose.gram_eigh = counting_gram
    try:
        t0 = time.perf_counter()
        cands = build_candidates(top, {r.name: r for r in refs}, cfg.rank_fractions, cfg.clusters, cfg.methods,
                                 cfg.seed, progress=False)
        seconds = time.perf_counter() - t0
    finally:
        clustering.full_svd, decompose.full_svd, clustering.gram_eigh, decompose.gram_eigh = saved
    rows = [[c.key(), c.predicted,
             hashlib.sha256(candidate_factors(c).reconstruct().contiguous().numpy().tobytes()).hexdigest()[:16]]
            for c in cands]
    return {"task": name, "n_select": args.samples, "top_k": [m.name for m in top], "seconds": round(seconds, 2),
            "svds": len(taken), "gram_eighs": len(grams), "n_candidates": len(cands), "candidates": rows}


def search_order(rows: list) -> list[str]:
    """The keys of [key, ΔL̂, hash] rows in the search's order (c2i_fast.search.interleave: best ΔL̂ first within
    each matrix, matrices round-robin); the matrix is the key's first field."""
    per: dict[str, list[str]] = {}
    for key, pred, _ in sorted(rows, key=lambda r: (r[1], r[0])):
        per.setdefault(key.split("|")[0], []).append(key)
    queues = list(per.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def compare(out: Path, a: str, b: str) -> str:
    """Per task: SVDs and seconds of the build, whether both runs built the same candidates with the same factors,
    whether the search would take them in the same order, and the largest ΔL̂ difference (relative to the
    largest |ΔL̂|): the Gram estimates differ from the SVD's in round-off only."""
    lines = ["| task | SVDs | seconds | same candidates and factors | same search order | max ΔL̂ diff |",
             "|---|---|---|---|---|---|"]
    for fa in sorted(out.glob(f"*.{a}.json")):
        fb = fa.with_name(fa.name.replace(f".{a}.json", f".{b}.json"))
        if not fb.is_file():
            continue
        ua, ub = json.loads(fa.read_text()), json.loads(fb.read_text())
        ca, cb = ua["candidates"], ub["candidates"]
        same = ua["top_k"] == ub["top_k"] and [(r[0], r[2]) for r in ca] == [(r[0], r[2]) for r in cb]
        oa, ob = search_order(ca), search_order(cb)
        first = next((i for i, (x, y) in enumerate(zip(oa, ob)) if x != y), None)
        order = "yes" if oa == ob else f"**no** (from #{first + 1 if first is not None else min(len(oa), len(ob)) + 1})"
        diff = "–"
        if [r[0] for r in ca] == [r[0] for r in cb] and ca:
            scale = max(abs(r[1]) for r in ca) or 1.0
            diff = f"{max(abs(x[1] - y[1]) for x, y in zip(ca, cb)) / scale:.1e}"
        lines.append(f"| {ua['task']} | {ua['svds']} → {ub['svds']} | {ua['seconds']} → {ub['seconds']} | "
                     f"{'yes' if same else '**no**'} ({ua['n_candidates']}) | {order} | {diff} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="fever")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="run", help="names the units: <task>.<label>.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="only print the table of labels A against B")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.compare:
        print(compare(out, *args.compare))
        return 0
    import torch

    from c2i_fast.io import atomic_write_text, device_name, versions
    from c2i_fast.models import load_model
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model)
    for name in args.tasks.split(","):
        unit = measure(args, lm, name)
        unit.update(label=args.label, model=args.model, threads=args.threads, omp_wait_policy=WAIT_POLICY,
                    device=device_name(), versions=versions(), commit=git_commit(),
                    command="python bench/bench_candidates.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        atomic_write_text(out / f"{name}.{args.label}.json", json.dumps(unit) + "\n")
        print(f"bench_candidates: {name} ({args.label}): {unit['svds']} SVDs, {unit['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
