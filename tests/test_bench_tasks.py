"""bench/bench_tasks.py (the results table) and bench/render_tasks.py: cells written once and resumed, sizes fitted
to small tasks, the markdown table with every planned cell. The end-to-end run is tiny but real (SmolLM2, FEVER)."""
import json
import os
import time

import pytest


@pytest.fixture(scope="module")
def bench(import_bench):
    return import_bench("bench_tasks")


@pytest.fixture(scope="module")
def render(import_bench):
    return import_bench("render_tasks")


def _cell(task, method, acc, n=200, paired=None, **extra):
    return {"model": "smollm2", "task": task, "method": method,
            "sizes": {"examples": 13086, "n_select": 100, "n_test": n, "n_confirm": 200, "fitted": None},
            "held_out": {"n": n, "accuracy": acc, "accuracy_ci95": None, "interval": "wilson",
                         "majority": {"label": "true", "accuracy": 0.55, "chance": 0.5}, "log_loss": 0.6931,
                         "base_accuracy": 0.5, "paired": paired, "changed": 0.0 if paired is None else 0.12},
            "plan": [] if paired is None else [{"matrix": "model.layers.11.mlp.down_proj", "rank_fraction": 0.05,
                                                "n_clusters": 2, "method": "block"}],
            "seconds": 12.3, "layer_passes": 0 if paired is None else 1002,
            "provenance": {"device": "AMD EPYC", "threads": 1, "commit": "abc1234", "date": "2026-12-01 12:00:00 UTC",
                           "versions": {"c2i_fast": "0.1.0", "torch": "2.13.0", "platform": "Linux"},
                           "command": "python bench/bench_tasks.py --tasks fever"}, **extra}


def _write(folder, cell):
    path = folder / cell["task"] / f"{cell['method']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell))


def test_wilson_interval(render):
    lo, hi = render.wilson(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    lo, hi = render.wilson(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775           # stays inside [0, 1] where the normal one would not
    assert render.wilson(0, 0) is None


def test_sizes_fit_small_tasks(bench):
    assert bench.fit_sizes(13086, 100, 500) == {"examples": 13086, "n_select": 100, "n_test": 500, "fitted": None}
    s = bench.fit_sizes(190, 100, 500)                  # bigbench_causal_judgment
    assert (s["n_select"], s["n_test"]) == (100, 90) and "90 held-out rows" in s["fitted"]
    s = bench.fit_sizes(80, 100, 500)                   # bias_in_bios_profession: half and half
    assert (s["n_select"], s["n_test"]) == (40, 40) and "half" in s["fitted"]


def test_skip_cell_specs(bench):
    specs = ["qwen:hotpotqa:laser=480 generation passes: days here", "fever:c2i=later"]
    assert bench.parse_skips(specs, "qwen2.5-coder-1.5b") == {("hotpotqa", "laser"): "480 generation passes: "
                                                              "days here", ("fever", "c2i"): "later"}
    assert bench.parse_skips(specs, "smollm2") == {("fever", "c2i"): "later"}
    for bad in ["fever:laser", "fever:lasr=x", "fever=x"]:
        with pytest.raises(SystemExit):
            bench.parse_skips([bad], "smollm2")


def test_estimates_and_max_minutes(bench, tmp_path):
    rep = {"forward_passes": {"layers": 30, "search_layer_passes": 100}, "task": {"kind": "classification"},
           "timings": {"load": 2.0, "scan_svd": 14.0, "search": 10.0, "confirm": 3.0, "test_base": 5.0,
                       "test_adapted": 1.0, "total": 40.0},
           "search": {"candidates": [{"layer": 20}, {"layer": 25}]}, "scan": {"matrices": [{}] * 210}}
    est = bench.estimates(rep, (28, 29))
    assert est["seconds_per_layer_pass"] == 0.1
    assert est["c2i"] == round(40 - 10 - 3 + 0.1 * (10 + 5), 1)              # shared phases + every candidate
    assert est["laser"] == round(2 + 14 * 2 / 7 * 2 / 30 + 6 + 0.1 * (30 + 16 * (2 + 1)), 1)
    rep["task"]["kind"] = "generation"      # a third of a candidate's passes (the decode steps) every layer
    d = bench.DECODE_SHARE
    depth = [(1 - d) * (30 - layer) + d * 30 for layer in range(30)]
    per = 10.0 / (depth[20] + depth[25])
    gen = bench.estimates(rep, None)
    assert gen["seconds_per_layer_pass"] == pytest.approx(per)
    assert gen["c2i"] == round(40 - 10 - 3 + 10.0, 1)                          # the same two candidates' passes
    assert gen["laser"] == round(2 + 14 * 2 / 7 + 6 + per * (30 + 16 * sum(depth)), 1)
    rep["search"]["candidates"][1]["same_as"] = "L20"                          # a twin ran no pass
    assert bench.estimates(rep, None)["seconds_per_layer_pass"] == pytest.approx(10.0 / depth[20])
    _write(tmp_path, _cell("fever", "c2i_fast", 0.5, estimates={"c2i": 7200.0, "laser": 600.0,
                                                                "seconds_per_layer_pass": 0.1}))
    args = type("Args", (), {"max_minutes": 60, "out": str(tmp_path), "skip_cell": [], "model": "smollm2"})
    b = bench.Bench(args, "cmd")
    assert "estimated 120 min > --max-minutes 60" in b.too_slow("fever", "c2i")
    assert b.too_slow("fever", "laser") is None and b.too_slow("fever", "c2i_fast") is None
    args.max_minutes = None
    assert b.too_slow("fever", "c2i") is None


def test_renderer_table_from_hand_made_cells(render, tmp_path):
    out = tmp_path / "tasks-smollm2"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({
        "model": "smollm2", "tasks": ["fever", "bias_in_bios_profession"], "methods": list(render.METHODS),
        "settings": {"samples": 100, "test_size": 200, "seed": 0},
        "runs": [{"command": "python bench/bench_tasks.py --model smollm2 --tasks fever --out X"}]}))
    base = _cell("fever", "base", 0.5)
    base["held_out"]["accuracy_ci95"] = render.wilson(100, 200)
    fast = _cell("fever", "c2i_fast", 0.56, paired={"n": 200, "fixed": 20, "broken": 8, "difference": 0.06,
                                                     "se": 0.02, "ci95": [0.02, 0.1], "p_two_sided": 0.036})
    fast["held_out"]["accuracy_ci95"] = render.wilson(112, 200)
    c2i = _cell("fever", "c2i", 0.5, paired={"n": 200, "fixed": 0, "broken": 0, "difference": 0.0, "se": 0.0,
                                            "ci95": [0.0, 0.0], "p_two_sided": 1.0})
    c2i["plan"] = []
    c2i["sizes"]["fitted"] = "made up: fewer rows"
    for c in (base, fast, c2i):
        _write(out, c)
    _write(out, {"model": "smollm2", "task": "fever", "method": "laser", "skipped": "estimated 900 min > 600"})
    md = render.render(out)
    lines = md.splitlines()
    assert lines[0] == "### smollm2"
    table = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| task")]
    assert len(table) == 8                       # 2 planned tasks × 4 methods
    assert all(ln.count("|") == 14 for ln in table + [render.HEADER, render.RULE])
    rows = {tuple(c.strip() for c in ln.split("|")[1:3]): ln for ln in table}
    assert "50.0% [43.1, 56.9]" in rows["fever", "base"] and "(the base model)" in rows["fever", "base"]
    assert "55.0% (true)" in rows["fever", "base"]
    r = rows["fever", "c2i_fast"]
    assert "56.0% [49.1, 62.7]" in r and "+6.0 pts [+2.0, +10.0]" in r and "20 / 8" in r and "| 0.036 |" in r
    assert "L11 mlp.down_proj ρ=0.05 k=2 block" in r and "12.0%" in r and "1,002" in r and "0.693" in r
    assert "none: base kept" in rows["fever", "c2i"] and "100 / 200\\*" in rows["fever", "c2i"]
    assert "skipped: estimated 900 min > 600" in rows["fever", "laser"]
    assert all("not run yet" in rows["bias_in_bios_profession", m] for m in render.METHODS)
    assert "Cells: 3 measured, 1 skipped with their reason, 4 not run yet, of 8." in md
    assert "\\* fever: made up: fewer rows" in md
    assert "Command: `python bench/bench_tasks.py --model smollm2 --tasks fever --out X`" in md
    assert "AMD EPYC (1 thread)" in md and "torch 2.13.0" in md and "abc1234" in md and "2026-12-01" in md
    assert "Wilson" in md and "McNemar" in md
    assert "to be rerun: fever." in md            # a c2i_fast cell without "loss" ran before `--loss auto`
    fast["loss"] = "choice"
    _write(out, fast)
    assert "to be rerun" not in render.render(out)
    # a method cell whose base differs from the base cell's: not the same held-out rows, said under the table
    fast["held_out"]["base_accuracy"] = 0.51
    _write(out, fast)
    assert "not the same rows" in render.render(out)


def test_render_into_a_document_replaces_only_its_block(render, tmp_path):
    out = tmp_path / "tasks-smollm2"
    _write(out, _cell("fever", "base", 0.5))
    doc = tmp_path / "results.md"
    text = (f"# Results\nbefore\n<!-- render_tasks: {out} -->\nold table\n<!-- /render_tasks -->\nafter\n"
            f"<!-- render_tasks: {out} -->\n")             # an unclosed second block: only the first is filled
    doc.write_text(text)
    assert render.main([str(out), "--into", str(doc)]) == 0
    new = doc.read_text()
    assert new.startswith(f"# Results\nbefore\n<!-- render_tasks: {out} -->\nSeed 0") and "old table" not in new
    assert "### smollm2" not in new and "| fever | base |" in new
    assert new.endswith(f"<!-- /render_tasks -->\nafter\n<!-- render_tasks: {out} -->\n")
    assert render.main([str(out), "--into", str(doc)]) == 0 and doc.read_text() == new      # idempotent
    # a folder without a block: one clear error, the document untouched
    other = tmp_path / "tasks-qwen"
    _write(other, _cell("fever", "base", 0.6))
    with pytest.raises(SystemExit, match="no '<!-- render_tasks: .*tasks-qwen -->'"):
        render.main([str(out), str(other), "--into", str(doc)])
    assert doc.read_text() == new


def test_list_cells_gives_each_cell_its_time_and_command(render, tmp_path, capsys):
    out = tmp_path / "tasks-smollm2"
    _write(out, _cell("fever", "base", 0.5))
    _write(out, {"model": "smollm2", "task": "fever", "method": "c2i", "skipped": "estimated 900 min > 600"})
    assert render.main([str(out), "--list-cells"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "- smollm2 · fever · base: 12.3 s · abc1234 · 2026-12-01 12:00:00 UTC · "
        "`python bench/bench_tasks.py --tasks fever`",
        "- smollm2 · fever · c2i: skipped: estimated 900 min > 600 · ? · ? · `command not recorded`"]


def test_render_plans_cells_of_a_folder_not_made_yet(bench, tmp_path, capsys):
    assert bench.main(["--render", "--out", str(tmp_path / "none"), "--model", "qwen2.5-coder-1.5b",
                       "--tasks", "fever,truthfulqa"]) == 0
    md = capsys.readouterr().out
    assert "### qwen2.5-coder-1.5b" in md and md.count("| not run yet |") == 8
    assert "Cells: 0 measured, 0 skipped with their reason, 8 not run yet, of 8." in md


def test_every_cell_present_runs_nothing(bench, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tasks"
    for m in ("base", "laser", "c2i", "c2i_fast"):
        _write(out, _cell("fever", m, 0.5))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}

    def boom(*a, **k):
        raise AssertionError("nothing should run: every cell exists")
    monkeypatch.setattr(bench.Bench, "run_method", boom)
    monkeypatch.setattr(bench.Bench, "base_alone", boom)
    assert bench.main(["--model", "smollm2", "--tasks", "fever", "--out", str(out), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "meta.json"} == before
    assert capsys.readouterr().out.count("| fever |") == 4


@pytest.mark.slow
def test_end_to_end_tiny_run_resumes_and_renders(bench, render, tmp_path, monkeypatch, capsys):
    """Tiny real run (SmolLM2, FEVER, 20 selection / 30 held-out rows): a cell left by a killed run stays as it
    is, the missing ones are made, a rerun loads no model; the table has the four cells with numbers."""
    import c2i_fast.models as models
    import c2i_fast.pipeline as pipeline
    monkeypatch.setenv("C2I_DATA", os.environ.get("C2I_DATA", "/work/shared/data"))
    loads, pipeline_loads = [], []
    real_load = models.load_model

    def counting_load(*a, **k):
        loads.append(a[0] if a else k.get("model"))
        return real_load(*a, **k)
    monkeypatch.setattr(models, "load_model", counting_load)          # the bench's one load per run
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pipeline_loads.append(a) or real_load(*a, **k))
    out = tmp_path / "tasks-smollm2"
    argv = ["--model", "smollm2", "--tasks", "fever", "--samples", "20", "--test-size", "30", "--top-k", "1",
            "--max-evals", "3", "--clusters", "1,2", "--methods", "block", "--rank-fractions", "0.1,0.01",
            "--laser-layers", "28,29", "--confirm-size", "60", "--threads", "1", "--quiet", "--out", str(out)]
    left = _cell("fever", "laser", 0.25, paired={"n": 30, "fixed": 0, "broken": 0, "difference": 0.0, "se": 0.0,
                                                "ci95": [0.0, 0.0], "p_two_sided": 1.0})
    _write(out, left)                                  # what a run killed after its laser cell left behind
    assert bench.main(argv) == 0
    assert len(loads) == 1                             # c2i_fast and c2i share it; laser's cell was there
    assert json.loads((out / "fever" / "laser.json").read_text()) == left
    (out / "fever" / "laser.json").unlink()            # now the run killed before laser: it resumes there
    stamps = {p: p.stat().st_mtime_ns for p in (out / "fever").glob("*.json")}
    assert bench.main(argv) == 0
    assert len(loads) == 2
    assert {p: p.stat().st_mtime_ns for p in (out / "fever").glob("*.json") if p in stamps} == stamps
    assert sorted(p.name for p in (out / "fever").glob("*.json")) == ["base.json", "c2i.json", "c2i_fast.json",
                                                                     "laser.json"]
    capsys.readouterr()
    assert bench.main(argv) == 0                       # every cell present: no model load
    assert len(loads) == 2 and pipeline_loads == []    # no run loaded a model of its own

    cells = {m: json.loads((out / "fever" / f"{m}.json").read_text()) for m in render.METHODS}
    base = cells["base"]["held_out"]
    for m, c in cells.items():
        assert c["sizes"]["n_select"] == 20 and c["sizes"]["n_test"] == 30 and c["held_out"]["n"] == 30
        assert c["held_out"]["base_accuracy"] == base["accuracy"]      # the same held-out rows
        lo, hi = c["held_out"]["accuracy_ci95"]
        assert lo <= c["held_out"]["accuracy"] <= hi
        assert c["provenance"]["versions"]["torch"] and c["provenance"]["command"].startswith("python bench/")
    assert cells["c2i"]["rule"] == "paper" and cells["c2i"]["n_evaluated"] == cells["c2i"]["n_candidates"] == 4
    assert cells["c2i_fast"]["rule"] == "confirm" and cells["c2i_fast"]["n_evaluated"] <= 3
    assert cells["c2i_fast"]["sizes"]["n_confirm"] == 60 and cells["c2i"]["sizes"]["n_confirm"] == 0
    assert cells["c2i_fast"]["loss"] == "choice" and cells["c2i"]["loss"] == "answer"     # fever: classification
    assert set(cells["c2i_fast"]["estimates"]) >= {"c2i", "laser"}
    assert cells["laser"]["laser_layers"] == "28,29" and cells["laser"]["n_candidates"] == 2 * 2 * 8
    assert cells["base"]["layer_passes"] == 0 and cells["base"]["source"] == "c2i_fast"
    assert (out / "fever" / "reports" / "c2i.json").is_file()
    md = capsys.readouterr().out
    rows = [ln for ln in md.splitlines() if ln.startswith("| fever |")]
    assert len(rows) == 4 and not any("not run yet" in r or "skipped" in r for r in rows)
    assert all("%" in r.split("|")[4] for r in rows)                  # an accuracy in every row


def test_a_killed_cell_resumes_its_run_and_a_changed_one_starts_over(bench, tmp_path, monkeypatch):
    """A cell's run folder (<out>/<task>/.work/<method>/run) outlives a killed or failed run: the next run passes
    ``resume`` (adapt/laser then skip the journaled candidates, tests/test_reliability.py) and the cell says it was
    resumed; the folder goes once the cell is written. Faked runs: a real LASER report stands in for the result."""
    import c2i_fast.pipeline as pipeline
    real = json.loads((bench.REPO / "bench/results/tasks-smollm2/counterfact_rewrite_all/reports/laser.json")
                      .read_text())
    calls = []

    def fake_laser(cfg, lm=None):
        calls.append(cfg.resume)
        run = bench.Path(cfg.out)
        run.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            (run / "journal.jsonl").write_text(json.dumps({"key": "first candidate", "t": time.time()}) + "\n")
            raise RuntimeError("killed after one candidate")
        assert (run / "journal.jsonl").read_text().count("\n") == 1        # what the killed run left
        return real
    monkeypatch.setattr(pipeline, "laser", fake_laser)
    monkeypatch.setattr(bench.Bench, "lm", property(lambda self: None))
    out = tmp_path / "tasks"
    argv = ["--model", "smollm2", "--tasks", "fever", "--cells", "laser", "--quiet", "--out", str(out)]
    assert bench.main(argv) != 0                                # the cell failed: no file, its folder kept
    work = out / "fever" / bench.WORK / "laser"
    assert not (out / "fever" / "laser.json").exists() and (work / "run" / "journal.jsonl").is_file()
    assert bench.main(argv) == 0 and calls == [False, True]
    cell = json.loads((out / "fever" / "laser.json").read_text())
    assert cell["resumed"]["attempts"] == 2 and cell["seconds"] >= cell["resumed"]["seconds_this_run"]
    assert cell["resumed"]["seconds_earlier"] is not None
    assert not (out / "fever" / bench.WORK).exists()             # written: the run folder is gone

    # a folder left by a run of another plan (other settings, sizes …) is started over, not resumed
    from types import SimpleNamespace
    me = SimpleNamespace(out=out)
    work, earlier = bench.Bench.attempts(me, "fever", "laser", {"settings": {"top_k": 5}})
    (work / "run").mkdir()
    started = time.time()
    (work / "run" / "journal.jsonl").write_text(json.dumps({"key": "a", "t": started + 5}) + "\n")
    work, earlier = bench.Bench.attempts(me, "fever", "laser", {"settings": {"top_k": 5}})
    assert len(earlier) == 1 and earlier[0]["last_progress"] == started + 5
    assert (work / "run" / "journal.jsonl").is_file()
    work, earlier = bench.Bench.attempts(me, "fever", "laser", {"settings": {"top_k": 7}})
    assert earlier == [] and not (work / "run").exists()


def test_an_earlier_run_without_journal_times_leaves_the_wall_unknown(bench, render, tmp_path, monkeypatch):
    """The span of an earlier run comes from its journal lines' times ("t"), never from the file's time (a
    checkout rewrites that: it once made a 55-minute run read as 13 hours). A journal whose lines carry no time
    (written before they did) leaves the cell's wall unknown, and the table says so with this run's time as a
    lower bound."""
    import c2i_fast.pipeline as pipeline
    real = json.loads((bench.REPO / "bench/results/tasks-smollm2/counterfact_rewrite_all/reports/laser.json")
                      .read_text())

    def fake_laser(cfg, lm=None):
        run = bench.Path(cfg.out)
        run.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            (run / "journal.jsonl").write_text('{"key": "first candidate"}\n')     # an old journal: no "t"
            raise RuntimeError("killed after one candidate")
        return real
    monkeypatch.setattr(pipeline, "laser", fake_laser)
    monkeypatch.setattr(bench.Bench, "lm", property(lambda self: None))
    out = tmp_path / "tasks"
    argv = ["--model", "smollm2", "--tasks", "fever", "--cells", "laser", "--quiet", "--out", str(out)]
    assert bench.main(argv) != 0 and bench.main(argv) == 0
    cell = json.loads((out / "fever" / "laser.json").read_text())
    assert cell["seconds"] is None and cell["resumed"]["seconds_earlier"] is None
    assert cell["resumed"]["seconds_this_run"] >= 0 and "not known" in cell["resumed"]["note"]
    row = render.row(cell)
    assert row.split("|")[12].strip().startswith("≥ ") and "earlier not timed" in row
