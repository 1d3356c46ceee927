"""bench/bench_roofline.py: its FLOP count per token-layer, and the search rate and goal budget it reads off a
bench_levers unit (the measurements themselves are in bench/results/roofline-*)."""
import pytest
from helpers import tiny_llama


@pytest.fixture(scope="module")
def bench(import_bench):
    return import_bench("bench_roofline")


def test_flops_per_token_layer_counts_every_linear_weight_and_the_attention_products(bench):
    model = tiny_llama()
    # q, o: 32×32; k, v: 32×16 (2 kv heads of 8); gate, up, down: 32×48
    weights = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48
    assert bench.layer_linear_params(model) == weights
    assert bench.attention_width(model) == 32
    assert bench.flops_per_token_layer(model, attended=10.0) == 2 * weights + 4 * 32 * 10.0


def test_search_rate_and_budget_read_the_unit(bench):
    unit = {"task": "fever", "timings": {"scan_gradient": 20.0, "search": 100.0, "confirm": 30.0},
            "search": {"row_passes": 50_000}}
    fwd = {"tokens_per_row": 20.0, "flops_per_token_layer": 1e7, "seconds_per_row_layer": 1e-3}
    s = bench.search_rate(unit, fwd)
    assert s["seconds_per_row_layer"] == pytest.approx(2e-3)
    assert s["tflops"] == pytest.approx(50_000 * 20 * 1e7 / 1e12)
    assert s["gflops"] == pytest.approx(s["tflops"] * 1e3 / 100.0)
    assert s["forward_speed_fraction"] == pytest.approx(0.5)
    g = bench.budget(unit, goal_seconds=120.0, rate_gflops=s["gflops"])
    assert g["other_phases_seconds"] == 50.0 and g["search_seconds_left"] == 70.0
    assert g["search_tflops_left"] == pytest.approx(70.0 * s["gflops"] / 1e3)


def test_a_file_that_is_not_a_levers_unit_is_refused(bench, tmp_path):
    bad = tmp_path / "u.json"
    bad.write_text('{"task": "fever"}')
    with pytest.raises(SystemExit, match="not a bench_levers unit"):
        bench.main(["--unit", str(bad)])
    with pytest.raises(SystemExit, match="no such file"):
        bench.main(["--unit", str(tmp_path / "missing.json")])


def test_best_of_returns_the_warm_up_result_and_the_fastest_timed_call(bench):
    """bench/_common.best_of (the timing loop bench_roofline and bench_batching share): one untimed warm-up whose
    value comes back, then ``repeats`` timed calls of which the fastest counts."""
    import time

    from _common import best_of
    calls = []

    def fn():
        calls.append(len(calls))
        time.sleep(0.3 if len(calls) == 2 else 0.001)      # the first timed call is the slow one
        return len(calls)
    result, seconds = best_of(fn, 3)
    assert result == 1 and len(calls) == 4                 # the warm-up's value; 1 + 3 calls
    assert 0.0005 < seconds < 0.15                         # the slow timed call is not the one kept
    with pytest.raises(ValueError, match="repeats=0"):
        best_of(fn, 0)
