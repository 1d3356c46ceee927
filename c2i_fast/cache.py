"""Base-model metrics cache: what the unchanged base model scores on a fixed set of rows is a function of the
model, the rows as batched and the machine, so a second ``c2i adapt`` / ``c2i eval``, a ``--resume`` or another
draw on the same held-out rows reads it instead of running the pass again.

Key: sha256 of a JSON description (:func:`describe`) of everything the numbers depend on —

* the base model: :func:`c2i_fast.artifacts.fingerprint` (every parameter's bytes; ≈0.4 s for 135M fp32 on one
  core, computed once per :class:`MetricsCache`, i.e. once per run: every edit of a run is undone exactly);
* the rows as scored: each example's fields, the scorer's rows batch by batch (token ids, choices, packing,
  trimming), the shared prefix, the pad id, kind, scoring, ``max_new_tokens``, whether generation ran — the
  batch layout fixes the padding and so the float rounding (``batch_tokens`` enters through it);
* the machine: device and its name (GPU or CPU model), torch / transformers / c2i_fast versions, torch's CPU thread count (the
  reduction order of a GEMM depends on it).

Value: the :meth:`c2i_fast.evaluate.Scorer.evaluate` result dict as JSON, one file per key under
``$C2I_CACHE/metrics/`` (default ``~/.cache/c2i_fast``). Python's JSON writes floats with ``repr``, so the round
trip is exact: a cached result is the bits a fresh pass gives. A file that cannot be read is a miss.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from .io import atomic_write_text, device_name, versions

ENV = "C2I_CACHE"


def cache_root() -> Path:
    """``$C2I_CACHE``, else ``~/.cache/c2i_fast``."""
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "c2i_fast")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def describe(scorer, model_fingerprint: str, generate: bool = True) -> dict:
    """What a base evaluation of ``scorer``'s rows depends on, as JSON-able values (see the module docstring)."""
    dev = next(scorer.model.parameters()).device
    v = versions()
    stc = scorer.single_token_choices
    return {
        "model": model_fingerprint,
        "device": dev.type, "device_name": device_name(),
        "threads": torch.get_num_threads(),
        "versions": {k: v[k] for k in ("c2i_fast", "torch", "transformers")},
        "kind": scorer.kind, "scoring": scorer.scoring, "max_new_tokens": scorer.max_new_tokens,
        "generate": bool(generate), "pad_id": scorer.pad_id,
        "examples": _sha([asdict(ex) for ex in scorer.examples]),
        "layout": _sha({"prefix": scorer.prefix_ids, "tail": scorer.tail_names,
                        "single_token_choices": None if stc is None else stc.tolist(),
                        "batches": [[[r.example, r.choice, r.ids, r.cont, r.spans, r.trimmed] for r in b.rows]
                                    for b in scorer.batches]}),
    }


class MetricsCache:
    """Base-model metrics of one model, read and written by scorer (one instance per run: the model's
    fingerprint is computed on first use and kept). ``enabled=False`` reads and writes nothing.
    ``hits``/``misses`` count lookups."""

    def __init__(self, model, enabled: bool = True, root: Path | None = None):
        self.model, self.enabled = model, enabled
        self.root = Path(root) if root is not None else cache_root() / "metrics"
        self.fingerprint: str | None = None
        self.hits = self.misses = 0

    def model_fingerprint(self) -> str:
        """c2i_fast.artifacts.fingerprint of the model, computed once."""
        if self.fingerprint is None:
            from .artifacts import fingerprint
            self.fingerprint = fingerprint(self.model)
        return self.fingerprint

    def path(self, scorer, generate: bool = True) -> Path:
        return self.root / f"{_sha(describe(scorer, self.model_fingerprint(), generate))}.json"

    def get(self, scorer, generate: bool = True) -> dict | None:
        """The cached result for the base model on ``scorer``'s rows, or None."""
        if not self.enabled:
            return None
        p = self.path(scorer, generate)
        try:
            res = json.loads(p.read_text())["result"]
        except (OSError, ValueError, KeyError, TypeError):
            self.misses += 1
            return None
        self.hits += 1
        return res

    def put(self, scorer, result: dict, generate: bool = True) -> None:
        """Store ``result`` (the base model's :meth:`Scorer.evaluate` on ``scorer``'s rows). A full disk or a
        read-only cache directory only costs the next run the pass."""
        if not self.enabled:
            return
        p = self.path(scorer, generate)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(p, json.dumps({"key": describe(scorer, self.model_fingerprint(), generate),
                                             "result": result}) + "\n")
        except OSError:
            pass

    def stats(self) -> dict:
        return {"enabled": self.enabled, "hits": self.hits, "misses": self.misses}


def base_metrics(scorer, mc: MetricsCache | None, prefix=None, capture: set[int] = frozenset(),
                 generate: bool = True) -> tuple[dict, bool]:
    """The base model's metrics on ``scorer``'s rows, and whether they came from the cache. On a hit the prefix
    cache still gets the layer inputs ``capture`` asks for, from a pass that stops below the highest of those
    layers (:meth:`c2i_fast.evaluate.Scorer.capture`): what the hit saves is the layers above it, the head,
    and (no capture) the whole pass. On a miss: ``scorer.evaluate(prefix, capture=…)``, then stored."""
    cached = mc.get(scorer, generate) if mc is not None else None
    if cached is not None:
        if prefix is not None and capture:
            scorer.capture(prefix, set(capture))
        return cached, True
    res = scorer.evaluate(prefix, capture=set(capture) if prefix is not None else set(), generate=generate)
    if mc is not None:
        mc.put(scorer, res, generate)
    return res, False
