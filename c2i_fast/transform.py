"""One-call model surgery: ``factorize_(model, plan)`` swaps named linear layers for factored ones, ``restore_``
puts the originals back. Modelled on torchao's ``quantize_(model, config, filter_fn)``.

A :class:`Plan` is a list of :class:`Edit` (module name, rank fraction ρ, clusters k, clustering method, seed)
plus the base model's id and fingerprint; it round-trips through JSON. Each factored module keeps a reference
to the module it replaced (in its ``__dict__``, so it is neither a submodule nor in ``state_dict``), which is
what ``restore_`` reinstates and what :func:`base_named_parameters` reads to fingerprint the *base* model.
"""
from __future__ import annotations

import json
import numbers
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from .decompose import (CLUSTER_METHODS, SVD, ClusteredFactors, ClusteredSVD, LowRankFactors, decompose,
                        rank_for)
from .errors import C2IError
from .nn import FACTORED_TYPES, ClusteredLowRankLinear, LowRankLinear, is_conv1d

PLAN_FORMAT = "c2i_fast.plan/1"
_ORIGINAL = "_c2i_original"   # key in a factored module's __dict__: the module it replaced
_EDIT = "c2i_edit"            # attribute of a factored module: the Edit that produced it


@dataclass(frozen=True)
class Edit:
    """Replace module ``matrix`` (e.g. ``"model.layers.25.mlp.up_proj"``) by its rank-fraction-ρ factorization,
    with rows split into ``n_clusters`` clusters by ``method`` (``seed`` for k-means / projective)."""
    matrix: str
    rank_fraction: float
    n_clusters: int = 1
    method: str = "block"
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.matrix, str) or not self.matrix:
            raise C2IError(f"edit matrix must be a non-empty module name, got {self.matrix!r}")
        rank_for(self.rank_fraction, 1, 1)    # raises C2IError for ρ outside (0, 1]
        if (isinstance(self.n_clusters, bool) or not isinstance(self.n_clusters, numbers.Integral)
                or self.n_clusters < 1):
            raise C2IError(f"edit {self.matrix!r}: n_clusters={self.n_clusters!r} must be an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise C2IError(f"edit {self.matrix!r}: seed={self.seed!r} must be an integer")
        if not isinstance(self.method, str) or self.method not in CLUSTER_METHODS:
            raise C2IError(f"edit {self.matrix!r}: unknown clustering method {self.method!r}; choose one of "
                           f"{', '.join(CLUSTER_METHODS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Edit":
        if not isinstance(d, Mapping):
            raise C2IError(f"a plan edit must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise C2IError(f"unknown edit field(s) {sorted(extra)}; known: {sorted(known)}")
        if "matrix" not in d or "rank_fraction" not in d:
            raise C2IError(f"an edit needs 'matrix' and 'rank_fraction', got {dict(d)}")
        return cls(**d)


@dataclass
class Plan:
    """What to factorize in which base model. JSON form: ``{"format", "base_model", "fingerprint", "edits",
    "meta"}``; ``fingerprint`` is :func:`c2i_fast.artifacts.fingerprint` of the base model (or None)."""
    edits: list[Edit]
    base_model: str = ""
    fingerprint: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.edits = [e if isinstance(e, Edit) else Edit.from_dict(e) for e in self.edits]
        seen = set()
        for e in self.edits:
            if e.matrix in seen:
                raise C2IError(f"plan edits matrix {e.matrix!r} twice")
            seen.add(e.matrix)

    def to_json(self) -> dict:
        """A JSON-serialisable dict."""
        return {"format": PLAN_FORMAT, "base_model": self.base_model, "fingerprint": self.fingerprint,
                "edits": [e.to_dict() for e in self.edits], "meta": self.meta}

    @classmethod
    def from_json(cls, d: Mapping | str) -> "Plan":
        """From :meth:`to_json`'s dict (or its JSON text)."""
        if isinstance(d, str):
            try:
                d = json.loads(d)
            except json.JSONDecodeError as e:
                raise C2IError(f"plan is not valid JSON: {e}") from e
        if not isinstance(d, Mapping) or "edits" not in d:
            raise C2IError("a plan must be a JSON object with an 'edits' list")
        fmt = d.get("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise C2IError(f"unsupported plan format {fmt!r} (this version reads {PLAN_FORMAT!r})")
        if not isinstance(d["edits"], list):
            raise C2IError("plan 'edits' must be a list")
        meta, base, fp = d.get("meta") or {}, d.get("base_model", "") or "", d.get("fingerprint")
        if not isinstance(meta, Mapping):
            raise C2IError(f"plan 'meta' must be a JSON object, got {type(meta).__name__}")
        if not isinstance(base, str):
            raise C2IError(f"plan 'base_model' must be a string, got {type(base).__name__}")
        if fp is not None and not isinstance(fp, str):
            raise C2IError(f"plan 'fingerprint' must be a string or null, got {type(fp).__name__}")
        return cls(edits=[Edit.from_dict(e) for e in d["edits"]], base_model=base, fingerprint=fp, meta=dict(meta))

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temp file in the same directory, then ``os.replace``)."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise C2IError(f"cannot read plan file {path}: {e}") from e
        try:
            return cls.from_json(json.loads(text))
        except json.JSONDecodeError as e:
            raise C2IError(f"plan file {path} is not valid JSON: {e}") from e
        except C2IError as e:
            raise C2IError(f"plan file {path}: {e}") from e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a partial one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())      # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
def _locate(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
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


def _dense_weight(mod: nn.Module, name: str) -> torch.Tensor:
    if is_conv1d(mod):
        return mod.weight.T
    if isinstance(mod, nn.Linear):
        return mod.weight
    raise C2IError(f"module {name!r} is a {type(mod).__name__}; only nn.Linear and Conv1D can be factorized")


def factorize_(model: nn.Module, plan_or_edits: Plan | Edit | Iterable[Edit | dict],
               *, factors: Mapping[str, LowRankFactors | ClusteredFactors] | None = None,
               svds: Mapping[str, SVD | ClusteredSVD] | None = None) -> nn.Module:
    """Swap the named modules of ``model`` in place for :class:`LowRankLinear` (k = 1) or
    :class:`ClusteredLowRankLinear` (k > 1) and return ``model``.

    ``factors[name]`` (used as is) or ``svds[name]`` (an :class:`SVD` of W for k = 1, or a fitted
    :class:`ClusteredSVD` with the edit's k) spare the decomposition; otherwise it is computed from the
    ORIGINAL dense weight in fp32. Factors are stored in the original weight's dtype, on its device. A module
    that is already factored is restored first, so re-applying an edit is idempotent. All names are checked
    before anything is swapped.
    """
    edits = _as_edits(plan_or_edits)
    factors = factors or {}
    svds = svds or {}
    # Pass 1: resolve every target (unknown names fail before any swap).
    targets = []
    for e in edits:
        parent, attr, mod = _locate(model, e.matrix)
        base = original_of(mod) if is_factored(mod) else mod
        if base is None:
            raise C2IError(f"module {e.matrix!r} is factored but keeps no original to refactorize from")
        w = _dense_weight(base, e.matrix)
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
            if e.n_clusters == 1:
                f = decompose(w, e.rank_fraction, svd=s if isinstance(s, SVD) else None, name=e.matrix)
            elif isinstance(s, ClusteredSVD) and s.n_clusters == e.n_clusters:
                if s.shape != (m, n):
                    raise C2IError(f"clustered SVD for {e.matrix!r} has shape {s.shape}, weight is {m}x{n}")
                f = s.factors(e.rank_fraction)
            else:
                f = decompose(w, e.rank_fraction, e.n_clusters, e.method, e.seed, name=e.matrix)
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
        parent, attr, mod = _locate(model, name)
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
