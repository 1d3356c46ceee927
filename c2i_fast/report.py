"""Turn a run's ``report.json`` into something people read: one self-contained HTML page and a terminal table.

``render_report(run_dir)`` reads ``<run_dir>/report.json`` (written by ``c2i adapt`` or ``c2i laser``:
:func:`c2i_fast.pipeline.build_report`, schema :data:`SCHEMA`) and writes ``<run_dir>/report/``::

    index.html                  every table, and every figure embedded as a base64 PNG (one file to mail)
    scan_heatmap.png …          the figures of c2i_fast.figures (matplotlib, imported only to draw them)

Reading goes through :func:`normalise`: it takes a report of any schema up to :data:`SCHEMA` (a report
without the ``schema`` key is from before it existed, or hand-made, or ``c2i eval --out``) to the layout
of :data:`SCHEMA` with every section present, so the renderers index it directly. A section the report
lacks (no scan in a LASER report, no evaluated candidate, …) is empty, and its figure and table are left out;
a hand-made report with only ``test`` renders. A report with a newer schema is refused with one clear error.

Every file is written atomically (temp file, then ``os.replace``), ``index.html`` last.
``summary_table(report)`` is the same headline as plain text for the end of ``c2i adapt``. Nothing here
imports torch.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from .errors import C2IError
from .io import atomic_write_bytes
from .report_data import (FIGURES, PHASES, REPORT, SCHEMA, TYPE_ORDER, candidate_key, dicts,  # noqa: F401
                          edit_text, evaluated, fmt_bytes, fmt_count, fmt_float, fmt_pct, fmt_pts, fmt_seconds,
                          load_report, loss_key, normalise, num, plan_keys, ranked, short_name)
# (REPORT, SCHEMA, TYPE_ORDER, loss_key, short_name: part of this module's API as before the split)


def _headline(report: dict) -> list[str]:
    """The sentences a reader wants first: held-out gain, and how it compares with the majority class."""
    base, adapted, pair = report["test"]["base"], report["test"]["adapted"], report["test"]["paired"]
    if base is None or adapted is None:
        return []
    a0, a1 = num(base.get("accuracy")), num(adapted.get("accuracy"))
    n = num(adapted.get("n"))
    out = []
    dec = report["decision"]
    if dec is not None and dec.get("reason"):
        out.append(f"Rule {dec.get('rule')!r}: {dec['reason']}.")
    out += [f"Held-out accuracy {fmt_pct(a0)} → {fmt_pct(a1)}"
           + (f" ({fmt_pts(a1 - a0)})" if a0 is not None and a1 is not None else "")
           + (f" on {adapted['n']} examples" if n else "") + "."]
    if a1 is not None and n and n >= 1 and pair is None:     # the paired line says it better
        se = 100 * math.sqrt(max(a1 * (1 - a1), 1e-12) / n)
        out[-1] += f" One standard error of an accuracy at this n is ±{se:.1f} pts."
    changed = report["test"]["changed"]
    if changed is not None and report["plan"]:
        out[-1] += f" The plan changes {fmt_pct(changed)} of the held-out answers."
    if pair is not None and num(pair.get("difference")) is not None and (pair.get("fixed") or pair.get("broken")):
        lo, hi = (list(pair.get("ci95") or []) + [None, None])[:2]
        s = (f"Paired on the same examples: {pair.get('fixed')} fixed, {pair.get('broken')} broken, "
             f"difference {fmt_pts(pair['difference'])}")
        if num(lo) is not None and num(hi) is not None:
            s += f" (95% interval {fmt_pts(lo)} to {fmt_pts(hi)})"
        if num(pair.get("p_two_sided")) is not None:
            s += f", exact McNemar p = {num(pair['p_two_sided']):.2g} (two-sided)"
        out.append(s + ".")
    maj = num(adapted["majority"].get("accuracy"))
    if maj is not None:
        label = adapted["majority"].get("label")
        if isinstance(label, str) and label.startswith("position "):       # choices differ per row
            s = f"Always answering the choice at {label} scores {fmt_pct(maj)}"
        else:
            s = f"Always answering {label!r} scores {fmt_pct(maj)}" if label is not None else \
                f"The majority class scores {fmt_pct(maj)}"
        if num(adapted["majority"].get("chance")) is not None:
            s += f" (chance {fmt_pct(adapted['majority']['chance'])})"
        if a1 is not None and a1 <= maj + 1e-12:
            s += " — the adapted model does not beat it"
        out.append(s + ".")
    sig = report["search"]["significance"]
    if sig is not None and num(sig.get("p_max")) is not None:
        p, j = num(sig["p_max"]), sig.get("candidates", "?")
        s = (f"Selection gain {sig.get('gain', 0):+d} of {sig.get('n', '?')} examples ({sig.get('wins', '?')} "
             f"fixed, {sig.get('losses', '?')} broken): p = {p:.2g} that the best of {j} candidates with no "
             f"effect gains as much (max-T sign-flip test; uncorrected McNemar p = "
             f"{num(sig.get('p_single')) or 0:.2g})")
        if sig.get("gated"):
            s += f"; above --gate-p {sig.get('gate_p')}, so the base model was kept"
        elif p > 0.05 and sig.get("gain", 0) > 0:
            s += f" — no more than picking the best of {j} gives by chance"
        out.append(s + ".")
    s_sum, s_mean = num(adapted.get("accuracy_sum")), num(adapted.get("accuracy_mean"))
    if s_sum is not None and s_mean is not None and abs(s_sum - s_mean) >= 0.05:
        out.append(f"Summed and length-normalised scoring disagree by {fmt_pts(s_mean - s_sum)[1:]} "
                   f"({fmt_pct(s_sum)} vs {fmt_pct(s_mean)}): the gain may be a label-length effect.")
    d = report["draws"]
    if d is not None and num(d.get("mean")) is not None:
        out.append(f"Over {d.get('n', '?')} disjoint selection draws: {fmt_pct(d['mean'])} ± "
                   f"{fmt_pts(d.get('std'))[1:]} (min {fmt_pct(d.get('min'))}, max {fmt_pct(d.get('max'))}).")
    return out


# ---------------------------------------------------------------------------------------------------------
# terminal
# ---------------------------------------------------------------------------------------------------------
def summary_table(report: dict) -> str:
    """Plain-text summary for the end of ``c2i adapt``/``laser``: task, plan, metrics table, size, time."""
    if not isinstance(report, dict):
        return ""
    report = normalise(report)
    task, model, plan = report["task"], report["config"].get("model"), report["plan"]
    head = [str(task["name"] or "?") + (f" ({task['kind']})" if task["kind"] else "")]
    if model:
        head.append(f"model {model}")
    lines = [" · ".join(head),
             "plan: " + ("; ".join(edit_text(e) for e in plan) if plan else
                         ("none beat the base model" if plan is not None else "—"))]
    cols = [("accuracy", "acc"), ("accuracy_sum", "acc sum"), ("accuracy_mean", "acc mean"),
            ("log_loss", "log-loss"), ("choice_loss", "choice-loss")]
    rows = []
    for split, label in (("selection", "selection"), ("test", "held-out")):
        for which in ("base", "adapted"):
            m = report[split][which]
            if m is None:
                continue
            rows.append([label, which, str(m.get("n", "")),
                         *[fmt_pct(m.get(k)) if k.startswith("acc") else fmt_float(m.get(k)) for k, _ in cols],
                         fmt_pct(m["majority"].get("accuracy"))])
    if rows:
        header = ["split", "model", "n", *[h for _, h in cols], "majority"]
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(r, widths)))
        lines += [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines += _headline(report)
    tot = report["accounting"]["total"]
    if tot is not None and num(tot.get("model_params_before")) is not None:
        lines.append(f"size: {fmt_count(tot.get('model_params_before'))} → "
                     f"{fmt_count(tot.get('model_params_after'))} parameters, "
                     f"{fmt_bytes(tot.get('model_bytes_before'))} → {fmt_bytes(tot.get('model_bytes_after'))}; "
                     f"edited matrices keep {fmt_pct(tot.get('param_ratio'))} of their parameters")
    t = report["timings"]
    if t:
        parts = [f"{PHASES.get(k, k)} {fmt_seconds(v)}" for k, v in t.items() if k != "total" and num(v)]
        lines.append(f"time: {fmt_seconds(t.get('total'))}" if num(t.get("total")) else "time:")
        if parts:
            lines[-1] += " (" + ", ".join(parts) + ")"
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#222;max-width:1180px;margin:24px auto;
padding:0 18px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.sub{color:#666;margin:0 0 14px}.headline{background:#f5f8fc;border-left:4px solid #4c72b0;padding:8px 12px}
.headline p{margin:3px 0}table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{padding:3px 9px;border-bottom:1px solid #e4e4e4;text-align:right;white-space:nowrap}
th{background:#f6f6f6;font-weight:600}td.l,th.l{text-align:left}tr.adapted td{font-weight:600}
tr.best td{background:#fff8d6}figure{margin:10px 0 18px}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:13px;max-width:900px}code{font-size:12px}details{margin:8px 0}
.muted{color:#888}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list], left: int = 1, row_class: list[str] | None = None) -> str:
    """An HTML table; the first ``left`` columns are left-aligned (text), the rest right-aligned (numbers)."""
    h = "".join(f'<th class="l">{_e(c)}</th>' if i < left else f"<th>{_e(c)}</th>" for i, c in enumerate(header))
    body = []
    for r, cells in enumerate(rows):
        cls = f' class="{row_class[r]}"' if row_class and row_class[r] else ""
        body.append(f"<tr{cls}>" + "".join(f'<td class="l">{_e(c)}</td>' if i < left else f"<td>{_e(c)}</td>"
                                           for i, c in enumerate(cells)) + "</tr>")
    return f"<table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _metrics_section(report: dict) -> str:
    rows, classes = [], []
    for split, label in (("selection", "selection"), ("test", "held-out")):
        for which in ("base", "adapted"):
            m = report[split][which]
            if m is None:
                continue
            maj = m["majority"]
            rows.append([label, which, m.get("n", "—"), fmt_pct(m.get("accuracy")), fmt_pct(m.get("accuracy_sum")),
                         fmt_pct(m.get("accuracy_mean")), fmt_float(m.get("log_loss")),
                         fmt_float(m.get("choice_loss")), fmt_pct(maj.get("accuracy")),
                         "—" if maj.get("label") is None else str(maj.get("label"))])
            classes.append("adapted" if which == "adapted" else "")
        b, a = report[split]["base"], report[split]["adapted"]
        if b is not None and a is not None:
            d = lambda k: (num(a.get(k)) - num(b.get(k))) if None not in (num(a.get(k)), num(b.get(k))) \
                else None  # noqa: E731
            rows.append([label, "change", "", fmt_pts(d("accuracy")), fmt_pts(d("accuracy_sum")),
                         fmt_pts(d("accuracy_mean")), fmt_float(d("log_loss")) if d("log_loss") is None else
                         f"{d('log_loss'):+.3f}", fmt_float(d("choice_loss")) if d("choice_loss") is None else
                         f"{d('choice_loss'):+.3f}", "", ""])
            classes.append("muted")
    if not rows:
        return ""
    scoring = next((m.get("scoring") for m in (report["selection"]["base"], report["test"]["base"])
                    if m is not None and m.get("scoring")), None) or report["config"].get("scoring")
    out = ["<h2>Accuracy: base vs adapted</h2>",
           _table(["split", "model", "n", "accuracy", "acc (summed)", "acc (length-norm.)", "log-loss",
                   "choice-loss", "majority", "majority label"], rows, left=2, row_class=classes),
           "<p class='sub'>“accuracy” is the primary scoring"
           + (f" (<code>{_e(scoring)}</code>)" if scoring else "")
           + "; summed and length-normalised log-probability scoring are both shown because a rank reduction can "
             "flip a label-length bias (METHOD.md §1.3). “majority” is the accuracy of always answering the most "
             "frequent label of that split. Selection metrics are measured on the same sample the plan was "
             "chosen on; only held-out numbers are an estimate of the gain.</p>"]
    d = report["draws"]
    if d is not None:
        accs, gains, plans, paired = d["test_accuracy"], d["test_gain"], d["plans"], d["test_paired"]
        drows = []
        for i, acc in enumerate(accs):
            p = dicts(plans[i]) if i < len(plans) else []
            pr = paired[i] if i < len(paired) and isinstance(paired[i], dict) else {}
            drows.append([str(i), "; ".join(edit_text(e) for e in p) or "none", fmt_pct(acc),
                          fmt_pts(gains[i]) if i < len(gains) else "—",
                          f"{pr['fixed']} / {pr['broken']}" if "fixed" in pr and "broken" in pr else "—",
                          f"{num(pr.get('p_two_sided')):.2g}" if num(pr.get("p_two_sided")) is not None else "—"])
        out += [f"<h3>Spread over {_e(d.get('n', len(accs)))} selection draws</h3>",
                f"<p>held-out accuracy of the adapted model: mean {fmt_pct(d.get('mean'))}, "
                f"std {fmt_pts(d.get('std'))[1:]}, min {fmt_pct(d.get('min'))}, max {fmt_pct(d.get('max'))}</p>"]
        if drows:
            out.append(_table(["draw", "plan", "held-out accuracy", "gain over base", "fixed / broken",
                               "McNemar p"], drows, left=2))
    return "\n".join(out)


def _plan_section(report: dict) -> str:
    plan = report["plan"]
    if plan is None:
        return ""
    if not plan:
        return "<h2>Plan</h2><p>No candidate beat the base model on the selection sample: the plan is empty " \
               "and the adapted model is the base model.</p>"
    rows = [[e.get("matrix", "?"), e.get("rank_fraction", "—"), e.get("n_clusters", 1), e.get("method", "—"),
             e.get("seed", "—")] for e in plan]
    return "<h2>Plan</h2>" + _table(["matrix", "ρ (kept rank fraction)", "clusters k", "method", "seed"], rows)


def _accounting_section(report: dict) -> str:
    mats, tot = report["accounting"]["matrices"], report["accounting"]["total"]
    if not mats and tot is None:
        return ""
    out = ["<h2>Size: parameters and bytes before and after</h2>"]
    if tot is not None:
        pb, pa = num(tot.get("model_params_before")), num(tot.get("model_params_after"))
        bb, ba = num(tot.get("model_bytes_before")), num(tot.get("model_bytes_after"))
        rows = [["whole model, parameters", fmt_count(pb), fmt_count(pa),
                 f"{100 * (pa - pb) / pb:+.2f}%" if pb and pa is not None else "—"],
                ["whole model, bytes", fmt_bytes(bb), fmt_bytes(ba),
                 f"{100 * (ba - bb) / bb:+.2f}%" if bb and ba is not None else "—"],
                ["edited matrices, parameters", fmt_count(tot.get("dense_params")),
                 fmt_count(tot.get("factored_params")), f"× {fmt_float(tot.get('param_ratio'), 4)}"],
                ["edited matrices, bytes", fmt_bytes(tot.get("dense_bytes")), fmt_bytes(tot.get("factored_bytes")),
                 f"× {fmt_float(tot.get('byte_ratio'), 4)}"]]
        out.append(_table(["", "before", "after", "change"], rows))
    if mats:
        rows = []
        for m in mats:
            ranks = m.get("ranks") if isinstance(m.get("ranks"), list) else []
            rk = ", ".join(str(r) for r in ranks[:8]) + (f", … ({len(ranks)})" if len(ranks) > 8 else "")
            shape = m.get("shape")
            rows.append([m.get("matrix", "?"), "×".join(str(s) for s in shape) if isinstance(shape, list) else "—",
                         m.get("rank_fraction", "—"), m.get("n_clusters", 1), m.get("method") or "—", rk or "—",
                         fmt_pct(m.get("kept_rank_fraction")), fmt_float(m.get("break_even_rank"), 1),
                         fmt_count(m.get("dense_params")), fmt_count(m.get("factored_params")),
                         fmt_float(m.get("param_ratio"), 4), fmt_bytes(m.get("factored_bytes")),
                         fmt_float(m.get("byte_ratio"), 4)])
        out.append(_table(["matrix", "shape", "ρ", "k", "method", "ranks", "kept rank", "break-even rank",
                           "dense params", "factored params", "param ratio", "factored bytes", "byte ratio"],
                          rows, left=1))
        out.append("<p class='sub'>“kept rank” is Σ r<sub>c</sub> / Σ min(|c|, n), the fraction of the available "
                   "rank kept; the break-even rank is where the factors stop saving parameters "
                   "(mn/(m+n) plain, mn/(kn+m) clustered). Factored bytes include the int64 routing index of "
                   "clustered factors.</p>")
    return "\n".join(out)


def _candidates_section(report: dict, top: int = 15) -> str:
    cands = evaluated(report)
    if not cands:
        return ""
    best_first = ranked(cands)
    plan = plan_keys(report)
    has_pred = any(num(c.get("predicted_delta")) is not None for c in best_first)
    header = ["matrix", "ρ", "k", "method"] + (["predicted ΔL̂"] if has_pred else []) + \
        ["accuracy", "acc (summed)", "acc (length-norm.)", "log-loss", "choice-loss", "seconds"]
    rows, classes = [], []
    for c in best_first[:top]:
        rows.append([c.get("matrix", "?"), c.get("rank_fraction", "—"), c.get("n_clusters", 1),
                     c.get("method", "—")] + ([fmt_float(c.get("predicted_delta"))] if has_pred else []) +
                    [fmt_pct(c.get("accuracy")), fmt_pct(c.get("accuracy_sum")), fmt_pct(c.get("accuracy_mean")),
                     fmt_float(c.get("log_loss")), fmt_float(c.get("choice_loss")),
                     "twin, not rerun" if c.get("same_as") else fmt_float(c.get("seconds"), 2)])
        classes.append("best" if candidate_key(c) in plan else "")
    n_all = report["search"]["n_candidates"]
    note = f"{len(cands)} evaluated" + (f" of {n_all} built" if isinstance(n_all, int) else "")
    twins = sum(bool(c.get("same_as")) for c in cands)
    if twins:
        note += (f" ({twins} of them twins: the same factors as an earlier candidate, so its result without a "
                 f"pass)")
    fp = report["forward_passes"]
    if num(fp.get("search_equivalent_full_passes")) is not None:
        note += (f"; the search cost {fp.get('search_layer_passes')} layer passes "
                 f"(≈ {fp['search_equivalent_full_passes']} full forward passes over the selection sample)")
    return (f"<h2>Top candidates (selection sample)</h2><p class='sub'>Ranked by accuracy, then log-loss; "
            f"{_e(note)}. The highlighted row is the plan.</p>" + _table(header, rows, left=1, row_class=classes))


def _scan_section(report: dict, top: int = 10) -> str:
    scan = report["scan"]
    mats = [m for m in scan["matrices"] if num(m.get("score")) is not None]
    if not mats:
        return ""
    mats = sorted(mats, key=lambda m: m["score"])[:top]
    rhos = sorted({r for m in mats for r in (m.get("first_order_delta") or {})}, key=lambda r: -float(r))
    rows = [[m.get("matrix", "?"), m.get("type", "—"), fmt_float(m.get("score")),
             fmt_float(m.get("grad_sigma_norm"))] + [fmt_float((m.get("first_order_delta") or {}).get(r)) for r in rhos]
            for m in mats]
    loss = num(scan["loss"])
    sub = f"score: <code>{_e(scan['score_kind'] or '?')}</code>, lower = more promising"
    if loss is not None:
        kind = _e(scan["loss_kind"] or "?")
        sub += f"; selection loss at the base weights {loss:.3f} (<code>{kind}</code>)"
    return (f"<h2>Scan: the {len(mats)} best-scored matrices</h2><p class='sub'>{sub}</p>"
            + _table(["matrix", "type", "score", "‖∂L/∂σ‖"] + [f"ΔL̂ ρ={r}" for r in rhos], rows, left=2))


def _figure_html(name: str, png: bytes, caption: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{caption} <span class='muted'>({_e(name)})</span></figcaption></figure>")


def _html(report: dict, source: Path, figures: dict[str, bytes], captions: dict[str, str]) -> str:
    task, cfg, ver = report["task"], report["config"], report["versions"]
    model = cfg.get("model")
    title = f"c2i report — {task['name'] or 'run'}" + (f" on {model}" if model else "")
    facts = ["LASER" if "val_size" in cfg else "Compress-to-Impress"]
    if task["kind"]:
        facts.append(f"{task['kind']} task")
    n_sel = task.get("n_select", task.get("n_val"))
    if n_sel is not None:
        facts.append(f"{n_sel} selection / {task.get('n_test', '?')} held-out examples")
    for k, lab in (("top_k", "top-K"), ("max_evals", "max evals"), ("seed", "seed")):
        if k in cfg:
            facts.append(f"{lab} {cfg[k]}")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1><p class='sub'>{_e(' · '.join(facts))}</p>"]
    head = _headline(report)
    plan = report["plan"]
    if plan:
        head.insert(0, "Plan: " + "; ".join(edit_text(e) for e in plan) + ".")
    elif plan is not None:
        head.insert(0, "Plan: none — no candidate beat the base model on the selection sample.")
    if head:
        parts.append("<div class='headline'>" + "".join(f"<p>{_e(s)}</p>" for s in head) + "</div>")
    parts.append(_metrics_section(report))
    for name in ("scan_heatmap.png", "search_rho.png"):
        if name in figures:
            parts.append(_figure_html(name, figures[name], captions[name]))
    parts.append(_plan_section(report))
    parts.append(_candidates_section(report))
    if "predicted_vs_measured.png" in figures:
        parts.append(_figure_html("predicted_vs_measured.png", figures["predicted_vs_measured.png"],
                                  captions["predicted_vs_measured.png"]))
    parts.append(_scan_section(report))
    parts.append(_accounting_section(report))
    if "timings.png" in figures:
        parts.append("<h2>Time</h2>" + _figure_html("timings.png", figures["timings.png"], captions["timings.png"]))
    details = []
    if cfg:
        details.append("<details><summary>configuration</summary>"
                       + _table(["key", "value"], [[k, json.dumps(v, default=str)] for k, v in cfg.items()], left=2)
                       + "</details>")
    if ver:
        details.append("<details><summary>versions</summary>"
                       + _table(["package", "version"], [[k, v] for k, v in ver.items()], left=2) + "</details>")
    parts += details
    parts.append(f"<p class='muted'>Rendered from <code>{_e(source)}</code> by c2i_fast.report.</p></body></html>")
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------
def render_report(run_dir, out_dir=None) -> Path:
    """Render ``<run_dir>/report.json`` into ``<out_dir or run_dir/report>/index.html`` plus one PNG per figure.

    Returns the path of index.html. Raises C2IError (naming the file) when report.json is missing or not a
    JSON object, or when matplotlib is not installed. Figure files of a previous render that this report has
    no data for are removed, so the folder always matches its index.html.
    """
    from .figures import CAPTIONS, render_figures     # figures use this module's helpers: imported to draw
    report, source = load_report(run_dir)
    figures = render_figures(report)
    out = Path(out_dir) if out_dir is not None else source.parent / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise C2IError(f"cannot create the report folder {out}: {e}") from e
    for name, png in figures.items():
        atomic_write_bytes(out / name, png)
    for name in FIGURES:
        if name not in figures and (out / name).is_file():
            (out / name).unlink()
    index = out / "index.html"
    atomic_write_bytes(index, _html(report, source, figures, CAPTIONS).encode("utf-8"))
    return index
