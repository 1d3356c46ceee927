"""Scan cache: the scan (gradient pass, every matrix's Σ-gradients and score, the top-K's SVDs and gradients) is a
function of the model, the selection rows as batched, the machine and the scan's options. A second ``c2i adapt``
on the same rows (another ``--rule``, ``--max-evals`` or ``--confirm-size``) or a ``--resume`` reads it instead
of paying the gradient pass and the SVDs again: on Qwen2.5-Coder-1.5B that is 5–25 minutes of a run.

Key: sha256 of the metrics cache's description of the rows and the machine (:func:`c2i_fast.cache.describe`:
model fingerprint, rows as batched, device, versions, thread count), plus the scan's own options — the matrices
scanned, the ρ grid, top-K, the loss and score kinds, the SVD route and gradient checkpointing.

Value: one folder per key under ``$C2I_CACHE/scan/`` (default ``~/.cache/c2i_fast``): ``scan.json`` (every
field but the tensors; Python's JSON writes floats with ``repr``, so they round-trip exactly) and
``tensors.safetensors`` (each matrix's Σ-gradients, the top-K's SVD factors and gradients, bit for bit). A folder
appears whole (written aside, then renamed) or not at all; one that cannot be read is a miss. The top-K of
Qwen2.5-Coder-1.5B take ~0.6 GB a key: delete the folder whenever you like, it only costs the next run its scan.

What a hit does not restore: the base model's selection metrics and the layer inputs the scan's forward pass
leaves for the search (``ScanResult.base``, the prefix cache). The caller gets them from one plain forward pass
instead (:func:`c2i_fast.cache.base_metrics`, itself cached), which gives the same bits.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .cache import _sha, cache_root, describe
from .scan import MatrixScan, ScanResult
from .svd import SVD

MODES = ("on", "write", "off")     # read and write; compute and write (a first run that must pay its scan); none


def scan_key(mc, scorer, refs, rank_fractions, top_k: int, loss_kind: str, score: str, svd: str,
             checkpointing: bool) -> dict:
    """Everything a scan's result depends on, as JSON-able values (the module docstring)."""
    return {"rows": describe(scorer, mc.model_fingerprint(), generate=False),
            "matrices": [r.name for r in refs], "rank_fractions": [float(r) for r in rank_fractions],
            "top_k": int(top_k), "loss": loss_kind, "score": score, "svd": svd,
            "checkpointing": bool(checkpointing)}


class ScanCache:
    """Scan results under ``root`` (default ``$C2I_CACHE/scan``), by :func:`scan_key`. ``mode`` is one of
    :data:`MODES`. ``hit`` says what the last :meth:`get` found (None before any)."""

    def __init__(self, mode: str = "on", root: Path | None = None):
        if mode not in MODES:
            raise ValueError(f"scan cache mode {mode!r}: choose one of {', '.join(MODES)}")
        self.mode = mode
        self.root = Path(root) if root is not None else cache_root() / "scan"
        self.hit: bool | None = None

    def folder(self, key: dict) -> Path:
        return self.root / _sha(key)

    def get(self, key: dict) -> ScanResult | None:
        """The cached scan for ``key`` (its ``base`` None, its seconds 0), or None."""
        if self.mode != "on":
            return None
        d = self.folder(key)
        try:
            from safetensors.torch import load_file
            meta = json.loads((d / "scan.json").read_text())
            if meta["key"] != json.loads(json.dumps(key)):
                raise ValueError("another key under this name")
            tensors = load_file(str(d / "tensors.safetensors"))
            sc = _from_json(meta["scan"], tensors)
        except Exception:          # unreadable, foreign or damaged (safetensors' own error type included): a miss
            self.hit = False
            return None
        self.hit = True
        return sc

    def put(self, key: dict, sc: ScanResult) -> None:
        """Store ``sc``. A full disk or a read-only cache costs the next run its scan, nothing more."""
        if self.mode == "off":
            return
        d = self.folder(key)
        try:
            from safetensors.torch import save_file
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
            try:
                meta, tensors = _to_json(sc)
                save_file(tensors, str(tmp / "tensors.safetensors"))
                (tmp / "scan.json").write_text(json.dumps({"key": key, "scan": meta}) + "\n")
                if d.exists():                       # an equal entry from a concurrent run: keep that one
                    return
                os.replace(tmp, d)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _to_json(sc: ScanResult) -> tuple[dict, dict]:
    tensors, mats = {}, []
    for i, m in enumerate(sc.matrices):
        tensors[f"{i}.g_sigma"] = m.g_sigma.contiguous()
        if m.svd is not None:
            for part in ("u", "s", "v"):
                tensors[f"{i}.svd.{part}"] = getattr(m.svd, part).contiguous()
        if m.grad is not None:
            tensors[f"{i}.grad"] = m.grad.contiguous()
        mats.append({"name": m.name, "layer": m.layer, "type": m.type, "shape": list(m.shape),
                     "delta": [[float(r), float(v)] for r, v in m.delta.items()], "score": m.score,
                     "exact": m.exact, "estimate": m.estimate})
    meta = {"matrices": mats, "loss": sc.loss, "loss_kind": sc.loss_kind, "score_kind": sc.score_kind,
            "skipped": sc.skipped, "svds": sc.svds}
    return meta, tensors


def _from_json(meta: dict, tensors: dict) -> ScanResult:
    mats = []
    for i, m in enumerate(meta["matrices"]):
        svd = SVD(*(tensors[f"{i}.svd.{p}"] for p in ("u", "s", "v"))) if f"{i}.svd.u" in tensors else None
        mats.append(MatrixScan(name=m["name"], layer=m["layer"], type=m["type"], shape=tuple(m["shape"]),
                               g_sigma=tensors[f"{i}.g_sigma"], delta={r: v for r, v in m["delta"]},
                               score=m["score"], svd=svd, grad=tensors.get(f"{i}.grad"), exact=m["exact"],
                               estimate=m["estimate"]))
    return ScanResult(matrices=mats, loss=meta["loss"], loss_kind=meta["loss_kind"], score_kind=meta["score_kind"],
                      seconds={"gradient": 0.0, "svd": 0.0}, skipped=meta["skipped"], base=None, svds=meta["svds"])
