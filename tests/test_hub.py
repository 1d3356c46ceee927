"""Hub loaders: LASER's processing of each hub source, checked on hand-made rows with `datasets` stubbed out
(no network here); the converted records go through the same schema checks, templates and splits."""
import sys
import types

import pytest

from c2i_fast.errors import C2IError
from c2i_fast.tasks import load_task

ROWS = {
    ("EleutherAI/fever", "v1.0", "paper_dev"): [
        {"id": 1, "claim": "A is B.", "label": "SUPPORTS"}, {"id": 2, "claim": "A is B.", "label": "SUPPORTS"},
        {"id": 3, "claim": "C is D.", "label": "SUPPORTS"}, {"id": 4, "claim": "C is D.", "label": "REFUTES"},
        {"id": 5, "claim": "E is F.", "label": "NOT ENOUGH INFO"}, {"id": 6, "claim": "G.", "label": "REFUTES"}],
    ("EleutherAI/fever", "v1.0", "paper_test"): [{"id": 7, "claim": "H.", "label": "SUPPORTS"}],
    ("truthful_qa", "multiple_choice", "validation"): [
        {"question": "Q?", "mc2_targets": {"choices": ["yes.", "no."], "labels": [1, 0]}}],
    ("tasksource/bigbench", "epistemic_reasoning", "validation"): [
        {"inputs": "Premise: p. Hypothesis: h.\nRelation:", "targets": ["entailment"]}],
    ("tasksource/bigbench", "epistemic_reasoning", "train"): [
        {"inputs": "Premise: q. Hypothesis: h.\nRelation:", "targets": ["non-entailment"]}],
}


@pytest.fixture
def fake_datasets(monkeypatch):
    mod = types.ModuleType("datasets")

    def load_dataset(name, config=None, split=None):
        key = (name, config, split)
        if key not in ROWS:
            raise FileNotFoundError(f"no such dataset {key}")
        return ROWS[key]
    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)


def test_fever_from_hub_drops_conflicts_and_nei(fake_datasets):
    t = load_task("hf:fever")
    assert [(e.id, e.target) for e in t.examples] == [("fever_paper_dev_1", " true"),
                                                      ("fever_paper_dev_6", " false"),
                                                      ("fever_paper_test_7", " true")]
    assert t.examples[0].prompt.startswith("Consider the following claim: A is B. Is this claim true or false.")


def test_truthfulqa_and_bigbench_from_hub(fake_datasets):
    t = load_task("hf:truthfulqa")
    assert [e.target for e in t.examples] == [" true", " false"] and len({e.group for e in t.examples}) == 1
    e = load_task("hf:bigbench_epistemic_reasoning")
    assert [x.target for x in e.examples] == [" entailment", " non-entailment"]
    assert e.examples[0].prompt.endswith("Premise: p. Hypothesis: h.\nRelation:")   # no doubled suffix


def test_hub_errors_are_clear(fake_datasets, monkeypatch):
    with pytest.raises(C2IError, match="cannot load hub dataset"):
        load_task("hf:hotpotqa")
    with pytest.raises(C2IError, match="unknown task 'hf:nope'"):
        load_task("hf:nope")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(C2IError, match="datasets extra"):
        load_task("hf:fever")
