"""c2i_fast.adapt(model, tokenizer, train, …) on a loaded model: the same plan and numbers as `c2i adapt`, in-memory
data, nothing written, the model left as it was (slow: the real SmolLM2)."""
from __future__ import annotations

import json

import pytest

import c2i_fast
from c2i_fast.artifacts import fingerprint
from c2i_fast.pipeline import AdaptConfig, adapt as run

OPTS = dict(samples=30, test_size=40, confirm_size=60, top_k=1, clusters=(1, 2), methods=("block",),
            rank_fractions=(0.1, 0.01), max_evals=4, threads=2, progress=False, rule="paper")


def _numbers(rep):
    return rep["plan"], rep["selection"]["adapted"]["accuracy"], rep["test"]["base"]["accuracy"], \
        rep["test"]["adapted"]["accuracy"], rep["test"]["adapted"]["log_loss"]


def test_same_plan_and_numbers_as_c2i_adapt_and_the_model_is_left_alone(smollm2, data_dir, tmp_path, monkeypatch):
    cli = run(AdaptConfig(model="smollm2", task="fever", out=str(tmp_path / "cli"), data_dir=str(data_dir), **OPTS))
    assert cli["search"]["prune_keep"] == 1          # the paper rule reads its pick only
    monkeypatch.setenv("C2I_CACHE", str(tmp_path / "cache"))
    before = fingerprint(smollm2.model)
    res = c2i_fast.adapt(smollm2.model, smollm2.tokenizer, "fever", data_dir=str(data_dir), **OPTS)
    assert _numbers(res.report) == _numbers(cli)
    assert fingerprint(smollm2.model) == before and not c2i_fast.transform.factored_modules(smollm2.model)
    assert not (tmp_path / "cache").exists()                 # nothing written unless asked
    if res.plan.edits:                                        # apply / restore / save round trip
        res.apply()
        assert list(c2i_fast.transform.factored_modules(smollm2.model)) == [e.matrix for e in res.plan.edits]
        res.restore()
        assert fingerprint(smollm2.model) == before
    out = res.save(tmp_path / "saved")
    assert json.loads((out / "report.json").read_text())["plan"] == res.report["plan"]
    assert "<html" in res.to_html().lower() and "held-out" in res.summary().lower()
    assert fingerprint(smollm2.model) == before


def test_examples_in_memory_and_an_explicit_test_set(smollm2, data_dir):
    from c2i_fast.tasks import load_task
    fever = load_task("fever", str(data_dir))
    rows = [{"id": e.id, "prompt": e.prompt, "answer": e.target.strip(), "choices": [c.strip() for c in e.choices]}
            for e in fever.examples[:160]]
    res = c2i_fast.adapt(smollm2.model, smollm2.tokenizer, rows[:120], test=rows[120:], name="fever-mini",
                         **{**OPTS, "rule": "confirm", "confirm_size": 60})
    assert res.report["task"]["n_test"] == 40 and res.report["task"]["n_confirm"] == 60
    assert res.report["decision"]["rule"] == "confirm"
    # a datasets.Dataset of the same records is the same task (so the same run: adapt is deterministic on a task)
    datasets = pytest.importorskip("datasets")
    from c2i_fast.notebook import as_task
    a, b = as_task(datasets.Dataset.from_list(rows[:120]), "fever-mini"), as_task(rows[:120], "fever-mini")
    assert a.kind == b.kind == "classification" and a.examples == b.examples and len(a.examples) == 120


def test_bad_calls_say_what_is_wrong(smollm2):
    with pytest.raises(c2i_fast.C2IError, match="needs the tokenizer and the training examples"):
        c2i_fast.adapt(smollm2.model)
    with pytest.raises(c2i_fast.C2IError, match="'task' is given by the arguments"):
        c2i_fast.adapt(smollm2.model, smollm2.tokenizer, "fever", task="counterfact")
