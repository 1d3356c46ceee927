"""bench/bench_prune_order.py: the exact-pruned search replayed under other orders and error guesses, on hand-made
candidates and batches (the committed units replay `c2i adapt --prune off` runs of the results table's tasks)."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from c2i_fast.evaluate import Scorer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(import_bench):
    return import_bench("bench_prune_order")


class FakeScorer:
    """Four batches of 25 rows, example i in batch i // 25; the Scorer's own stopping_order."""

    def __init__(self, n=100, size=25):
        self.examples = list(range(n))
        self.batches = [SimpleNamespace(rows=[SimpleNamespace(example=e) for e in range(s, min(n, s + size))])
                        for s in range(0, n, size)]

    stopping_order = Scorer.stopping_order


def _cand(matrix, layer, rho, flags, **extra):
    return {"matrix": matrix, "layer": layer, "rank_fraction": rho, "n_clusters": 1, "method": "block", "seed": 0,
            "predicted_delta": -rho, "accuracy": sum(flags) / len(flags), "log_loss": 1.0, **extra}


def _flags(wrong):
    return [e not in wrong for e in range(100)]


def test_a_guess_from_the_same_matrix_stops_a_collapsed_candidate_sooner(bench):
    base = _flags(set(range(60, 90)))                  # 70 correct, wrong in batches 2 and 3
    good = [_cand("hi", 9, r, _flags(set(range(60, 60 + w)))) for r, w in ((0.9, 20), (0.8, 22), (0.6, 24))]
    # two candidates of one matrix, both wrong on examples 0-49 (batches 0 and 1), right where the base errs
    bad = [_cand("lo", 5, r, _flags(set(range(50)))) for r in (0.9, 0.8)]
    order = good + bad
    flags = {bench.key(c): _flags(set(range(60, 60 + w))) for c, w in zip(good, (20, 22, 24))}
    flags.update({bench.key(c): _flags(set(range(50))) for c in bad})
    sc = FakeScorer()
    today = bench.replay(order, flags, {}, base, sc, n_layers=10, guess="base")
    matrix = bench.replay(order, flags, {}, base, sc, n_layers=10, guess="matrix")
    # the bar is 76 after the three good ones: a candidate stops once it has 25 wrong answers. Guessing the base's
    # errors, the first "lo" runs batches 2 and 3 first (right there), then batch 0 (25 wrong): 75 rows; the
    # second the same. Guessing the first's errors, the second runs batch 0 first and stops after it: 25 rows.
    assert today["stopped"] == matrix["stopped"] == 2
    assert today["row_passes"] == 3 * 100 * 1 + 2 * 75 * 5
    assert matrix["row_passes"] == 3 * 100 * 1 + (75 + 25) * 5
    assert today["best"] == matrix["best"]             # exact: the fully scored candidates are the same


def test_twins_run_once_and_the_bar_waits_for_three(bench):
    base = _flags(set(range(50)))                      # 50 correct
    a = _cand("m", 8, 0.9, _flags(set(range(10))))
    twin = _cand("m", 8, 0.8, _flags(set(range(10))), same_as=bench.key(a))
    worse = _cand("m", 8, 0.6, _flags(set(range(60))))      # 40 correct: below the base from the start
    flags = {bench.key(c): _flags(set(range(10))) for c in (a, twin)}
    flags[bench.key(worse)] = _flags(set(range(60)))
    out = bench.replay([a, twin, worse], flags, {bench.key(twin): bench.key(a), bench.key(a): bench.key(a)},
                       base, FakeScorer(), n_layers=10, guess="base")
    # a: 100 rows × 2 layers; the twin: no pass; worse: stops once 51 wrong (its batches 0, 1 and 2 hold 60)
    assert out["row_passes"] == 100 * 2 + 75 * 2 and out["stopped"] == 1


def test_orders_keep_the_candidates_and_put_the_deepest_first(bench):
    cands = [_cand("a", 2, 0.9, _flags(set())), _cand("b", 7, 0.9, _flags(set(range(5)))),
             _cand("a", 2, 0.5, _flags(set(range(3))))]
    flags = {bench.key(c): [True] * 100 for c in cands}
    flags[bench.key(cands[1])] = _flags(set(range(5)))
    out = bench.orders(cands, flags)
    assert [c["layer"] for c in out["deepest-first"]] == [7, 2, 2]
    assert out["predicted"] == cands
    assert [c["matrix"] for c in out["probe"]] == ["b", "a", "a"] and out["probe"][1] is cands[0]
    assert out["oracle"][-1] is cands[1]
    assert all(sorted(map(bench.key, o)) == sorted(map(bench.key, cands)) for o in out.values())


@pytest.mark.parametrize("task", ["fever", "truthfulqa", "bias_in_bios_gender"])
def test_the_committed_replay_of_today_matches_the_table_cell(task):
    """The deepest-first / base-guess replay is today's exact search: its row·layer passes are those the results
    table's c2i_fast cell ran on the same candidates (rerun both if the defaults change)."""
    unit = REPO / "bench/results/prune-order-smollm2" / f"{task}.json"
    cell = REPO / "bench/results/tasks-smollm2" / task / "reports/c2i_fast.json"
    if not unit.is_file() or not cell.is_file():
        pytest.skip("no committed unit or cell")
    u, c = json.loads(unit.read_text()), json.loads(cell.read_text())
    if u["run_config"]["loss"] != c["config"]["loss"]:
        pytest.skip("the cell ranked by another loss")
    today = next(r for r in u["rows"] if r["order"] == "deepest-first" and r["guess"] == "base")
    assert today["row_passes"] == c["search"]["row_passes"]
    assert all(r["same_best"] for r in u["rows"])
