"""What a ``report.json`` holds and how to read it: the schema, :func:`normalise` (any older layout → the
current one, every section present), the number formatting and the small queries the HTML page, the terminal
table and the figures share. No torch, no matplotlib.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .errors import C2IError

REPORT = "report.json"
SCHEMA = 2          # the report.json layout build_report writes and this module reads (2: decision, test.changed)
FIGURES = ("scan_heatmap.png", "search_rho.png", "predicted_vs_measured.png", "timings.png")

# Matrix types in display order (c2i_fast.models.MATRIX_TYPES; repeated here so rendering needs no torch).
TYPE_ORDER = ("q", "k", "v", "qkv", "o", "mlp_in", "mlp_up", "mlp_out")
PHASES = {"load": "load model", "scan_gradient": "scan: gradient pass", "scan_svd": "scan: SVDs",
          "candidates": "build candidates", "select_base": "selection: base", "val_base": "validation: base",
          "search": "search", "svd": "SVDs", "confirm": "confirm", "test_base": "held-out: base",
          "test_adapted": "held-out: adapted", "test_compared": "held-out: other rules"}


# ---------------------------------------------------------------------------------------------------------
# formatting (shared by the HTML page, the terminal table, the figures and the tests)
# ---------------------------------------------------------------------------------------------------------
def num(x) -> float | None:
    """``x`` as a finite float, else None (None, NaN, strings, bools all read as missing)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def fmt_pct(x) -> str:
    """An accuracy in [0, 1] as a percentage with one decimal: 0.4583 → '45.8%'; missing → '—'."""
    v = num(x)
    return "—" if v is None else f"{100 * v:.1f}%"


def fmt_pts(x) -> str:
    """A difference of accuracies in percentage points, signed: 0.333 → '+33.3 pts'."""
    v = num(x)
    return "—" if v is None else f"{round(100 * v, 1) + 0.0:+.1f} pts"      # + 0.0: no "-0.0"


def fmt_float(x, digits: int = 3) -> str:
    v = num(x)
    return "—" if v is None else f"{v:.{digits}f}"


def fmt_count(x) -> str:
    """A parameter count: 134515008 → '134.52 M'."""
    v = num(x)
    if v is None:
        return "—"
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def fmt_bytes(x) -> str:
    """A byte count with binary prefixes: 538060032 → '513.1 MiB'."""
    v = num(x)
    if v is None:
        return "—"
    for div, unit in ((2 ** 30, " GiB"), (2 ** 20, " MiB"), (2 ** 10, " KiB")):
        if abs(v) >= div:
            return f"{v / div:.1f}{unit}"
    return f"{v:.0f} B"


def fmt_seconds(x) -> str:
    v = num(x)
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
# reading: any older layout → the layout of SCHEMA, every section present
# ---------------------------------------------------------------------------------------------------------
def load_report(run_dir) -> tuple[dict, Path]:
    """The normalised report of ``run_dir`` (a run directory or the report.json itself) and the file it came
    from."""
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
    return normalise(report, source=str(path)), path


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _dict_or_none(x) -> dict | None:
    return x if isinstance(x, dict) else None


def dicts(x) -> list[dict]:
    return [e for e in x if isinstance(e, dict)] if isinstance(x, list) else []


def _list(x) -> list:
    return x if isinstance(x, list) else []


def _metrics(m) -> dict | None:
    """One model's metrics on one split, with ``majority`` always a dict (the other keys depend on the task)."""
    return {**m, "majority": _dict(m.get("majority"))} if isinstance(m, dict) else None


def normalise(report: dict, source: str = "report") -> dict:
    """``report`` in the layout of schema :data:`SCHEMA` (see :func:`c2i_fast.pipeline.build_report`), every
    section present: ``config``, ``versions``, ``forward_passes``, ``timings`` dicts; ``task`` a dict with
    ``name`` and ``kind``; ``plan`` a list of edits, or None where the report has no plan (``c2i eval``);
    ``scan.matrices``, ``search.candidates`` and ``accounting.matrices`` lists; metrics (``selection``/``test``
    × ``base``/``adapted``), ``test.paired``, ``search.significance``, ``accounting.total`` and ``draws`` dicts
    or None. Entries that are not of their type read as missing. Idempotent.

    No ``schema`` key: a report from before it existed (the same sections), a hand-made one, or the metrics
    ``c2i eval --out FILE`` writes (base/adapted at the top level: read as the held-out split). A ``schema``
    above :data:`SCHEMA` raises C2IError naming ``source``.
    """
    schema = report.get("schema", 0)
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 0:
        raise C2IError(f"{source}: 'schema' must be a non-negative integer, got {schema!r}")
    if schema > SCHEMA:
        raise C2IError(f"{source} has report schema {schema}, newer than this c2i_fast reads ({SCHEMA}): "
                       f"upgrade c2i_fast to render it")
    if schema == 0 and "test" not in report and isinstance(report.get("base"), dict):    # c2i eval --out FILE
        report = {**report, "test": {"base": report["base"], "adapted": report.get("adapted", report["base"])}}
        if isinstance(report.get("task"), str):
            report["task"] = {"name": report["task"], "n_test": report.get("n_test")}
    task = report.get("task")
    scan, search, acc = _dict(report.get("scan")), _dict(report.get("search")), _dict(report.get("accounting"))
    sel, test, draws = _dict(report.get("selection")), _dict(report.get("test")), _dict_or_none(report.get("draws"))
    return {
        **report,
        "schema": SCHEMA,
        "config": _dict(report.get("config")),
        "versions": _dict(report.get("versions")),
        "task": {"name": None, "kind": None, **task} if isinstance(task, dict) else {"name": task, "kind": None},
        "plan": None if report.get("plan") is None else dicts(report["plan"]),
        "scan": {"loss": None, "loss_kind": None, "score_kind": None, **scan, "matrices": dicts(scan.get("matrices"))},
        "search": {"n_candidates": None, "rank_correlation_predicted_vs_measured": None, **search,
                   "significance": _dict_or_none(search.get("significance")),
                   "candidates": dicts(search.get("candidates"))},
        "selection": {"base": _metrics(sel.get("base")), "adapted": _metrics(sel.get("adapted"))},
        "test": {"base": _metrics(test.get("base")), "adapted": _metrics(test.get("adapted")),
                 "paired": _dict_or_none(test.get("paired")), "changed": num(test.get("changed"))},
        "decision": _dict_or_none(report.get("decision")),
        "forward_passes": _dict(report.get("forward_passes")),
        "accounting": {**acc, "matrices": dicts(acc.get("matrices")), "total": _dict_or_none(acc.get("total"))},
        "timings": _dict(report.get("timings")),
        "draws": None if draws is None else {**draws, **{k: _list(draws.get(k)) for k in (
            "plans", "test_accuracy", "test_gain", "test_paired")}},
    }


def loss_key(report: dict) -> str:
    """The selection loss the scan ranked by (``config.loss``): choice_loss or log_loss."""
    return "choice_loss" if report["config"].get("loss") == "choice" else "log_loss"


def evaluated(report: dict) -> list[dict]:
    """The search's candidates that have a measured accuracy, in evaluation order."""
    return [c for c in report["search"]["candidates"] if num(c.get("accuracy")) is not None]


def ranked(cands: list[dict]) -> list[dict]:
    """Best first, as the search ranks them: accuracy, then log-loss."""
    def key(c):
        ll = num(c.get("log_loss"))
        return (-num(c.get("accuracy")), ll if ll is not None else math.inf)
    return sorted(cands, key=key)


def candidate_key(c: dict) -> tuple:
    """(matrix, ρ, k, method) of a candidate summary or plan edit: how the plan's rows are found."""
    return (c.get("matrix"), num(c.get("rank_fraction")), c.get("n_clusters", 1), c.get("method", "block"))


def plan_keys(report: dict) -> set[tuple]:
    return {candidate_key(e) for e in report["plan"] or ()}
