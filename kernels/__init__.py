"""Kernels of c2i_fast, installed as ``c2i_fast.kernels``.

Every op has a pure-torch reference in ``naive.py``. The functions exported here dispatch: Triton on CUDA
tensors, the reference elsewhere. ``C2I_KERNELS=torch`` forces the reference, ``C2I_KERNELS=triton``
forces Triton (e.g. with ``TRITON_INTERPRET=1`` on CPU tensors, for tests). The choice is made at call time
inside registered ops (``torch.ops.c2i.*``), so ``torch.compile`` sees one opaque op either way.

One file per op (Triton kernels → launcher → registered op → autograd):

    lowrank.py      lowrank_matmul            c2i::lowrank_matmul            backward w.r.t. x, u, v, s, bias
    clustered.py    clustered_lowrank_matmul  c2i::clustered_lowrank_matmul  backward w.r.t. x, v_cat, u_packed, bias
    reconstruct.py  clustered_reconstruct     c2i::clustered_reconstruct     backward w.r.t. v_cat, u_packed
    rsvd.py         randomized_svd (+ _blocks, pad_blocks), GEMMs via c2i::batched_matmul
    compile_check.py  AOT-compiles the kernels for sm_90 without a GPU (smem, registers, spills, MMA kind)

triton is optional: without it everything imports and runs the references.
"""
import sys as _sys


def _other_kernels(name: str, here: str):
    """The package ``name`` found on sys.path outside this folder's parent (Hugging Face's `kernels`, installed
    in site-packages), imported under that name; None when there is none."""
    import importlib.machinery
    import importlib.util
    from pathlib import Path

    root = Path(here).resolve().parent.parent
    path = [p for p in _sys.path if Path(p or ".").resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    _sys.modules[name] = module          # as the import system does: a package importing itself finds itself
    spec.loader.exec_module(module)
    return module


if __name__.split(".")[0] != "c2i_fast":
    # Imported as a top-level `kernels`: the checkout's root is on sys.path (`python -m pytest`, `python -c` there)
    # and transformers imports Hugging Face's `kernels` package by that name (a dependency from transformers
    # 5.25 on). Be that package where it is installed; otherwise be c2i_fast.kernels, never a second copy of
    # ours (a second registration of the torch.ops.c2i.* ops would take over from c2i_fast.kernels' module
    # globals and monkeypatches); where neither is importable (an uninstalled checkout), stay an empty module.
    _real = _other_kernels(__name__, __file__)
    if _real is None:
        try:
            import importlib as _importlib
            _sys.modules[__name__] = _importlib.import_module("c2i_fast.kernels")
        except ImportError:
            pass
else:
    from . import naive  # noqa: F401
    from .clustered import clustered_lowrank_matmul  # noqa: F401
    from .lowrank import lowrank_matmul  # noqa: F401
    from .reconstruct import clustered_reconstruct  # noqa: F401
    from .rsvd import pad_blocks, randomized_svd, randomized_svd_blocks  # noqa: F401
    from .utils import HAS_TRITON, backend, use_triton  # noqa: F401

    __all__ = ["lowrank_matmul", "clustered_lowrank_matmul", "clustered_reconstruct", "randomized_svd",
               "randomized_svd_blocks", "pad_blocks", "naive", "backend", "use_triton", "HAS_TRITON"]
