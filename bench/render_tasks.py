"""The results table of ``bench/bench_tasks.py``: its cell folders → the markdown of docs/results.md.

One table per folder (one model), a row per (task, method) cell, then the command(s) and the provenance
(device, threads, versions, commits, dates) the cells record. A cell is ``<folder>/<task>/<method>.json``; a
planned cell without a file (meta.json's tasks × methods) reads "not run yet", a skipped one its reason.

    python bench/render_tasks.py bench/results/tasks-smollm2 bench/results/tasks-qwen2.5-coder-1.5b
    python bench/render_tasks.py bench/results/tasks-smollm2 bench/results/tasks-qwen2.5-coder-1.5b \
        --into docs/results.md        # the tables in place, between their '<!-- render_tasks: … -->' markers
    python bench/render_tasks.py bench/results/tasks-smollm2 --list-cells   # each cell's time and command

Columns, all on the same held-out rows per task: accuracy with its 95% Wilson score interval; the majority-class
rate on those rows; the paired difference with the base model (Δ, its normal 95% interval from the per-example
differences, fixed / broken = examples the method's plan gets right that the base got wrong / the reverse, the
exact two-sided McNemar p); the fraction of answers the plan changes; log-loss; the plan; the method's wall
time; its search cost in layer-passes (one pass of one transformer layer over the selection rows). No torch.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from c2i_fast.report import edit_text, fmt_pct, fmt_pts, fmt_seconds, num
from c2i_fast.tasks import TASKS

METHODS = ("base", "laser", "c2i", "c2i_fast")
META = "meta.json"
Z95 = 1.959963984540054
NOT_RUN = "not run yet"
HEADER = ("| task | method | rows sel. / test | accuracy [95% Wilson] | majority class | Δ vs base [95%] | "
          "fixed / broken | McNemar p | answers changed | log-loss | plan | wall | layer-passes |")
LEGEND = ("Accuracy: 95% Wilson score interval. Δ: paired difference with the base on the same rows, normal 95% "
          "interval; McNemar p: exact, two-sided. Wall: the method's whole run (scan, search, confirmation, held-out "
          "passes; base: its held-out pass), after the one model load a bench run shares between its cells; a "
          "base-model pass made before on the same rows (by another cell or an earlier run) is read from the "
          "metrics cache. Layer-passes: the search's, one transformer layer over the selection "
          "rows (the confirmation and held-out passes are not counted).")
RULE = "|" + "---|" * HEADER.count(" | ") + "---|"


def wilson(correct: int, n: int, z: float = Z95) -> list[float] | None:
    """Wilson score interval of a proportion correct / n (95% at the default z); None for n = 0.
    Unlike the normal interval it stays inside [0, 1] and is sound near 0 and 1 and at small n."""
    if n <= 0:
        return None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def cell_path(folder: Path, task: str, method: str) -> Path:
    return Path(folder) / task / f"{method}.json"


def read_cells(folder: Path) -> dict[tuple[str, str], dict]:
    """{(task, method): cell} of every cell file in ``folder``."""
    out = {}
    for f in sorted(Path(folder).glob("*/*.json")):
        if f.stem in METHODS:
            cell = json.loads(f.read_text())
            out[(cell.get("task", f.parent.name), cell.get("method", f.stem))] = cell
    return out


def _pct_interval(ci) -> str:
    lo, hi = (list(ci or []) + [None, None])[:2]
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]" if num(lo) is not None and num(hi) is not None else ""


def _pts_interval(ci) -> str:
    lo, hi = (list(ci or []) + [None, None])[:2]
    return f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" if num(lo) is not None and num(hi) is not None else ""


def _p(x) -> str:
    v = num(x)
    return "—" if v is None else (f"{v:.2g}" if v < 0.1 else f"{v:.2f}")     # 0.036, 0.0012, 0.50


def _plan(cell: dict) -> str:
    if cell["method"] == "base":
        return "(the base model)"
    edits = cell.get("plan") or []
    text = "; ".join(edit_text(e) for e in edits) if edits else "none: base kept"
    return text.replace("|", "/")


def _sizes(cell: dict) -> str:
    s = cell.get("sizes") or {}
    text = f"{s.get('n_select', '?')} / {s.get('n_test', '?')}"
    return text + ("\\*" if s.get("fitted") else "")


def row(cell: dict) -> str:
    """One markdown table row of a cell (a skipped cell: its reason)."""
    task, method = cell["task"], cell["method"]
    if cell.get("skipped"):
        reason = str(cell["skipped"]).replace("|", "/")
        return f"| {task} | {method} | — | skipped: {reason} |" + " — |" * 9
    h = cell["held_out"]
    pd = h.get("paired")
    acc = f"{fmt_pct(h['accuracy'])} {_pct_interval(h.get('accuracy_ci95'))}".strip()
    maj = h.get("majority") or {}
    majority = fmt_pct(maj.get("accuracy")) + (f" ({maj['label']})" if maj.get("label") is not None else "")
    if pd is None:
        delta = fixed = p = "—"
    else:
        delta = f"{fmt_pts(pd['difference'])} {_pts_interval(pd.get('ci95'))}".strip()
        fixed = f"{pd['fixed']} / {pd['broken']}"
        p = _p(pd.get("p_two_sided"))
    changed = "—" if method == "base" else fmt_pct(h.get("changed"))
    loss = num(h.get("log_loss"))
    passes = cell.get("layer_passes")
    # a cell resumed after a kill: its wall sums the runs, its layer-passes are the last run's only
    resumed, wall = "", fmt_seconds(cell.get("seconds"))
    if cell.get("resumed"):
        r = cell["resumed"]
        resumed = f" (resumed, {r['attempts']} runs)"
        if cell.get("seconds") is None:   # an earlier run's span is not known: this run's time, a lower bound
            wall = f"≥ {fmt_seconds(r['seconds_this_run'])}"
            resumed = f" (this run of {r['attempts']}; earlier not timed)"
    cols = [task, method, _sizes(cell), acc, majority.replace("|", "/"), delta, fixed, p, changed,
            "—" if loss is None else f"{loss:.3f}", _plan(cell), wall + resumed,
            "—" if passes is None else f"{passes:,.0f}" + (" (last run)" if resumed else "")]
    return "| " + " | ".join(cols) + " |"


def planned(meta: dict, cells: dict) -> list[tuple[str, str]]:
    """(task, method) in table order: the planned tasks (meta.json) then any other task with a cell; methods in
    METHODS order."""
    tasks = list(meta.get("tasks") or [])
    tasks += sorted({t for t, _ in cells} - set(tasks))
    methods = [m for m in METHODS if m in (meta.get("methods") or METHODS) or any(k[1] == m for k in cells)]
    return [(t, m) for t in tasks for m in methods]


def coverage(meta: dict, cells: dict) -> str:
    """One line: how many of the planned cells hold a measurement, say why they were skipped, or are not run."""
    plan = planned(meta, cells)
    measured = sum(1 for k in plan if k in cells and not cells[k].get("skipped"))
    skipped = sum(1 for k in plan if k in cells and cells[k].get("skipped"))
    return (f"Cells: {measured} measured, {skipped} skipped with their reason, {len(plan) - measured - skipped} "
            f"not run yet, of {len(plan)}.")


def notes(meta: dict, cells: dict) -> list[str]:
    """What sits under a table: fitted split sizes, base-accuracy mismatches, the commands and provenance."""
    out = []
    fitted = sorted({(c["task"], c["sizes"]["fitted"]) for c in cells.values()
                     if not c.get("skipped") and (c.get("sizes") or {}).get("fitted")})
    for task, why in fitted:
        out.append(f"\\* {task}: {why}")
    base = {t: c for (t, m), c in cells.items() if m == "base" and not c.get("skipped")}
    for (t, m), c in sorted(cells.items()):
        b = c.get("held_out", {}).get("base_accuracy") if not c.get("skipped") else None
        if t in base and b is not None and abs(b - base[t]["held_out"]["accuracy"]) > 1e-9:
            out.append(f"**Warning**: {t}/{m} measured the base at {fmt_pct(b)} on its held-out rows, the base "
                       f"cell {fmt_pct(base[t]['held_out']['accuracy'])}: not the same rows.")
    # c2i_fast's cells are its defaults: one whose scan ranked by another loss than today's default resolves to on
    # its task is stale (cells written before `--loss auto`, commit 819ec2f, carry no "loss": they ranked by the answer)
    from c2i_fast.pipeline import AdaptConfig, scan_loss
    stale = sorted(t for (t, m), c in cells.items() if m == "c2i_fast" and not c.get("skipped") and t in TASKS
                   and c.get("loss", "answer") != scan_loss(AdaptConfig.loss, TASKS[t].kind))
    if stale:
        out.append(f"c2i_fast cells whose scan ranked by another loss than today's default (`--loss "
                   f"{AdaptConfig.loss}`: the choice loss on classification), to be rerun: " + ", ".join(stale) + ".")
    for c in sorted({c["laser_layers"] for c in cells.values() if c.get("laser_layers")}):
        out.append(f"LASER cells: layers {c} only (their `laser_layers`).")
    runs = meta.get("runs") or []
    commands = list(dict.fromkeys(r["command"] for r in runs if r.get("command")))
    if commands:
        out.append("Command" + ("s" if len(commands) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in commands))
    prov = [c.get("provenance") or {} for c in cells.values()]
    devices = sorted({f"{p['device']} ({p.get('threads')} thread{'' if p.get('threads') == 1 else 's'})"
                      for p in prov if p.get("device")})
    vers = sorted({", ".join(f"{k} {v}" for k, v in p["versions"].items() if k != "platform")
                   for p in prov if p.get("versions")})
    commits = sorted({p["commit"] for p in prov if p.get("commit")})
    dates = sorted(p["date"] for p in prov if p.get("date"))
    if devices:
        out.append("Device: " + "; ".join(devices) + ".")
    if vers:
        out.append("Versions: " + "; ".join(vers) + ".")
    if commits:
        out.append("Commit" + ("s" if len(commits) > 1 else "") + ": " + ", ".join(commits) + ".")
    if dates:
        out.append(f"Cells finished {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "") + ".")
    return out


def render(folder: Path, meta: dict | None = None) -> str:
    """The markdown of one folder: a heading, the table (every planned cell), the notes. ``meta`` (model,
    tasks, methods) overrides the folder's meta.json, e.g. to show planned cells of a folder not made yet."""
    folder = Path(folder)
    stored = json.loads((folder / META).read_text()) if (folder / META).is_file() else {}
    meta = {**stored, **(meta or {})}
    cells = read_cells(folder) if folder.is_dir() else {}
    model = meta.get("model") or next((c.get("model") for c in cells.values()), folder.name)
    s = meta.get("settings") or {}
    lines = [f"### {model}", "",
             f"Seed {s.get('seed', 0)}, draw 0 of 1: every method selects on the same {s.get('samples', 100)} rows "
             f"and is judged on the same held-out rows (up to {s.get('test_size', 500)}) per task. " + LEGEND, "",
             HEADER, RULE]
    for task, method in planned(meta, cells):
        cell = cells.get((task, method))
        lines.append(row(cell) if cell is not None else f"| {task} | {method} | — | {NOT_RUN} |" + " — |" * 9)
    lines.append("")
    lines += [n + "  " for n in [coverage(meta, cells)] + notes(meta, cells)]
    return "\n".join(lines).rstrip() + "\n"


def cell_lines(folder: Path) -> list[str]:
    """One line per cell file: what it is, its wall time (or why it was skipped), commit, date and the command
    that wrote it — the per-cell list a closing note gives."""
    lines = []
    for (task, method), cell in sorted(read_cells(folder).items()):
        prov = cell.get("provenance") or {}
        if cell.get("skipped"):
            what = f"skipped: {cell['skipped']}"
        else:
            what = row(cell).split(" | ")[-2]          # the table's wall column, resumed runs said as there
        cmd = prov.get("command") or "command not recorded"
        lines.append(f"- {cell.get('model', folder.name)} · {task} · {method}: {what} · "
                     f"{prov.get('commit', '?')} · {prov.get('date', '?')} · `{cmd}`")
    return lines


def fill(doc: str, folder: str, table: str) -> str:
    """``doc`` with the text between ``<!-- render_tasks: FOLDER -->`` and the next ``<!-- /render_tasks -->``
    replaced by ``table`` (its "### model" heading dropped: the document has its own)."""
    start, end = f"<!-- render_tasks: {folder} -->\n", "<!-- /render_tasks -->"
    i = doc.find(start)
    j = doc.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise SystemExit(f"render_tasks: no '{start.strip()}' … '{end}' block in the document")
    body = table.split("\n", 2)[2] if table.startswith("### ") else table
    return doc[:i + len(start)] + body.rstrip("\n") + "\n" + doc[j:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="bench_tasks.py --out folders (one model each)")
    ap.add_argument("--into", metavar="DOC", help="write each table into DOC between its '<!-- render_tasks: "
                    "FOLDER -->' and '<!-- /render_tasks -->' lines (FOLDER as given here) instead of printing")
    ap.add_argument("--list-cells", action="store_true",
                    help="print one line per cell (wall time, commit, date, command) instead of the tables")
    args = ap.parse_args(argv)
    if args.list_cells:
        print("\n".join(line for f in args.folders for line in cell_lines(Path(f))))
        return 0
    tables = {f: render(Path(f)) for f in args.folders}
    if args.into is None:
        print("\n".join(tables.values()))
        return 0
    doc = Path(args.into).read_text()
    for folder, table in tables.items():
        doc = fill(doc, folder, table)
    tmp = Path(args.into + ".tmp")
    tmp.write_text(doc)
    tmp.replace(args.into)              # all tables or none: a missing block fails before anything is written
    return 0


if __name__ == "__main__":
    sys.exit(main())
