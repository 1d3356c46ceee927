"""bench/bench_search.py times LASER's own code path (one forward per choice, a log-softmax at every position):
it must score exactly what our scorer scores, so only the cost differs — real SmolLM2, real task rows."""
import pytest
import torch

from c2i_fast.evaluate import Scorer
from c2i_fast.tasks import check_tokenization, load_task, split


@pytest.fixture(scope="module")
def bench(import_bench):
    return import_bench("bench_search")


@pytest.mark.parametrize("task_name", ["bigbench_epistemic_reasoning", "fever", "counterfact"])
def test_laser_code_path_scores_like_ours(bench, smollm2, data_dir, task_name):
    task = check_tokenization(load_task(task_name, data_dir), smollm2.tokenizer)
    rows = split(task, 5, 2, seed=1)["select"]
    ours = Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind, batch_tokens=4096)
    laser = bench.LaserCodePath(smollm2.model, smollm2.tokenizer, rows, task.kind, pack_choices=False)
    assert all(len(b.rows) == 1 for b in laser.batches)                 # one example (or choice) at a time
    assert len(laser.batches) == len(laser.rows)
    if task_name == "bigbench_epistemic_reasoning":                    # multi-token choices: a forward each
        assert len(laser.rows) == 2 * len(rows) and len(ours.rows) == len(rows)
    with torch.no_grad():
        a, b = ours.evaluate(), laser.evaluate()
    assert a["correct"] == b["correct"]
    assert a["log_loss"] == pytest.approx(b["log_loss"], rel=1e-4)


def test_batching_bench_layouts_agree_and_shrink(import_bench, smollm2, data_dir):
    rows = import_bench("bench_batching").measure(smollm2, "bigbench_epistemic_reasoning", 12, 0, 1)
    assert [r["layout"] for r in rows][0] == "whole rows, full batches"
    assert rows[0]["shared_prefix_tokens"] == 0 and rows[1]["shared_prefix_tokens"] >= 8
    assert rows[0]["padded_tokens"] > rows[1]["padded_tokens"] >= rows[2]["padded_tokens"]
    assert len({r["accuracy"] for r in rows}) == 1


def test_speed_goals_are_the_speed_issues(bench):
    ratios = {"c_vs_laser_faithful_speedup": 619.0, "c_vs_laser_batched_speedup": 298.0,
              "c_vs_paper_faithful_speedup": 10.0}
    assert bench.speed_goals_met(ratios) == {"c_vs_laser_faithful_speedup": False,
                                             "c_vs_laser_batched_speedup": True, "c_vs_paper_faithful_speedup": True}
