"""The report's figures as PNG bytes, drawn from a normalised report (:func:`c2i_fast.report.normalise`).

    scan_heatmap.png            (a) Σ-gradient score over layers × matrix types; inspected and chosen marked
    search_rho.png              (b) selection accuracy and log-loss vs ρ per inspected matrix, plain vs clustered
    predicted_vs_measured.png   (c) first-order ΔL̂ vs the measured loss change, with the rank correlation
    timings.png                 (d) seconds per phase

A figure whose data the report lacks (no scan section in a LASER report, no evaluated candidate, …) is None.
matplotlib is imported lazily (``pip install c2i_fast[report]``) and used without pyplot (Agg canvas), so
drawing never touches a global backend.
"""
from __future__ import annotations

import io
import re

from .errors import C2IError
from .report_data import (FIGURES, PHASES, TYPE_ORDER, candidate_key, evaluated, fmt_seconds, loss_key, normalise, num,
                     plan_keys, short_name)

K_COLOURS = ("#dd8452", "#55a868", "#4c72b0", "#c44e52", "#937860", "#da8bc3", "#8c8c8c")
MAJORITY_COLOUR = "#7b3294"
METHOD_STYLE = {"block": ("-", "o"), "kmeans": ("--", "s"), "projective": (":", "^")}
DPI = 110


# HTML captions, one per figure (c2i_fast.report places them)
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
    mats = [m for m in report["scan"]["matrices"]
            if num(m.get("score")) is not None and isinstance(m.get("layer"), int)]
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
    kind = report["scan"]["score_kind"] or "first_order"
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
    inspected = {c.get("matrix") for c in report["search"]["candidates"]}
    chosen = {e.get("matrix") for e in report["plan"] or ()}
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
    cands = [c for c in evaluated(report) if num(c.get("rank_fraction")) is not None]
    if not cands:
        return None
    matplotlib, Figure, _ = _mpl()
    best_by_matrix: dict[str, float] = {}
    order: list[str] = []
    for c in report["search"]["candidates"]:      # every inspected matrix, evaluated or not
        name = c.get("matrix")
        if name not in best_by_matrix:
            order.append(name)
            best_by_matrix[name] = -1.0
        if c in cands:
            best_by_matrix[name] = max(best_by_matrix[name], c["accuracy"])
    scanned = [m.get("matrix") for m in report["scan"]["matrices"]]
    first = {n: i for i, n in enumerate(order)}
    order.sort(key=lambda n: scanned.index(n) if n in scanned else len(scanned) + first[n])
    pos_of = {n: i for i, n in enumerate(order)}
    shown = order
    if len(order) > max_matrices:       # a LASER sweep: show the matrices that did best
        chosen = {e.get("matrix") for e in report["plan"] or ()}
        shown = sorted(order, key=lambda n: (n not in chosen, -best_by_matrix[n], pos_of[n]))[:max_matrices]
        shown.sort(key=pos_of.get)
    ks = sorted({int(c.get("n_clusters", 1)) for c in cands if c.get("n_clusters", 1) != 1})
    colour = {k: K_COLOURS[i % len(K_COLOURS)] for i, k in enumerate(ks)}
    plan = plan_keys(report)
    base = report["selection"]["base"] or {"majority": {}}
    b_acc, b_ll = num(base.get("accuracy")), num(base.get("log_loss"))
    maj = num(base["majority"].get("accuracy"))
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
                cs = sorted((c for c in cs if num(c.get(key)) is not None), key=lambda c: xpos[c["rank_fraction"]])
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
                    if candidate_key(c) in plan:
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
    total, n_ev = report["search"]["n_candidates"], len(cands)
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
    key = loss_key(report)
    base = num((report["selection"]["base"] or {}).get(key))
    pts = [c for c in evaluated(report) if num(c.get("predicted_delta")) is not None
           and num(c.get(key)) is not None]
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
    plan = plan_keys(report)
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
        if candidate_key(c) in plan:
            ax.scatter(x[t], y[t], s=230, marker="*", color="gold", edgecolor="black", linewidth=0.8, zorder=4)
    if any(candidate_key(c) in plan for c in pts):
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
    rc = num(report["search"]["rank_correlation_predicted_vs_measured"])
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
    t = report["timings"]
    items = [(k, num(v)) for k, v in t.items() if k != "total" and num(v) is not None]
    if not items:
        return None
    _, Figure, _ = _mpl()
    total = num(t.get("total")) or sum(v for _, v in items)
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



def render_figures(report: dict) -> dict[str, bytes]:
    """Every figure the report has the data for, as PNG bytes keyed by file name (in FIGURES order)."""
    report = normalise(report)
    makers = {"scan_heatmap.png": fig_scan_heatmap, "search_rho.png": fig_search_rho,
              "predicted_vs_measured.png": fig_predicted_vs_measured, "timings.png": fig_timings}
    _mpl()          # the clear error before any work
    out = {}
    for name in FIGURES:
        png = makers[name](report)
        if png:
            out[name] = png
    return out
