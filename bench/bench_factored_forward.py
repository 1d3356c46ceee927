"""Forward time of an adapted model, factored vs dense, and saved-artifact size vs full model size (CPU or GPU).

    python bench/bench_factored_forward.py                     # default plans: 12 late MLP matrices, ρ=0.1, k ∈ {1, 4}
    python bench/bench_factored_forward.py --plan plan.json    # one case from a saved Plan
    python bench/bench_factored_forward.py --model random:.gpu/models/smollm2 --device cuda --dtype bfloat16 \
        --batch 8 --seq 512 --out $OUT/factored_forward-h200.json   # on the GPU machine (bench/gpu_session.sh)

For each case we time (time.perf_counter, after a device synchronize on CUDA; warm-up excluded; median and 20/80%
quantiles of repeated runs):
  * the whole model's forward on a (batch, seq) batch, dense vs factored (module swap between rounds, so both
    are measured on the same process state, interleaved to spread machine noise over both);
  * the edited matrices alone on the same (batch*seq, in) activations: dense nn.Linear vs factored module.
Sizes: ``save_adapted`` artifact bytes on disk vs the ``export_dense`` checkpoint's model.safetensors bytes.
Results go to bench/results/factored_forward-<cpu|gpu name>.json with the device, versions, threads, load, date.
Absolute times hold only for this machine; the ratios measured in one run are the comparable numbers.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from c2i_fast.artifacts import accounting, export_dense, save_adapted
from c2i_fast.models import load_model
from c2i_fast.io import device_name
from c2i_fast.transform import Edit, Plan, factored_modules, factorize_, restore_

ROOT = Path(__file__).resolve().parent


def quantiles(ts: list[float]) -> dict:
    qs = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
    return {"median_ms": 1e3 * statistics.median(ts), "p20_ms": 1e3 * qs[1], "p80_ms": 1e3 * qs[7], "n": len(ts)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()   # CUDA launches are asynchronous: time the work, not the queueing


def time_fn(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
    return out


def default_plans(n_layers: int, rho: float) -> list[Plan]:
    layers = range(n_layers - 4, n_layers)
    names = [f"model.layers.{i}.mlp.{p}" for i in layers for p in ("gate_proj", "up_proj", "down_proj")]
    return [Plan([Edit(n, rho, k, "block") for n in names], base_model="smollm2",
                 meta={"case": f"late MLP x{len(names)}, rho={rho}, k={k}"}) for k in (1, 4)]


def bench_case(model, plan: Plan, ids: torch.Tensor, repeats: int, warmup: int, rounds: int) -> dict:
    names = [e.matrix for e in plan.edits]
    dense_mods = {n: model.get_submodule(n) for n in names}
    t0 = time.perf_counter()
    factorize_(model, plan)
    factorize_s = time.perf_counter() - t0
    fact_mods = factored_modules(model)
    factors = {n: m.factors() for n, m in fact_mods.items()}
    acc = accounting(model)
    # Per-matrix inputs: activations of the right width, one row per token of the batch.
    tokens = ids.numel()
    w = dense_mods[names[0]].weight
    xs = {n: torch.randn(tokens, dense_mods[n].in_features).to(w.device, w.dtype) for n in names}

    def fwd():
        with torch.inference_mode():
            model(ids)

    def mats(mods):
        def run():
            with torch.inference_mode():
                for n in names:
                    mods[n](xs[n])
        return run

    dense_t, fact_t, dense_m, fact_m = [], [], [], []
    for _ in range(rounds):             # interleave dense / factored rounds: drift hits both alike
        restore_(model)
        dense_t += time_fn(fwd, repeats, warmup)
        dense_m += time_fn(mats(dense_mods), repeats, warmup)
        factorize_(model, plan, factors=factors)
        fact_mods = factored_modules(model)
        fact_t += time_fn(fwd, repeats, warmup)
        fact_m += time_fn(mats(fact_mods), repeats, warmup)
    with tempfile.TemporaryDirectory() as d:
        art = save_adapted(model, plan, Path(d) / "art")
        art_bytes = sum(f.stat().st_size for f in art.iterdir())
    restore_(model)
    model_fwd = {"dense": quantiles(dense_t), "factored": quantiles(fact_t)}
    model_fwd["speedup_dense_over_factored"] = model_fwd["dense"]["median_ms"] / model_fwd["factored"]["median_ms"]
    mat_fwd = {"dense": quantiles(dense_m), "factored": quantiles(fact_m)}
    mat_fwd["speedup_dense_over_factored"] = mat_fwd["dense"]["median_ms"] / mat_fwd["factored"]["median_ms"]
    return {
        "case": plan.meta.get("case", "plan"), "edits": [e.to_dict() for e in plan.edits],
        "factorize_seconds": factorize_s, "model_forward": model_fwd, "edited_matrices_forward": mat_fwd,
        "artifact_bytes": art_bytes, "accounting_total": acc["total"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--plan", help="Plan JSON path (default: late MLP matrices at --rho, k in {1, 4})")
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice). On a CPU shared with other jobs, 1 "
                         "thread avoids the spin-wait collapse of oversubscribed thread pools")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/factored_forward-<device>.json)")
    args = ap.parse_args(argv)
    slug = "cpu" if args.device == "cpu" else \
        "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name().lower()).strip("-")
    args.out = args.out or str(ROOT / "results" / f"factored_forward-{slug}.json")

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    lm = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    model = lm.model.eval()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq)).to(args.device)
    plans = [Plan.load(args.plan)] if args.plan else default_plans(model.config.num_hidden_layers, args.rho)

    cases = [bench_case(model, p, ids, args.repeats, args.warmup, args.rounds) for p in plans]
    with tempfile.TemporaryDirectory() as d:
        out = export_dense(model, Path(d) / "dense")
        full_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    for c in cases:
        c["full_model_safetensors_bytes"] = full_bytes
        c["artifact_over_full_model"] = c["artifact_bytes"] / full_bytes

    import transformers
    result = {
        "bench": "factored_forward", "device": args.device, "device_name": device_name(), "dtype": args.dtype,
        "cpu": device_name() if args.device == "cpu" else None, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": sys.version.split()[0],
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "loadavg_1min_at_start": load,
        "loadavg_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "input": {"batch": args.batch, "seq": args.seq},
        "timing": {"repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds,
                   "clock": "time.perf_counter" + (" between torch.cuda.synchronize()" if args.device != "cpu" else ""),
                   "stat": "median (p20/p80) of repeats*rounds runs"},
        "cases": cases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for c in cases:
        mf, ef = c["model_forward"], c["edited_matrices_forward"]
        print(f"{c['case']}: model fwd dense {mf['dense']['median_ms']:.1f} ms, factored "
              f"{mf['factored']['median_ms']:.1f} ms (x{mf['speedup_dense_over_factored']:.2f}); edited matrices "
              f"dense {ef['dense']['median_ms']:.2f} ms, factored {ef['factored']['median_ms']:.2f} ms "
              f"(x{ef['speedup_dense_over_factored']:.2f}); artifact {c['artifact_bytes'] / 1e6:.2f} MB vs "
              f"full {c['full_model_safetensors_bytes'] / 1e6:.1f} MB")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
