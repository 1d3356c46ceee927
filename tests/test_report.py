"""The HTML report: renders from a real `adapt` output directory and from hand-made ones; every figure is a
real PNG; the page carries the report's numbers; bad input gives a C2IError naming the file."""
from __future__ import annotations

import base64
import copy
import io
import json
import re
import sys

import pytest

from c2i_fast.errors import C2IError
from c2i_fast.report import FIGURES, SCHEMA, fmt_count, fmt_pct, render_report, summary_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, smollm2):
    """One real C2I run on SmolLM2 + FEVER with a tiny grid (two matrix types keep the scan short)."""
    from c2i_fast.pipeline import AdaptConfig, adapt
    out = tmp_path_factory.mktemp("adapt") / "run"
    adapt(AdaptConfig(model="smollm2", task="fever", out=str(out), samples=16, test_size=16, top_k=1,
                      rank_fractions=(0.5, 0.05), clusters=(1, 2), methods=("block",), types=("mlp_in", "mlp_out"),
                      max_evals=4, confirm_size=50, threads=1, progress=False), lm=smollm2)
    return out


def _report(run) -> dict:
    return json.loads((run / "report.json").read_text())


def _write(tmp_path, report) -> object:
    d = tmp_path / "run"
    d.mkdir()
    (d / "report.json").write_text(json.dumps(report))
    return d


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert len(data) > 5_000, f"{path.name} is suspiciously small ({len(data)} bytes)"
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        assert w >= 300 and h >= 150, f"{path.name} is {w}×{h}"
        extrema = im.convert("L").getextrema()
        assert extrema[0] < extrema[1], f"{path.name} is a blank image"
    import matplotlib.image
    assert matplotlib.image.imread(io.BytesIO(data)).ndim == 3


def _embedded(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_real_run_renders_every_figure_and_the_numbers(real_run):
    rep = _report(real_run)
    assert rep["schema"] == SCHEMA
    index = render_report(real_run)
    assert index == real_run / "report" / "index.html"
    html = index.read_text()
    for name in FIGURES:
        _check_png(index.parent / name)
    # the page is self-contained: the same PNGs embedded
    assert sorted(_embedded(html)) == sorted((index.parent / n).read_bytes() for n in FIGURES)
    for split in ("selection", "test"):
        for which in ("base", "adapted"):
            m = rep[split][which]
            for key in ("accuracy", "accuracy_sum", "accuracy_mean"):
                assert fmt_pct(m[key]) in html
            assert f"{m['log_loss']:.3f}" in html
            assert fmt_pct(m["majority"]["accuracy"]) in html
    assert str(rep["test"]["base"]["majority"]["label"]) in html
    for e in rep["plan"]:
        assert e["matrix"] in html
    total = rep["accounting"].get("total") if rep["accounting"] else None
    if total:      # the plan may be empty on 16 samples; then there is nothing to account for
        assert fmt_count(total["model_params_before"]) in html and fmt_count(total["model_params_after"]) in html
    # no temp files left behind
    assert not [p for p in index.parent.iterdir() if p.name.startswith(".")]


def test_summary_table_of_a_real_run(real_run):
    rep = _report(real_run)
    text = summary_table(rep)
    assert "fever" in text and "held-out" in text and "selection" in text
    assert fmt_pct(rep["test"]["base"]["accuracy"]) in text
    assert fmt_pct(rep["test"]["adapted"]["accuracy"]) in text
    assert fmt_pct(rep["test"]["base"]["majority"]["accuracy"]) in text
    assert "time:" in text
    sig = rep["search"]["significance"]
    assert f"Selection gain {sig['gain']:+d} of 16 examples" in text and f"best of {sig['candidates']}" in text
    rep["search"]["significance"].update(gated=True, gate_p=0.05)
    assert "above --gate-p 0.05, so the base model was kept" in summary_table(rep)


def test_laser_shaped_report_renders_without_scan(real_run, tmp_path):
    """`c2i laser` writes no scan section and no predicted ΔL̂: those figures are left out, the rest render."""
    rep = copy.deepcopy(_report(real_run))
    del rep["scan"]
    for c in rep["search"]["candidates"]:
        c.pop("predicted_delta", None)
    rep["search"].pop("rank_correlation_predicted_vs_measured", None)
    index = render_report(_write(tmp_path, rep))
    files = {p.name for p in index.parent.glob("*.png")}
    assert files == {"search_rho.png", "timings.png"}
    for name in files:
        _check_png(index.parent / name)
    assert fmt_pct(rep["test"]["adapted"]["accuracy"]) in index.read_text()


def test_twins_are_marked_in_the_candidate_table(real_run, tmp_path):
    """A candidate with an earlier one's factors (search.same_as) shows as a twin, not as a 0-second pass."""
    rep = copy.deepcopy(_report(real_run))
    cands = [c for c in rep["search"]["candidates"] if c.get("accuracy") is not None]
    first, twin = cands[0], cands[1]
    for k in ("accuracy", "accuracy_sum", "accuracy_mean", "log_loss", "choice_loss"):
        if k in first:
            twin[k] = first[k]
    twin["seconds"], twin["same_as"] = 0.0, "earlier|key"
    html = render_report(_write(tmp_path, rep)).read_text()
    assert "twin, not rerun" in html and "1 of them twins" in html


def test_draws_spread_is_reported(real_run, tmp_path):
    rep = copy.deepcopy(_report(real_run))
    rep["draws"] = {"n": 3, "plans": [rep["plan"], [], rep["plan"]], "test_accuracy": [0.61, 0.5, 0.705],
                    "test_gain": [0.11, 0.0, 0.205], "mean": 0.605, "std": 0.1025, "min": 0.5, "max": 0.705,
                    "test_paired": [{"fixed": 17, "broken": 6, "p_two_sided": 0.0347}, None,
                                    {"fixed": 29, "broken": 8, "p_two_sided": 0.00061}]}
    html = render_report(_write(tmp_path, rep)).read_text()
    assert "Spread over 3 selection draws" in html
    assert "<td>17 / 6</td>" in html and "<td>0.035</td>" in html and "<td>29 / 8</td>" in html
    for x in ("60.5%", "10.2 pts", "50.0%", "70.5%", "+20.5 pts"):
        assert x in html
    assert "60.5%" in summary_table(rep)


def test_paired_held_out_difference_is_stated(tmp_path):
    rep = {"task": {"name": "fever"},
           "test": {"base": {"accuracy": 0.518, "n": 500}, "adapted": {"accuracy": 0.516, "n": 500},
                    "paired": {"n": 500, "fixed": 40, "broken": 41, "difference": -0.002, "se": 0.018,
                               "ci95": [-0.0373, 0.0333], "p_two_sided": 1.0}}}
    html = render_report(_write(tmp_path, rep)).read_text()
    assert "40 fixed, 41 broken, difference -0.2 pts (95% interval -3.7 pts to +3.3 pts)" in html
    assert "exact McNemar p = 1 (two-sided)" in html and "40 fixed, 41 broken" in summary_table(rep)
    rep["test"]["paired"].update(fixed=0, broken=0, difference=0.0)      # no answer changed: nothing to say
    (tmp_path / "same").mkdir()
    assert "fixed" not in render_report(_write(tmp_path / "same", rep)).read_text()


def test_minimal_hand_made_report(tmp_path):
    rep = {"task": {"name": "<script>x</script>"},
           "test": {"base": {"accuracy": 0.5, "n": 10, "majority": {"label": "yes", "accuracy": 0.6}},
                    "adapted": {"accuracy": 0.55, "n": 10, "majority": {"label": "yes", "accuracy": 0.6}}},
           "timings": {"load": 1.0, "search": 2.5, "total": 4.0}}
    index = render_report(_write(tmp_path, rep), tmp_path / "out")
    html = index.read_text()
    for x in ("50.0%", "55.0%", "60.0%", "+5.0 pts", "does not beat it"):
        assert x in html
    assert "<script>x" not in html and "&lt;script&gt;" in html
    assert {p.name for p in index.parent.glob("*.png")} == {"timings.png"}
    _check_png(index.parent / "timings.png")
    assert "55.0%" in summary_table(rep)
    # an empty object renders too (a page that says little), and so does the terminal table
    (tmp_path / "empty").mkdir()
    assert render_report(_write(tmp_path / "empty", {})).is_file()
    assert isinstance(summary_table({}), str)


def test_rerender_removes_figures_the_new_report_lacks(real_run, tmp_path):
    out = tmp_path / "out"
    render_report(real_run, out)
    assert {p.name for p in out.glob("*.png")} == set(FIGURES)
    render_report(_write(tmp_path, {"test": {"base": {"accuracy": 0.5}, "adapted": {"accuracy": 0.5}}}), out)
    assert not list(out.glob("*.png"))
    assert "50.0%" in (out / "index.html").read_text()


def test_render_accepts_the_report_file_itself(tmp_path):
    d = _write(tmp_path, {"test": {"base": {"accuracy": 0.25}, "adapted": {"accuracy": 0.75}}})
    index = render_report(d / "report.json")
    assert index == d / "report" / "index.html" and "75.0%" in index.read_text()


@pytest.mark.parametrize("content, match", [(None, "no report here"), ("{not json", "not a valid JSON report"),
                                            ("[1, 2]", "expected a JSON object")])
def test_bad_report_is_a_clear_error_naming_the_file(tmp_path, content, match):
    if content is not None:
        (tmp_path / "report.json").write_text(content)
    with pytest.raises(C2IError, match=match) as e:
        render_report(tmp_path)
    assert str(tmp_path / "report.json") in str(e.value)


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    d = _write(tmp_path, {"test": {"base": {"accuracy": 0.5}, "adapted": {"accuracy": 0.5}}})
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(C2IError, match="matplotlib"):
        render_report(d)
    assert not (d / "report").exists()
