"""Reliability: a killed search resumes with no candidate evaluated twice and the same final plan; the same
seed gives bit-identical plans and report numbers on CPU."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from c2i_fast.cli import main

ARGS = ["--model", "smollm2", "--task", "fever", "--samples", "16", "--test-size", "16", "--top-k", "2",
        "--rank-fractions", "0.6,0.2,0.05", "--clusters", "1,2", "--methods", "block", "--max-evals", "8",
        "--types", "mlp_in,mlp_out", "--threads", "1"]


def _numbers(rep: dict) -> dict:
    """Everything in a report that must be reproducible (timings and per-candidate seconds excluded)."""
    cands = [{k: v for k, v in c.items() if k != "seconds"} for c in rep["search"]["candidates"]]
    return {"plan": rep["plan"], "selection": rep["selection"], "test": rep["test"], "candidates": cands,
            "scan": rep["scan"], "accounting": rep["accounting"]}


def test_kill_and_resume_gives_the_uninterrupted_result(tmp_path, smollm2):
    ref = tmp_path / "ref"
    assert main(["adapt", *ARGS, "--out", str(ref), "--quiet"]) == 0
    ref_rep = json.loads((ref / "report.json").read_text())

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "c2i_fast.cli", "adapt", *ARGS, "--out", str(out), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / "journal.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(journal.read_text().splitlines())
    assert 3 <= n_before < 8 and not (out / "report.json").exists()

    assert main(["adapt", "--resume", str(out), "--quiet"]) == 0
    keys = [json.loads(l)["key"] for l in journal.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 8                       # nobody evaluated twice, all evaluated
    rep = json.loads((out / "report.json").read_text())
    assert _numbers(rep) == _numbers(ref_rep)                     # bit-identical to the uninterrupted run
    assert json.loads((out / "plan.json").read_text())["edits"] == json.loads((ref / "plan.json").read_text())["edits"]
    assert rep["versions"]["torch"] and rep["config"]["seed"] == 0


def test_out_dir_in_use_is_refused(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_text("x")
    assert main(["adapt", *ARGS, "--out", str(out), "--quiet"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["something"]
