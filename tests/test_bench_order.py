"""bench/bench_order.py: the offline replay of a search under a skipping rule, on a hand-made report (the
committed results replay the reports of bench/results/tasks-*)."""
import pytest


@pytest.fixture(scope="module")
def bench(import_bench):
    return import_bench("bench_order")


def _cand(matrix, layer, rho, acc, delta, k=1, **extra):
    return {"matrix": matrix, "layer": layer, "rank_fraction": rho, "n_clusters": k, "method": "block", "seed": 0,
            "predicted_delta": delta, "accuracy": acc, "log_loss": None if acc is None else 1.0 - acc, **extra}


def _report(cands, base=0.5, prune="exact", n_layers=10):
    return {"selection": {"base": {"n": 100, "accuracy": base}}, "forward_passes": {"layers": n_layers},
            "search": {"prune": prune, "n_evaluated": len(cands), "candidates": cands}}


def test_search_order_is_interleave_then_deepest_layer_first(bench):
    cands = [_cand("L2.a", 2, 0.9, 0.6, -3.0), _cand("L2.a", 2, 0.5, 0.6, -1.0), _cand("L7.b", 7, 0.9, 0.6, -2.0),
             {**_cand("L1.c", 1, 0.9, None, 0.0), "accuracy": None}]          # never evaluated: left out
    assert [c["matrix"] + str(c["rank_fraction"]) for c in bench.search_order(_report(cands))] == \
        ["L7.b0.9", "L2.a0.9", "L2.a0.5"]
    assert [c["layer"] for c in bench.search_order(_report(cands, prune="off"))] == [2, 7, 2]   # interleave only


def test_give_up_skips_a_matrix_whose_scored_candidates_sit_below_the_bar(bench):
    # matrix "hi" (layer 9, scored first) sets the bar at 0.70 (the third best); "lo" scores 0.50 and 0.52 and
    # its third candidate (0.80, which the report scored) is skipped once two of its own are below the bar
    cands = [_cand("hi", 9, r, a, -5.0 + i) for i, (r, a) in enumerate([(0.9, 0.7), (0.8, 0.72), (0.6, 0.74)])]
    cands += [_cand("lo", 3, r, a, -5.0 + i) for i, (r, a) in enumerate([(0.9, 0.5), (0.8, 0.52), (0.6, 0.8)])]
    out = bench.replay(_report(cands), "give-up", margin=0.05, minimum=2)
    assert out["skipped"] == 1 and out["saved"] == (10 - 3) * 100 and out["row_passes"] == 3 * 100 + 3 * 700
    assert out["same_best"] is False                 # the skipped one was the best: the rule changed what is read
    assert bench.replay(_report(cands), "give-up", margin=0.05, minimum=3)["skipped"] == 0
    assert bench.replay(_report(cands), "give-up", margin=0.25, minimum=2)["skipped"] == 0


def test_interp_needs_a_scored_rho_on_each_side(bench):
    cands = [_cand("m", 5, 0.9, 0.40, -3.0), _cand("m", 5, 0.6, 0.41, -2.0), _cand("m", 5, 0.8, 0.9, -1.0),
             _cand("top", 8, 0.9, 0.8, -9.0), _cand("top", 8, 0.8, 0.8, -8.0), _cand("top", 8, 0.6, 0.8, -7.0)]
    out = bench.replay(_report(cands), "interp", margin=0.0, minimum=1)
    assert out["skipped"] == 1 and out["same_best"] is False
    # a pruned candidate never raises the bar and a skipped one costs what the report says it ran
    pruned = {**_cand("m", 5, 0.4, None, -0.5), "accuracy": None, "pruned": True, "rows_scored": 30}
    out = bench.replay(_report(cands + [pruned]), "interp", margin=0.0, minimum=1)
    assert out["skipped"] == 1 and out["row_passes"] == 3 * 500 + 3 * 200 + 5 * 30


def test_no_report_is_one_clear_error(bench, tmp_path):
    with pytest.raises(SystemExit, match="no c2i adapt report"):
        bench.main(["--reports", str(tmp_path / "*.json")])
