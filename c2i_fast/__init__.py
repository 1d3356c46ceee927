"""c2i_fast: Compress-to-Impress adaptation of language models, kept factored.

One-call API::

    import c2i_fast
    lm = c2i_fast.load_model("smollm2")                       # or a hub id / directory / .gguf
    c2i_fast.factorize_(lm.model, c2i_fast.Plan.load("out/plan.json"))
    c2i_fast.restore_(lm.model)

    report = c2i_fast.adapt(c2i_fast.AdaptConfig(model="smollm2", task="fever", out="out"))
    res = c2i_fast.adapt(model, tokenizer, "fever")             # a loaded model: AdaptResult, nothing written
    with c2i_fast.remembered_svds():                            # several adapts of one model: one SVD each
        ...

The names below are loaded on first use (``__getattr__``), so ``import c2i_fast`` stays cheap (no torch or
transformers import); the ``TYPE_CHECKING`` imports let type checkers and IDEs see them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import C2IError

__version__ = "0.1.0"

# public name → the module (of this package) that defines it
_LAZY = {
    "LowRankLinear": "nn", "ClusteredLowRankLinear": "nn",
    "factorize_": "transform", "restore_": "transform", "Plan": "transform", "Edit": "transform",
    "save_adapted": "artifacts", "load_adapted": "artifacts", "export_dense": "artifacts",
    "accounting": "artifacts", "fingerprint": "artifacts",
    "load_model": "models", "target_matrices": "models",
    "load_task": "tasks",
    "adapt": "notebook", "AdaptResult": "notebook", "laser": "pipeline", "evaluate_model": "pipeline",
    "AdaptConfig": "config", "LaserConfig": "config", "EvalConfig": "config",
    "remembered_svds": "svd",
}

__all__ = ["C2IError", "__version__", *_LAZY]

if TYPE_CHECKING:
    from .artifacts import accounting, export_dense, fingerprint, load_adapted, save_adapted
    from .models import load_model, target_matrices
    from .nn import ClusteredLowRankLinear, LowRankLinear
    from .config import AdaptConfig, EvalConfig, LaserConfig
    from .notebook import AdaptResult, adapt
    from .pipeline import evaluate_model, laser
    from .svd import remembered_svds
    from .tasks import load_task
    from .transform import Edit, Plan, factorize_, restore_


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value          # later lookups skip this function
        return value
    raise AttributeError(f"module 'c2i_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API (loaded or not) and the module's dunder names."""
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__")})
