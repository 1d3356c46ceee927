"""The search's precision: score the candidates with the model's weights in a lower precision, then put back
the very tensors the model had (the scan, the confirmation and the held-out passes run at the model's own).

Only parameters are cast. Buffers stay: Llama-style rotary ``inv_freq`` is computed in fp32 by transformers and
loses digits if stored in bf16. A candidate's factors take the dtype of the weight they replace
(:func:`c2i_fast.transform.factorize_`), so they are scored in the search's precision too.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .errors import C2IError

SEARCH_DTYPES = ("model", "bfloat16")          # "model": the dtype the model was loaded in


def search_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a ``--search-dtype`` choice (None: the model's own)."""
    if name not in SEARCH_DTYPES:
        raise C2IError(f"--search-dtype {name!r}: choose one of {', '.join(SEARCH_DTYPES)}")
    return None if name == "model" else getattr(torch, name)


def lowers_precision(model: nn.Module, name: str) -> bool:
    """Whether ``--search-dtype name`` casts any of ``model``'s floating parameters."""
    dtype = search_dtype(name)
    return dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in model.parameters())


@contextmanager
def search_precision(model: nn.Module, name: str):
    """Within the block ``model``'s floating parameters are in ``--search-dtype name``; afterwards each holds
    the same tensor as before (same storage, same version: memoized SVDs and fingerprints stay valid), also when
    the block raises. A bf16 copy of every parameter lives for the block (half an fp32 model's memory)."""
    dtype = search_dtype(name)
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        if dtype is not None:
            with torch.no_grad():
                for p in model.parameters():
                    if p.is_floating_point() and p.dtype != dtype:
                        saved.append((p, p.data))
                        p.data = p.data.to(dtype)
        yield model
    finally:
        for p, original in saved:
            p.data = original
