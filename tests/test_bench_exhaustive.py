"""bench/bench_exhaustive.py: the fast defaults against the exhaustive evaluation of the same candidates, built from
the results table's c2i and c2i_fast cells. The committed SmolLM2 reports check the bookkeeping; a tiny real run
checks that the resumed exhaustive run decides what a from-scratch ``--max-evals 0`` run decides."""
import copy
import json
import os

import pytest


@pytest.fixture(scope="module")
def bench(import_bench):
    return import_bench("bench_exhaustive")


def _reports(bench, task):
    root = bench.REPO / "bench/results/tasks-smollm2" / task
    cells = {m: json.loads((root / f"{m}.json").read_text()) for m in ("c2i_fast", "c2i")}
    reps = {m: json.loads((root / "reports" / f"{m}.json").read_text()) for m in ("c2i_fast", "c2i")}
    return cells, reps


def test_journal_holds_every_scored_candidate_with_its_row_count(bench):
    _, reps = _reports(bench, "counterfact")
    lines = [json.loads(x) for x in bench.journal_lines(reps["c2i"])]
    assert len(lines) == reps["c2i"]["search"]["n_evaluated"] == 400
    assert all(x["result"]["n"] == 100 for x in lines)
    full = [x for x in lines if not x["result"].get("pruned")]
    assert full and all({"accuracy", "log_loss"} <= set(x["result"]) for x in full)
    pruned = [x for x in lines if x["result"].get("pruned")]
    cands = reps["c2i"]["search"]["candidates"]
    assert len(pruned) == sum(bool(c.get("pruned")) for c in cands)       # twins of a stopped one included
    assert sum(bool(c.get("pruned")) and not c.get("same_as") for c in cands) == reps["c2i"]["search"]["pruned"]
    assert all("rows_scored" in x["result"] and "accuracy" not in x["result"] for x in pruned)


def test_the_cells_agree_on_the_candidates_both_scored(bench):
    """CounterFact's c2i_fast (48 scored) and c2i (400 scored) cells: every candidate both scored in full has the
    very same accuracy and log-loss (the same factored passes on the same rows)."""
    cells, reps = _reports(bench, "counterfact")
    a = bench.agreement(reps["c2i_fast"], reps["c2i"])
    assert a["same"] and a["common"] >= 30 and a["max_abs_accuracy_diff"] == 0.0
    assert bench.not_comparable(cells["c2i_fast"], cells["c2i"], reps["c2i_fast"], reps["c2i"]) is None
    worse = copy.deepcopy(reps["c2i"])
    worse["search"]["candidates"][0]["accuracy"] += 0.01
    changed = bench.key(worse["search"]["candidates"][0])
    if changed in bench.scored(reps["c2i_fast"]):
        assert not bench.agreement(reps["c2i_fast"], worse)["same"]


def test_what_cannot_be_compared_says_why(bench):
    cells, reps = _reports(bench, "counterfact")
    f, c = cells["c2i_fast"], cells["c2i"]
    assert "skipped" in bench.not_comparable(f, {**c, "skipped": "too slow"}, reps["c2i_fast"], reps["c2i"])
    assert "no report" in bench.not_comparable(f, c, None, reps["c2i"])
    assert "every candidate" in bench.not_comparable(f, {**c, "max_evals": 48}, reps["c2i_fast"], reps["c2i"])
    other = {**c, "settings": {**c["settings"], "top_k": 3}}
    assert "other settings" in bench.not_comparable(f, other, reps["c2i_fast"], reps["c2i"])
    loose = copy.deepcopy(reps["c2i"])
    loose["search"]["prune_keep"] = 1
    assert "pruning" in bench.not_comparable(f, c, reps["c2i_fast"], loose)
    moved = copy.deepcopy(reps["c2i"])
    moved["selection"]["base"]["accuracy"] += 0.01
    assert "selection rows" in bench.not_comparable(f, c, reps["c2i_fast"], moved)
    ranked = copy.deepcopy(reps["c2i_fast"])
    ranked["scan"]["loss_kind"] = "choice"                         # c2i_fast at --loss auto on a classification task
    assert "different losses" in bench.not_comparable(f, c, ranked, reps["c2i"])
    cells, reps = _reports(bench, "bias_in_bios_profession")       # 0 confirmation rows: the fallback decided
    why = bench.not_comparable(cells["c2i_fast"], cells["c2i"], reps["c2i_fast"], reps["c2i"])
    assert "without confirmation rows" in why


@pytest.mark.slow
def test_resumed_exhaustive_run_decides_as_a_fresh_max_evals_0_run(bench, import_bench, tmp_path, monkeypatch):
    """Tiny real run (SmolLM2, CounterFact): bench_tasks makes the c2i_fast (2 of 8 candidates) and c2i (all 8)
    cells, this bench compares them; its exhaustive decision and held-out numbers are those of a fresh
    ``adapt(max_evals=0, rule="confirm")`` that scores every candidate itself."""
    from c2i_fast.config import AdaptConfig
    from c2i_fast.pipeline import adapt
    monkeypatch.setenv("C2I_DATA", os.environ.get("C2I_DATA", "/work/shared/data"))
    tasks = import_bench("bench_tasks")
    cells = tmp_path / "tasks"
    grid = ["--samples", "30", "--test-size", "60", "--top-k", "1", "--clusters", "1,2", "--methods", "block,kmeans",
            "--rank-fractions", "0.2,0.01", "--confirm-size", "60", "--threads", "1", "--quiet"]
    assert tasks.main(["--model", "smollm2", "--tasks", "counterfact", "--cells", "c2i_fast,c2i", "--max-evals", "2",
                       "--out", str(cells), *grid]) == 0
    out = tmp_path / "exhaustive"
    assert bench.main(["--cells", str(cells), "--out", str(out), "--threads", "1", "--quiet"]) == 0
    unit = json.loads((out / "counterfact.json").read_text())
    assert unit["comparable"] and unit["agreement"]["same"]
    assert unit["fast"]["n_evaluated"] <= 2 < unit["exhaustive"]["n_evaluated"] == unit["exhaustive"]["n_candidates"]

    fast_rep = json.loads((cells / "counterfact/reports/c2i_fast.json").read_text())
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in fast_rep["config"].items()}
    cfg.update(out=str(tmp_path / "fresh"), max_evals=0, resume=False, progress=False)
    fresh = adapt(AdaptConfig(**cfg))
    assert fresh["search"]["n_evaluated"] == unit["exhaustive"]["n_evaluated"]
    assert [c["key"] for c in unit["exhaustive"]["contenders"]] == \
        [bench.key(d) for d in fresh["decision"]["confirmed"]]
    assert [c["confirmation_accuracy"] for c in unit["exhaustive"]["contenders"]] == \
        [d["accuracy"] for d in fresh["decision"]["confirmed"]]
    assert unit["exhaustive"]["shipped"] == fresh["decision"]["shipped"]
    assert unit["exhaustive"]["plan"] == fresh["plan"]
    assert unit["exhaustive"]["held_out"]["accuracy"] == fresh["test"]["adapted"]["accuracy"]
    assert "| counterfact | " in bench.table(out)
