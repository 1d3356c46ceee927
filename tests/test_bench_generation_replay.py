"""bench_generation_replay on the real SmolLM2 and HotpotQA rows (small): the cached and whole passes agree and
the JSON says so, with the times and provenance beside them."""
import json

import pytest


@pytest.mark.slow
def test_bench_generation_replay_small(tmp_path, import_bench, data_dir):
    bench = import_bench("bench_generation_replay")
    out = tmp_path / "gr.json"
    assert bench.main(["--model", "smollm2", "--task", "hotpotqa", "--layers", "20", "--samples", "8",
                       "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["all_same"] and rep["n_rows"] == 8 and [r["layer"] for r in rep["candidates"]] == [20]
    row = rep["candidates"][0]
    assert row["same"] and row["changed_vs_base"] >= 1 and row["seconds_whole"] > 0 and row["seconds_replayed"] > 0
    assert rep["commit"] is not None and rep["command"].startswith("python bench/bench_generation_replay.py")


def test_refuses_a_task_that_is_not_generation(tmp_path, import_bench, data_dir):
    bench = import_bench("bench_generation_replay")
    with pytest.raises(SystemExit, match="classification"):
        bench.main(["--model", "smollm2", "--task", "fever", "--out", str(tmp_path / "x.json")])
