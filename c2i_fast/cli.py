"""``c2i`` command line: adapt, eval, laser, apply, export.

Every bad input ends in one line ``c2i: error: <message naming the file/line/parameter>`` and exit code 2;
outputs are written atomically, so a failed or killed run leaves no half-written file.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import C2IError


def _list_of(kind, what: str):
    """An argparse type: comma-separated values converted by ``kind`` (a non-empty tuple)."""
    def parse(text: str) -> tuple:
        try:
            vals = tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError("empty list")
        return vals
    return parse


_floats = _list_of(float, "numbers")
_ints = _list_of(int, "integers")


def _strs(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _common(p: argparse.ArgumentParser, out_required: bool = True, required: bool = True):
    p.add_argument("--model", required=required, help="hub id, local directory, .gguf file, or alias 'smollm2' / 'qwen2.5-coder-1.5b'")
    p.add_argument("--task", required=required, help="task name from the manifest (e.g. fever) or a .jsonl file")
    p.add_argument("--data-dir", help="folder with the task JSONL files (default: $C2I_DATA or shared/data)")
    p.add_argument("--metric", choices=["classification", "recall", "generation"],
                   help="task kind of a user JSONL file (default: classification if it has choices, else recall)")
    p.add_argument("--test-size", type=int, default=500, help="held-out examples (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scoring", choices=["mean", "sum"], default="mean",
                   help="classification score: length-normalised (default) or summed log-prob; both are reported")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward batch")
    p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                   help="run every row whole (default: a prompt prefix common to all rows runs once per pass)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-metrics-cache", dest="metrics_cache", action="store_false",
                   help="do not read or write the base model's metrics cache ($C2I_CACHE, default "
                        "~/.cache/c2i_fast; the cached numbers are bit-identical to a fresh pass)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--log-json", metavar="PATH", help="machine-readable JSON-lines events to PATH ('-' = stderr)")
    if out_required:
        p.add_argument("--out", required=required, help="output directory")


def build_parser() -> argparse.ArgumentParser:
    from .search import DEFAULT_CLUSTERS, DEFAULT_METHODS, DEFAULT_RANK_FRACTIONS
    ap = argparse.ArgumentParser(prog="c2i", description="Compress-to-Impress: adapt an LM to a task "
                                 "by gradient-guided (clustered) low-rank reduction, no training.")
    sub = ap.add_subparsers(dest="command", required=True)

    a = sub.add_parser("adapt", help="scan, search and apply a C2I plan; writes plan, factors and report")
    _common(a, required=False)     # --model/--task/--out are checked in _run (not needed with --resume)
    a.add_argument("--samples", type=int, default=100, help="selection sample size (default 100)")
    a.add_argument("--top-k", type=int, default=5, help="matrices inspected after the gradient scan")
    a.add_argument("--rank-fractions", type=_floats, default=DEFAULT_RANK_FRACTIONS, help="ρ grid, e.g. 0.1,0.01")
    a.add_argument("--clusters", type=_ints, default=DEFAULT_CLUSTERS, help="k grid, e.g. 1,2,4,8")
    a.add_argument("--methods", type=_strs, default=DEFAULT_METHODS, help="block,kmeans,projective")
    a.add_argument("--types", type=_strs, default=None, help="matrix types to scan (default: all)")
    a.add_argument("--max-evals", type=int, default=48,
                   help="evaluate only the N candidates with the best first-order ΔL̂ (0 = all; default 48)")
    a.add_argument("--compose", type=int, default=0, help="greedily try to add up to N more edits")
    a.add_argument("--loss", choices=["auto", "answer", "choice"], default="auto",
                   help="scan loss: gold-answer cross-entropy or choice-restricted (classification); auto (default): "
                        "choice on classification tasks, answer otherwise")
    a.add_argument("--score", choices=["first_order", "grad_norm"], default="first_order")
    a.add_argument("--draws", type=int, default=1, help="repeat selection on N disjoint samples")
    a.add_argument("--gate-p", type=float, default=None, metavar="P",
                   help="keep the base model unless the plan's selection gain is significant at P against the "
                        "best of the evaluated candidates under no effect (max-T sign-flip test; default: off, "
                        "the p-value is reported either way)")
    a.add_argument("--rule", choices=["confirm", "paper"], default="confirm",
                   help="which plan ships: 'confirm' (default: the best few re-scored with the base on "
                        "--confirm-size held-apart training rows, shipped only if the gain there is significant "
                        "at --alpha) or 'paper' (C2I: the best on selection, if it beats the base)")
    a.add_argument("--confirm-size", type=int, default=200, help="confirmation rows (default 200)")
    a.add_argument("--confirm-top", type=int, default=3, help="candidates re-scored on them (default 3)")
    a.add_argument("--alpha", type=float, default=0.05,
                   help="ship only if the confirmed gain's one-sided McNemar p × --confirm-top ≤ this")
    a.add_argument("--prune", choices=["exact", "race", "halve", "off"], default="exact",
                   help="stop scoring a candidate once even every remaining selection row answered correctly "
                        "cannot put it among the best max(1, --confirm-top): the same plans as 'off' (default "
                        "exact; off where --gate-p, --compose or a max-T fallback needs every candidate). 'race' "
                        "also stops one already worse, paired, than the base or the best few (one-sided McNemar "
                        "p < 0.01 after 20 rows): fewer passes, not always the same plan. 'halve': successive "
                        "halving, every candidate on a quarter of the rows, the better half on the next quarter, "
                        "the better half of those on the rest: about half the passes, not always the same plan")
    a.add_argument("--scan-svd", choices=["full", "randomized", "gram"], default="gram",
                   help="the scan's SVDs: 'randomized' takes only the top singular triplets the ρ grid needs "
                        "where it needs at most 1/8 of them (ρ ≤ 0.125; not the default grid, which reaches ρ=0.9), "
                        "and a full SVD for the matrices that reach the top-K; 'gram': every score from the "
                        "eigendecomposition of the smaller Gram matrix WWᵀ or WᵀW (the full SVD's scores up to "
                        "round-off; the default), a full SVD only for the best 2 × --top-k")
    a.add_argument("--no-scan-cache", dest="scan_cache", action="store_const", const="off", default="on",
                   help="do not read or write the scan cache ($C2I_CACHE/scan: a second run on the same selection "
                        "rows, or a --resume, skips the gradient pass and the SVDs; the same bits as a fresh scan)")
    a.add_argument("--search-dtype", choices=["model", "bfloat16"], default="model",
                   help="the selection passes of the base and the candidates: 'bfloat16' runs their matmuls "
                        "in bf16 (autocast; the LM head at full precision; about twice as fast on CPUs with "
                        "AVX512-BF16 or AMX); the scan, confirmation and held-out passes run at the model's own "
                        "dtype (default: model)")
    a.add_argument("--compare-rules", action="store_true",
                   help="also judge every other rule's plan on the held-out rows (bench; the report's 'rules')")
    a.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="model weights (SVDs and accumulation stay fp32)")
    a.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    a.add_argument("--device-map", help="accelerate device map, e.g. auto, for a model bigger than one device")
    a.add_argument("--gradient-checkpointing", action="store_true", help="less memory in the gradient pass")
    a.add_argument("--nproc", type=int, default=1,
                   help="run on N processes of this machine with torchrun (same plan and report as one)")
    a.add_argument("--no-report", action="store_true", help="do not render the HTML/PNG report")
    a.add_argument("--resume", metavar="DIR", help="continue a killed `c2i adapt` run in DIR with its saved "
                   "configuration; candidates already in its journal are not evaluated again")

    l = sub.add_parser("laser", help="LASER's exhaustive search in the same harness")
    _common(l)
    l.add_argument("--val-size", type=int, default=100, help="validation examples used for selection")
    l.add_argument("--rank-fractions", type=_floats, default=DEFAULT_RANK_FRACTIONS)
    l.add_argument("--types", type=_strs, default=("mlp_in", "mlp_out"))
    l.add_argument("--layers", type=_ints, default=None, help="layers to search (default all)")
    l.add_argument("--draws", type=int, default=1, help="split as `c2i adapt --draws N` does …")
    l.add_argument("--draw", type=int, default=0, help="… and select on its draw D (same selection/held-out rows)")
    l.add_argument("--faithful", action="store_true", help="dense rebuild + full forward per candidate")
    l.add_argument("--prune", choices=("off", "exact"), default="off",
                   help="exact: stop scoring a candidate once it cannot be the best (same pick, fewer passes)")
    l.add_argument("--no-report", action="store_true", help="do not render the HTML/PNG report")
    l.add_argument("--resume", action="store_true")

    e = sub.add_parser("eval", help="held-out metrics of a base model, and of an adapted directory")
    _common(e, out_required=False)
    e.add_argument("--samples", type=int, default=100, help="selection size excluded from the test split")
    e.add_argument("--adapted", help="directory written by `c2i adapt` / `c2i apply`")
    e.add_argument("--out", help="write the metrics JSON here")

    p = sub.add_parser("apply", help="apply a plan.json to a base model and save the factored artifact")
    p.add_argument("--model", required=True)
    p.add_argument("--plan", required=True, help="plan.json (or a directory holding one)")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")

    r = sub.add_parser("report", help="render DIR/report.json to DIR/report/index.html + PNG figures")
    r.add_argument("dir", help="output directory of `c2i adapt` / `c2i laser` (or a report.json)")
    r.add_argument("--out", help="where to write the page (default DIR/report)")
    r.add_argument("--quiet", action="store_true")

    x = sub.add_parser("export", help="write an adapted model as a dense Hugging Face checkpoint or GGUF file")
    x.add_argument("--model", required=True)
    x.add_argument("--adapted", required=True, help="directory written by `c2i adapt` / `c2i apply`")
    x.add_argument("--out", required=True, help="a directory (--format hf) or a .gguf file (--format gguf)")
    x.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: a Hugging Face checkpoint directory (default); gguf: the --model GGUF file with the "
                        "edited matrices dense, every other tensor and all metadata copied as they were")
    x.add_argument("--gguf-type", choices=["f32", "f16", "bf16", "q8_0"], default="f32",
                   help="GGUF type of the edited matrices (default f32, exact)")
    x.add_argument("--quiet", action="store_true")
    return ap


def _finish(rep: dict, out: str, no_report: bool) -> None:
    """Summary table on stdout; the HTML/PNG report unless --no-report (a missing matplotlib does not fail a
    finished run)."""
    from .report import render_report, summary_table
    print(summary_table(rep))
    print(f"wrote {out}/plan.json, {out}/report.json")
    if not no_report:
        try:
            print(f"wrote {render_report(out)}")
        except C2IError as e:
            print(f"c2i: report not rendered: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import os

    from .openmp import choose_wait_policy, threads_in
    argv = list(sys.argv[1:] if argv is None else argv)
    # before torch loads (build_parser imports it): spinning OpenMP threads are fast on free cores, many times
    # slower on shared ones
    choose_wait_policy(threads_in(argv))
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", 1) > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _launch(argv, args.nproc)
    try:
        return _run(args)
    except C2IError as e:
        print(f"c2i: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("c2i: interrupted (rerun with --resume to continue an adapt/laser run)", file=sys.stderr)
        return 130


def _launch(argv: list[str], nproc: int) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this machine."""
    import subprocess
    i = argv.index("--nproc") if "--nproc" in argv else None
    rest = argv[:i] + argv[i + 2:] if i is not None else [a for a in argv if not a.startswith("--nproc=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "c2i_fast.cli", *rest]
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        print(f"c2i: error: the distributed run failed (torchrun exit code {rc}; the failing rank's error is "
              f"above)", file=sys.stderr)
        return 2 if rc == 2 else 1
    return 0


def _run_config(args, progress: bool) -> dict:
    """The fields of c2i_fast.pipeline.RunConfig, from the options every run command shares (_common)."""
    return dict(model=args.model, task=args.task, test_size=args.test_size, seed=args.seed, scoring=args.scoring,
                data_dir=args.data_dir, metric=args.metric, batch_tokens=args.batch_tokens,
                share_prefix=args.share_prefix, progress=progress, threads=args.threads, log_json=args.log_json,
                metrics_cache=args.metrics_cache)


def _run(args) -> int:
    from . import pipeline
    progress = not args.quiet
    if args.command == "adapt" and args.resume:
        cfg = pipeline.resume_config(args.resume, progress=progress, threads=args.threads, log_json=args.log_json,
                                     metrics_cache=args.metrics_cache)
        rep = pipeline.adapt(cfg)
        _finish(rep, cfg.out, args.no_report)
    elif args.command == "adapt":
        from .models import MATRIX_TYPES
        missing = [f"--{k}" for k in ("model", "task", "out") if not getattr(args, k)]
        if missing:
            raise C2IError(f"adapt needs {', '.join(missing)} (or --resume DIR)")
        cfg = pipeline.AdaptConfig(
            **_run_config(args, progress), out=args.out, samples=args.samples, top_k=args.top_k,
            rank_fractions=args.rank_fractions, clusters=args.clusters, methods=args.methods,
            types=args.types or MATRIX_TYPES, max_evals=args.max_evals, compose=args.compose, loss=args.loss,
            score=args.score, resume=False, draws=args.draws, dtype=args.dtype, device=args.device,
            device_map=args.device_map, gradient_checkpointing=args.gradient_checkpointing, gate_p=args.gate_p,
            rule=args.rule, confirm_size=args.confirm_size, confirm_top=args.confirm_top, alpha=args.alpha,
            compare_rules=args.compare_rules, prune=args.prune, scan_svd=args.scan_svd,
            search_dtype=args.search_dtype, scan_cache=args.scan_cache)
        rep = pipeline.adapt(cfg)
        _finish(rep, cfg.out, args.no_report)
    elif args.command == "laser":
        cfg = pipeline.LaserConfig(
            **_run_config(args, progress), out=args.out, val_size=args.val_size,
            rank_fractions=args.rank_fractions, types=args.types, layers=args.layers, faithful=args.faithful,
            resume=args.resume, draw=args.draw, draws=args.draws, prune=args.prune)
        rep = pipeline.laser(cfg)
        _finish(rep, cfg.out, args.no_report)
    elif args.command == "eval":
        cfg = pipeline.EvalConfig(**_run_config(args, progress), plan=args.adapted, samples=args.samples,
                                  out=args.out)
        rep = pipeline.evaluate_model(cfg)
        print(json.dumps({k: rep[k] for k in rep if k in ("task", "n_test", "base", "adapted", "paired")}, indent=2,
                         default=str))
    elif args.command == "apply":
        from pathlib import Path
        from .artifacts import save_adapted
        from .models import load_model
        from .transform import Plan, factorize_
        plan_path = Path(args.plan)
        plan = Plan.load(plan_path / "plan.json" if plan_path.is_dir() else plan_path)
        lm = load_model(args.model)
        factorize_(lm.model, plan)
        save_adapted(lm.model, Plan(plan.edits, base_model=args.model, meta=plan.meta), args.out)
        print(f"wrote {args.out}")
    elif args.command == "report":
        from .report import load_report, render_report, summary_table
        print(summary_table(load_report(args.dir)[0]))
        print(f"wrote {render_report(args.dir, args.out)}")
    elif args.command == "export":
        from .artifacts import export_dense, load_adapted
        from .gguf_export import export_gguf, source_gguf
        from .models import load_model
        source = source_gguf(args.model) if args.format == "gguf" else None   # refuse a non-GGUF model early
        lm = load_model(args.model)
        load_adapted(lm.model, args.adapted)
        if source is not None:
            export_gguf(lm.model, source, args.out, dtype=args.gguf_type)
        else:
            export_dense(lm.model, args.out, tokenizer=lm.tokenizer)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
