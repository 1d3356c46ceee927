"""The shipping rule inside `c2i adapt` on the real SmolLM2 (slow): what the report says, and that the rule
never reads the held-out rows."""
from __future__ import annotations

import json

import pytest

from c2i_fast.pipeline import AdaptConfig, adapt, resume_config

SMALL = dict(model="smollm2", task="fever", samples=30, test_size=40, confirm_size=60, top_k=1, clusters=(1, 2),
             methods=("block",), rank_fractions=(0.1, 0.01), max_evals=4, threads=2, progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm2, data_dir):
    out = tmp_path_factory.mktemp("rule") / "run"
    return adapt(AdaptConfig(out=str(out), compare_rules=True, data_dir=str(data_dir), **SMALL), lm=smollm2), out


def test_the_report_says_what_the_rule_decided(run):
    rep, out = run
    dec = rep["decision"]
    assert dec["rule"] == "confirm" and isinstance(dec["shipped"], bool) and dec["reason"]
    assert rep["task"]["n_confirm"] == 60 and dec["n_confirm"] == 60
    plan = json.loads((out / "plan.json").read_text())
    assert [e["matrix"] for e in plan["edits"]] == [e["matrix"] for e in rep["plan"]]
    assert bool(rep["plan"]) == dec["shipped"] and plan["meta"]["rule"] == "confirm"
    assert set(rep["rules"]) == {"confirm", "paper"}
    for name, r in rep["rules"].items():                      # every rule judged on the same held-out rows
        assert r["test"]["base"]["accuracy"] == rep["test"]["base"]["accuracy"]
        assert r["test"]["changed"] is not None and 0.0 <= r["test"]["changed"] <= 1.0
        assert (r["test"]["changed"] == 0.0) == (not r["plan"]) or r["test"]["changed"] == 0.0
    assert rep["rules"]["confirm"]["plan"] == rep["plan"]
    if not dec["fallback"] and dec["confirmed"]:
        c = dec["confirmed"][dec["chosen"]]
        assert c["paired"]["n"] == 60 and dec["p_adjusted"] == pytest.approx(
            min(1.0, dec["p_one_sided"] * len(dec["confirmed"])))
    assert 0.0 <= rep["decision"]["changed"]["selection"] <= 1.0


def test_the_paper_rule_is_an_option_and_resumed_old_runs_keep_it(tmp_path, smollm2, data_dir):
    (tmp_path / "config.json").write_text(json.dumps({"model": "smollm2", "task": "fever", "out": str(tmp_path)}))
    assert resume_config(str(tmp_path)).rule == "paper"        # written before the rule existed
    from c2i_fast.errors import C2IError
    with pytest.raises(C2IError, match="--compose confirms no composed plan"):
        adapt(AdaptConfig(out=str(tmp_path / "x"), compose=1, data_dir=str(data_dir), **SMALL), lm=smollm2)
    with pytest.raises(C2IError, match="--rule 'best'"):
        adapt(AdaptConfig(out=str(tmp_path / "y"), rule="best", data_dir=str(data_dir), **SMALL), lm=smollm2)


def test_the_default_loss_is_choice_on_classification_and_answer_runs_the_whole_adapt(run, tmp_path, smollm2,
                                                                                       data_dir):
    """`--loss auto` (the default, adopted by the pre-registered rule in docs/results.md) ranks FEVER's scan by the
    loss over the label choices; `--loss answer` (the paper's) ranks by the answer's loss, which on the same
    selection rows is a different number, and that run too ends in a decision."""
    rep = adapt(AdaptConfig(out=str(tmp_path / "answer"), loss="answer", data_dir=str(data_dir), **SMALL), lm=smollm2)
    default = run[0]
    assert default["scan"]["loss_kind"] == "choice" and rep["scan"]["loss_kind"] == "answer"
    assert rep["scan"]["loss"] != pytest.approx(default["scan"]["loss"], rel=1e-3)
    assert rep["decision"]["rule"] == "confirm" and rep["decision"]["reason"]
    assert rep["selection"]["base"]["accuracy"] == default["selection"]["base"]["accuracy"]   # same rows, model
