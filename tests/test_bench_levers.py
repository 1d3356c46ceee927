"""bench/bench_levers.py: what a unit keeps of a report, the resume order (a warm-cache variant always follows a
filled cache), and the table against the ``none`` variant. The runs themselves are faked here: each is a whole
`c2i adapt` at the defaults, minutes of CPU (the bench's results are in bench/results/levers-*)."""
import json

import pytest


@pytest.fixture(scope="module")
def levers(import_bench):
    return import_bench("bench_levers")


def _report(prune="exact", pruned=0, saved=0, best=("model.layers.28.mlp.up_proj",), shipped=True):
    confirmed = [{"matrix": m, "rank_fraction": 0.2, "n_clusters": 8, "method": "block", "accuracy": 0.1}
                 for m in best]
    plan = [{k: confirmed[0][k] for k in ("matrix", "rank_fraction", "n_clusters", "method")}] if shipped else []
    return {"config": {"top_k": 2, "batch_tokens": 4096}, "task": {"name": "fever", "n_test": 500},
            "timings": {"scan_gradient": 20.0, "scan_svd": 10.0, "search": 40.0, "test_base": 9.0, "total": 99.0},
            "scan": {"matrices": [{"matrix": "model.layers.28.mlp.up_proj"}, {"matrix": "model.layers.11.mlp.down_proj"},
                                  {"matrix": "model.layers.3.self_attn.q_proj"}]},
            "search": {"n_candidates": 96, "n_evaluated": 48, "n_same_factors": 0, "prune": prune, "pruned": pruned,
                       "row_passes": 1000 - saved, "row_passes_saved": saved,
                       "rank_correlation_predicted_vs_measured": 0.1},
            "decision": {"shipped": shipped, "reason": "r", "confirmed": confirmed}, "plan": plan,
            "test": {"base": {"accuracy": 0.056}, "adapted": {"accuracy": 0.08 if shipped else 0.056},
                     "paired": {"fixed": 12, "broken": 2}},
            "metrics_cache": {"enabled": True, "hits": 2, "misses": 0}}


def test_a_unit_keeps_the_top_k_the_savings_and_the_plan(levers):
    u = levers.unit_from_report(_report(pruned=3, saved=250), 101.26)
    assert u["seconds"] == 101.3 and u["top_k"] == ["model.layers.28.mlp.up_proj", "model.layers.11.mlp.down_proj"]
    assert u["search"]["pruned"] == 3 and u["search"]["row_passes"] == 750 and u["search"]["row_passes_saved"] == 250
    assert u["plan"][0]["matrix"] == "model.layers.28.mlp.up_proj" and u["shipped"]
    assert u["held_out"] == {"base": 0.056, "adapted": 0.08, "paired": {"fixed": 12, "broken": 2}}
    assert "total" not in u["timings"] and u["timings"]["search"] == 40.0 and u["batch_tokens"] == 4096
    assert u["test_size"] == 500


def test_warm_variants_follow_a_filled_cache_and_units_resume(levers, tmp_path, monkeypatch):
    calls = []

    def fake(args, task, variant, lm, cache_dir):
        calls.append((task, variant, cache_dir.name))
        return levers.unit_from_report(_report(prune=levers.VARIANTS[variant][0]), 1.0)
    monkeypatch.setattr(levers, "run_variant", fake)
    monkeypatch.setattr("c2i_fast.models.load_model", lambda name: object())
    out = tmp_path / "levers"
    (out / "fever").mkdir(parents=True)
    kept = {**levers.unit_from_report(_report(), 7.0), "task": "fever", "variant": "exact"}
    (out / "fever" / "exact.json").write_text(json.dumps(kept))               # a finished unit is kept
    assert levers.main(["--tasks", "fever", "--variants", "none,exact,race", "--out", str(out)]) == 0
    # race needs the cache exact fills: exact's cold run is made again (not written), then race
    assert calls == [("fever", "none", "fever"), ("fever", "exact", "fever"), ("fever", "race", "fever")]
    assert json.loads((out / "fever" / "exact.json").read_text()) == kept
    assert json.loads((out / "fever" / "race.json").read_text())["variant"] == "race"
    calls.clear()
    assert levers.main(["--tasks", "fever", "--variants", "none,exact,race", "--out", str(out)]) == 0
    assert calls == []                                                        # everything present: nothing run
    # a rerun at the defaults follows the defaults' own run, which stores its scan; run alone, it makes that run first
    calls.clear()
    assert levers.main(["--tasks", "fever", "--variants", "defaults,second", "--out", str(out)]) == 0
    assert calls == [("fever", "defaults", "fever"), ("fever", "second", "fever")]
    (out / "fever" / "second.json").unlink()
    calls.clear()
    assert levers.main(["--tasks", "fever", "--variants", "second", "--out", str(out)]) == 0
    assert calls == [("fever", "defaults", "fever"), ("fever", "second", "fever")]
    assert levers.VARIANTS["defaults"].scan_cache == "write" and levers.VARIANTS["second"].scan_cache == "on"
    fastest = levers.VARIANTS["fastest"]
    assert (fastest.prune, fastest.search_dtype, fastest.scan_svd, fastest.cache_state) == \
        ("halve", "bfloat16", "gram", "cold")


def test_the_table_compares_each_variant_with_none(levers, tmp_path, capsys):
    d = tmp_path / "t" / "counterfact"
    d.mkdir(parents=True)
    for v, rep in (("none", _report(prune="off")), ("exact", _report(pruned=3, saved=250)),
                   ("race", _report(prune="race", pruned=9, saved=600, best=("model.layers.11.mlp.down_proj",)))):
        (d / f"{v}.json").write_text(json.dumps(levers.unit_from_report(rep, 50.0)))
    table = levers.summarize(tmp_path / "t").splitlines()
    rows = {line.split(" | ")[1]: line for line in table[2:]}
    assert set(rows) == {"none", "exact", "race"}
    assert "| 750 | 250 | 3 |" in rows["exact"] and "| yes |" in rows["exact"]
    assert "| **no** |" in rows["race"] and "5.6% → 8.0%" in rows["race"]
    assert levers.main(["--out", str(tmp_path / "t"), "--summary"]) == 0
    assert "| counterfact | race |" in capsys.readouterr().out
    # a later run with no `none` of its own: compared with the earlier run's
    later = tmp_path / "later" / "counterfact"
    later.mkdir(parents=True)
    (later / "exact.json").write_text(json.dumps(levers.unit_from_report(_report(pruned=5, saved=400), 40.0)))
    assert levers.main(["--out", str(tmp_path / "later"), "--summary", "--against", str(tmp_path / "t")]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if "| exact |" in line]
    assert len(row) == 1 and "| 600 | 400 | 5 |" in row[0] and "| yes |" in row[0]


def test_an_unknown_variant_is_refused(levers, tmp_path):
    with pytest.raises(SystemExit) as e:
        levers.main(["--variants", "exact,turbo", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
