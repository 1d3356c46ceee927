"""bench/bench_wait_policy.py: cells are checked, finished cells are skipped (resume) and tabulated. The runs
themselves are minutes of CPU in fresh processes (results in bench/results/wait-policy-cpu)."""
import json

import pytest


@pytest.fixture(scope="module")
def wp(import_bench):
    return import_bench("bench_wait_policy")


def test_an_unknown_cell_is_refused(wp, tmp_path):
    with pytest.raises(SystemExit) as e:
        wp.main(["--out", str(tmp_path), "--cells", "default-idle,spin-fast"])
    assert e.value.code == 2


def test_finished_cells_are_skipped_and_tabulated(wp, tmp_path, monkeypatch, capsys):
    for cell in wp.CELLS:
        (tmp_path / f"{cell}.json").write_text(json.dumps(
            {"seconds": 30.0, "timings": {"scan_gradient": 10.0, "scan_svd": 5.0, "candidates": 8.0, "search": 2.0,
                                          "test_base": 1.5}}))
    monkeypatch.setattr(wp, "run_cell", lambda cell: pytest.fail(f"{cell} ran again"))
    assert wp.main(["--out", str(tmp_path)]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(wp.CELLS) and "| 30.0 | 10.0 | 5.0 |" in rows[0]
