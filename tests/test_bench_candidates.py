"""bench/bench_candidates.py: the comparison of two runs' candidates (the runs take a scan each: minutes of CPU;
the results are in bench/results/candidates-*)."""
import json


def test_compare_says_whether_two_runs_built_the_same_candidates(import_bench, tmp_path):
    bench = import_bench("bench_candidates")
    unit = {"task": "fever", "top_k": ["m1"], "seconds": 2.0, "svds": 10, "n_candidates": 2,
            "candidates": [["k1", -0.5, "ab"], ["k2", -0.1, "cd"]]}
    (tmp_path / "fever.before.json").write_text(json.dumps(unit))
    (tmp_path / "fever.after.json").write_text(json.dumps({**unit, "svds": 7, "seconds": 1.5}))
    (tmp_path / "truthfulqa.before.json").write_text(json.dumps({**unit, "task": "truthfulqa"}))
    (tmp_path / "truthfulqa.after.json").write_text(json.dumps(
        {**unit, "task": "truthfulqa", "candidates": [["k1", -0.5, "ab"], ["k2", -0.1, "ce"]]}))
    rows = bench.compare(tmp_path, "before", "after").splitlines()
    assert rows[2] == "| fever | 10 → 7 | 2.0 → 1.5 | yes (2) |"
    assert rows[3] == "| truthfulqa | 10 → 10 | 2.0 → 2.0 | **no** (2) |"       # one factor hash differs
