"""A plan is a complete recipe: which matrices of which base model to factorize, and how.

An :class:`Edit` names one module and everything :func:`c2i_fast.decompose.fit` needs to rebuild exactly the
factors that were scored: rank fraction ρ, clusters k, clustering method, seed and, where the search used
settings other than the clustering's defaults, the projective subspace dimension, iterations and restarts.
A :class:`Plan` is a list of edits plus the base model's id and fingerprint; it round-trips through JSON.
"""
from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

from .decompose import CLUSTER_METHODS, rank_for
from .errors import C2IError
from .io import atomic_write_text

PLAN_FORMAT = "c2i_fast.plan/1"
# Optional recipe fields: absent (None) means the clustering's defaults (decompose.KMEANS_ITERS, …), which is
# also what a plan file written before these fields existed gets.
_OPTIONAL = ("subspace_rank", "iters", "restarts")


@dataclass(frozen=True)
class Edit:
    """Replace module ``matrix`` (e.g. ``"model.layers.25.mlp.up_proj"``) by its rank-fraction-ρ factorization,
    with rows split into ``n_clusters`` clusters by ``method`` (``seed`` for k-means / projective).

    Optional recipe fields (None = the clustering's defaults, see :func:`c2i_fast.decompose.cluster_labels`):
    ``subspace_rank`` the dimension of projective clustering's subspaces (default: the per-cluster rank of an
    equal split at ρ), ``iters`` Lloyd / alternating iterations (k-means, projective), ``restarts`` projective
    clustering's sampled restarts. The search fits projective clustering once per k at the rank of the scan's
    best ρ with few iterations, so its edits record all three.
    """
    matrix: str
    rank_fraction: float
    n_clusters: int = 1
    method: str = "block"
    seed: int = 0
    subspace_rank: int | None = None
    iters: int | None = None
    restarts: int | None = None

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
        lowest = {"subspace_rank": 1, "iters": 0, "restarts": 0}
        for name in _OPTIONAL:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lowest[name]):
                raise C2IError(f"edit {self.matrix!r}: {name}={v!r} must be an integer >= {lowest[name]} or absent")
        uses = {"subspace_rank": ("projective",), "iters": ("kmeans", "projective"), "restarts": ("projective",)}
        for name, methods in uses.items():
            if getattr(self, name) is not None and (self.method not in methods or self.n_clusters == 1):
                raise C2IError(f"edit {self.matrix!r}: {name} applies to {' / '.join(methods)} clustering with "
                               f"n_clusters > 1, not to method={self.method!r} with n_clusters={self.n_clusters}")

    def to_dict(self) -> dict:
        """JSON form; the optional recipe fields only when set (plans without them read as before)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in d.items() if k not in _OPTIONAL or v is not None}

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
