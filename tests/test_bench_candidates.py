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
    assert rows[2] == "| fever | 10 → 7 | 2.0 → 1.5 | yes (2) | yes | 0.0e+00 |"
    assert rows[3] == "| truthfulqa | 10 → 10 | 2.0 → 2.0 | **no** (2) | yes | 0.0e+00 |"   # one factor hash differs


def test_compare_reports_the_search_order_and_the_largest_score_difference(import_bench, tmp_path):
    bench = import_bench("bench_candidates")
    rows = [["m1|0.9|1|block|0", -0.5, "ab"], ["m1|0.5|1|block|0", -0.4, "cd"], ["m2|0.9|1|block|0", -0.45, "ef"]]
    assert bench.search_order(rows) == ["m1|0.9|1|block|0", "m2|0.9|1|block|0", "m1|0.5|1|block|0"]
    unit = {"task": "fever", "top_k": ["m1", "m2"], "seconds": 2.0, "svds": 10, "n_candidates": 3, "candidates": rows}
    swapped = [rows[0], [rows[1][0], -0.6, "cd"], rows[2]]          # m1's two candidates change places
    (tmp_path / "fever.a.json").write_text(json.dumps(unit))
    (tmp_path / "fever.b.json").write_text(json.dumps({**unit, "candidates": swapped}))
    line = bench.compare(tmp_path, "a", "b").splitlines()[2]
    assert line == "| fever | 10 → 10 | 2.0 → 2.0 | yes (3) | **no** (from #1) | 4.0e-01 |"
