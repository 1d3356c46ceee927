"""bench/bench_precision.py: its bf16-weights comparison mode puts the model back as it was, and the table reads
units as written (the runs themselves take minutes of CPU; the results are in bench/results/precision-*)."""
import json

import pytest
import torch
from helpers import tiny_llama


@pytest.fixture(scope="module")
def bench(import_bench):
    return import_bench("bench_precision")


def test_bf16_weights_mode_puts_the_fp32_tensors_back(bench):
    model = tiny_llama()
    before = [(p.data_ptr(), p.clone()) for p in model.parameters()]
    with pytest.raises(RuntimeError, match="inside"):
        with bench.precision("bf16-weights", model):
            assert all(p.dtype == torch.bfloat16 for p in model.parameters())
            raise RuntimeError("inside")
    assert all(p.dtype == torch.float32 and p.data_ptr() == ptr and torch.equal(p, v)
               for p, (ptr, v) in zip(model.parameters(), before))


def _mode(seconds, flips, accs, best):
    return {"base": {"seconds": 2.0, "accuracy": 0.5, "log_loss": 1.0, "flips": flips[0]},
            "candidates": [{"matrix": "m", "accuracy": a, "accuracy_delta": d, "flips": f, "seconds": seconds / 2}
                           for a, d, f in zip(accs, (0.0, accs[1] - 0.5), flips[1:])],
            "candidate_seconds": seconds, "flips_total": sum(flips[1:]), "best": best}


def test_summary_reads_the_units(bench, tmp_path):
    unit = {"task": "fever", "n_select": 100, "n_candidates": 2,
            "modes": {"fp32": {**_mode(10.0, (0, 0, 0), (0.5, 0.5), [0, 1]), "same_best": True},
                      "autocast": {**_mode(5.0, (1, 2, 3), (0.5, 0.53), [1, 0]), "same_best": False}}}
    (tmp_path / "fever.json").write_text(json.dumps(unit))
    (tmp_path / "meta.json").write_text("{}")            # not a unit
    rows = bench.summary(tmp_path).splitlines()
    assert len(rows) == 4 and all(r.count("|") == 10 for r in rows)
    assert rows[3] == "| fever | autocast | 2.0 | 5.0 | 2.00× | 1 of 100 | 5 of 200 | 3 pts | **no** |"


def test_benches_ask_their_commit_as_they_start(bench):
    # bench/_common asks git when imported: a unit written hours later names the code its process loaded
    import _common
    assert _common.git_commit.cache_info().currsize == 1
    before = _common.git_commit.cache_info().misses
    assert _common.git_commit() == _common.git_commit() and _common.git_commit.cache_info().misses == before
