"""bench/bench_scan_loss.py: how it compares the two losses' matrix orders (the scans themselves run on the real
model: bench/results/scan-loss-*)."""
import pytest


@pytest.fixture(scope="module")
def bench(import_bench):
    return import_bench("bench_scan_loss")


def test_compare_reports_overlap_spearman_and_watched_ranks(bench):
    orders = {"answer": ["a", "b", "c", "d", "e"], "choice": ["e", "b", "a", "c", "d"]}
    out = bench.compare(orders, top_k=2, watch=["e", "c"])
    assert out["top"] == {"answer": ["a", "b"], "choice": ["e", "b"]} and out["top_overlap"] == 1
    assert out["watch"] == {"e": {"answer": 5, "choice": 1}, "c": {"answer": 3, "choice": 4}}
    assert out["spearman"] == pytest.approx(1 - 6 * (4 + 0 + 1 + 1 + 16) / (5 * 24))
    assert bench.compare({"answer": list("abc"), "choice": list("abc")}, 1, [])["spearman"] == pytest.approx(1.0)
