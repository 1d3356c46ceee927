"""bench/gpu_session.sh is run once per drawn GPU session with no chance to debug it there: it must parse, stay
inside what the GPU machine returns (at most 8 files from $OUT, no subfolders) and find what gpu_prepare.sh
builds. (Its full CPU rehearsal, C2I_GPU_REHEARSAL=1, takes minutes: see the script's header.)"""
import re
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", ["gpu_session.sh", "gpu_prepare.sh"])
def test_script_parses(script):
    res = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_session_returns_at_most_eight_flat_files():
    text = (BENCH / "gpu_session.sh").read_text()
    outs = set(re.findall(r'"\$OUT/([^"]+)"', text))
    assert {"env.txt", "session.log", "search-gpu-fever.json"} <= outs
    assert all("/" not in o for o in outs)                    # files two folders down do not come back
    assert len(outs) <= 8
    # the per-task search results are one name with $task in it: count each task it runs
    tasks = re.search(r"for task in ([^;]+);", text).group(1).split()
    assert len(outs) - 1 + len(tasks) <= 8


def test_session_reads_what_prepare_writes():
    prep, sess = (BENCH / "gpu_prepare.sh").read_text(), (BENCH / "gpu_session.sh").read_text()
    assert ".gpu.tmp/models/smollm2" in prep and "random:$PWD/.gpu/models/smollm2" in sess
    assert 'C2I_DATA="$PWD/.gpu/data"' in sess and 'cp "$DATA/$t.jsonl" .gpu.tmp/data/' in prep
    for task in ("fever", "counterfact", "bigbench_epistemic_reasoning"):
        assert task in prep.split("TASKS=")[1].split("\n")[0] and task in sess
