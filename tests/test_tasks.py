"""Tasks: real data files load, LASER templates, deterministic leak-free splits, one clear error per bad input."""
import json

import pytest

from c2i_fast.errors import C2IError
from c2i_fast.tasks import TASKS, load_task, majority_baseline, read_jsonl, split


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_loads_from_real_data(name, data_dir):
    task = load_task(name, str(data_dir))
    assert len(task.examples) > 50
    ex = task.examples[0]
    assert ex.target.startswith(" ") and ex.target.strip()
    if task.kind == "classification":
        assert ex.choices[ex.label] == ex.target and all(c.startswith(" ") for c in ex.choices)


def test_laser_templates(data_dir):
    fever = load_task("fever", str(data_dir)).examples[0]
    assert fever.prompt == ("Consider the following claim: Fox 2000 Pictures released the film Soul Food. "
                            "Is this claim true or false. The claim is")
    assert fever.choices == [" false", " true"] and fever.target == " true"
    hp = load_task("hotpotqa", str(data_dir)).examples[0]
    assert hp.prompt.endswith("? The answer is") and hp.target == " yes"
    wiki = load_task("bigbench_qa_wikidata", str(data_dir))
    assert len(wiki.examples) == 18933          # LASER keeps single-target examples only


def test_split_is_deterministic_disjoint_and_group_aware(data_dir):
    task = load_task("counterfact", str(data_dir))
    a = split(task, 100, 300, seed=3)
    b = split(task, 100, 300, seed=3)
    assert [e.id for e in a["select"]] == [e.id for e in b["select"]]
    assert len(a["select"]) == 100 and len(a["test"]) == 300
    sel_groups = {e.group for e in a["select"]}
    assert not sel_groups & {e.group for e in a["test"]}        # no fact straddles selection and test
    assert not {e.id for e in a["select"]} & {e.id for e in a["test"]}
    c = split(task, 100, 300, seed=4)
    assert [e.id for e in c["select"]] != [e.id for e in a["select"]]
    d0 = split(task, 100, 300, seed=3, draw=0, n_draws=2)
    d1 = split(task, 100, 300, seed=3, draw=1, n_draws=2)       # --draws: disjoint selection samples …
    assert [e.id for e in d0["select"]] == [e.id for e in a["select"]]
    assert not {e.group for e in d1["select"]} & sel_groups
    assert [e.id for e in d0["test"]] == [e.id for e in d1["test"]]   # … judged on one held-out set
    assert not {e.group for e in d0["test"]} & ({e.group for e in d1["select"]} | sel_groups)


def test_majority_baseline():
    task_like = load_task("fever")
    ex = task_like.examples[:10]
    m = majority_baseline(ex)
    labels = [e.label for e in ex]
    assert m["accuracy"] == max(labels.count(0), labels.count(1)) / 10
    assert m["label"] in ("true", "false") and m["chance"] == 0.5


def test_majority_baseline_with_choices_per_row_is_a_position():
    """A multiple-choice task whose choices differ per row: "always position i", not the first row's text."""
    from c2i_fast.tasks import Example
    rows = [Example(str(i), f"{i}+{i}=", f" {2 * i}", [f" {2 * i}", f" {2 * i + 1}", " 0", " 9"], lab)
            for i, lab in enumerate([1, 1, 0, 1, 2])]
    m = majority_baseline(rows)
    assert m == {"label": "position 1", "accuracy": 3 / 5, "chance": 0.25}


def _write(tmp_path, lines, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return p


GOOD = {"id": "a", "prompt": "Is the sky blue?", "answer": "yes", "choices": ["yes", "no"]}


@pytest.mark.parametrize("lines, needle", [
    ([GOOD, "{not json"], ":2: malformed JSON"),
    ([GOOD, {"id": "b", "prompt": "x"}], ":2: record is missing field(s) ['answer']"),
    ([{**GOOD, "answer": "maybe"}], ":1: answer 'maybe' is not among choices"),
    ([GOOD, GOOD], ":2: duplicate id 'a'"),
    ([GOOD, {**GOOD, "id": "c", "prompt": 3}], ":2: field 'prompt' must be a string"),
    ([], "holds no records"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, lines, needle):
    p = _write(tmp_path, lines)
    with pytest.raises(C2IError) as e:
        read_jsonl(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(C2IError, match="does not exist"):
        load_task(str(tmp_path / "nope.jsonl"))
    with pytest.raises(C2IError, match="unknown task 'fevr'"):
        load_task("fevr")


def test_user_jsonl_task(tmp_path):
    p = _write(tmp_path, [GOOD, {**GOOD, "id": "b", "answer": "no"}])
    t = load_task(str(p))
    assert t.kind == "classification" and t.examples[1].label == 1
    g = load_task(str(_write(tmp_path, [{"id": "a", "prompt": "The capital of France is", "answer": "Paris",
                                          "choices": None}], "g.jsonl")))
    assert g.kind == "recall" and g.examples[0].target == " Paris"
    with pytest.raises(C2IError, match="too few"):
        split(t, n_select=5)


def test_unreadable_file_is_named(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"id": "a", "prompt": "caf\xe9", "answer": "x"}\n')
    with pytest.raises(C2IError, match=f"data file {p} is unreadable"):
        read_jsonl(p)


def test_confirmation_rows_are_disjoint_and_leave_the_other_splits_as_they_were():
    task = load_task("fever")
    plain = split(task, 50, 200, seed=3, draw=1, n_draws=2)
    withc = split(task, 50, 200, seed=3, draw=1, n_draws=2, n_confirm=120)
    for k in ("select", "test"):
        assert [e.id for e in plain[k]] == [e.id for e in withc[k]]
    assert plain["confirm"] == [] and len(withc["confirm"]) == 120
    groups = {k: {e.group for e in withc[k]} for k in ("select", "test", "confirm")}
    assert not groups["confirm"] & (groups["select"] | groups["test"])
    other_draw = split(task, 50, 200, seed=3, draw=0, n_draws=2, n_confirm=120)
    assert not {e.group for e in other_draw["select"]} & groups["confirm"]
    tiny = load_task("bigbench_causal_judgment")              # 190 rows: fewer confirmation rows than asked
    s = split(tiny, 50, 100, seed=0, n_confirm=200)
    assert 0 < len(s["confirm"]) < 200 and len(s["select"]) + len(s["test"]) + len(s["confirm"]) <= len(tiny.examples)
