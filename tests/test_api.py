"""The package's public surface: what ``import c2i_fast`` shows (and does not load), the run configurations'
shared base and their unchanged fields, the report schema, and LASER's order through ``search()``."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import c2i_fast

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


# ---------------------------------------------------------------------------------------------------------
# the package namespace
# ---------------------------------------------------------------------------------------------------------
def test_import_loads_neither_torch_nor_transformers():
    r = _python("import sys, c2i_fast; dir(c2i_fast); c2i_fast.__all__; "
                "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    assert r.returncode == 0, r.stderr


def test_every_public_name_resolves_and_dir_lists_it():
    listed = dir(c2i_fast)
    for name in c2i_fast.__all__:
        assert name in listed, name
        assert getattr(c2i_fast, name) is not None, name
    assert c2i_fast.EvalConfig.__name__ == "EvalConfig" and callable(c2i_fast.evaluate_model)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        c2i_fast.nope  # noqa: B018


def test_type_checking_imports_name_exactly_the_lazy_exports():
    """Type checkers and IDEs read the TYPE_CHECKING block; it must match what __getattr__ serves."""
    tree = ast.parse((ROOT / "c2i_fast" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {}
    for imp in block.body:
        for a in imp.names:
            seen[a.asname or a.name] = imp.module
    lazy = {n for n in c2i_fast.__all__ if n not in ("C2IError", "__version__")}
    assert set(seen) == lazy
    for name, module in seen.items():       # each the object __getattr__ serves
        assert getattr(importlib.import_module(f"c2i_fast.{module}"), name) is getattr(c2i_fast, name), name


def test_report_rendering_never_imports_torch(tmp_path):
    pytest.importorskip("matplotlib")
    d = tmp_path / "run"
    d.mkdir()
    (d / "report.json").write_text(json.dumps({"schema": 1, "test": {"base": {"accuracy": 0.5},
                                                                     "adapted": {"accuracy": 0.75}},
                                               "timings": {"load": 1.0, "total": 2.0}}))
    r = _python("import sys, c2i_fast.report as r, c2i_fast.figures; "
                "assert 'torch' not in sys.modules, 'after import'; "
                f"r.render_report({str(d)!r}); print(r.summary_table(r.load_report({str(d)!r})[0])); "
                "assert 'torch' not in sys.modules, 'after rendering'")
    assert r.returncode == 0, r.stderr
    assert "75.0%" in r.stdout and (d / "report" / "timings.png").is_file()


# ---------------------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------------------
SHARED = {"test_size": 500, "seed": 0, "scoring": "mean", "data_dir": None, "metric": None, "batch_tokens": 4096,
          "share_prefix": True, "progress": True, "threads": None, "log_json": None, "metrics_cache": True}
# every field and default each config had before the base class: callers construct them by keyword
OWN = {
    "AdaptConfig": {"samples": 100, "top_k": 5, "rank_fractions": (0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01),
                    "clusters": (1, 2, 4, 8), "methods": ("block", "kmeans", "projective"),
                    "types": ("q", "k", "v", "qkv", "o", "mlp_in", "mlp_up", "mlp_out"), "max_evals": 48,
                    "compose": 0, "loss": "auto", "score": "first_order", "resume": False, "draws": 1,
                    "dense_candidates": False, "dtype": "float32", "device": None, "device_map": None,
                    "gradient_checkpointing": False, "gate_p": None,
                    # added since: the shipping rule, bench hooks, pruning and the scan's SVD
                    "rule": "confirm", "confirm_size": 200, "confirm_top": 3, "alpha": 0.05, "compare_rules": False,
                    "only_draw": None, "prune": "exact", "keep_best": 0, "scan_svd": "gram", "search_dtype": "model",
                    "scan_cache": "on"},
    "LaserConfig": {"val_size": 100, "rank_fractions": (0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01),
                    "types": ("mlp_in", "mlp_out"), "layers": None, "faithful": False, "resume": False,
                    "draw": 0, "draws": 1, "prune": "off"},
    "EvalConfig": {"plan": None, "samples": 100, "out": None},
}


@pytest.mark.parametrize("name", sorted(OWN))
def test_configs_share_one_base_and_keep_their_fields(name):
    from c2i_fast.pipeline import RunConfig
    cls = getattr(c2i_fast, name)
    assert issubclass(cls, RunConfig)
    base = {f.name for f in dataclasses.fields(RunConfig)}
    assert base == {"model", "task", *SHARED}
    required = {"model", "task"} | ({"out"} if name != "EvalConfig" else set())
    kw = {k: "x" for k in required}
    cfg = cls(**kw)
    got = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}
    assert got == {**kw, **SHARED, **OWN[name]}
    for k in required:
        with pytest.raises(TypeError):
            cls(**{j: v for j, v in kw.items() if j != k})
    assert cfg.to_json()["model"] == "x" and all(not isinstance(v, tuple) for v in cfg.to_json().values())


def test_faithful_modes_run_rows_whole():
    from c2i_fast.pipeline import AdaptConfig, EvalConfig, LaserConfig
    assert AdaptConfig(model="m", task="t", out="o").shares_prefix()
    assert not AdaptConfig(model="m", task="t", out="o", dense_candidates=True).shares_prefix()
    assert not LaserConfig(model="m", task="t", out="o", faithful=True).shares_prefix()
    assert not EvalConfig(model="m", task="t", share_prefix=False).shares_prefix()


def test_resume_reads_a_config_json_of_an_older_version(tmp_path):
    """config.json as the version before the base class wrote it (its key order, no resume/progress/…)."""
    from c2i_fast.pipeline import resume_config
    old = {"model": "smollm2", "task": "fever", "out": str(tmp_path), "samples": 40, "test_size": 60, "top_k": 2,
           "rank_fractions": [0.4, 0.1], "clusters": [1, 2], "methods": ["block"], "types": ["mlp_in"],
           "max_evals": 14, "compose": 0, "seed": 0, "loss": "answer", "score": "first_order", "scoring": "mean",
           "data_dir": None, "metric": None, "batch_tokens": 4096, "share_prefix": True, "draws": 1,
           "dense_candidates": False, "dtype": "float32", "device": None, "device_map": None,
           "gradient_checkpointing": False, "gate_p": None}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = resume_config(str(tmp_path), progress=False, threads=2)
    assert cfg.resume and not cfg.progress and cfg.threads == 2
    assert cfg.rank_fractions == (0.4, 0.1) and cfg.samples == 40 and cfg.out == str(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# report schema
# ---------------------------------------------------------------------------------------------------------
def test_report_schema_is_written_and_read():
    from c2i_fast.pipeline import SCHEMA as written
    from c2i_fast.report import SCHEMA, normalise
    assert written == SCHEMA
    rep = normalise({"schema": SCHEMA, "plan": [], "test": {"base": {"accuracy": 0.5}}})
    assert rep["plan"] == [] and rep["test"]["adapted"] is None and rep["search"]["candidates"] == []
    assert rep["test"]["base"]["majority"] == {} and normalise(rep) == rep        # idempotent


def test_report_without_schema_is_read_as_before():
    from c2i_fast.report import normalise
    rep = normalise({"task": "fever", "n_test": 10, "base": {"accuracy": 0.5}, "adapted": {"accuracy": 0.6}})
    assert rep["task"]["name"] == "fever" and rep["test"]["adapted"]["accuracy"] == 0.6 and rep["plan"] is None


@pytest.mark.parametrize("schema, match", [(99, "newer than this c2i_fast reads"), ("1", "non-negative integer")])
def test_report_with_a_schema_it_cannot_read_is_one_clear_error(tmp_path, schema, match):
    from c2i_fast.errors import C2IError
    from c2i_fast.report import load_report
    (tmp_path / "report.json").write_text(json.dumps({"schema": schema}))
    with pytest.raises(C2IError, match=match) as e:
        load_report(tmp_path)
    assert str(tmp_path / "report.json") in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# search() in LASER's mode
# ---------------------------------------------------------------------------------------------------------
def test_search_in_given_order_scores_every_candidate_once_in_order(monkeypatch):
    """LASER's candidates have ΔL̂ = NaN (no order to sort by) and some share factors: with order="given" and
    dedupe=False each one gets its own evaluation, journalled in the order built."""
    from c2i_fast import search as S
    from c2i_fast.transform import Edit
    scores = {0.5: 0.6, 0.1: 0.7, 0.05: 0.7}
    calls = []

    def fake(scorer, c, cache, applied=(), dense=False, within=True):
        calls.append(c.key())
        return {"accuracy": scores[c.edit.rank_fraction], "log_loss": 1.0 - c.edit.rank_fraction}
    monkeypatch.setattr(S, "evaluate_candidate", fake)
    cands = [S.Candidate(Edit(f"model.layers.{layer}.mlp.down_proj", rho), layer, math.nan)
             for layer in (3, 1) for rho in (0.5, 0.1, 0.05)]
    journal = []
    base = {"accuracy": 0.5, "log_loss": 2.0}
    res = S.search(None, cands, base, None, n_layers=4, max_evals=None, progress=False,
                   on_result=lambda c: journal.append(c.key()), done={cands[1].key(): {"accuracy": 0.0,
                                                                                     "log_loss": 9.0}},
                   order="given", dedupe=False)
    keys = [c.key() for c in cands]
    assert [c.key() for c in res.candidates] == keys
    assert calls == journal == [k for i, k in enumerate(keys) if i != 1]        # the journalled one is skipped
    assert res.forward_layer_passes == 4 * 5 and len(res.evaluated) == 6
    assert [c.key() for c in res.best] == [cands[4].key()]       # 0.7, then the lower log-loss
    with pytest.raises(ValueError, match="order"):
        S.search(None, cands, base, None, n_layers=4, order="sideways")


def test_the_default_scan_loss_is_the_choice_loss_on_classification_tasks_only():
    """`--loss auto` (the default since the pre-registered comparison in docs/results.md): the loss over the
    label choices where there are choices, the answer's log-loss on recall and generation tasks; an explicit
    loss is kept, and an unknown one is refused before anything is loaded or written."""
    from c2i_fast.errors import C2IError
    from c2i_fast.pipeline import AdaptConfig, adapt, scan_loss
    assert AdaptConfig(model="m", task="t", out="o").loss == "auto"
    assert scan_loss("auto", "classification") == "choice"
    assert scan_loss("auto", "recall") == "answer" and scan_loss("auto", "generation") == "answer"
    assert scan_loss("answer", "classification") == "answer" and scan_loss("choice", "classification") == "choice"
    with pytest.raises(C2IError, match="--loss 'margin'"):
        adapt(AdaptConfig(model="m", task="t", out="/nonexistent/never-written", loss="margin"))
