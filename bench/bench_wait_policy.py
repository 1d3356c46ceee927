"""OpenMP's wait policy on this CPU: one reduced ``c2i adapt`` (SmolLM2, CounterFact, 100 selection rows, 2
evaluations, 50 confirmation and 50 held-out rows, 2 threads) under libgomp's default (spin, then sleep) and
under ``OMP_WAIT_POLICY=PASSIVE``, on idle cores and beside a neighbour (another process multiplying matrices
with 2 PASSIVE threads, as a second job on a shared machine would). Why ``c2i adapt`` chooses the policy by the
load it finds (c2i_fast/openmp.py).

Each cell (``<out>/<setting>.json``: wall seconds and the run's phases) runs in a fresh process (libgomp reads
the policy when torch loads), is written atomically when it finishes, and is skipped when present.

    python bench/bench_wait_policy.py --out bench/results/wait-policy-cpu
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit  # noqa: E402

CELLS = ("default-idle", "passive-idle", "passive-shared", "default-shared")
RUN = """
import json, sys, time
t = time.perf_counter()
from c2i_fast.pipeline import AdaptConfig, adapt
rep = adapt(AdaptConfig(model="smollm2", task="counterfact", out=sys.argv[1], samples=100, max_evals=2, test_size=50,
                        confirm_size=50, threads=2, progress=False, metrics_cache=False, scan_cache="off"))
print(json.dumps({"seconds": round(time.perf_counter() - t, 1), "timings": rep["timings"]}))
"""
NEIGHBOUR = """
import torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a.T / 512)
"""


def run_cell(cell: str) -> dict:
    policy, where = cell.split("-")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    neighbour = None
    if where == "shared":
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env={**env, "OMP_WAIT_POLICY": "PASSIVE"})
        time.sleep(5)
    try:
        with tempfile.TemporaryDirectory(prefix="c2i-wait-") as tmp:
            r = subprocess.run([sys.executable, "-c", RUN, str(Path(tmp) / "run")], env=env, capture_output=True,
                               text=True, timeout=3600)
        if r.returncode != 0:
            raise SystemExit(f"[bench_wait_policy] {cell} failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cells", default=",".join(CELLS), help=f"of {', '.join(CELLS)}")
    args = ap.parse_args(argv)
    cells = args.cells.split(",")
    bad = [c for c in cells if c not in CELLS]
    if bad:
        ap.error(f"--cells: unknown {', '.join(bad)} (choose from {', '.join(CELLS)})")
    from c2i_fast.io import atomic_write_text, device_name, versions
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_wait_policy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for cell in cells:
        path = out / f"{cell}.json"
        if path.is_file():
            continue
        print(f"[bench_wait_policy] {cell}", file=sys.stderr, flush=True)
        load = os.getloadavg()[0]
        commit = git_commit.__wrapped__()        # each cell is a fresh `c2i` process: the code as it starts
        unit = run_cell(cell)
        unit.update(cell=cell, load_before=load, device=device_name(), versions=versions(),
                    commit=commit, command=command, finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        atomic_write_text(path, json.dumps(unit, indent=2) + "\n")
    for cell in CELLS:
        if (out / f"{cell}.json").is_file():
            u = json.loads((out / f"{cell}.json").read_text())
            t = u["timings"]
            print(f"| {cell} | {u['seconds']} | {t.get('scan_gradient')} | {t.get('scan_svd')} | {t.get('candidates')} "
                  f"| {t.get('search')} | {t.get('test_base')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
