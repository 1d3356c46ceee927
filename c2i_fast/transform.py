"""One-call model surgery: ``factorize_(model, plan)`` swaps named linear layers for factored ones, ``restore_``
puts the originals back. Modelled on torchao's ``quantize_(model, config, filter_fn)``.

A :class:`Plan` is a list of :class:`Edit` (module name, rank fraction ρ, clusters k, clustering method, seed)
plus the base model's id and fingerprint; it round-trips through JSON. Each factored module keeps a reference
to the module it replaced (in its ``__dict__``, so it is neither a submodule nor in ``state_dict``), which is
what ``restore_`` reinstates and what :func:`base_named_parameters` reads to fingerprint the *base* model.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from .decompose import SVD, ClusteredFactors, ClusteredSVD, LowRankFactors, fit
from .errors import C2IError
from .io import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported for older importers)
from .nn import FACTORED_TYPES, ClusteredLowRankLinear, LowRankLinear, linear_weight
from .plan import PLAN_FORMAT, Edit, Plan  # noqa: F401  (Edit and Plan are part of this module's API)

_ORIGINAL = "_c2i_original"   # key in a factored module's __dict__: the module it replaced
_EDIT = "c2i_edit"            # attribute of a factored module: the Edit that produced it


# ---------------------------------------------------------------------------------------------------------
# Inspecting factored models
# ---------------------------------------------------------------------------------------------------------
def is_factored(module: nn.Module) -> bool:
    return isinstance(module, FACTORED_TYPES)


def original_of(module: nn.Module) -> nn.Module | None:
    """The module a factored module replaced (None if it was built by hand)."""
    return module.__dict__.get(_ORIGINAL)


def edit_of(module: nn.Module) -> Edit | None:
    return getattr(module, _EDIT, None)


def factored_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: factored module} in model order."""
    return {name: mod for name, mod in model.named_modules() if is_factored(mod)}


def current_plan(model: nn.Module, base_model: str = "", meta: dict | None = None) -> Plan:
    """The plan that reproduces ``model``'s factored modules (from the Edit each one records)."""
    edits = []
    for name, mod in factored_modules(model).items():
        e = edit_of(mod)
        if e is None:
            raise C2IError(f"factored module {name!r} was not made by factorize_ and records no edit")
        edits.append(e)
    return Plan(edits, base_model=base_model, meta=dict(meta or {}))


def base_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``named_parameters()`` of the *base* model: a factored module contributes the parameters of the module
    it replaced. Shared (tied) parameters are reported once, under the first name met, as torch does."""
    seen: set[int] = set()

    def visit(mod: nn.Module, prefix: str):
        if is_factored(mod) and original_of(mod) is not None:
            mod = original_of(mod)
        for n, p in mod._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            yield prefix + n, p
        for cn, child in mod._modules.items():
            if child is not None:
                yield from visit(child, prefix + cn + ".")

    yield from visit(model, "")


# ---------------------------------------------------------------------------------------------------------
# factorize_ / restore_
# ---------------------------------------------------------------------------------------------------------
def locate(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent module, attribute name, module) for a dotted module name."""
    if not name:
        raise C2IError("cannot factorize the model itself: name a linear submodule")
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise C2IError(f"model {type(model).__name__} has no module named {name!r}") from None
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr, mod


def _as_edits(plan_or_edits) -> list[Edit]:
    if isinstance(plan_or_edits, Plan):
        return list(plan_or_edits.edits)
    if isinstance(plan_or_edits, Edit):
        return [plan_or_edits]
    if isinstance(plan_or_edits, Mapping):
        return list(Plan.from_json(plan_or_edits).edits)
    edits = [e if isinstance(e, Edit) else Edit.from_dict(e) for e in plan_or_edits]
    Plan(edits)   # duplicate check
    return edits


def factorize_(model: nn.Module, plan_or_edits: Plan | Edit | Iterable[Edit | dict],
               *, factors: Mapping[str, LowRankFactors | ClusteredFactors] | None = None,
               svds: Mapping[str, SVD | ClusteredSVD] | None = None) -> nn.Module:
    """Swap the named modules of ``model`` in place for :class:`LowRankLinear` (k = 1) or
    :class:`ClusteredLowRankLinear` (k > 1) and return ``model``.

    ``factors[name]`` (used as is) or ``svds[name]`` (an :class:`SVD` of W for k = 1, or a
    :class:`ClusteredSVD` fitted with the edit's clustering) spare the decomposition; otherwise
    :func:`c2i_fast.decompose.fit` computes it from the ORIGINAL dense weight in fp32. Factors are stored in the original weight's dtype, on its device. A module
    that is already factored is restored first, so re-applying an edit is idempotent. All names are checked
    before anything is swapped.
    """
    edits = _as_edits(plan_or_edits)
    factors = factors or {}
    svds = svds or {}
    # Pass 1: resolve every target (unknown names fail before any swap).
    targets = []
    for e in edits:
        parent, attr, mod = locate(model, e.matrix)
        base = original_of(mod) if is_factored(mod) else mod
        if base is None:
            raise C2IError(f"module {e.matrix!r} is factored but keeps no original to refactorize from")
        w = linear_weight(base, name=e.matrix)
        if not 1 <= e.n_clusters <= w.shape[0]:
            raise C2IError(f"edit {e.matrix!r}: n_clusters={e.n_clusters} must satisfy "
                           f"1 <= n_clusters <= {w.shape[0]} (rows)")
        targets.append((e, parent, attr, base, w))
    # Pass 2: decompose and swap.
    for e, parent, attr, base, w in targets:
        m, n = w.shape
        f = factors.get(e.matrix)
        if f is None:
            s = svds.get(e.matrix)
            usable = isinstance(s, SVD) if e.n_clusters == 1 else (
                isinstance(s, ClusteredSVD) and s.n_clusters == e.n_clusters)
            f = fit(w, e, s if usable else None, name=e.matrix)
        if tuple(f.shape) != (m, n):
            raise C2IError(f"factors for {e.matrix!r} have shape {tuple(f.shape)}, its weight is {m}x{n}")
        f = f.to(device=w.device)
        if isinstance(f, LowRankFactors) and e.n_clusters == 1:
            new = LowRankLinear.from_factors(f, bias=base.bias, dtype=w.dtype)
        elif isinstance(f, ClusteredFactors) and f.n_clusters == e.n_clusters:
            new = ClusteredLowRankLinear.from_factors(f, bias=base.bias, dtype=w.dtype)
        else:
            raise C2IError(f"factors for {e.matrix!r} ({type(f).__name__}) do not match the edit's "
                           f"n_clusters={e.n_clusters}")
        # Behave like the layer replaced: same train/eval mode, frozen if its weight was frozen.
        new.train(base.training)
        new.requires_grad_(w.requires_grad)
        new.__dict__[_ORIGINAL] = base
        setattr(new, _EDIT, e)
        setattr(parent, attr, new)
    return model


def restore_(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Put back the original modules of all factored modules (or of ``names``); returns ``model``.

    The original follows the factored module's device and floating dtype (the model may have been moved or
    cast since it was factorized).
    """
    if names is None:
        todo = list(factored_modules(model))
    else:
        todo = [names] if isinstance(names, str) else list(names)
    for name in todo:
        parent, attr, mod = locate(model, name)
        if not is_factored(mod):
            raise C2IError(f"module {name!r} is not factored; nothing to restore")
        orig = original_of(mod)
        if orig is None:
            raise C2IError(f"factored module {name!r} keeps no original module to restore")
        ref = next(mod.parameters())
        w = orig.weight
        if w.device != ref.device or (w.dtype != ref.dtype and w.is_floating_point()):
            orig.to(device=ref.device, dtype=ref.dtype)
        del mod.__dict__[_ORIGINAL]
        setattr(parent, attr, orig)
    return model
