"""Ahead-of-time compilation of the Triton kernels for a GPU target, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but accepts code the compiler rejects and
says nothing about resources. This module runs the real launchers with CPU tensors while recording each launch
(grid, arguments, constexprs, num_warps/num_stages) instead of running it, then compiles every distinct launch
with ``triton.compile`` for the target (default sm_90, H100) down to a cubin, and reports shared memory,
registers and spills (``ptxas -v``) and which MMA instructions the PTX uses.

    python -m c2i_fast.kernels.compile_check            # table for sm_90
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile

import torch

from . import clustered, lowrank, reconstruct, rsvd

_MODULES = (lowrank, clustered, reconstruct, rsvd)
_TT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64",
       torch.int32: "i32"}
SMEM_LIMIT = {90: 232448, 80: 166912}     # max dynamic shared memory per block (bytes)


class _Recorder:
    def __init__(self, kernel, sink):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **constexprs):
            self.sink.append(dict(kernel=self.kernel, grid=grid, args=args, constexprs=constexprs,
                                  num_warps=num_warps, num_stages=num_stages))
        return launch


@contextlib.contextmanager
def record_launches():
    """Within the block, launchers record their launches in the yielded list instead of running them."""
    sink: list = []
    saved = [(m, m.launchable) for m in _MODULES]
    try:
        for m in _MODULES:
            m.launchable = lambda kernel: _Recorder(kernel, sink)
        yield sink
    finally:
        for m, f in saved:
            m.launchable = f


def _jit(kernel):
    from triton.runtime.jit import JITFunction
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def compile_launch(rec: dict, arch: int = 90):
    """triton.compile one recorded launch for cuda:arch; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = _jit(rec["kernel"])
    names = [n for n in fn.arg_names if n not in rec["constexprs"]]
    sig = {}
    for name, val in zip(names, rec["args"]):
        if isinstance(val, torch.Tensor):
            sig[name] = "*" + _TT[val.dtype]
        elif isinstance(val, bool):
            sig[name] = "i1"
        else:
            sig[name] = "i64" if abs(int(val)) >= 2 ** 31 else "i32"
    for k in rec["constexprs"]:
        sig[k] = "constexpr"
    src = ASTSource(fn, sig, dict(rec["constexprs"]))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": rec["num_warps"], "num_stages": rec["num_stages"]})


def ptxas_info(ptx: str, arch: int = 90) -> dict:
    """Registers and spill bytes from ``ptxas -v`` (the ptxas bundled with triton)."""
    import triton
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    out = {}
    for exe in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bindir, exe)
        if not os.path.exists(path):
            continue
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            # the 'a' (architecture-specific: wgmma) targets exist from sm_90 on; sm_80a does not
            gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
            res = subprocess.run([path, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                                 capture_output=True, text=True)
        if res.returncode:
            continue
        log = res.stdout + res.stderr
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        out = {"regs": int(regs.group(1)) if regs else None,
               "spill_bytes": (int(spill.group(1)) + int(spill.group(2))) if spill else None}
        break
    return out


def default_launches(dtypes=(torch.float16, torch.bfloat16, torch.float32), bmm: bool = True) -> list[dict]:
    """The launches the launchers make for representative decode/prefill shapes (Llama-2-7B sizes)."""
    cases = []
    g = torch.Generator().manual_seed(0)
    with record_launches() as sink:
        for dt in dtypes:
            for M, n, m, r in ((1, 4096, 11008, 409), (16, 4096, 4096, 24), (4096, 4096, 11008, 409)):
                x = torch.empty(M, n, dtype=dt)
                u, v = torch.empty(m, r, dtype=dt), torch.empty(n, r, dtype=dt)
                s, b = torch.empty(r), torch.empty(m, dtype=dt)
                lowrank.lowrank_matmul_triton(x, u, v, s, b)
                ro = torch.tensor([0, m // 2, m])
                ko = torch.tensor([0, r, 2 * r])
                clustered.clustered_lowrank_matmul_triton(x, torch.empty(n, 2 * r, dtype=dt),
                                                          torch.empty(m, r, dtype=dt), torch.randperm(m, generator=g),
                                                          ro, ko, b)
            reconstruct.clustered_reconstruct_triton(torch.empty(2, 4096, 2 * 409, dtype=dt),
                                                     torch.empty(2, 11008, 409, dtype=dt),
                                                     torch.randperm(11008, generator=g),
                                                     torch.tensor([0, 5504, 11008]), torch.tensor([0, 409, 818]))
        if bmm:
            a = torch.empty(2, 4096, 4096)
            rsvd.bmm_triton(a, torch.empty(2, 4096, 417))
            rsvd.bmm_triton(a.transpose(1, 2), torch.empty(2, 4096, 417))
        cases.extend(sink)
    seen, out = set(), []
    for rec in cases:
        key = (rec["kernel"], tuple("*" + _TT[a.dtype] if isinstance(a, torch.Tensor) else "i" for a in rec["args"]),
               tuple(sorted(rec["constexprs"].items())), rec["num_warps"], rec["num_stages"])
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return out


def report(arch: int = 90, launches: list[dict] | None = None) -> list[dict]:
    rows = []
    for rec in launches if launches is not None else default_launches():
        k = compile_launch(rec, arch)
        ptx = k.asm["ptx"]
        dtypes = sorted({_TT[a.dtype] for a in rec["args"] if isinstance(a, torch.Tensor) and a.is_floating_point()})
        row = {"kernel": _jit(rec["kernel"]).fn.__name__, "dtypes": dtypes,
               "constexprs": {k2: v for k2, v in rec["constexprs"].items()},
               "num_warps": rec["num_warps"], "num_stages": rec["num_stages"], "shared_bytes": k.metadata.shared,
               "smem_ok": k.metadata.shared <= SMEM_LIMIT.get(arch, 232448),
               "mma": "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "fma"),
               **ptxas_info(ptx, arch)}
        rows.append(row)
    return rows


if __name__ == "__main__":  # pragma: no cover
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    for row in report(arch):
        print(row)
