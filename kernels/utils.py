"""Backend selection and small helpers shared by the kernel files.

Backend (read at every call, so tests can flip it with ``monkeypatch.setenv``):

    C2I_KERNELS unset / "auto"  Triton on CUDA tensors (when triton is importable), the reference elsewhere
    C2I_KERNELS=torch           always the pure-torch reference (``naive.py``)
    C2I_KERNELS=triton          always Triton; on CPU tensors this needs TRITON_INTERPRET=1

C2I_KERNELS_POISON=1 makes every launcher allocate its outputs (and intermediates that a kernel must fully
overwrite) filled with NaN instead of uninitialised memory, so a test sees any element a kernel never wrote.

triton is an optional dependency: when it is missing, ``triton``/``tl`` below are stand-ins whose ``jit``
leaves the function undecorated, so the kernel files still import (their kernels just can't be launched).
"""
from __future__ import annotations

import functools
import os

import torch

try:  # optional GPU extra
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _Stub:
        """Enough of ``triton``/``triton.language`` for the kernel files to be defined (not run)."""

        def __getattr__(self, name):
            return _Stub()

        def __call__(self, *args, **kwargs):
            return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Stub()

        def jit(self, fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = _Stub()
    tl = _Stub()

BACKEND_ENV = "C2I_KERNELS"
POISON_ENV = "C2I_KERNELS_POISON"


def backend() -> str:
    """'auto', 'torch' or 'triton' (from ``C2I_KERNELS``)."""
    mode = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"{BACKEND_ENV}={mode!r}: expected 'auto', 'torch' or 'triton'")
    return mode


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op called on tensor ``t`` takes the Triton path."""
    mode = backend()
    if mode == "torch":
        return False
    if mode == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed")
        if not t.is_cuda and not interpret():
            raise RuntimeError(f"{BACKEND_ENV}=triton on {t.device} tensors needs TRITON_INTERPRET=1")
        return True
    return HAS_TRITON and t.is_cuda


def poison() -> bool:
    return os.environ.get(POISON_ENV, "0").strip() in ("1", "true", "yes")


def alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-filled when C2I_KERNELS_POISON=1 (tests)."""
    if poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_INTERPRETED: dict = {}


class InterpreterUnavailable(RuntimeError):
    """TRITON_INTERPRET=1 was asked for, but this triton's interpreter cannot run the kernels here."""


def _interpreter_probe(out_ptr, n):   # interpreted only: a loop whose bound is a runtime integer argument
    for i in range(0, n):
        tl.store(out_ptr + i, 1.0)


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """Why triton's interpreter cannot run the kernels on this machine, or None if it can (probed once).

    Triton 3.6's interpreter (3.9's is fixed) turns a runtime loop bound into ``int(<1-element array>)``, which
    numpy ≥ 2.4 refuses ('only 0-dimensional arrays can be converted to Python scalars'), so every kernel here
    with a loop over K or over the rank would fail. Compiled kernels on a GPU are not affected."""
    if not HAS_TRITON:
        return "triton is not installed"
    from triton.runtime.interpreter import InterpretedFunction
    out = torch.zeros(2)
    try:
        InterpretedFunction(_interpreter_probe)[(1,)](out, 2)
    except Exception as e:  # noqa: BLE001 - any failure of the probe means the kernels cannot be interpreted
        import numpy
        return (f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run loops here with numpy "
                f"{numpy.__version__}: {e!r}. Use a newer triton (3.9 works) or numpy < 2.4; on a GPU the "
                f"compiled kernels are not affected.")
    return None if bool((out == 1).all()) else "triton's interpreter ran a probe kernel wrongly"


def launchable(kernel):
    """The kernel to launch: its interpreter twin when TRITON_INTERPRET=1 was set only after the kernel
    module was imported (``@triton.jit`` picks compiled vs. interpreted when it decorates). For this to
    work the kernels call no @jit helpers of triton.language (tl.cdiv, tl.zeros): those were decorated at
    triton's import too. Use ``(a + b - 1) // b`` and ``tl.full``."""
    if not interpret():
        return kernel
    problem = interpreter_problem()
    if problem:
        raise InterpreterUnavailable(problem)
    from triton.runtime.interpreter import InterpretedFunction
    if isinstance(kernel, InterpretedFunction):
        return kernel
    if kernel not in _INTERPRETED:
        _INTERPRETED[kernel] = InterpretedFunction(kernel.fn)
    return _INTERPRETED[kernel]


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM); 132 where there is none."""
    if device_index is None or not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    return num_sms(t.device.index if t.is_cuda else None)


def dot_precision(dtype: torch.dtype) -> str | None:
    """``input_precision`` for tl.dot with fp32 operands: 'tf32' when torch allows TF32, else 'tf32x3'
    (three TF32 tensor-core products: ~fp32 accuracy, several times the FMA rate); 16-bit: default."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return None


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())
