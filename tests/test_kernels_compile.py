"""Ahead-of-time compilation of every Triton kernel for an H100 (sm_90) on a machine without a GPU.

The interpreter tests check what the kernels compute; this checks that the compiler accepts the kernels as
the launchers actually launch them (bf16 included, which the interpreter cannot run), that they fit in shared
memory, use tensor-core MMAs, and that ptxas reports no register spills. See kernels/compile_check.py.
Runs in a subprocess: the interpreter (TRITON_INTERPRET=1, set by the other kernel tests) patches
triton.language in-process, which breaks real compilation.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]

SCRIPT = f"""
import importlib, importlib.util, json, sys, warnings
warnings.filterwarnings("ignore")
import torch
try:
    K = importlib.import_module("c2i_fast.kernels")
except Exception:
    root = {str(REPO / "kernels")!r}
    spec = importlib.util.spec_from_file_location("c2i_fast.kernels", root + "/__init__.py",
                                                  submodule_search_locations=[root])
    K = importlib.util.module_from_spec(spec)
    sys.modules["c2i_fast.kernels"] = K
    spec.loader.exec_module(K)
cc = importlib.import_module(K.__name__ + ".compile_check")
# bf16 covers every 16-bit kernel/config (fp16 differs only in the element type); fp32 adds the fp32 paths
# and the rSVD GEMM.
rows = cc.report(int(sys.argv[1]), cc.default_launches(dtypes=(torch.bfloat16, torch.float32)))
print("JSON" + json.dumps(rows, default=str))
"""


def _report(arch: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(arch)], capture_output=True, text=True, env=env,
                         timeout=600)
    if res.returncode and "GPUTarget" in res.stderr and "ImportError" in res.stderr:
        pytest.skip("triton AOT compile API not available")
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("JSON"))
    return json.loads(line[4:])


@pytest.fixture(scope="module")
def rows():
    return _report(90)


def test_every_kernel_compiles_for_sm90(rows):
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_xv_kernel", "_tu_kernel", "_clustered_tu_kernel", "_reconstruct_kernel", "_bmm_kernel"}
    bad = []
    for r in rows:
        if not r["smem_ok"] or r["mma"] not in ("wgmma", "mma.sync") or (r.get("spill_bytes") or 0) > 0:
            bad.append(r)
    assert not bad, json.dumps(bad, indent=1)
    # the prefill (compute-bound) 16-bit configurations must use Hopper's wgmma
    prefill = [r for r in rows if r["dtypes"] == ["bf16", "fp32"] and r["constexprs"].get("BLOCK_M") == 128]
    assert prefill and all(r["mma"] == "wgmma" for r in prefill)


def test_every_kernel_compiles_for_sm80():
    """An A100 (sm_80) build: every kernel compiles, fits in shared memory and gets ptxas' register count (ptxas
    is asked for sm_80, there being no sm_80a). The launch configurations are Hopper's: there some prefill tiles
    spill (reported in the README), so spills are not asserted here."""
    rows = _report(80)
    assert {r["kernel"] for r in rows} == {"_xv_kernel", "_tu_kernel", "_clustered_tu_kernel", "_reconstruct_kernel",
                                           "_bmm_kernel"}
    assert all(r["smem_ok"] and r["mma"] == "mma.sync" and r["regs"] for r in rows), json.dumps(rows, indent=1)
