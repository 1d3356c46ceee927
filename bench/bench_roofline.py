"""Roofline of the search: how near a candidate's pass runs to a plain forward, and a plain forward to the dense
matmul rate of the machine — whether what is left of the speed goals is faster code or fewer FLOPs.

For one task (the 100 selection rows of draw 0, split as ``c2i adapt`` splits them) it measures, at ``--threads``:

    matmul    torch.mm at the model's MLP shape, [padded tokens of the largest batch, d] × [d, d_ff], fp32
    forward   one warm base-model pass over the rows, laid out as the search's Scorer lays them out:
              seconds per row-layer (one row through one decoder layer) and GFLOP/s
    search    from ``--unit``, a whole ``c2i adapt`` that recorded its search seconds and row-passes
              (a ``bench_levers.py`` unit): its seconds per row-layer, its GFLOP/s and the ratio to the forward's

FLOPs: 2 × (the decoder layer's linear weights) per padded token, plus the attention products
(4 × d_attn × the mean attended length per token); the LM head, norms and activations are left out. A search's
FLOPs are its row-passes × the mean padded tokens per row × FLOPs per token-layer. From them, and the goal's
wall time minus the run's other phases, it prints the FLOP budget the goal leaves the search.

    python bench/bench_roofline.py --unit bench/results/levers-smollm2-gram/fever/defaults.json --threads 2 \\
        --goal-seconds 120 --out bench/results/roofline-smollm2-fever.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import best_of, git_commit  # noqa: E402
from c2i_fast.evaluate import Scorer  # noqa: E402
from c2i_fast.io import atomic_write_text, device_name, versions  # noqa: E402
from c2i_fast.models import decoder_layers, load_model  # noqa: E402
from c2i_fast.tasks import check_tokenization, load_task, split  # noqa: E402


def layer_linear_params(model: nn.Module) -> int:
    """Weights of the linear maps in one decoder layer (the first; every layer has the same shapes)."""
    layer = decoder_layers(model)[0]
    return sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))


def attention_width(model: nn.Module) -> int:
    """Width of the attention products QKᵀ and AV: heads × head dim."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_attention_heads * head_dim


def flops_per_token_layer(model: nn.Module, attended: float) -> float:
    """FLOPs of one token through one decoder layer: 2 per linear weight, and QKᵀ plus AV over ``attended``
    keys (2 × 2 × width × attended)."""
    return 2.0 * layer_linear_params(model) + 4.0 * attention_width(model) * attended


def matmul_gflops(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 GFLOP/s of [m, k] × [k, n] (after one warm-up)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    _, best = best_of(lambda: torch.mm(a, b), repeats)
    return 2.0 * m * k * n / best / 1e9


def forward(lm, task_name: str, samples: int, seed: int, repeats: int) -> dict:
    """One warm full forward of the base model over the selection rows, as the search's Scorer runs them."""
    task = check_tokenization(load_task(task_name), lm.tokenizer)
    rows = split(task, samples, 1, seed=seed)["select"]
    sc = Scorer(lm.model, lm.tokenizer, rows, task.kind)
    with torch.no_grad():
        _, seconds = best_of(lambda: sc.evaluate(generate=False), repeats)
    padded = sum(b.input_ids.numel() for b in sc.batches)
    # the mean attended length: a left-padded batch of width w attends (w + 1) / 2 keys per token, after the
    # shared prefix's keys
    attended = sum(b.input_ids.numel() * ((b.input_ids.shape[1] + 1) / 2 + len(sc.prefix_ids))
                   for b in sc.batches) / padded
    n_layers = len(decoder_layers(lm.model))
    per_token = flops_per_token_layer(lm.model, attended)
    return {"rows": len(rows), "batches": len(sc.batches), "padded_tokens": padded,
            "tokens_per_row": padded / len(rows), "largest_batch_tokens": max(b.input_ids.numel() for b in sc.batches),
            "shared_prefix_tokens": len(sc.prefix_ids), "attended": attended, "layers": n_layers,
            "flops_per_token_layer": per_token, "seconds": seconds,
            "seconds_per_row_layer": seconds / (len(rows) * n_layers),
            "gflops": padded * n_layers * per_token / seconds / 1e9}


def search_rate(unit: dict, fwd: dict) -> dict:
    """The unit's search against the forward: seconds per row-layer, GFLOP/s, and their ratio."""
    seconds, row_passes = unit["timings"]["search"], unit["search"]["row_passes"]
    flops = row_passes * fwd["tokens_per_row"] * fwd["flops_per_token_layer"]
    per = seconds / row_passes
    return {"seconds": seconds, "row_passes": row_passes, "seconds_per_row_layer": per, "tflops": flops / 1e12,
            "gflops": flops / seconds / 1e9, "forward_speed_fraction": fwd["seconds_per_row_layer"] / per}


def budget(unit: dict, goal_seconds: float, rate_gflops: float) -> dict:
    """What a ``goal_seconds`` run leaves its search once the unit's other phases are paid, in seconds and in
    TFLOPs at ``rate_gflops``."""
    other = sum(v for k, v in unit["timings"].items() if k != "search")
    left = goal_seconds - other
    return {"goal_seconds": goal_seconds, "other_phases_seconds": other, "search_seconds_left": left,
            "search_tflops_left": max(0.0, left) * rate_gflops / 1e3}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unit", required=True, help="a bench_levers.py unit JSON (its task, search seconds, row-passes)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards (the best is kept)")
    ap.add_argument("--threads", type=int, help="torch threads (the unit's run's, for a fair ratio)")
    ap.add_argument("--goal-seconds", type=float, help="a whole-run goal: print the search's share of it")
    ap.add_argument("--out", help="JSON results file (written atomically)")
    args = ap.parse_args(argv)
    path = Path(args.unit)
    if not path.is_file():
        sys.exit(f"bench_roofline: error: --unit {path}: no such file")
    unit = json.loads(path.read_text())
    if "search" not in unit or "row_passes" not in unit.get("search", {}) or "timings" not in unit:
        sys.exit(f"bench_roofline: error: --unit {path}: not a bench_levers unit (no search row_passes / timings)")
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    fwd = forward(lm, unit["task"], args.samples, args.seed, args.repeats)
    cfg = lm.model.config
    mm = matmul_gflops(fwd["largest_batch_tokens"], cfg.hidden_size, cfg.intermediate_size)
    fwd["matmul_fraction"] = fwd["gflops"] / mm
    res = {"device": device_name(), "threads": torch.get_num_threads(), "versions": versions(),
           "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "command": "python bench/bench_roofline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "model": args.model, "task": unit["task"], "unit": str(path), "unit_commit": unit.get("commit"),
           "matmul": {"shape": [fwd["largest_batch_tokens"], cfg.hidden_size, cfg.intermediate_size], "gflops": mm},
           "forward": fwd, "search": search_rate(unit, fwd)}
    if args.goal_seconds:
        res["goal"] = budget(unit, args.goal_seconds, res["search"]["gflops"])
    s, g = res["search"], res.get("goal")
    print(f"{res['device']}, {res['threads']} thread(s), {args.model}, {unit['task']}, {fwd['rows']} rows "
          f"({fwd['tokens_per_row']:.1f} padded tokens a row)")
    print(f"matmul {res['matmul']['shape']}: {mm:.1f} GFLOP/s")
    print(f"forward: {fwd['seconds']:.2f} s, {fwd['seconds_per_row_layer'] * 1e3:.3f} ms per row-layer, "
          f"{fwd['gflops']:.1f} GFLOP/s ({fwd['matmul_fraction']:.0%} of the matmul)")
    print(f"search ({path}): {s['seconds']:.1f} s over {s['row_passes']:,} row-layers = "
          f"{s['seconds_per_row_layer'] * 1e3:.3f} ms each, {s['tflops']:.1f} TFLOP at {s['gflops']:.1f} GFLOP/s "
          f"({s['forward_speed_fraction']:.0%} of the forward's speed)")
    if g:
        print(f"goal {g['goal_seconds']:.0f} s: the other phases took {g['other_phases_seconds']:.1f} s, leaving the "
              f"search {g['search_seconds_left']:.1f} s = {g['search_tflops_left']:.1f} TFLOP at its rate "
              f"(it ran {s['tflops']:.1f}: {s['tflops'] / max(g['search_tflops_left'], 1e-9):.1f}× too many)")
    if args.out:
        atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
