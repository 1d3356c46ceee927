"""c2i_fast: Compress-to-Impress adaptation of language models, kept factored.

One-call API::

    import c2i_fast
    lm = c2i_fast.load_model("smollm2")                       # or a hub id / directory / .gguf
    c2i_fast.factorize_(lm.model, c2i_fast.Plan.load("out/plan.json"))
    c2i_fast.restore_(lm.model)

    report = c2i_fast.adapt(c2i_fast.AdaptConfig(model="smollm2", task="fever", out="out"))
"""
__version__ = "0.1.0"

from .errors import C2IError  # noqa: F401,E402


def __getattr__(name):
    # Lazy exports: `import c2i_fast` stays cheap (no transformers import) until a name is used.
    import importlib
    where = {
        "LowRankLinear": "nn", "ClusteredLowRankLinear": "nn",
        "factorize_": "transform", "restore_": "transform", "Plan": "transform", "Edit": "transform",
        "save_adapted": "artifacts", "load_adapted": "artifacts", "export_dense": "artifacts",
        "accounting": "artifacts", "fingerprint": "artifacts",
        "load_model": "models", "target_matrices": "models",
        "load_task": "tasks", "adapt": "pipeline", "laser": "pipeline", "AdaptConfig": "pipeline",
        "LaserConfig": "pipeline",
    }
    if name in where:
        return getattr(importlib.import_module(f".{where[name]}", __name__), name)
    raise AttributeError(f"module 'c2i_fast' has no attribute {name!r}")
