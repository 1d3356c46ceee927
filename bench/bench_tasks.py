"""The results table: base model, LASER, paper-faithful C2I and c2i_fast on every task, in one harness.

Per task the four methods select on the same rows and are judged on the same held-out rows (seed 0, draw 0 of
1: ``c2i_fast.tasks.split``, whose confirmation rows come after the held-out ones and change neither):

- ``c2i_fast``: ``c2i adapt`` at its defaults (rule "confirm", max_evals 48);
- ``c2i``: C2I as the paper describes it: the gradient top-K, clustered candidates, every candidate evaluated
  (max_evals 0), the best on the selection rows applied if it beats the base (rule "paper");
- ``laser``: LASER's grid ({mlp_in, mlp_out} × layers × its 8 ρ), the best on the same selection rows
  (``--laser-layers``: a subset of layers, for big models; the cell says which), scored with exact pruning
  (a candidate's pass stops once it cannot be the best: the same pick, fewer row-passes);
- ``base``: the base model's held-out pass of the first of those runs (every run makes it on the same rows).

Each (model, task, method) cell is written atomically to ``<out>/<task>/<method>.json`` when it finishes (the
run's whole report.json beside it, in ``<task>/reports/``) and skipped when it exists, so a killed run resumes;
a run that finds every cell present loads no model. ``--skip-cell`` and ``--max-minutes`` write a cell with
``"skipped": reason`` instead (delete the file to run it after all). A cell's run works in
``<out>/<task>/.work/<method>/`` (small: its journal and config; commit it as it grows, so the next session's
checkout has it), which outlives a killed run: the next run resumes it from its journal (the candidates scored before are not scored again) and the cell then says so (``resumed``). The runs go c2i_fast, c2i, laser per task:
c2i_fast's measured seconds per layer-pass give the estimate ``--max-minutes`` compares with.

Small tasks: the split needs ``--samples`` selection rows and at least ``MIN_TEST`` held-out ones; a task with
fewer examples gets half for selection and half held out, and the held-out size is min(--test-size, what is
left). c2i_fast's confirmation rows are what remains after that (its rule falls back to the selection max-T
test below 50). Each cell records its sizes and why they were fitted.

    python bench/bench_tasks.py --model smollm2 --tasks all --out bench/results/tasks-smollm2
    python bench/bench_tasks.py --model qwen2.5-coder-1.5b --laser-layers 17-27 \
        --tasks fever,counterfact,truthfulqa,bigbench_epistemic_reasoning,bias_in_bios_gender \
        --out bench/results/tasks-qwen2.5-coder-1.5b
    python bench/bench_tasks.py --out bench/results/tasks-smollm2 --render      # the markdown table only
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from c2i_fast.io import atomic_write_text  # noqa: E402
from _common import git_commit, parse_layers  # noqa: E402
from render_tasks import METHODS, cell_path, render, wilson  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIN_TEST = 50                 # fewest held-out rows a task keeps before its selection sample is halved
WORK = ".work"          # <out>/<task>/.work/<method>/: a running cell's run folder, kept when killed (committed while it runs)
RUN_ORDER = ("c2i_fast", "c2i", "laser")      # c2i_fast first: the cheapest, and the others' time estimate
LASER_RHO = 8                 # LASER's ρ grid (LaserConfig's default rank_fractions)
C2I_KEEP_BEST = 3             # the c2i cell's pruning keeps this many best exact: the confirm rule's confirm_top


def parse_skips(specs: list[str], model: str) -> dict[tuple[str, str], str]:
    """``--skip-cell [MODEL:]TASK:METHOD=REASON`` → {(task, method): reason} of this model's cells. MODEL may be
    any prefix of --model ("qwen" for qwen2.5-coder-1.5b); without it the cell is this model's."""
    out = {}
    for spec in specs or []:
        key, sep, reason = spec.partition("=")
        parts = key.split(":")
        if not sep or not reason.strip() or len(parts) not in (2, 3) or parts[-1] not in METHODS:
            raise SystemExit(f"--skip-cell {spec!r}: write [MODEL:]TASK:METHOD=REASON, METHOD one of "
                             f"{', '.join(METHODS)}")
        if len(parts) == 3 and not model.startswith(parts[0]):
            continue
        out[(parts[-2], parts[-1])] = reason.strip()
    return out


def fit_sizes(n_examples: int, samples: int, test_size: int, min_test: int = MIN_TEST) -> dict:
    """Selection and held-out sizes for a task of ``n_examples``: ``samples`` and up to ``test_size`` held out,
    or, when fewer than ``min_test`` would be left for the held-out rows, half and half. ``fitted`` says why
    (None when the sizes are the requested ones)."""
    n_select = samples if n_examples - samples >= min_test else n_examples // 2
    n_test = min(test_size, n_examples - n_select)
    why = None
    if n_select < samples:
        why = (f"{n_examples} examples, too few for {samples} selection + {min_test} held-out rows: half for "
               f"selection, half held out")
    elif n_test < test_size:
        why = f"{n_examples} examples: {n_select} for selection leave {n_test} held-out rows (of {test_size} asked)"
    return {"examples": n_examples, "n_select": n_select, "n_test": n_test, "fitted": why}


def held_out(test: dict, which: str = "adapted") -> dict:
    """The numbers a cell keeps of one model on the held-out rows (``test``: a report's test block): accuracy
    with its Wilson interval, majority class, log-loss, and, for the adapted one, the paired test with the base
    and the answers changed."""
    m = test[which]
    n, acc = m["n"], m["accuracy"]
    out = {"n": n, "accuracy": acc, "accuracy_ci95": wilson(round(acc * n), n), "interval": "wilson",
           "majority": m.get("majority"), "log_loss": m.get("log_loss"), "base_accuracy": test["base"]["accuracy"],
           "paired": None, "changed": 0.0}
    if which == "adapted":
        out.update(paired=test.get("paired"), changed=test.get("changed"))
    return out


# Of a generation candidate's time, the share that runs every layer (mostly its greedy decode steps), while its
# teacher-forced pass and its prefill start at the candidate's layer (c2i_fast.replay): fitted to
# bench/results/generation-replay-smollm2.json, where replayed / whole = (1 − s)(n − ℓ)/n + s gives s = 0.39–0.45
# over its five layers (SmolLM2 HotpotQA, 100 rows, 15 new tokens).
DECODE_SHARE = 0.4


def estimates(rep: dict, laser_layers: tuple | None) -> dict:
    """Seconds the c2i and laser cells of a task would take, from c2i_fast's report on it: its seconds per
    search layer-pass times their layer-passes (every candidate of the same grid; LASER's 2 × 8 per layer), plus
    the phases they share. A candidate's layer-passes: from its layer up; on a generation task
    :data:`DECODE_SHARE` of them every layer (the decode steps). Rough: the cost per layer-pass varies with the
    layer's place and with pruning."""
    fp, t = rep["forward_passes"], rep["timings"]
    n_layers, passes = fp["layers"], fp["search_layer_passes"]
    if not passes:
        return {}
    generation = rep["task"]["kind"] == "generation"

    def depth(layer: int) -> float:
        return (1 - DECODE_SHARE) * (n_layers - layer) + DECODE_SHARE * n_layers if generation else n_layers - layer
    if generation:          # no pruning there: each candidate that ran a pass (not a twin's result) ran it all
        passes = sum(depth(c["layer"]) for c in rep["search"]["candidates"] if not c.get("same_as")) or passes
    per_pass = t["search"] / passes
    shared = t["total"] - t["search"] - t.get("confirm", 0.0) - t.get("test_compared", 0.0)
    c2i = shared + per_pass * sum(depth(c["layer"]) for c in rep["search"]["candidates"])
    layers = laser_layers if laser_layers is not None else range(n_layers)
    per_layer = max(1, len(rep.get("scan", {}).get("matrices") or []) // n_layers)
    svd = t.get("scan_svd", 0.0) * 2 / per_layer * len(layers) / n_layers
    held = t.get("test_base", 0.0) + t.get("test_adapted", 0.0)
    laser = (t.get("load", 0.0) + svd + held
             + per_pass * (n_layers + sum(2 * LASER_RHO * depth(layer) for layer in layers)))
    return {"c2i": round(c2i, 1), "laser": round(laser, 1), "seconds_per_layer_pass": per_pass}


RESUMED_NOTE = ("wall = this run + each earlier run up to its last journaled candidate; layer-passes: this run's "
                "only (journaled candidates were not rescored)")
RESUMED_UNTIMED = ("wall not known: an earlier run's journal lines carry no time (written before they did), so "
                   "its span is unknown; seconds_this_run is this run's alone. Layer-passes: this run's only")


def last_journaled(journal: Path, since: float) -> float | None:
    """When the last candidate journaled at or after ``since`` (epoch seconds) was scored, from the journal
    lines' ``"t"``; None when no such line has one. Not the file's time: a checkout rewrites that."""
    times = []
    if journal.is_file():
        for line in journal.read_text().splitlines():
            try:
                t = json.loads(line).get("t")
            except json.JSONDecodeError:
                continue                # a torn last line from a kill
            if isinstance(t, (int, float)) and t >= since:
                times.append(float(t))
    return max(times) if times else None


class Bench:
    """One model's cells in ``out``: what to run, the runs, the cells written."""

    def __init__(self, args, command: str):
        self.args, self.out, self.command = args, Path(args.out), command
        self.skips = parse_skips(args.skip_cell, args.model)
        self.failed: list[str] = []
        self._lm = None

    @property
    def lm(self):
        """The model, loaded on first use and shared by every cell (each run leaves it as it found it)."""
        if self._lm is None:
            from c2i_fast.models import load_model
            self._lm = load_model(self.args.model)
        return self._lm

    # -- provenance ------------------------------------------------------------------------------------------
    def provenance(self, versions: dict | None = None) -> dict:
        from c2i_fast.io import device_name, versions as current
        return {"device": device_name(), "threads": self.args.threads, "versions": versions or current(),
                "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": self.command}

    def settings(self) -> dict:
        a = self.args
        return {"samples": a.samples, "test_size": a.test_size, "confirm_size": a.confirm_size, "top_k": a.top_k,
                "max_evals": a.max_evals, "seed": a.seed, "rank_fractions": a.rank_fractions,
                "clusters": a.clusters, "methods": a.methods, "laser_layers": a.laser_layers}

    def write(self, task: str, method: str, cell: dict, report: dict | None = None) -> dict:
        cell = {"model": self.args.model, "task": task, "method": method, **cell}
        if report is not None:       # the whole run first: a cell on disk always has its report beside it
            atomic_write_text(self.out / task / "reports" / f"{method}.json",
                              json.dumps(report, indent=2, default=str) + "\n")
        atomic_write_text(cell_path(self.out, task, method), json.dumps(cell, indent=2, default=str) + "\n")
        print(f"[bench_tasks] wrote {task}/{method}"
              + (f" (skipped: {cell['skipped']})" if cell.get("skipped") else ""), file=sys.stderr, flush=True)
        return cell

    def skip(self, task: str, method: str, reason: str) -> dict:
        return self.write(task, method, {"skipped": reason, "settings": self.settings(),
                                         "provenance": {"commit": git_commit(), "command": self.command,
                                                        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}})

    # -- one task --------------------------------------------------------------------------------------------
    def run_task(self, task: str) -> None:
        todo = [m for m in self.args.cells if not cell_path(self.out, task, m).is_file()]
        if not todo:
            return
        for m in [m for m in todo if (task, m) in self.skips]:
            self.skip(task, m, self.skips[(task, m)])
        todo = [m for m in todo if (task, m) not in self.skips]
        if not todo:
            return
        from c2i_fast.tasks import load_task
        sizes = fit_sizes(len(load_task(task, self.args.data_dir).examples), self.args.samples,
                          self.args.test_size)
        for method in [m for m in RUN_ORDER if m in todo]:
            reason = self.too_slow(task, method)
            if reason:
                self.skip(task, method, reason)
                continue
            print(f"[bench_tasks] {self.args.model} {task} {method}", file=sys.stderr, flush=True)
            try:
                cell, report = self.run_method(task, method, sizes)
            except Exception:            # one failed cell must not cost the others: no file, a rerun retries
                traceback.print_exc()
                self.failed.append(f"{task}/{method}")
                continue
            if "base" in todo and not cell_path(self.out, task, "base").is_file():
                self.write(task, "base", self.base_cell(cell, method))
            self.write(task, method, cell, report)
            shutil.rmtree(self.out / task / WORK / method, ignore_errors=True)
            if (self.out / task / WORK).is_dir() and not any((self.out / task / WORK).iterdir()):
                (self.out / task / WORK).rmdir()
        failed = any(f.startswith(f"{task}/") for f in self.failed)
        if "base" in todo and not cell_path(self.out, task, "base").is_file():
            self.base_alone(task, sizes, own_pass=not failed)      # a failed method's rerun makes it anyway

    def too_slow(self, task: str, method: str) -> str | None:
        """A reason to skip ``method`` when c2i_fast's cell estimates it above --max-minutes."""
        limit = self.args.max_minutes
        path = cell_path(self.out, task, "c2i_fast")
        if limit is None or method == "c2i_fast" or not path.is_file():
            return None
        est = json.loads(path.read_text()).get("estimates") or {}
        if est.get(method) is None or est[method] <= 60 * limit:
            return None
        return (f"estimated {est[method] / 60:.0f} min > --max-minutes {limit:g} (from c2i_fast's "
                f"{est['seconds_per_layer_pass']:.3g} s per layer-pass on this task)")

    def attempts(self, task: str, method: str, plan: dict) -> tuple[Path, list[dict]]:
        """The cell's work folder and its earlier attempts (each ``{"start", "last_progress"}``, epoch seconds).
        A killed cell's run resumes from its journal (``adapt``/``laser`` ``resume``: candidates scored before
        are not scored again) when the folder was made for the same run (``plan``); otherwise it starts over."""
        work = self.out / task / WORK / method
        cell = work / "cell.json"
        if work.exists() and not (cell.is_file() and json.loads(cell.read_text()) == plan):
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cell, json.dumps(plan, indent=2, default=str) + "\n")
        log, journal = work / "attempts.jsonl", work / "run" / "journal.jsonl"
        earlier = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        if earlier and "last_progress" not in earlier[-1]:  # the last attempt's span ends at its last journal line
            earlier[-1]["last_progress"] = last_journaled(journal, since=earlier[-1]["start"])
        now = {"start": time.time(), "commit": git_commit()}
        atomic_write_text(log, "".join(json.dumps(e) + "\n" for e in [*earlier, now]))
        return work, earlier

    def run_method(self, task: str, method: str, sizes: dict) -> tuple[dict, dict]:
        from c2i_fast.pipeline import AdaptConfig, LaserConfig, adapt, laser
        a = self.args
        common = dict(model=a.model, task=task, test_size=sizes["n_test"], seed=a.seed, data_dir=a.data_dir,
                      threads=a.threads, progress=not a.quiet)
        plan = {"method": method, "sizes": sizes, "settings": self.settings(), "model": a.model, "task": task}
        if method == "c2i_fast":      # a run killed under another default loss (before `--loss auto`) is not resumed
            plan["loss"] = AdaptConfig.loss
        work, earlier = self.attempts(task, method, plan)
        common["resume"] = (work / "run" / "journal.jsonl").is_file()
        # a first run pays (and stores) its scan, so cells on the same rows are timed alike; a resumed one reads it
        scan_cache = "on" if common["resume"] else "write"
        if not common["resume"]:
            shutil.rmtree(work / "run", ignore_errors=True)     # killed before its first candidate: start over
        # None when an earlier run's end is not known (a journal written before lines carried their time)
        spans = [None if e.get("last_progress") is None else max(0.0, e["last_progress"] - e["start"])
                 for e in earlier]
        spent_before = None if None in spans else sum(spans)
        # no cleanup on failure: the work folder stays, and the next run resumes from its journal
        t0 = time.perf_counter()
        if method == "laser":
            layers = parse_layers(a.laser_layers)
            # exact pruning: LASER's pick (accuracy, ties by log-loss) with fewer row-passes
            rep = laser(LaserConfig(out=str(work / "run"), val_size=sizes["n_select"], layers=layers, draw=0,
                                    draws=1, prune="exact", **common), lm=self.lm)
            shipped, reason = bool(rep["plan"]), (
                f"LASER grid: layers {a.laser_layers or 'all'} × {{mlp_in, mlp_out}} × "
                f"{len(rep['config']['rank_fractions'])} ρ, best on the {rep['task']['n_val']} selection rows "
                f"(scored with exact pruning: {rep['search'].get('pruned', 0)} candidates stopped once they "
                f"could not be the best; the same pick as scoring every row)")
            extra = {"laser_layers": a.laser_layers or "all", "prune": rep["search"].get("prune", "off")}
        else:
            grid = dict(samples=sizes["n_select"], top_k=a.top_k, rank_fractions=tuple(a.rank_fractions),
                        clusters=tuple(a.clusters), methods=tuple(a.methods), confirm_size=a.confirm_size)
            # c2i's pruning keeps the best three exact (not only its pick): its ranking of every candidate is
            # then also the confirm rule's, which bench/bench_exhaustive.py reads
            # c2i ranks by the answer loss as the paper does; c2i_fast by its default (auto: choice on classification)
            rule = dict(rule="paper", max_evals=0, keep_best=C2I_KEEP_BEST, loss="answer") if method == "c2i" else dict(
                rule="confirm", max_evals=a.max_evals)
            rep = adapt(AdaptConfig(out=str(work / "run"), draws=1, scan_cache=scan_cache, **grid, **rule, **common),
                        lm=self.lm)
            shipped, reason = rep["decision"]["shipped"], rep["decision"]["reason"]
            extra = {"rule": rule["rule"], "max_evals": rule["max_evals"], "loss": rep["scan"]["loss_kind"]}
            if method == "c2i_fast":
                extra["estimates"] = estimates(rep, parse_layers(a.laser_layers))
        seconds = time.perf_counter() - t0
        fp, sr = rep["forward_passes"], rep["search"]
        if earlier:
            extra["resumed"] = {"attempts": len(earlier) + 1, "seconds_this_run": round(seconds, 1),
                                "seconds_earlier": None if spent_before is None else round(spent_before, 1),
                                "note": RESUMED_NOTE if spent_before is not None else RESUMED_UNTIMED}
            seconds = None if spent_before is None else seconds + spent_before
        cell = {"sizes": {**sizes, "n_select": rep["task"].get("n_select", rep["task"].get("n_val")),
                          "n_test": rep["task"]["n_test"], "n_confirm": rep["task"].get("n_confirm")},
                "held_out": held_out(rep["test"]), "base_held_out": held_out(rep["test"], "base"),
                "plan": rep["plan"], "shipped": shipped, "reason": reason,
                "seconds": None if seconds is None else round(seconds, 1),
                "layer_passes": fp["search_layer_passes"], "layers": fp["layers"],
                "n_candidates": sr["n_candidates"], "n_evaluated": sr["n_evaluated"], "timings": rep["timings"],
                **extra, "settings": self.settings(), "provenance": self.provenance(rep.get("versions"))}
        return cell, rep

    def base_cell(self, cell: dict, source: str) -> dict:
        """The base model's cell from a method cell's held-out base pass (same rows for every method)."""
        return {"sizes": cell["sizes"], "held_out": cell["base_held_out"], "plan": [], "shipped": False,
                "reason": f"the base model: the held-out base pass of the {source} run",
                "seconds": (cell.get("timings") or {}).get("test_base"), "layer_passes": 0,
                "layers": cell.get("layers"), "source": source, "settings": cell["settings"],
                "provenance": cell["provenance"]}

    def base_alone(self, task: str, sizes: dict, own_pass: bool = True) -> None:
        """The base cell when this invocation ran no method: from a method cell on disk, else (``own_pass``) a
        held-out pass of its own."""
        for m in RUN_ORDER:
            p = cell_path(self.out, task, m)
            cell = json.loads(p.read_text()) if p.is_file() else {}
            if cell.get("base_held_out"):
                self.write(task, "base", self.base_cell(cell, m))
                return
        if not own_pass:
            return
        a = self.args
        t0 = time.perf_counter()
        try:    # split(task, samples, test_size, seed): draw 0 of 1, the held-out rows of every method
            from c2i_fast.pipeline import EvalConfig, evaluate_model
            rep = evaluate_model(EvalConfig(model=a.model, task=task, samples=sizes["n_select"],
                                            test_size=sizes["n_test"], seed=a.seed, data_dir=a.data_dir,
                                            threads=a.threads, progress=not a.quiet), lm=self.lm)
        except Exception:
            traceback.print_exc()
            self.failed.append(f"{task}/base")
            return
        test = {"base": rep["base"], "adapted": rep["base"]}
        self.write(task, "base", {
            "sizes": {**sizes, "n_test": rep["n_test"]}, "held_out": held_out(test, "base"), "plan": [],
            "shipped": False, "reason": "the base model: its own held-out pass (no method cell to take it from)",
            "seconds": round(time.perf_counter() - t0, 1), "layer_passes": 0, "source": "eval",
            "settings": self.settings(), "provenance": self.provenance(rep.get("versions"))})


def write_meta(args, out: Path, command: str, tasks: list[str]) -> bool:
    """meta.json: model, planned tasks and methods (the union over runs), settings, one entry per run. False
    (nothing written) when the folder's cells were made with other settings."""
    settings = Bench(args, command).settings()
    meta = {"model": args.model, "tasks": tasks, "methods": list(args.cells), "settings": settings, "runs": []}
    path = out / "meta.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("settings") != settings or old.get("model") != args.model:
            print(f"bench_tasks: {out} holds cells of {old.get('model')} with other settings "
                  f"({old.get('settings')}); use another --out", file=sys.stderr)
            return False
        meta["tasks"] = list(dict.fromkeys(old.get("tasks", []) + tasks))
        meta["methods"] = [m for m in METHODS if m in set(old.get("methods", [])) | set(args.cells)]
        meta["runs"] = old.get("runs", [])
    meta["runs"].append({"command": command, "commit": git_commit(), "threads": args.threads,
                         "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")
    return True


def all_tasks(data_dir: str | None) -> list[str]:
    from c2i_fast.tasks import data_dir as find
    return list(json.loads((Path(find(data_dir)) / "manifest.json").read_text()))


def fill_defaults(args) -> None:
    """The grid options left unset take AdaptConfig's defaults (the c2i_fast defaults the table reports)."""
    from c2i_fast.config import AdaptConfig
    d = AdaptConfig(model="", task="", out="")
    for name in ("samples", "test_size", "confirm_size", "top_k", "max_evals"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(d, name))
    for name in ("rank_fractions", "clusters", "methods"):
        if getattr(args, name) is None:
            setattr(args, name, list(getattr(d, name)))


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",")]


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", help="comma-separated task names, or 'all' (every task of the data manifest)")
    ap.add_argument("--cells", default=",".join(METHODS), help=f"which methods (default: {','.join(METHODS)})")
    ap.add_argument("--out", required=True, help="folder of cell JSONs (created), e.g. bench/results/tasks-smollm2")
    # None: AdaptConfig's default, filled in after --render (which imports no torch)
    ap.add_argument("--samples", type=int, help="selection rows (default 100)")
    ap.add_argument("--test-size", type=int, help="held-out rows (default 500)")
    ap.add_argument("--confirm-size", type=int, help="c2i_fast's confirmation rows (default 200)")
    ap.add_argument("--top-k", type=int, help="c2i and c2i_fast (default 5)")
    ap.add_argument("--max-evals", type=int, help="c2i_fast only (c2i evaluates every candidate; default 48)")
    ap.add_argument("--rank-fractions", type=floats, help="c2i and c2i_fast's ρ grid (LASER keeps its 8)")
    ap.add_argument("--clusters", type=ints, help="c2i and c2i_fast's cluster counts (default 1,2,4,8)")
    ap.add_argument("--methods", type=lambda s: s.split(","),
                    help="c2i and c2i_fast's decomposition methods (default block,kmeans,projective)")
    ap.add_argument("--laser-layers", help="LASER on these layers only, e.g. 17-27 (default: every layer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", help="task data folder (default: $C2I_DATA)")
    ap.add_argument("--skip-cell", action="append", default=[], metavar="[MODEL:]TASK:METHOD=REASON",
                    help="write this cell as skipped with REASON (repeatable)")
    ap.add_argument("--max-minutes", type=float, help="skip a c2i or laser cell that c2i_fast's run on the task "
                    "estimates above this many minutes")
    ap.add_argument("--render", action="store_true", help="only print the markdown table of --out (with --tasks: "
                    "every planned cell, 'not run yet' where no file is)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.cells = [m for m in METHODS if m in args.cells.split(",")]
    out = Path(args.out)
    tasks = (all_tasks(args.data_dir) if args.tasks == "all" else args.tasks.split(",")) if args.tasks else []
    if args.render:
        planned = {"model": args.model, "tasks": tasks, "methods": args.cells} if tasks else None
        print(render(out, planned))
        return 0
    if not tasks:
        ap.error("--tasks is required (or --render)")
    fill_defaults(args)
    command = "python bench/bench_tasks.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.mkdir(parents=True, exist_ok=True)
    if not write_meta(args, out, command, tasks):
        return 2
    bench = Bench(args, command)
    from c2i_fast.svd import remembered_svds
    with remembered_svds():       # c2i_fast, c2i and LASER factor the same weights: one SVD each per run
        for task in tasks:
            bench.run_task(task)
    print(render(out))
    if bench.failed:
        print(f"bench_tasks: failed (no cell written, a rerun retries): {', '.join(bench.failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
