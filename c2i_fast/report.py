"""Turn a run's ``report.json`` into something people read: one self-contained HTML page and a terminal table.

``render_report(run_dir)`` reads ``<run_dir>/report.json`` (written by ``c2i adapt`` or ``c2i laser``, see
c2i_fast.pipeline) and writes ``<run_dir>/report/``::

    index.html                  every table, and every figure embedded as a base64 PNG (one file to mail)
    scan_heatmap.png            (a) Σ-gradient score over layers × matrix types; inspected and chosen marked
    search_rho.png              (b) selection accuracy and log-loss vs ρ per inspected matrix, plain vs clustered
    predicted_vs_measured.png   (c) first-order ΔL̂ vs the measured loss change, with the rank correlation
    timings.png                 (d) seconds per phase

A figure whose data the report lacks (no scan section in a LASER report, no evaluated candidate, …) is left
out, and so is its table; a hand-made report with only ``test`` renders. Every file is written atomically
(temp file, then ``os.replace``), ``index.html`` last. ``summary_table(report)`` is the same headline as
plain text for the end of ``c2i adapt``.

matplotlib is imported lazily (``pip install c2i_fast[report]``) and used without pyplot (Agg canvas), so
rendering never touches a global backend.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

from .errors import C2IError

REPORT = "report.json"
FIGURES = ("scan_heatmap.png", "search_rho.png", "predicted_vs_measured.png", "timings.png")

# Matrix types in display order (c2i_fast.models.MATRIX_TYPES; repeated here so rendering needs no torch).
TYPE_ORDER = ("q", "k", "v", "qkv", "o", "mlp_in", "mlp_up", "mlp_out")
PHASES = {"load": "load model", "scan_gradient": "scan: gradient pass", "scan_svd": "scan: SVDs",
          "candidates": "build candidates", "select_base": "selection: base", "val_base": "validation: base",
          "search": "search", "svd": "SVDs", "test_base": "held-out: base", "test_adapted": "held-out: adapted"}
K_COLOURS = ("#dd8452", "#55a868", "#4c72b0", "#c44e52", "#937860", "#da8bc3", "#8c8c8c")
MAJORITY_COLOUR = "#7b3294"
METHOD_STYLE = {"block": ("-", "o"), "kmeans": ("--", "s"), "projective": (":", "^")}
DPI = 110


# ---------------------------------------------------------------------------------------------------------
# formatting (shared by the HTML page, the terminal table and the tests)
# ---------------------------------------------------------------------------------------------------------
def _num(x) -> float | None:
    """``x`` as a finite float, else None (None, NaN, strings, bools all read as missing)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def fmt_pct(x) -> str:
    """An accuracy in [0, 1] as a percentage with one decimal: 0.4583 → '45.8%'; missing → '—'."""
    v = _num(x)
    return "—" if v is None else f"{100 * v:.1f}%"


def fmt_pts(x) -> str:
    """A difference of accuracies in percentage points, signed: 0.333 → '+33.3 pts'."""
    v = _num(x)
    return "—" if v is None else f"{round(100 * v, 1) + 0.0:+.1f} pts"      # + 0.0: no "-0.0"


def fmt_float(x, digits: int = 3) -> str:
    v = _num(x)
    return "—" if v is None else f"{v:.{digits}f}"


def fmt_count(x) -> str:
    """A parameter count: 134515008 → '134.52 M'."""
    v = _num(x)
    if v is None:
        return "—"
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def fmt_bytes(x) -> str:
    """A byte count with binary prefixes: 538060032 → '513.1 MiB'."""
    v = _num(x)
    if v is None:
        return "—"
    for div, unit in ((2 ** 30, " GiB"), (2 ** 20, " MiB"), (2 ** 10, " KiB")):
        if abs(v) >= div:
            return f"{v / div:.1f}{unit}"
    return f"{v:.0f} B"


def fmt_seconds(x) -> str:
    v = _num(x)
    if v is None:
        return "—"
    if v >= 3600:
        return f"{v / 3600:.1f} h"
    if v >= 120:
        return f"{v / 60:.1f} min"
    return f"{v:.1f} s"


def short_name(matrix: str) -> str:
    """'model.layers.11.mlp.down_proj' → 'L11 mlp.down_proj' (the first '.<digits>.' is the layer)."""
    m = re.search(r"\.(\d+)\.(.+)$", str(matrix))
    return f"L{m.group(1)} {m.group(2)}" if m else str(matrix)


def edit_text(e: dict) -> str:
    """One plan edit as 'L11 mlp.down_proj ρ=0.05 k=2 block'."""
    k = e.get("n_clusters", 1)
    s = f"{short_name(e.get('matrix', '?'))} ρ={e.get('rank_fraction', '?')} k={k}"
    return s + (f" {e.get('method')}" if k != 1 and e.get("method") else "")


# ---------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------
def _get(d, *keys, default=None):
    """``d[k0][k1]…`` or ``default`` where any level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _dicts(x) -> list[dict]:
    return [e for e in x if isinstance(e, dict)] if isinstance(x, list) else []


def load_report(run_dir) -> tuple[dict, Path]:
    """The report dict of ``run_dir`` (a run directory or the report.json itself) and the file it came from."""
    p = Path(run_dir)
    path = p / REPORT if p.is_dir() else p
    if not path.is_file():
        raise C2IError(f"{path}: no report here (expected the {REPORT} that `c2i adapt` or `c2i laser` "
                       f"writes into its --out directory)")
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise C2IError(f"{path} is not a valid JSON report: {e}") from e
    if not isinstance(report, dict):
        raise C2IError(f"{path} is not a valid report: expected a JSON object, got {type(report).__name__}")
    return _normalise(report), path


def _normalise(report: dict) -> dict:
    """`c2i eval --out FILE` writes base/adapted at the top level: read them as the held-out split."""
    if "test" not in report and isinstance(report.get("base"), dict):
        report = {**report, "test": {"base": report["base"], "adapted": report.get("adapted", report["base"])}}
        if isinstance(report.get("task"), str):
            report["task"] = {"name": report["task"], "n_test": report.get("n_test")}
    return report


def _loss_key(report: dict) -> str:
    return "choice_loss" if _get(report, "config", "loss") == "choice" else "log_loss"


def _evaluated(report: dict) -> list[dict]:
    return [c for c in _dicts(_get(report, "search", "candidates")) if _num(c.get("accuracy")) is not None]


def _ranked(cands: list[dict]) -> list[dict]:
    """Best first, as the search ranks them: accuracy, then log-loss."""
    def key(c):
        ll = _num(c.get("log_loss"))
        return (-_num(c.get("accuracy")), ll if ll is not None else math.inf)
    return sorted(cands, key=key)


def _plan_keys(report: dict) -> set[tuple]:
    return {(e.get("matrix"), _num(e.get("rank_fraction")), e.get("n_clusters", 1), e.get("method", "block"))
            for e in _dicts(report.get("plan"))}


def _cand_key(c: dict) -> tuple:
    return (c.get("matrix"), _num(c.get("rank_fraction")), c.get("n_clusters", 1), c.get("method", "block"))


def _headline(report: dict) -> list[str]:
    """The sentences a reader wants first: held-out gain, and how it compares with the majority class."""
    base, adapted = _get(report, "test", "base"), _get(report, "test", "adapted")
    if not isinstance(base, dict) or not isinstance(adapted, dict):
        return []
    a0, a1 = _num(base.get("accuracy")), _num(adapted.get("accuracy"))
    out = [f"Held-out accuracy {fmt_pct(a0)} → {fmt_pct(a1)}"
           + (f" ({fmt_pts(a1 - a0)})" if a0 is not None and a1 is not None else "")
           + (f" on {adapted['n']} examples" if _num(adapted.get("n")) else "") + "."]
    n = _num(adapted.get("n"))
    pair = _get(report, "test", "paired")
    if a1 is not None and n and n >= 1 and not isinstance(pair, dict):     # the paired line says it better
        se = 100 * math.sqrt(max(a1 * (1 - a1), 1e-12) / n)
        out[0] += f" One standard error of an accuracy at this n is ±{se:.1f} pts."
    if isinstance(pair, dict) and _num(pair.get("difference")) is not None and (pair.get("fixed") or pair.get("broken")):
        lo, hi = (list(pair.get("ci95") or []) + [None, None])[:2]
        s = (f"Paired on the same examples: {pair.get('fixed')} fixed, {pair.get('broken')} broken, "
             f"difference {fmt_pts(pair['difference'])}")
        if _num(lo) is not None and _num(hi) is not None:
            s += f" (95% interval {fmt_pts(lo)} to {fmt_pts(hi)})"
        if _num(pair.get("p_two_sided")) is not None:
            s += f", exact McNemar p = {_num(pair.get('p_two_sided')):.2g} (two-sided)"
        out.append(s + ".")
    maj = _num(_get(adapted, "majority", "accuracy"))
    if maj is not None:
        label = _get(adapted, "majority", "label")
        s = f"Always answering {label!r} scores {fmt_pct(maj)}" if label is not None else \
            f"The majority class scores {fmt_pct(maj)}"
        if a1 is not None and a1 <= maj + 1e-12:
            s += " — the adapted model does not beat it"
        out.append(s + ".")
    sig = _get(report, "search", "significance")
    if isinstance(sig, dict) and _num(sig.get("p_max")) is not None:
        p, j = _num(sig.get("p_max")), sig.get("candidates", "?")
        s = (f"Selection gain {sig.get('gain', 0):+d} of {sig.get('n', '?')} examples ({sig.get('wins', '?')} "
             f"fixed, {sig.get('losses', '?')} broken): p = {p:.2g} that the best of {j} candidates with no "
             f"effect gains as much (max-T sign-flip test; uncorrected McNemar p = {_num(sig.get('p_single')) or 0:.2g})")
        if sig.get("gated"):
            s += f"; above --gate-p {sig.get('gate_p')}, so the base model was kept"
        elif p > 0.05 and sig.get("gain", 0) > 0:
            s += f" — no more than picking the best of {j} gives by chance"
        out.append(s + ".")
    s_sum, s_mean = _num(adapted.get("accuracy_sum")), _num(adapted.get("accuracy_mean"))
    if s_sum is not None and s_mean is not None and abs(s_sum - s_mean) >= 0.05:
        out.append(f"Summed and length-normalised scoring disagree by {fmt_pts(s_mean - s_sum)[1:]} "
                   f"({fmt_pct(s_sum)} vs {fmt_pct(s_mean)}): the gain may be a label-length effect.")
    d = report.get("draws")
    if isinstance(d, dict) and _num(d.get("mean")) is not None:
        out.append(f"Over {d.get('n', '?')} disjoint selection draws: {fmt_pct(d.get('mean'))} ± "
                   f"{fmt_pts(d.get('std'))[1:]} (min {fmt_pct(d.get('min'))}, max {fmt_pct(d.get('max'))}).")
    return out


# ---------------------------------------------------------------------------------------------------------
# terminal
# ---------------------------------------------------------------------------------------------------------
def summary_table(report: dict) -> str:
    """Plain-text summary for the end of ``c2i adapt``/``laser``: task, plan, metrics table, size, time."""
    if not isinstance(report, dict):
        return ""
    report = _normalise(report)
    lines = []
    task, cfg = report.get("task"), report.get("config")
    name = task.get("name") if isinstance(task, dict) else task
    head = [str(name or "?")]
    if isinstance(task, dict) and task.get("kind"):
        head[0] += f" ({task['kind']})"
    if isinstance(cfg, dict) and cfg.get("model"):
        head.append(f"model {cfg['model']}")
    lines.append(" · ".join(head))
    plan = _dicts(report.get("plan"))
    lines.append("plan: " + ("; ".join(edit_text(e) for e in plan) if plan else
                             ("none beat the base model" if "plan" in report else "—")))
    cols = [("accuracy", "acc"), ("accuracy_sum", "acc sum"), ("accuracy_mean", "acc mean"),
            ("log_loss", "log-loss"), ("choice_loss", "choice-loss")]
    rows = []
    for split, label in (("selection", "selection"), ("test", "held-out")):
        for which in ("base", "adapted"):
            m = _get(report, split, which)
            if not isinstance(m, dict):
                continue
            maj = _get(m, "majority", "accuracy")
            rows.append([label, which, str(m.get("n", "")),
                         *[fmt_pct(m.get(k)) if k.startswith("acc") else fmt_float(m.get(k)) for k, _ in cols],
                         fmt_pct(maj)])
    if rows:
        header = ["split", "model", "n", *[h for _, h in cols], "majority"]
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(r, widths)))
        lines += [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines += _headline(report)
    tot = _get(report, "accounting", "total")
    if isinstance(tot, dict) and _num(tot.get("model_params_before")) is not None:
        lines.append(f"size: {fmt_count(tot.get('model_params_before'))} → "
                     f"{fmt_count(tot.get('model_params_after'))} parameters, "
                     f"{fmt_bytes(tot.get('model_bytes_before'))} → {fmt_bytes(tot.get('model_bytes_after'))}; "
                     f"edited matrices keep {fmt_pct(tot.get('param_ratio'))} of their parameters")
    t = report.get("timings")
    if isinstance(t, dict) and t:
        parts = [f"{PHASES.get(k, k)} {fmt_seconds(v)}" for k, v in t.items() if k != "total" and _num(v)]
        lines.append(f"time: {fmt_seconds(t.get('total'))}" if _num(t.get("total")) else "time:")
        if parts:
            lines[-1] += " (" + ", ".join(parts) + ")"
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------------
def _mpl():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise C2IError("rendering a report needs matplotlib: pip install 'c2i_fast[report]' "
                       f"(or pip install matplotlib) [{e}]") from e
    return matplotlib, Figure, FigureCanvasAgg


def _png(fig) -> bytes:
    _, _, FigureCanvasAgg = _mpl()
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.12,
                metadata={"Software": None})
    return buf.getvalue()


def _style(ax):
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#e6e6e6", linewidth=0.6)
    ax.set_axisbelow(True)


def fig_scan_heatmap(report: dict) -> bytes | None:
    """(a) Σ-gradient score over layers (x) × matrix types (y); inspected boxed, chosen starred."""
    mats = [m for m in _dicts(_get(report, "scan", "matrices"))
            if _num(m.get("score")) is not None and isinstance(m.get("layer"), int)]
    if not mats:
        return None
    import numpy as np
    matplotlib, Figure, _ = _mpl()
    types = sorted({str(m.get("type", "?")) for m in mats},
                   key=lambda t: (TYPE_ORDER.index(t) if t in TYPE_ORDER else len(TYPE_ORDER), t))
    n_layers = max(m["layer"] for m in mats) + 1
    grid = np.full((len(types), n_layers), np.nan)
    where = {}
    for m in mats:
        i, j = types.index(str(m.get("type", "?"))), m["layer"]
        grid[i, j] = m["score"]
        where[m.get("matrix")] = (i, j)
    finite = grid[np.isfinite(grid)]
    kind = _get(report, "scan", "score_kind", default="first_order")
    if finite.min() < 0 < finite.max():
        lim = float(np.abs(finite).max())
        norm, cmap = matplotlib.colors.Normalize(-lim, lim), matplotlib.colormaps["RdBu"]
    else:   # one sign: lower is still better, darker red
        norm = matplotlib.colors.Normalize(float(finite.min()), float(finite.max()))
        cmap = matplotlib.colormaps["Reds_r"]
    cmap = cmap.with_extremes(bad="#f0f0f0")

    fig = Figure(figsize=(max(6.0, 0.26 * n_layers + 2.4), 0.42 * len(types) + 1.6))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_yticks(range(len(types)), types, fontsize=8)
    step = 1 if n_layers <= 32 else (2 if n_layers <= 64 else 4)
    ax.set_xticks(range(0, n_layers, step), [str(i) for i in range(0, n_layers, step)], fontsize=7)
    ax.set_xlabel("layer", fontsize=9)
    ax.set_xticks(np.arange(-0.5, n_layers, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, len(types), 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.spines[:].set_visible(False)
    inspected = {c.get("matrix") for c in _dicts(_get(report, "search", "candidates"))}
    chosen = {e.get("matrix") for e in _dicts(report.get("plan"))}
    for name in inspected:          # a black box with a white inner line reads on any cell colour
        if name in where:
            i, j = where[name]
            ax.add_patch(matplotlib.patches.Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False,
                                                      edgecolor="black", linewidth=2.2, zorder=3))
            ax.add_patch(matplotlib.patches.Rectangle((j - 0.36, i - 0.36), 0.72, 0.72, fill=False,
                                                      edgecolor="white", linewidth=1.0, zorder=3))
    for name in chosen:
        if name in where:
            i, j = where[name]
            ax.plot(j, i, marker="*", color="gold", markersize=11, markeredgecolor="black", markeredgewidth=0.8)
    cb = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.015)
    cb.ax.tick_params(labelsize=7)
    cb.set_label("min$_\\rho$ first-order $\\Delta\\hat L$" if kind == "first_order"
                 else "$-\\|\\partial L/\\partial\\sigma\\|$", fontsize=8)
    n_top = len(inspected & set(where))
    title = ("Σ-gradient scan: predicted loss change of the best truncation per matrix "
             "(red = more promising)" if kind == "first_order" else
             "Σ-gradient scan: singular-value gradient norm (red = more sensitive)")
    ax.set_title(title, fontsize=10, loc="left")
    note = f"{len(mats)} matrices scanned; □ the {n_top} inspected by the search"
    if chosen & set(where):
        note += "; ★ the plan"
    ax.text(0, -0.08, note, transform=ax.transAxes, fontsize=8, va="top", color="#444")
    ax.xaxis.set_label_coords(1.0, -0.08)
    ax.xaxis.label.set_horizontalalignment("right")
    return _png(fig)


def fig_search_rho(report: dict, max_matrices: int = 6, per_row: int = 3) -> bytes | None:
    """(b) per inspected matrix: selection accuracy (upper) and log-loss (lower) vs ρ, one line per (k, method).

    ρ sits on evenly spaced positions, largest first (more reduction to the right): LASER's grid
    0.9/0.8/0.6/…/0.01 is unreadable on a log axis. Panels wrap after ``per_row`` matrices; a sweep over more
    than ``max_matrices`` matrices (LASER) shows the ones that reached the best accuracy.
    """
    cands = [c for c in _evaluated(report) if _num(c.get("rank_fraction")) is not None]
    if not cands:
        return None
    matplotlib, Figure, _ = _mpl()
    best_by_matrix: dict[str, float] = {}
    order: list[str] = []
    for c in _dicts(_get(report, "search", "candidates")):      # every inspected matrix, evaluated or not
        name = c.get("matrix")
        if name not in best_by_matrix:
            order.append(name)
            best_by_matrix[name] = -1.0
        if c in cands:
            best_by_matrix[name] = max(best_by_matrix[name], c["accuracy"])
    scanned = [m.get("matrix") for m in _dicts(_get(report, "scan", "matrices"))]
    first = {n: i for i, n in enumerate(order)}
    order.sort(key=lambda n: scanned.index(n) if n in scanned else len(scanned) + first[n])
    pos_of = {n: i for i, n in enumerate(order)}
    shown = order
    if len(order) > max_matrices:       # a LASER sweep: show the matrices that did best
        chosen = {e.get("matrix") for e in _dicts(report.get("plan"))}
        shown = sorted(order, key=lambda n: (n not in chosen, -best_by_matrix[n], pos_of[n]))[:max_matrices]
        shown.sort(key=pos_of.get)
    ks = sorted({int(c.get("n_clusters", 1)) for c in cands if c.get("n_clusters", 1) != 1})
    colour = {k: K_COLOURS[i % len(K_COLOURS)] for i, k in enumerate(ks)}
    plan = _plan_keys(report)
    base = _get(report, "selection", "base", default={})
    b_acc, b_ll = _num(_get(base, "accuracy")), _num(_get(base, "log_loss"))
    maj = _num(_get(base, "majority", "accuracy"))
    rhos = sorted({float(c["rank_fraction"]) for c in cands}, reverse=True)
    xpos = {r: i for i, r in enumerate(rhos)}

    n = len(shown)
    ncol = min(n, per_row)
    npair = -(-n // ncol)
    fig = Figure(figsize=(max(5.2, 3.1 * ncol + 0.9), 4.5 * npair + 1.1), layout="constrained")
    axes = fig.subplots(2 * npair, ncol, squeeze=False)
    acc_axes, ll_axes = [], []
    handles = {}
    for j in range(npair * ncol):
        pr, col_i = divmod(j, ncol)
        ax_acc, ax_ll = axes[2 * pr][col_i], axes[2 * pr + 1][col_i]
        if j >= n:
            ax_acc.set_visible(False)
            ax_ll.set_visible(False)
            continue
        name = shown[j]
        acc_axes.append(ax_acc)
        ll_axes.append(ax_ll)
        groups: dict[tuple, list[dict]] = {}
        for c in cands:
            if c.get("matrix") == name:
                groups.setdefault((int(c.get("n_clusters", 1)), str(c.get("method", "block"))), []).append(c)
        if not groups:
            ax_acc.text(0.5, 0.5, "no candidate evaluated\n(pruned by predicted ΔL̂)", transform=ax_acc.transAxes,
                        ha="center", va="center", fontsize=8, color="#666", zorder=6,
                        bbox=dict(facecolor="white", edgecolor="#ddd", boxstyle="round,pad=0.4"))
        for ax, key in ((ax_acc, "accuracy"), (ax_ll, "log_loss")):
            _style(ax)
            ref = b_acc if key == "accuracy" else b_ll
            if ref is not None:
                h = ax.axhline(ref, color="#888", linestyle=(0, (4, 3)), linewidth=1.1, zorder=1)
                handles.setdefault("base model", h)
            if key == "accuracy" and maj is not None:
                h = ax.axhline(maj, color=MAJORITY_COLOUR, linestyle=":", linewidth=1.3, zorder=1)
                handles.setdefault("majority class", h)
            for (k, method), cs in sorted(groups.items()):
                cs = sorted((c for c in cs if _num(c.get(key)) is not None), key=lambda c: xpos[c["rank_fraction"]])
                if not cs:
                    continue
                ls, mk = METHOD_STYLE.get(method, ("-.", "D"))
                label = "plain SVD (k=1)" if k == 1 else f"k={k} {method}"
                (h,) = ax.plot([xpos[c["rank_fraction"]] for c in cs], [c[key] for c in cs],
                               linestyle="-" if k == 1 else ls, marker="o" if k == 1 else mk,
                               color="black" if k == 1 else colour[k], markersize=4.5,
                               linewidth=1.8 if k == 1 else 1.3, zorder=3 if k == 1 else 2)
                handles.setdefault(label, h)
                for c in cs:
                    if _cand_key(c) in plan:
                        (hs,) = ax.plot(xpos[c["rank_fraction"]], c[key], marker="*", markersize=14,
                                        color="gold", markeredgecolor="black", markeredgewidth=0.8,
                                        linestyle="none", zorder=5)
                        handles.setdefault("chosen (plan)", hs)
            ax.set_xticks(range(len(rhos)), [f"{r:g}" for r in rhos])
            ax.set_xlim(-0.5, len(rhos) - 0.5)
            ax.margins(y=0.12)
        ax_acc.set_title(short_name(name), fontsize=9)
        ax_acc.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        ax_acc.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{100 * v:.3g}%"))
        ax_acc.tick_params(labelbottom=False)
        ax_ll.tick_params(axis="x", labelsize=7.5)
        ax_ll.set_xlabel("kept rank fraction ρ  (→ more reduction)", fontsize=8)
        if col_i == 0:
            ax_acc.set_ylabel("selection accuracy", fontsize=9)
            ax_ll.set_ylabel("selection log-loss", fontsize=9)
    for group in (acc_axes, ll_axes):   # one y scale per metric, labels on the first column only
        for i, ax in enumerate(group[1:], 1):
            ax.sharey(group[0])
            if i % ncol:
                ax.tick_params(labelleft=False)
    total, n_ev = _get(report, "search", "n_candidates"), len(cands)
    title = "Search on the selection sample: plain vs clustered truncation"
    sub = f"{n_ev} of {total} candidates evaluated" if isinstance(total, int) else f"{n_ev} candidates"
    if len(shown) < len(order):
        sub += f"; {len(shown)} of {len(order)} matrices shown (the plan's and the most accurate)"
    fig.suptitle(f"{title}\n{sub}", fontsize=10, x=0.01, ha="left")
    def legend_key(lab):
        m = re.match(r"k=(\d+) (.*)", lab)
        return (lab not in ("base model", "majority class"), lab != "plain SVD (k=1)", lab == "chosen (plan)",
                int(m.group(1)) if m else 0, m.group(2) if m else lab)
    ordered = sorted(handles, key=legend_key)
    fig.legend([handles[k] for k in ordered], ordered, loc="outside lower center",
               ncol=min(len(ordered), 2 * ncol + 1), fontsize=8, frameon=False)
    return _png(fig)


def fig_predicted_vs_measured(report: dict) -> bytes | None:
    """(c) first-order ΔL̂ vs the measured change of the scan loss on the selection sample."""
    key = _loss_key(report)
    base = _num(_get(report, "selection", "base", key))
    pts = [c for c in _evaluated(report) if _num(c.get("predicted_delta")) is not None
           and _num(c.get(key)) is not None]
    if base is None or len(pts) < 2:
        return None
    import numpy as np
    matplotlib, Figure, _ = _mpl()
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    _style(ax)
    names = list(dict.fromkeys(c.get("matrix") for c in pts))
    ks = sorted({int(c.get("n_clusters", 1)) for c in pts})
    methods = sorted({str(c.get("method", "block")) for c in pts if int(c.get("n_clusters", 1)) != 1},
                     key=lambda m: (list(METHOD_STYLE).index(m) if m in METHOD_STYLE else len(METHOD_STYLE), m))
    plan = _plan_keys(report)
    x = np.array([c["predicted_delta"] for c in pts], dtype=float)
    y = np.array([c[key] - base for c in pts], dtype=float)
    ax.axhline(0, color="#999", linewidth=0.8, zorder=1)
    ax.axvline(0, color="#999", linewidth=0.8, zorder=1)
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.axline((0, 0), slope=1, color="#bbb", linestyle="--", linewidth=0.9, zorder=1)
    from matplotlib.lines import Line2D
    kcol = {k: "black" if k == 1 else K_COLOURS[i % len(K_COLOURS)]
            for i, k in enumerate(k for k in ks if k != 1)} | {1: "black"}
    if len(names) > 1:      # colour = matrix, marker = k
        cols = matplotlib.colormaps["tab10"]
        kmark = {k: m for k, m in zip(ks, "os^Dvp<>h")}
        style = lambda c: (cols(names.index(c.get("matrix")) % 10), kmark[int(c.get("n_clusters", 1))])  # noqa
        handles = [Line2D([], [], marker="o", linestyle="none", color=cols(i % 10), label=short_name(nm))
                   for i, nm in enumerate(names[:10])]
        handles += [Line2D([], [], marker=kmark[k], linestyle="none", color="#555",
                           label="plain (k=1)" if k == 1 else f"k={k}") for k in ks]
    else:                   # one matrix: colour = k and marker = method, as in the ρ figure
        style = lambda c: (kcol[int(c.get("n_clusters", 1))],  # noqa: E731
                           "o" if int(c.get("n_clusters", 1)) == 1
                           else METHOD_STYLE.get(str(c.get("method")), ("", "D"))[1])
        handles = [Line2D([], [], marker="o", linestyle="none", color=kcol[k],
                          label="plain (k=1)" if k == 1 else f"k={k}") for k in ks]
        handles += [Line2D([], [], marker=METHOD_STYLE.get(m, ("", "D"))[1], linestyle="none", color="#555",
                           label=m) for m in methods]
    for t, c in enumerate(pts):
        colr, mk = style(c)
        ax.scatter(x[t], y[t], s=36, marker=mk, color=colr, alpha=0.85, edgecolor="white", linewidth=0.5,
                   zorder=3)
        if _cand_key(c) in plan:
            ax.scatter(x[t], y[t], s=230, marker="*", color="gold", edgecolor="black", linewidth=0.8, zorder=4)
    if any(_cand_key(c) in plan for c in pts):
        handles.append(Line2D([], [], marker="*", linestyle="none", color="gold", markeredgecolor="black",
                              markersize=11, label="chosen"))
    handles.append(Line2D([], [], color="#bbb", linestyle="--", label="measured = predicted"))
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              title=short_name(names[0]) if len(names) == 1 else None, title_fontsize=7.5)
    span = max(abs(lo), abs(hi))
    small = np.abs(np.concatenate([x, y]))
    small = small[small > 0]
    if small.size and span / max(np.median(small), 1e-12) > 50:     # a few huge predictions: symlog
        lt = float(np.percentile(small, 25))
        ax.set_xscale("symlog", linthresh=lt)
        ax.set_yscale("symlog", linthresh=lt)
    lname = "choice-restricted loss" if key == "choice_loss" else "log-loss"
    ax.set_xlabel("predicted first-order $\\Delta\\hat L$ = $\\langle G, \\hat W - W\\rangle$", fontsize=9)
    ax.set_ylabel(f"measured Δ {lname} (selection)", fontsize=9)
    rc = _num(_get(report, "search", "rank_correlation_predicted_vs_measured"))
    ax.set_title("Does the first-order estimate rank candidates?\n"
                 + (f"Spearman rank correlation {rc:+.2f} over {len(pts)} candidates" if rc is not None
                    else f"{len(pts)} candidates"), fontsize=10, loc="left")
    fig.tight_layout()
    return _png(fig)


def _phase_colour(phase: str) -> str:
    """Scan blue, search orange, evaluation of base/adapted green, the rest grey."""
    if phase.startswith("scan") or phase == "svd":
        return "#4c72b0"
    if phase in ("candidates", "search"):
        return "#dd8452"
    if phase.startswith(("select", "test", "val")):
        return "#55a868"
    return "#999999"


def fig_timings(report: dict) -> bytes | None:
    """(d) seconds per phase, in pipeline order, with the share of the total."""
    t = report.get("timings")
    if not isinstance(t, dict):
        return None
    items = [(k, _num(v)) for k, v in t.items() if k != "total" and _num(v) is not None]
    if not items:
        return None
    _, Figure, _ = _mpl()
    total = _num(t.get("total")) or sum(v for _, v in items)
    fig = Figure(figsize=(6.4, max(2.2, 0.34 * len(items) + 1.1)))
    ax = fig.add_subplot()
    _style(ax)
    ax.grid(axis="y", visible=False)
    labels = [PHASES.get(k, k) for k, _ in items]
    vals = [v for _, v in items]
    ys = list(range(len(items)))
    ax.barh(ys, vals, color=[_phase_colour(k) for k, _ in items], height=0.62)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    vmax = max(vals) or 1.0
    for yv, v in zip(ys, vals):
        ax.text(v + vmax * 0.01, yv, f"{fmt_seconds(v)}  ({100 * v / total:.0f}%)" if total else fmt_seconds(v),
                va="center", fontsize=7.5, color="#333")
    ax.set_xlim(0, vmax * 1.28)
    ax.set_xlabel("seconds", fontsize=8)
    other = total - sum(vals)
    sub = f"total {fmt_seconds(total)}" + (f" (unlisted: {fmt_seconds(other)})" if other > 0.05 * total else "")
    ax.set_title(f"Where the time went — {sub}", fontsize=10, loc="left")
    fig.tight_layout()
    return _png(fig)


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
            m = _get(report, split, which)
            if not isinstance(m, dict):
                continue
            maj = m.get("majority") if isinstance(m.get("majority"), dict) else {}
            rows.append([label, which, m.get("n", "—"), fmt_pct(m.get("accuracy")), fmt_pct(m.get("accuracy_sum")),
                         fmt_pct(m.get("accuracy_mean")), fmt_float(m.get("log_loss")),
                         fmt_float(m.get("choice_loss")), fmt_pct(maj.get("accuracy")),
                         "—" if maj.get("label") is None else str(maj.get("label"))])
            classes.append("adapted" if which == "adapted" else "")
        b, a = _get(report, split, "base"), _get(report, split, "adapted")
        if isinstance(b, dict) and isinstance(a, dict):
            d = lambda k: (_num(a.get(k)) - _num(b.get(k))) if None not in (_num(a.get(k)), _num(b.get(k))) \
                else None  # noqa: E731
            rows.append([label, "change", "", fmt_pts(d("accuracy")), fmt_pts(d("accuracy_sum")),
                         fmt_pts(d("accuracy_mean")), fmt_float(d("log_loss")) if d("log_loss") is None else
                         f"{d('log_loss'):+.3f}", fmt_float(d("choice_loss")) if d("choice_loss") is None else
                         f"{d('choice_loss'):+.3f}", "", ""])
            classes.append("muted")
    if not rows:
        return ""
    scoring = _get(report, "selection", "base", "scoring") or _get(report, "test", "base", "scoring") or \
        _get(report, "config", "scoring")
    out = ["<h2>Accuracy: base vs adapted</h2>",
           _table(["split", "model", "n", "accuracy", "acc (summed)", "acc (length-norm.)", "log-loss",
                   "choice-loss", "majority", "majority label"], rows, left=2, row_class=classes),
           "<p class='sub'>“accuracy” is the primary scoring"
           + (f" (<code>{_e(scoring)}</code>)" if scoring else "")
           + "; summed and length-normalised log-probability scoring are both shown because a rank reduction can "
             "flip a label-length bias (METHOD.md §1.3). “majority” is the accuracy of always answering the most "
             "frequent label of that split. Selection metrics are measured on the same sample the plan was "
             "chosen on; only held-out numbers are an estimate of the gain.</p>"]
    d = report.get("draws")
    if isinstance(d, dict):
        accs = d.get("test_accuracy") if isinstance(d.get("test_accuracy"), list) else []
        gains = d.get("test_gain") if isinstance(d.get("test_gain"), list) else []
        plans = d.get("plans") if isinstance(d.get("plans"), list) else []
        paired = d.get("test_paired") if isinstance(d.get("test_paired"), list) else []
        drows = []
        for i, acc in enumerate(accs):
            p = _dicts(plans[i]) if i < len(plans) else []
            pr = paired[i] if i < len(paired) and isinstance(paired[i], dict) else {}
            drows.append([str(i), "; ".join(edit_text(e) for e in p) or "none", fmt_pct(acc),
                          fmt_pts(gains[i]) if i < len(gains) else "—",
                          f"{pr['fixed']} / {pr['broken']}" if "fixed" in pr and "broken" in pr else "—",
                          f"{_num(pr.get('p_two_sided')):.2g}" if _num(pr.get("p_two_sided")) is not None else "—"])
        out += [f"<h3>Spread over {_e(d.get('n', len(accs)))} selection draws</h3>",
                f"<p>held-out accuracy of the adapted model: mean {fmt_pct(d.get('mean'))}, "
                f"std {fmt_pts(d.get('std'))[1:]}, min {fmt_pct(d.get('min'))}, max {fmt_pct(d.get('max'))}</p>"]
        if drows:
            out.append(_table(["draw", "plan", "held-out accuracy", "gain over base", "fixed / broken",
                               "McNemar p"], drows, left=2))
    return "\n".join(out)


def _plan_section(report: dict) -> str:
    if "plan" not in report:
        return ""
    plan = _dicts(report.get("plan"))
    if not plan:
        return "<h2>Plan</h2><p>No candidate beat the base model on the selection sample: the plan is empty " \
               "and the adapted model is the base model.</p>"
    rows = [[e.get("matrix", "?"), e.get("rank_fraction", "—"), e.get("n_clusters", 1), e.get("method", "—"),
             e.get("seed", "—")] for e in plan]
    return "<h2>Plan</h2>" + _table(["matrix", "ρ (kept rank fraction)", "clusters k", "method", "seed"], rows)


def _accounting_section(report: dict) -> str:
    acc = report.get("accounting")
    mats = _dicts(_get(acc, "matrices"))
    tot = _get(acc, "total")
    if not mats and not isinstance(tot, dict):
        return ""
    out = ["<h2>Size: parameters and bytes before and after</h2>"]
    if isinstance(tot, dict):
        pb, pa = _num(tot.get("model_params_before")), _num(tot.get("model_params_after"))
        bb, ba = _num(tot.get("model_bytes_before")), _num(tot.get("model_bytes_after"))
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
    cands = _evaluated(report)
    if not cands:
        return ""
    ranked = _ranked(cands)
    plan = _plan_keys(report)
    has_pred = any(_num(c.get("predicted_delta")) is not None for c in ranked)
    header = ["matrix", "ρ", "k", "method"] + (["predicted ΔL̂"] if has_pred else []) + \
        ["accuracy", "acc (summed)", "acc (length-norm.)", "log-loss", "choice-loss", "seconds"]
    rows, classes = [], []
    for c in ranked[:top]:
        rows.append([c.get("matrix", "?"), c.get("rank_fraction", "—"), c.get("n_clusters", 1),
                     c.get("method", "—")] + ([fmt_float(c.get("predicted_delta"))] if has_pred else []) +
                    [fmt_pct(c.get("accuracy")), fmt_pct(c.get("accuracy_sum")), fmt_pct(c.get("accuracy_mean")),
                     fmt_float(c.get("log_loss")), fmt_float(c.get("choice_loss")),
                     "twin, not rerun" if c.get("same_as") else fmt_float(c.get("seconds"), 2)])
        classes.append("best" if _cand_key(c) in plan else "")
    n_all = _get(report, "search", "n_candidates")
    note = f"{len(cands)} evaluated" + (f" of {n_all} built" if isinstance(n_all, int) else "")
    twins = sum(bool(c.get("same_as")) for c in cands)
    if twins:
        note += (f" ({twins} of them twins: the same factors as an earlier candidate, so its result without a "
                 f"pass)")
    fp = report.get("forward_passes")
    if isinstance(fp, dict) and _num(fp.get("search_equivalent_full_passes")) is not None:
        note += (f"; the search cost {fp.get('search_layer_passes')} layer passes "
                 f"(≈ {fp['search_equivalent_full_passes']} full forward passes over the selection sample)")
    return (f"<h2>Top candidates (selection sample)</h2><p class='sub'>Ranked by accuracy, then log-loss; "
            f"{_e(note)}. The highlighted row is the plan.</p>" + _table(header, rows, left=1, row_class=classes))


def _scan_section(report: dict, top: int = 10) -> str:
    mats = [m for m in _dicts(_get(report, "scan", "matrices")) if _num(m.get("score")) is not None]
    if not mats:
        return ""
    mats = sorted(mats, key=lambda m: m["score"])[:top]
    rhos = sorted({r for m in mats for r in (m.get("first_order_delta") or {})}, key=lambda r: -float(r))
    rows = [[m.get("matrix", "?"), m.get("type", "—"), fmt_float(m.get("score")),
             fmt_float(m.get("grad_sigma_norm"))] + [fmt_float(_get(m, "first_order_delta", r)) for r in rhos]
            for m in mats]
    scan = report.get("scan")
    loss = _num(_get(scan, "loss"))
    sub = f"score: <code>{_e(_get(scan, 'score_kind', default='?'))}</code>, lower = more promising"
    if loss is not None:
        kind = _e(_get(scan, "loss_kind", default="?"))
        sub += f"; selection loss at the base weights {loss:.3f} (<code>{kind}</code>)"
    return (f"<h2>Scan: the {len(mats)} best-scored matrices</h2><p class='sub'>{sub}</p>"
            + _table(["matrix", "type", "score", "‖∂L/∂σ‖"] + [f"ΔL̂ ρ={r}" for r in rhos], rows, left=2))


def _figure_html(name: str, png: bytes, caption: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{caption} <span class='muted'>({_e(name)})</span></figcaption></figure>")


CAPTIONS = {
    "scan_heatmap.png": "<b>(a)</b> One backward pass over the selection sample scores every matrix: the colour is "
                        "the first-order loss change of its best plain truncation (red: truncating is predicted "
                        "to lower the loss). Boxed cells are the top-K matrices the search inspected; the star is "
                        "the plan.",
    "search_rho.png": "<b>(b)</b> Measured selection accuracy (top) and log-loss (bottom) of every evaluated "
                      "candidate against the kept rank fraction ρ. Black: plain truncated SVD (LASER's k=1); "
                      "coloured: row-clustered factorizations, one line per number of clusters k and method. "
                      "Dashed grey: the base model; dotted red: the majority class. Missing points were not "
                      "evaluated (the search evaluates the candidates with the best predicted ΔL̂ first).",
    "predicted_vs_measured.png": "<b>(c)</b> The free first-order estimate ΔL̂ = ⟨G, Ŵ − W⟩ against the "
                                 "measured change of the selection loss. It is crude for large truncations, so "
                                 "it is used to rank and prune candidates, not to predict loss; the rank "
                                 "correlation says how well it ranks.",
    "timings.png": "<b>(d)</b> Wall-clock seconds per phase of the run.",
}


def _html(report: dict, source: Path, figures: dict[str, bytes]) -> str:
    task, cfg, ver = report.get("task"), report.get("config"), report.get("versions")
    tname = task.get("name") if isinstance(task, dict) else task
    model = _get(cfg, "model")
    title = f"c2i report — {tname or 'run'}" + (f" on {model}" if model else "")
    method = "LASER" if isinstance(cfg, dict) and "val_size" in cfg else "Compress-to-Impress"
    facts = [method]
    if isinstance(task, dict):
        if task.get("kind"):
            facts.append(f"{task['kind']} task")
        n_sel = task.get("n_select", task.get("n_val"))
        if n_sel is not None:
            facts.append(f"{n_sel} selection / {task.get('n_test', '?')} held-out examples")
    if isinstance(cfg, dict):
        for k, lab in (("top_k", "top-K"), ("max_evals", "max evals"), ("seed", "seed")):
            if k in cfg:
                facts.append(f"{lab} {cfg[k]}")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1><p class='sub'>{_e(' · '.join(facts))}</p>"]
    head = _headline(report)
    plan = _dicts(report.get("plan"))
    if plan:
        head.insert(0, "Plan: " + "; ".join(edit_text(e) for e in plan) + ".")
    elif "plan" in report:
        head.insert(0, "Plan: none — no candidate beat the base model on the selection sample.")
    if head:
        parts.append("<div class='headline'>" + "".join(f"<p>{_e(s)}</p>" for s in head) + "</div>")
    parts.append(_metrics_section(report))
    for name in ("scan_heatmap.png", "search_rho.png"):
        if name in figures:
            parts.append(_figure_html(name, figures[name], CAPTIONS[name]))
    parts.append(_plan_section(report))
    parts.append(_candidates_section(report))
    if "predicted_vs_measured.png" in figures:
        parts.append(_figure_html("predicted_vs_measured.png", figures["predicted_vs_measured.png"],
                                  CAPTIONS["predicted_vs_measured.png"]))
    parts.append(_scan_section(report))
    parts.append(_accounting_section(report))
    if "timings.png" in figures:
        parts.append("<h2>Time</h2>" + _figure_html("timings.png", figures["timings.png"], CAPTIONS["timings.png"]))
    details = []
    if isinstance(cfg, dict):
        details.append("<details><summary>configuration</summary>"
                       + _table(["key", "value"], [[k, json.dumps(v, default=str)] for k, v in cfg.items()], left=2)
                       + "</details>")
    if isinstance(ver, dict):
        details.append("<details><summary>versions</summary>"
                       + _table(["package", "version"], [[k, v] for k, v in ver.items()], left=2) + "</details>")
    parts += details
    parts.append(f"<p class='muted'>Rendered from <code>{_e(source)}</code> by c2i_fast.report.</p></body></html>")
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------
def render_figures(report: dict) -> dict[str, bytes]:
    """Every figure the report has the data for, as PNG bytes keyed by file name (in FIGURES order)."""
    makers = {"scan_heatmap.png": fig_scan_heatmap, "search_rho.png": fig_search_rho,
              "predicted_vs_measured.png": fig_predicted_vs_measured, "timings.png": fig_timings}
    _mpl()          # the clear error before any work
    out = {}
    for name in FIGURES:
        png = makers[name](report)
        if png:
            out[name] = png
    return out


def render_report(run_dir, out_dir=None) -> Path:
    """Render ``<run_dir>/report.json`` into ``<out_dir or run_dir/report>/index.html`` plus one PNG per figure.

    Returns the path of index.html. Raises C2IError (naming the file) when report.json is missing or not a
    JSON object, or when matplotlib is not installed. Figure files of a previous render that this report has
    no data for are removed, so the folder always matches its index.html.
    """
    from .transform import atomic_write_bytes    # lazily: rendering a report needs no model code loaded
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
    atomic_write_bytes(index, _html(report, source, figures).encode("utf-8"))
    return index
