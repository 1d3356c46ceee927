"""bench/bench_kernels.py runs (--tiny: a few tiny shapes, seconds) and writes JSON with the promised fields."""
import os
import json

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # same process as the interpreter tests: set it early


@pytest.fixture(scope="module")
def bench(import_bench):
    return import_bench("bench_kernels")


def test_bench_tiny_writes_json(bench, tmp_path, monkeypatch):
    monkeypatch.delenv("C2I_KERNELS", raising=False)
    monkeypatch.delenv("C2I_KERNELS_POISON", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # see test_kernels_rsvd.one_thread
    try:
        out = tmp_path / "kernels-test.json"
        doc = bench.main(["--tiny", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert data["schema"] == doc["schema"] and data["mode"] == "tiny" and data["complete"] is True
    assert [f.name for f in tmp_path.iterdir()] == ["kernels-test.json"]         # no temp file left behind
    for key in ("date", "device", "versions", "ceilings", "cases", "goals", "skipped", "timing"):
        assert key in data
    assert data["device"]["name"] and data["versions"]["torch"] == torch.__version__ and "triton" in data["versions"]
    ceil = data["ceilings"]
    assert ceil["copy_GBps"] > 0 and all(v["TFLOPs"] > 0 for v in ceil["matmul"].values())
    assert {c["op"] for c in data["cases"]} == {"lowrank", "clustered", "reconstruct", "rsvd"}
    for case in data["cases"]:
        assert case["impls"] and "ratios" in case
        for name, imp in case["impls"].items():
            if "skipped" in imp:
                assert isinstance(imp["skipped"], str) and imp["skipped"]
                continue
            for field in ("median_ms", "p20_ms", "p80_ms", "GBps", "TFLOPs", "roofline_frac"):
                assert imp[field] is not None and imp[field] >= 0, (case["case"], name, field)
            assert imp["median_ms"] > 0
        if "check_relerr" in case["info"]:
            assert case["info"]["check_relerr"] < 1e-4, case["case"]
    rs = [c for c in data["cases"] if c["op"] == "rsvd"]
    assert rs and rs[0]["info"]["err_over_optimum"]["c2i.randomized_svd"] < 1.05
    assert len(data["goals"]) == 7 and all("status" in g for g in data["goals"])
    if not torch.cuda.is_available():
        lr = next(c for c in data["cases"] if c["op"] == "lowrank")
        assert "CUDA" in lr["impls"]["triton.launcher"]["skipped"]
        assert all(g["status"].startswith("not measured") for g in data["goals"])


def test_bench_cut_short_leaves_finished_cases(bench, tmp_path, monkeypatch):
    """The GPU machine kills a run at its time limit: every case finished by then is on disk, marked incomplete."""
    real, calls = bench.run_case, []

    def run_then_die(*a, **k):
        if calls:
            raise KeyboardInterrupt("time limit")
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(bench, "run_case", run_then_die)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path / "kernels-cut.json"
    try:
        with pytest.raises(KeyboardInterrupt):
            bench.main(["--tiny", "--ops", "lowrank", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert data["complete"] is False and len(data["cases"]) == 1 and data["cases"][0]["op"] == "lowrank"
    assert data["cases"][0]["impls"]["dense.matmul"]["median_ms"] > 0
