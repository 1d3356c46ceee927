"""lm-evaluation-harness bridge (c2i_fast.lm_eval_model): an lm-eval task YAML over our FEVER rows builds exactly our
prompts and choices, converts back to our JSONL, and lm-eval's ``acc`` of the ``c2i`` model (base, and an adapted
directory run factored) equals our Scorer's summed-log-prob accuracy on the same 40 held-out rows.

Offline throughout: the task reads a local JSONL; the model is the cached SmolLM2 alias."""
from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")      # before datasets is imported (by lm_eval)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

pytest.importorskip("lm_eval")

from c2i_fast.errors import C2IError  # noqa: E402
from c2i_fast.tasks import load_task, read_jsonl, split  # noqa: E402

N_SELECT, N_TEST = 10, 40
TASK = "c2i_fever40"
# Our FEVER template (c2i_fast.tasks.TASKS["fever"]) in Jinja: strip, add a period unless the claim ends with one.
FEVER_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Consider the following claim: {{{{prompt.strip()}}}}{{% if not prompt.strip().endswith(('.', '?', '!')) \
%}}.{{% endif %}} Is this claim true or false. The claim is"
doc_to_choice: choices
doc_to_target: "{{{{choices.index(answer)}}}}"
target_delimiter: {delim}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder, rows: list[dict], name: str = TASK, delim: str = '" "'):
    """An lm-eval task folder: ``rows`` as a JSONL file and a YAML over it; returns the YAML's path."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "_line"}) + "\n" for r in rows))
    yaml = folder / f"{name}.yaml"
    yaml.write_text(FEVER_YAML.format(name=name, data=data, delim=delim))
    return yaml


@pytest.fixture(scope="module")
def held_out(data_dir):
    """Our 40 held-out FEVER examples (split seed 0, 10 selection rows first) and their raw records."""
    test = split(load_task("fever", str(data_dir)), N_SELECT, N_TEST, seed=0)["test"]
    records = {r["id"]: r for r in read_jsonl(data_dir / "fever.jsonl")}
    return test, [records[ex.id] for ex in test]


@pytest.fixture(scope="module")
def task_dir(held_out, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    write_task(folder, held_out[1])
    return folder


def manager(folder):
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(folder), include_defaults=False)


def test_the_yaml_builds_our_prompts_choices_and_labels(held_out, task_dir):
    from c2i_fast.lm_eval_model import load_lm_eval_task
    examples, _ = held_out
    task = load_lm_eval_task(TASK, str(task_dir), include_defaults=False)
    docs = list(task.eval_docs)
    assert len(docs) == len(examples) == N_TEST
    delim = task.config.target_delimiter
    for doc, ex in zip(docs, examples):
        assert task.fewshot_context(doc, 0) == ex.prompt
        assert [delim + c for c in task.doc_to_choice(doc)] == ex.choices    # " false", " true"
        assert task.doc_to_target(doc) == ex.label


def test_task_to_jsonl_gives_back_our_task(held_out, task_dir, tmp_path):
    from c2i_fast.lm_eval_model import task_to_jsonl
    examples, _ = held_out
    out = task_to_jsonl(str(task_dir / f"{TASK}.yaml"), tmp_path / "fever40.jsonl", include_defaults=False)
    converted = load_task(str(out))
    assert converted.kind == "classification"
    assert [(e.prompt, e.choices, e.label) for e in converted.examples] == \
           [(e.prompt, e.choices, e.label) for e in examples]


def test_task_to_jsonl_refuses_a_task_that_would_score_other_text(held_out, tmp_path):
    from c2i_fast.lm_eval_model import task_to_jsonl
    yaml = write_task(tmp_path, held_out[1][:3], name="glued", delim='""')   # "The claim isfalse"
    with pytest.raises(C2IError, match="target_delimiter"):
        task_to_jsonl(str(yaml), tmp_path / "glued.jsonl", include_defaults=False)


def _our_accuracy(model, tokenizer, examples):
    from c2i_fast.evaluate import Scorer
    res = Scorer(model, tokenizer, examples, "classification", scoring="sum").evaluate()
    return res["accuracy"], res["predictions_sum"]


def _harness(model, task_dir, **kw):
    """lm-eval's acc and per-doc argmax of the summed log-probs (its ``acc`` prediction)."""
    import lm_eval
    res = lm_eval.simple_evaluate(model=model, tasks=[TASK], task_manager=manager(task_dir), log_samples=True,
                                  **kw)
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    preds = [max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) for s in samples]
    return res["results"][TASK]["acc,none"], preds


@pytest.mark.slow
def test_lm_eval_encodes_each_choice_as_our_scorer_does(smollm2, held_out):
    """Context/continuation tokens: lm-eval encodes context + continuation jointly and splits at the context's
    length; ours tokenizes the prompt and the choice apart. For FEVER they are the same tokens."""
    from c2i_fast.lm_eval_model import C2ILM
    lm = C2ILM(pretrained=smollm2.model, tokenizer=smollm2.tokenizer)
    tok = smollm2.tokenizer
    for ex in held_out[0]:
        for c in ex.choices:
            ctx, cont = lm._encode_pair(ex.prompt, c)
            assert ctx == tok(ex.prompt).input_ids
            assert cont == tok(c, add_special_tokens=False).input_ids


@pytest.mark.slow
def test_lm_eval_acc_equals_our_summed_log_prob_accuracy(smollm2, held_out, task_dir, tmp_path):
    """Base and adapted (one clustered edit, saved, then loaded by ``c2i`` from its directory and run factored):
    lm-eval's acc is our Scorer(scoring="sum") accuracy within one example of 40 (measured: equal, and every
    prediction the same)."""
    import c2i_fast
    from c2i_fast.artifacts import save_adapted
    from c2i_fast.lm_eval_model import C2ILM
    from c2i_fast.nn import ClusteredLowRankLinear
    examples, _ = held_out
    model, tok = smollm2.model, smollm2.tokenizer

    ours_base, ours_base_pred = _our_accuracy(model, tok, examples)
    theirs_base, theirs_base_pred = _harness(C2ILM(pretrained=model, tokenizer=tok, batch_size=8), task_dir)

    adapted = tmp_path / "adapted"
    try:
        c2i_fast.factorize_(model, c2i_fast.Plan([c2i_fast.Edit("model.layers.9.mlp.down_proj", 0.1, 2, "block")]))
        save_adapted(model, None, adapted)
        ours_adapted, ours_adapted_pred = _our_accuracy(model, tok, examples)
    finally:
        c2i_fast.restore_(model)
    # by name, as `--model c2i --model_args ...` does (simple_evaluate's own two calls): the registry lookup
    # and lm-eval's argument string
    from lm_eval.api.registry import get_model
    lm = get_model("c2i").create_from_arg_string(f"pretrained=smollm2,adapted={adapted},device=cpu",
                                                  {"batch_size": 8})
    assert isinstance(lm.model.model.layers[9].mlp.down_proj, ClusteredLowRankLinear)   # run factored
    theirs_adapted, theirs_adapted_pred = _harness(lm, task_dir)

    print(f"\nFEVER {N_TEST} held-out rows, summed log-prob accuracy: base ours {ours_base:.3f} lm-eval "
          f"{theirs_base:.3f}; adapted ours {ours_adapted:.3f} lm-eval {theirs_adapted:.3f}")
    assert abs(theirs_base - ours_base) <= 1 / N_TEST + 1e-9
    assert abs(theirs_adapted - ours_adapted) <= 1 / N_TEST + 1e-9
    assert sum(a != b for a, b in zip(ours_base_pred, theirs_base_pred)) <= 1
    assert sum(a != b for a, b in zip(ours_adapted_pred, theirs_adapted_pred)) <= 1
    assert ours_adapted != ours_base           # the edit changes predictions: the adapted run is not the base


@pytest.mark.slow
def test_python_m_runs_lm_evals_command_line_with_c2i(task_dir, tmp_path):
    """``python -m c2i_fast.lm_eval_model`` = ``lm_eval`` with the ``c2i`` model type registered (lm-eval reads no
    model entry points, so plain ``lm_eval --model c2i`` cannot find it). No --device: lm-eval then passes cuda:0,
    which falls back to the CPU on a machine without CUDA."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "c2i_fast.lm_eval_model", "--model", "c2i", "--model_args", "pretrained=smollm2",
           "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "8",
           "--limit", "4", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "c2i_fever40" in run.stdout and "acc" in run.stdout
    results = list(out.rglob("results_*.json"))
    assert results and json.loads(results[0].read_text())["config"]["model"] == "c2i"
