"""Helpers shared by the test modules (``from helpers import ...``: pyproject puts tests/ on sys.path).

    load_kernels()        c2i_fast.kernels, installed or straight from the checkout's kernels/
    KERNELS_IMPORT        the lines a test's subprocess script starts with to get ``load_kernels`` too
    import_bench(stem)    bench/<stem>.py as a module (bench/ is not a package)
    assert_close(...)     relative error against a float64 reference, and no NaN/Inf in the output
    assert_finite(t)      no NaN/Inf
    tiny_llama()          a seeded random 2-layer Llama (hidden 32, 4 heads, 2 kv heads): mechanics and shapes only
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BENCH_DIR = REPO / "bench"

# A subprocess (cwd elsewhere, fresh interpreter) gets the same loader: prepend this to its script.
KERNELS_IMPORT = f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom helpers import load_kernels\n"


def _import_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_kernels():
    """c2i_fast.kernels, installed or straight from the checkout (bench/_common.py's loader: one copy)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    from _common import load_kernels as load
    return load()


def import_bench(stem: str):
    """bench/<stem>.py as module ``c2i_<stem>``, imported once per process. bench/ goes on sys.path, as when the
    script runs, so it finds its siblings (bench/_common.py)."""
    name = f"c2i_{stem}"
    if name not in sys.modules:
        if str(BENCH_DIR) not in sys.path:
            sys.path.insert(0, str(BENCH_DIR))
        _import_file(name, BENCH_DIR / f"{stem}.py")
    return sys.modules[name]


def assert_finite(t: torch.Tensor, name: str = "") -> None:
    """No NaN or Inf in ``t`` (outputs are allocated NaN-filled under C2I_KERNELS_POISON=1: an unwritten element
    shows up here)."""
    bad = int((~torch.isfinite(t.detach())).sum())
    assert not bad, f"{name + ': ' if name else ''}{bad} NaN/Inf of {t.numel()} values (an element never written?)"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, *, name: str = "",
                 norm: str = "fro") -> float:
    """Assert that ``actual`` has ``expected``'s shape, only finite values, and a relative error ≤ ``rel``
    against ``expected`` (both taken to float64 on the CPU; ``expected`` is the float64 reference). Returns it.

    norm 'fro': ‖actual − expected‖_F / ‖expected‖_F; 'max': max|actual − expected| / max|expected|. Against an
    all-zero reference the error is absolute (the denominator is 1)."""
    label = f"{name}: " if name else ""
    assert actual.shape == expected.shape, f"{label}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert_finite(actual, name)
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if norm == "fro":
        num, den = (a - e).norm().item(), e.norm().item()
    elif norm == "max":
        num = (a - e).abs().max().item() if a.numel() else 0.0
        den = e.abs().max().item() if e.numel() else 0.0
    else:
        raise ValueError(f"norm={norm!r}: expected 'fro' or 'max'")
    err = num / (den if den > 0 else 1.0)
    assert err <= rel, f"{label}relative error {err:.3g} > {rel:g}"
    return err


def tiny_llama(seed: int = 0, **config):
    """A seeded random 2-layer Llama in eval mode (vocab 64, hidden 32, MLP 48, 4 heads, 2 kv heads): for
    mechanics and shapes, never for accuracy. ``config`` overrides or adds LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config})).eval()
