"""End to end: `c2i adapt` / `eval` / `laser` / `apply` / `export` on the real SmolLM2 and real data, and one
clear error (exit 2, culprit named, nothing written) for each bad input."""
import json

import pytest
import torch

from c2i_fast.cli import main
from c2i_fast.evaluate import Scorer
from c2i_fast.report_data import SCHEMA
from c2i_fast.tasks import Example

SMALL = ["--model", "smollm2", "--samples", "24", "--test-size", "24", "--top-k", "2",
         "--rank-fractions", "0.5,0.05", "--clusters", "1,2", "--methods", "block,kmeans", "--max-evals", "6",
         "--confirm-size", "50", "--quiet"]        # the fewest confirmation rows that still confirm


@pytest.fixture(scope="module")
def fever_run(tmp_path_factory, smollm2):
    out = tmp_path_factory.mktemp("run") / "fever"
    assert main(["adapt", "--task", "fever", "--out", str(out), *SMALL,
                 "--log-json", str(out.parent / "events.jsonl")]) == 0
    return out


def test_log_json_events_and_rendered_report(fever_run):
    events = [json.loads(l) for l in (fever_run.parent / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("candidate") == 6
    assert {"scan", "selection_base", "significance", "plan", "held_out"} <= set(kinds)
    rep = json.loads((fever_run / "report.json").read_text())
    assert next(e for e in events if e["event"] == "held_out")["adapted"]["accuracy"] == \
        rep["test"]["adapted"]["accuracy"]
    assert (fever_run / "report" / "index.html").is_file()          # rendered by default


def test_adapt_writes_plan_and_report_and_never_loses_to_base_on_selection(fever_run):
    plan = json.loads((fever_run / "plan.json").read_text())
    rep = json.loads((fever_run / "report.json").read_text())
    assert plan["base_model"] == "smollm2" and plan["fingerprint"].startswith("sha256:")
    assert plan["meta"]["seed"] == 0 and plan["meta"]["task"] == "fever"
    sel, test = rep["selection"], rep["test"]
    assert sel["adapted"]["accuracy"] >= sel["base"]["accuracy"]
    if sel["adapted"]["accuracy"] == sel["base"]["accuracy"]:
        assert sel["adapted"]["log_loss"] <= sel["base"]["log_loss"]
    for part in ("base", "adapted"):
        for k in ("accuracy", "accuracy_sum", "accuracy_mean", "log_loss", "choice_loss", "majority"):
            assert k in test[part]
        assert test[part]["n"] == 24
    assert rep["search"]["n_evaluated"] == 6 and len(rep["search"]["candidates"]) == 2 * 2 * (1 + 2)
    sig = rep["search"]["significance"]          # the best evaluated candidate's gain, tested against chance
    best = max(c["accuracy"] for c in rep["search"]["candidates"] if "accuracy" in c)
    assert sig["n"] == 24 and sig["candidates"] == 6 and sig["gated"] is False and sig["gate_p"] is None
    assert sig["gain"] == round((best - sel["base"]["accuracy"]) * 24) and sig["gain"] == sig["wins"] - sig["losses"]
    assert 0 < sig["p_max"] <= 1 and (sig["p_max"] == 1.0 if sig["gain"] <= 0 else sig["p_single"] < 1)
    assert {"load", "scan_gradient", "scan_svd", "search", "test_base", "total"} <= set(rep["timings"])
    pair = test["paired"]                        # the held-out difference, judged on the same 24 examples
    assert pair["n"] == 24 and pair["fixed"] - pair["broken"] == round(
        (test["adapted"]["accuracy"] - test["base"]["accuracy"]) * 24)
    assert pair["difference"] == pytest.approx(test["adapted"]["accuracy"] - test["base"]["accuracy"])
    assert 0 < pair["p_two_sided"] <= 1 and pair["ci95"][0] <= pair["difference"] <= pair["ci95"][1]
    assert rep["forward_passes"]["search_layer_passes"] > 0
    assert len(rep["scan"]["matrices"]) == 210
    assert rep["schema"] == SCHEMA and list(rep)[:5] == ["schema", "config", "versions", "task", "plan"]
    if plan["edits"]:
        assert (fever_run / "adapted.safetensors").is_file()
        assert rep["accounting"]["total"]


def test_eval_of_the_adapted_directory_reproduces_the_held_out_numbers(fever_run, capsys):
    rep = json.loads((fever_run / "report.json").read_text())
    assert main(["eval", "--model", "smollm2", "--task", "fever", "--samples", "24", "--test-size", "24",
                 "--adapted", str(fever_run), "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["base"]["accuracy"] == rep["test"]["base"]["accuracy"]
    assert abs(out["base"]["log_loss"] - rep["test"]["base"]["log_loss"]) < 1e-5
    if rep["plan"]:
        assert out["adapted"]["accuracy"] == rep["test"]["adapted"]["accuracy"]
        assert abs(out["adapted"]["log_loss"] - rep["test"]["adapted"]["log_loss"]) < 1e-4
        assert {k: out["paired"][k] for k in ("fixed", "broken")} == \
            {k: rep["test"]["paired"][k] for k in ("fixed", "broken")}


def test_laser_in_the_same_harness(tmp_path):
    out = tmp_path / "laser"
    assert main(["laser", "--model", "smollm2", "--task", "fever", "--val-size", "16", "--test-size", "16",
                 "--layers", "28,29", "--rank-fractions", "0.1,0.01", "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["search"]["n_evaluated"] == 2 * 2 * 2         # {mlp_in, mlp_out} × 2 layers × 2 ρ
    assert {c["matrix"] for c in rep["search"]["candidates"]} == {
        f"model.layers.{l}.mlp.{t}_proj" for l in (28, 29) for t in ("gate", "down")}
    assert rep["selection"]["adapted"]["accuracy"] >= rep["selection"]["base"]["accuracy"]
    assert rep["schema"] == SCHEMA and "scan" not in rep
    # the sweep's order: matrix by matrix, every ρ of each, one journal line per candidate in that order
    lines = (out / "journal.jsonl").read_text().splitlines()
    journal = [json.loads(line)["key"].split("|")[:2] for line in lines]
    assert journal == [[c["matrix"], str(c["rank_fraction"])] for c in rep["search"]["candidates"]]
    assert [c["rank_fraction"] for c in rep["search"]["candidates"]] == [0.1, 0.01] * 4


def test_laser_exact_pruning_picks_what_the_full_sweep_picks(tmp_path, smollm2, data_dir):
    from c2i_fast.pipeline import LaserConfig, laser
    # A task the model does well (SmolLM2 at chance scores every candidate alike and stops none), and small
    # batches so a losing candidate's pass can stop before its last row.
    common = dict(model="smollm2", task="bias_in_bios_profession", data_dir=str(data_dir), val_size=16,
                  test_size=2, layers=(29,), rank_fractions=(0.5, 0.01), batch_tokens=400, progress=False)
    full, pruned = (laser(LaserConfig(out=str(tmp_path / mode), prune=mode, **common), lm=smollm2)
                    for mode in ("off", "exact"))
    assert pruned["plan"] == full["plan"] and pruned["selection"] == full["selection"]
    assert pruned["search"]["prune"] == "exact" and pruned["search"]["pruned"] >= 1
    assert pruned["forward_passes"]["search_layer_passes"] < full["forward_passes"]["search_layer_passes"]
    by_key = {(c["matrix"], c["rank_fraction"]): c for c in full["search"]["candidates"]}
    for c in pruned["search"]["candidates"]:           # a fully scored candidate scores as in the full sweep
        if not c.get("pruned"):
            assert c["accuracy"] == by_key[(c["matrix"], c["rank_fraction"])]["accuracy"]
    sig = pruned["search"]["significance"]
    assert sig is None or sig["pruned"] == pruned["search"]["pruned"]


def test_generation_scores_the_continuation_not_the_prompt(smollm2):
    # "Paris" is in the prompt; the model continues with Berlin. Only the continuation counts.
    ex = Example("p", "Paris is in France. Rome is in Italy. The capital of Germany is", " Paris",
                 answers=["Paris"])
    sc = Scorer(smollm2.model, smollm2.tokenizer, [ex], "generation", max_new_tokens=4)
    gen = sc.generate()
    assert "berlin" in gen["texts"][0].lower() and gen["correct"] == [False]
    ex2 = Example("b", ex.prompt, " Berlin", answers=["Berlin"])
    assert Scorer(smollm2.model, smollm2.tokenizer, [ex2], "generation", max_new_tokens=4).generate()["correct"] == [True]


def _jsonl(path, recs):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


@pytest.mark.parametrize("case", ["missing_file", "malformed", "rho", "k_rows", "unknown_task", "top_k",
                                  "unknown_model", "gate_p"])
def test_bad_input_is_one_clear_error(case, tmp_path, capsys):
    good = {"id": "a", "prompt": "Is water wet?", "answer": "yes", "choices": ["yes", "no"]}
    args = ["adapt", "--model", "smollm2", "--task", "fever", "--quiet", "--samples", "4", "--test-size", "4"]
    needle = {
        "missing_file": str(tmp_path / "missing.jsonl"),
        "malformed": f"{tmp_path / 'bad.jsonl'}:2: malformed JSON",
        "rho": "ρ=1.5 must be in (0, 1]",
        "k_rows": "--clusters 4096 is invalid",
        "unknown_task": "unknown task 'nope'",
        "top_k": "--top-k must be ≥ 1",
        "unknown_model": "model path ./no/such/model does not exist",
        "gate_p": "--gate-p must be in [0, 1], got 1.5",
    }[case]
    if case == "missing_file":
        args[args.index("fever")] = str(tmp_path / "missing.jsonl")
    elif case == "malformed":
        args[args.index("fever")] = str(_jsonl(tmp_path / "bad.jsonl", [good, "{oops"]))
    elif case == "rho":
        args += ["--rank-fractions", "0.5,1.5"]
    elif case == "k_rows":
        args += ["--clusters", "1,4096", "--top-k", "1", "--max-evals", "1"]
    elif case == "unknown_task":
        args[args.index("fever")] = "nope"
    elif case == "top_k":
        args += ["--top-k", "0"]
    elif case == "unknown_model":
        args[args.index("smollm2")] = "./no/such/model"
    elif case == "gate_p":
        args += ["--gate-p", "1.5"]
    out = tmp_path / "out"
    assert main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("c2i: error: ") and needle in err[0], err
    assert not (out / "plan.json").exists() and not (out / "report.json").exists()


def test_apply_and_export_commands(fever_run, tmp_path, smollm2):
    from safetensors.torch import load_file
    plan = json.loads((fever_run / "plan.json").read_text())
    if not plan["edits"]:
        pytest.skip("the small search found no edit that beat the base model")
    applied = tmp_path / "applied"
    assert main(["apply", "--model", "smollm2", "--plan", str(fever_run / "plan.json"), "--out", str(applied)]) == 0
    a, b = load_file(str(fever_run / "adapted.safetensors")), load_file(str(applied / "adapted.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # same SVDs → same factors
    exported = tmp_path / "dense"
    assert main(["export", "--model", "smollm2", "--adapted", str(applied), "--out", str(exported)]) == 0
    from transformers import AutoModelForCausalLM
    from c2i_fast.artifacts import load_adapted
    from c2i_fast.transform import restore_
    dense = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    ids = smollm2.tokenizer("Consider the following claim: The sky is green.", return_tensors="pt").input_ids
    load_adapted(smollm2.model, str(applied))
    try:
        with torch.no_grad():
            want = smollm2.model(ids).logits
    finally:
        restore_(smollm2.model)
    with torch.no_grad():
        got = dense(ids).logits
    assert (got - want).abs().max() < 1e-3 * want.abs().max()


def test_draws_report_the_spread_over_disjoint_selection_samples(tmp_path):
    out = tmp_path / "draws"
    assert main(["adapt", "--model", "smollm2", "--task", "fever", "--samples", "8", "--test-size", "16",
                 "--top-k", "1", "--types", "mlp_out", "--rank-fractions", "0.05", "--clusters", "1",
                 "--max-evals", "1", "--draws", "2", "--confirm-size", "50", "--out", str(out), "--quiet", "--no-report"]) == 0
    rep = json.loads((out / "report.json").read_text())
    d = rep["draws"]
    assert d["n"] == 2 and len(d["test_accuracy"]) == 2 and len(d["plans"]) == 2
    assert d["min"] <= d["mean"] <= d["max"] and d["std"] >= 0
    assert len(d["selection_p_max"]) == 2 and all(0 < p <= 1 for p in d["selection_p_max"])
    for pair, gain in zip(d["test_paired"], d["test_gain"]):       # each draw judged pairwise on the same rows
        assert pair["n"] == 16 and pair["fixed"] - pair["broken"] == round(gain * 16)
    assert d["test_paired"][0] == rep["test"]["paired"]
    base = json.loads((out / "report.json").read_text())["test"]["base"]
    assert base["n"] == 16      # every draw is judged on the same held-out set
    assert (out / "journal.draw1.jsonl").is_file() and not (out / "report").exists()


def test_greedy_composition_adds_only_improving_edits(tmp_path):
    out = tmp_path / "compose"
    assert main(["adapt", "--model", "smollm2", "--task", "fever", "--samples", "16", "--test-size", "8",
                 "--top-k", "3", "--types", "mlp_out", "--rank-fractions", "0.05", "--clusters", "1",
                 "--max-evals", "3", "--compose", "2", "--rule", "paper", "--out", str(out), "--quiet",
                 "--no-report"]) == 0
    rep = json.loads((out / "report.json").read_text())
    plan, cands = rep["plan"], rep["search"]["candidates"]
    assert len(plan) <= 3 and len({e["matrix"] for e in plan}) == len(plan)
    if plan:   # the first edit is the best single candidate; the composition is at least as good as it
        best = max((c for c in cands if "accuracy" in c), key=lambda c: (c["accuracy"], -c["log_loss"]))
        assert plan[0]["matrix"] == best["matrix"]
        assert rep["selection"]["adapted"]["accuracy"] >= best["accuracy"]
