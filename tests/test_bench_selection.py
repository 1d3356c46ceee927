"""bench/bench_selection.py without a model: a folder's settings guard (a unit made with other settings, e.g.
another --prune, is never mixed in), the resume that skips finished units, and the summary over draws."""
import json

import pytest


def _unit(task: str, draw: int, delta: float, fixed: int, broken: int, shipped: bool) -> dict:
    held = {"base_accuracy": 0.5, "accuracy": 0.5 + delta, "majority": None, "n": 500, "fixed": fixed,
            "broken": broken, "difference": delta, "ci95": None, "p_two_sided": 0.01 if delta else 1.0,
            "changed": (fixed + broken) / 500, "log_loss_base": 1.0, "log_loss": 1.0}
    edit = {"matrix": "model.layers.28.mlp.up_proj", "rank_fraction": 0.2, "n_clusters": 8, "method": "block"}
    return {"task": task, "draw": draw, "timings": {"search": 90.0}, "search": {"row_passes": 17000},
            "decision": {"confirmed": [edit]}, "rules": {
        "confirm": {"plan": [], "shipped": shipped, "reason": "", "changed": None, "held_out": held},
        "paper": {"plan": [], "shipped": True, "reason": "", "changed": None,
                  "held_out": {**held, "difference": -0.02, "fixed": 3, "broken": 13, "p_two_sided": 0.02}}}}


@pytest.fixture
def folder(tmp_path):
    """A folder as a run before --prune existed left it: settings without "prune", two finished draws."""
    out = tmp_path / "sel"
    (out / "fever").mkdir(parents=True)
    settings = {"samples": 100, "confirm_size": 200, "test_size": 500, "top_k": 5, "max_evals": 48, "seed": 0,
                "draws": 2, "laser_layers": None, "laser_tasks": None}
    (out / "meta.json").write_text(json.dumps({"model": "smollm2", "settings": settings, "runs": []}))
    (out / "fever" / "draw0.json").write_text(json.dumps(_unit("fever", 0, 0.04, 30, 10, True)))
    (out / "fever" / "draw1.json").write_text(json.dumps(_unit("fever", 1, 0.0, 0, 0, False)))
    return out


def test_other_prune_setting_is_refused_and_nothing_is_written(folder, import_bench, capsys):
    bs = import_bench("bench_selection")
    before = (folder / "meta.json").read_text()
    assert bs.main(["--tasks", "fever", "--draws", "2", "--prune", "halve", "--out", str(folder)]) == 2
    assert "use another --out" in capsys.readouterr().err
    assert (folder / "meta.json").read_text() == before and not (folder / "summary.json").exists()


def test_default_prune_resumes_an_older_folder_and_summarizes(folder, import_bench):
    bs = import_bench("bench_selection")
    # both draws exist: nothing to run, so no model is loaded; the run is appended to the folder's history
    assert bs.main(["--tasks", "fever", "--draws", "2", "--out", str(folder), "--quiet"]) == 0
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["settings"]["prune"] == "exact" and len(meta["runs"]) == 1
    s = json.loads((folder / "summary.json").read_text())["tasks"]["fever"]
    assert s["confirm"]["delta"] == [0.04, 0.0] and s["confirm"]["shipped"] == 1
    assert s["confirm"]["mean_delta"] == pytest.approx(0.02) and s["confirm"]["worse"] == 0
    assert s["paper"]["worse"] == 2 and s["paper"]["fixed"] == [3, 3]
    table = bs.markdown(json.loads((folder / "summary.json").read_text()))
    assert "| smollm2 | fever | **confirm** | 2 of 2 | 1 | +4.0, 0 | +2.00 | 30 / 10, 0 / 0 |" in table


def test_against_compares_draw_by_draw(folder, tmp_path, import_bench, capsys):
    """--summary --against: each draw finished in both folders, side by side; a changed confirmed set and a
    changed plan are flagged."""
    bs = import_bench("bench_selection")
    other = tmp_path / "halve"
    (other / "fever").mkdir(parents=True)
    u = _unit("fever", 0, 0.04, 30, 10, True)
    u.update(timings={"search": 30.0}, search={"row_passes": 6000})
    u["decision"]["confirmed"][0].update(rank_fraction=0.1, paired={"fixed": 25, "broken": 9})
    u["decision"].update(shipped=True, chosen=0)
    u["rules"]["paper"]["plan"] = [{**u["decision"]["confirmed"][0]}]
    (other / "fever" / "draw0.json").write_text(json.dumps(u))
    assert bs.main(["--out", str(other), "--summary", "--against", str(folder)]) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| fever | 0 |")]
    assert rows == ["| fever | 0 | 90 → 30 | 17000 → 6000 | **no** | +0 → +16 | yes | +4.0 → +4.0 | **no** | "
                    "-2.0 → -2.0 |"]
    # the older folder's draw 0 kept the base as far as its decision says (no "shipped"): 0 units, +0
    assert "Shipped by the confirm rule: 0 → 1 units; confirmation-row net fixes of the shipped edits: +0 → +16" in out


def test_loss_is_a_setting_of_the_folder(folder, import_bench, capsys):
    """A folder made before --loss existed ran the answer loss: --loss choice is refused there."""
    bs = import_bench("bench_selection")
    assert bs.main(["--tasks", "fever", "--draws", "2", "--loss", "choice", "--out", str(folder)]) == 2
    assert "use another --out" in capsys.readouterr().err
    assert bs.main(["--tasks", "fever", "--draws", "2", "--loss", "answer", "--out", str(folder), "--quiet"]) == 0


def test_only_draws_runs_its_draws_of_the_split(folder, import_bench, capsys, monkeypatch):
    """--only-draws 1: draw 1 of the --draws 2 split only (finished here, so no model loads); a draw outside the
    split is refused before anything is written."""
    bs = import_bench("bench_selection")
    before = (folder / "meta.json").read_text()
    for bad in ("2", "0,x", "-1", "1-2"):
        assert bs.main(["--tasks", "fever", "--draws", "2", "--only-draws", bad, "--out", str(folder)]) == 2
        assert "--only-draws" in capsys.readouterr().err
    assert (folder / "meta.json").read_text() == before
    (folder / "fever" / "draw0.json").unlink()          # draw 0 missing: --only-draws 1 must not run it
    monkeypatch.setattr("c2i_fast.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert bs.main(["--tasks", "fever", "--draws", "2", "--only-draws", "1", "--out", str(folder), "--quiet"]) == 0
    assert json.loads((folder / "meta.json").read_text())["settings"]["draws"] == 2


@pytest.mark.slow
def test_exhaustive_out_decides_as_a_fresh_max_evals_0_run(import_bench, tmp_path, monkeypatch):
    """Tiny real run (SmolLM2, CounterFact, 1 matrix, 2 of 6 candidates): the exhaustive unit that resumed the
    fast unit's run scores every candidate and decides exactly what a fresh ``--max-evals 0`` unit decides, with
    the same held-out numbers; the fast run's folder is gone once the exhaustive unit is written."""
    import os
    monkeypatch.setenv("C2I_DATA", os.environ.get("C2I_DATA", "/work/shared/data"))
    import c2i_fast.pipeline as pipeline
    bs = import_bench("bench_selection")
    grid = {"rank_fractions": (0.2, 0.01), "clusters": (1, 2), "methods": ("block", "kmeans")}
    real_config = pipeline.AdaptConfig
    monkeypatch.setattr(pipeline, "AdaptConfig", lambda **kw: real_config(**{**kw, **grid}))
    tiny = ["--model", "smollm2", "--tasks", "counterfact", "--draws", "2", "--samples", "30", "--test-size", "60",
            "--confirm-size", "60", "--top-k", "1", "--threads", "1", "--loss", "auto", "--quiet"]
    refused = ["--prune", "halve", "--out", str(tmp_path / "x"), "--exhaustive-out", str(tmp_path / "y")]
    assert bs.main(tiny + refused) == 2 and not (tmp_path / "x").exists()
    fast, exh, fresh = tmp_path / "fast", tmp_path / "exh", tmp_path / "fresh"
    real = bs.run_unit

    def first_draw_only(args, task, draw, lm=None, work=None):
        if draw:
            raise KeyboardInterrupt               # the run is cut short after draw 0's units
        return real(args, task, draw, lm, work)
    monkeypatch.setattr(bs, "run_unit", first_draw_only)
    for run in (["--max-evals", "2", "--out", str(fast), "--exhaustive-out", str(exh)],
                ["--max-evals", "0", "--out", str(fresh)]):
        with pytest.raises(KeyboardInterrupt):
            bs.main(tiny + run)
    a = json.loads((fast / "counterfact/draw0.json").read_text())
    b = json.loads((exh / "counterfact/draw0.json").read_text())
    c = json.loads((fresh / "counterfact/draw0.json").read_text())
    assert a["n_evaluated"] == 2 and b["n_evaluated"] == c["n_evaluated"] == 6
    assert len(b["candidates"]) == 6 and all("predicted_delta" in x for x in b["candidates"])
    cp = b["constant_predictions"]
    assert cp["fully_scored"] <= 6 and cp["constant"] <= cp["fully_scored"] and cp["fully_scored_first"] <= 2
    assert b["resumed_from"] == {**b["resumed_from"], "n_evaluated": 2, "cut_short": False}
    assert b["resumed_from"]["n_evaluated"] == 2 and b["timings"]["search"] >= b["timings"]["search_rest"]
    assert b["decision"]["confirmed"] == c["decision"]["confirmed"]
    assert b["decision"]["shipped"] == c["decision"]["shipped"]
    for rule in ("confirm", "paper"):
        assert b["rules"][rule]["plan"] == c["rules"][rule]["plan"]
        assert b["rules"][rule]["held_out"] == c["rules"][rule]["held_out"]
    assert not (exh / ".runs/counterfact/draw0").exists()
    assert (exh / ".runs/.gitignore").read_text() == "*\n"
    assert json.loads((exh / "meta.json").read_text())["settings"]["max_evals"] == 0


def test_order_table_reads_every_candidate_of_an_exhaustive_unit(tmp_path, import_bench):
    bs = import_bench("bench_selection")
    out = tmp_path / "exh"
    (out / "fever").mkdir(parents=True)
    cands = [{"matrix": f"m{i % 2}", "rank_fraction": 0.1 * (i + 1), "n_clusters": 1, "method": "block",
              "predicted_delta": -float(i), "accuracy": 0.5 + 0.01 * i, "log_loss": 1.0, "choice_loss": 1.0 - 0.1 * i}
             for i in range(5)]
    cands.append({**cands[0], "rank_fraction": 0.9, "accuracy": None, "pruned": True, "rows_scored": 10})
    unit = _unit("fever", 0, 0.0, 0, 0, False)
    unit["decision"]["confirmed"] = [{k: cands[i][k] for k in ("matrix", "rank_fraction", "n_clusters", "method")}
                                     for i in (4, 3, 2)]
    unit.update(candidates=cands, resumed_from={"n_evaluated": 2})
    (out / "fever" / "draw0.json").write_text(json.dumps(unit))
    table = bs.order_table(out)
    # ΔL̂ falls as the choice loss falls: +1; confirmed at positions 5, 4, 3; best 51% in the first 2, 54% in all
    assert "| fever | 0 | 6 (5) | +1.00 (choice loss) | 5, 4, 3 | 51% | 54% |" in table
    del unit["candidates"]
    (out / "fever" / "draw0.json").write_text(json.dumps(unit))
    assert bs.order_table(out) is None


def test_constant_predictions_counts_one_label_answers(import_bench):
    bs = import_bench("bench_selection")
    journal = {"a": {"predictions_sum": [1, 1, 1]}, "b": {"predictions_sum": [0, 1, 1]},
               "c": {"pruned": True, "rows_scored": 2}, "d": {"predictions_sum": [0, 0, 0]}}
    assert bs.constant_predictions(journal, 2) == {"fully_scored": 3, "constant": 2, "fully_scored_first": 2,
                                                   "constant_first": 1}
