"""The search's precision: score the base and the candidates on the selection rows with bf16 matmuls, while
the scan, the confirmation and the held-out passes run at the model's own precision.

``torch.autocast`` rather than casting the weights: the matmuls (the cost) run in bf16, while the residual
stream, the norms and softmax stay fp32, and the LM head runs in fp32 (a bf16 logit near 20 is off by up to
0.06, enough to flip a choice between near-tied answers). Nothing of the model is changed: no weight is
copied, cast or written. A candidate's factored module is autocast like any linear layer.
``bench/bench_precision.py`` measures the speed and the answers that move, against fp32 and against bf16
weights (docs/results.md).
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
    """Whether ``--search-dtype name`` runs any of ``model``'s matmuls below the precision of its weights."""
    dtype = search_dtype(name)
    return dtype is not None and any(p.is_floating_point() and p.itemsize > dtype.itemsize
                                     for p in model.parameters())


@contextmanager
def search_precision(model: nn.Module, name: str):
    """Within the block ``model``'s forwards run their matmuls in ``--search-dtype name`` (autocast on the
    model's device), its output embedding (the LM head) at its weight's dtype on an input of that dtype."""
    if not lowers_precision(model, name):
        yield model
        return
    # where the matmuls run (an accelerate-offloaded parameter sits on "meta" until its layer runs)
    device = next((p.device.type for p in model.parameters() if p.device.type != "meta"), "cpu")
    head = model.get_output_embeddings()
    full = head.forward if head is not None else None
    own = head.__dict__.get("forward") if head is not None else None     # e.g. accelerate's hook wrapper

    def head_at_full_precision(x, *args, **kwargs):
        with torch.autocast(device, enabled=False):
            return full(x.to(head.weight.dtype), *args, **kwargs)

    if head is not None:
        head.forward = head_at_full_precision          # an instance attribute over the class's forward
    try:
        with torch.autocast(device, dtype=search_dtype(name)):
            yield model
    finally:
        if head is not None:
            if own is None:
                del head.forward
            else:
                head.forward = own
