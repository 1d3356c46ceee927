"""Fuzz: the JSONL task loader and the plan loader never crash with anything but C2IError."""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from c2i_fast.errors import C2IError
from c2i_fast.tasks import load_task, read_jsonl
from c2i_fast.transform import Plan

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=5),
                           max_leaves=12)
record = st.fixed_dictionaries({}, optional={"id": json_values, "prompt": json_values, "answer": json_values,
                                             "choices": json_values, "answers": json_values,
                                             "single_target": json_values})
line = st.one_of(record.map(json.dumps), json_values.map(json.dumps), st.text(max_size=40))


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, max_size=6))
def test_jsonl_loader_only_raises_c2ierror(tmp_path, lines):
    p = tmp_path / "fuzz.jsonl"
    p.write_text("\n".join(lines), encoding="utf-8")
    try:
        recs = read_jsonl(p)
        task = load_task(str(p))
        assert len(task.examples) == len(recs)
    except C2IError as e:
        assert str(p) in str(e) or "--metric" in str(e) or "mix of records" in str(e)


edit = st.fixed_dictionaries({}, optional={"matrix": json_values, "rank_fraction": json_values,
                                           "n_clusters": json_values, "method": json_values, "seed": json_values})


@settings(max_examples=150, deadline=None, derandomize=True)
@given(doc=st.one_of(json_values, st.fixed_dictionaries({"edits": st.lists(edit, max_size=3)},
                                                        optional={"format": json_values, "meta": json_values,
                                                                  "base_model": json_values})))
def test_plan_loader_only_raises_c2ierror(doc):
    try:
        plan = Plan.from_json(doc)
        Plan.from_json(plan.to_json())             # whatever loads, round-trips
    except C2IError:
        pass
