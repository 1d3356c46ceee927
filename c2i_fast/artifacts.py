"""Saving adapted models: the small factored artifact, a plain dense checkpoint, and honest size accounting.

Artifact layout (``save_adapted``)::

    <dir>/adapted.safetensors   the factored modules' tensors only, keys "<module name>.<u|v|bias|v_cat|…>"
    <dir>/plan.json             the Plan (edits, base model id, base-model fingerprint) + the tensor file's sha256

``load_adapted(base, dir)`` checks the base model's fingerprint and the file checksum, then swaps the stored
factors in (no SVD is recomputed). ``export_dense`` writes a standard Hugging Face checkpoint that plain
transformers loads without c2i_fast.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .decompose import ClusteredFactors, LowRankFactors, cluster_labels, rank_for
from .errors import C2IError
from .io import atomic_directory, atomic_write_text, umask
from .nn import ClusteredLowRankLinear, LowRankLinear, is_conv1d, linear_weight
from .transform import (Plan, base_named_parameters, current_plan, edit_of, factored_modules, factorize_,
                        is_factored, locate, original_of, restore_)

ADAPTED_FILE = "adapted.safetensors"
PLAN_FILE = "plan.json"
ARTIFACT_FORMAT = "c2i_fast.adapted/1"
_FINGERPRINT_SALT = b"c2i_fast.fingerprint/1\n"


# ---------------------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------------------
def fingerprint(model: nn.Module) -> str:
    """``"sha256:<hex>"`` of the BASE model: every parameter's name, shape, dtype and full bytes, by name.

    Factored modules contribute the parameters of the modules they replaced, so an adapted model and its base
    have the same fingerprint. Hashing all bytes (≈0.4 s for 135M fp32 parameters on one CPU core) makes it
    exact: any changed value, cast or reshaped tensor changes it, and a safetensors round trip does not.
    """
    h = hashlib.sha256(_FINGERPRINT_SALT)
    for name, p in sorted(base_named_parameters(model), key=lambda kv: kv[0]):
        t = p.detach()
        if t.device.type == "meta":
            raise C2IError(f"cannot fingerprint parameter {name!r}: it is on the meta device (offloaded)")
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        # A uint8 view hashes the raw bytes of any dtype (bf16 included, which numpy cannot represent).
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Factored artifact
# ---------------------------------------------------------------------------------------------------------
def _check_plan_matches(model: nn.Module, plan: Plan) -> None:
    fm = factored_modules(model)
    planned = {e.matrix for e in plan.edits}
    if planned != set(fm):
        raise C2IError(f"plan does not describe the model's factored modules: planned but not factored "
                       f"{sorted(planned - set(fm))}, factored but not planned {sorted(set(fm) - planned)}")
    for e in plan.edits:
        mod = fm[e.matrix]
        k = mod.n_clusters if isinstance(mod, ClusteredLowRankLinear) else 1
        if k != e.n_clusters:
            raise C2IError(f"plan edit for {e.matrix!r} says n_clusters={e.n_clusters}, the module has {k}")


def save_adapted(model: nn.Module, plan: Plan | None, directory: str | os.PathLike) -> Path:
    """Write ``adapted.safetensors`` (factored modules' tensors only) and ``plan.json`` into ``directory``.

    ``plan`` defaults to :func:`~c2i_fast.transform.current_plan`; it must name exactly the factored modules.
    The saved plan carries the base-model fingerprint and the tensor file's sha256. Atomic: a new directory is
    built under a temp name and renamed into place; in an existing directory each file is written to a temp
    name and ``os.replace``-d, tensors first and plan last (a torn pair fails the checksum on load).
    """
    from safetensors.torch import save_file

    plan = current_plan(model) if plan is None else plan
    _check_plan_matches(model, plan)
    tensors = {}
    for name, mod in factored_modules(model).items():
        for key, t in mod.state_dict().items():
            tensors[f"{name}.{key}"] = t.detach().cpu().contiguous()
    meta = dict(plan.meta)
    out = Plan(plan.edits, base_model=plan.base_model, fingerprint=fingerprint(model), meta=meta)

    directory = Path(directory)

    def write_tensors(path: Path) -> dict:
        # One metadata key: safetensors writes the metadata map in hash order, so two keys would make the
        # file bytes (and the checksum in plan.json) differ from run to run.
        save_file(tensors, str(path), metadata={"c2i_fast": ARTIFACT_FORMAT})
        os.chmod(path, 0o666 & ~umask())
        return {"format": ARTIFACT_FORMAT, "file": ADAPTED_FILE, "sha256": _file_sha256(path),
                "bytes": path.stat().st_size}

    if not directory.exists():       # the directory appears complete or not at all
        with atomic_directory(directory) as work:
            out.meta = {**meta, "artifact": write_tensors(work / ADAPTED_FILE)}
            (work / PLAN_FILE).write_text(json.dumps(out.to_json(), indent=2) + "\n")
        return directory
    tmp_tensors = directory / f".{ADAPTED_FILE}.tmp-{os.getpid()}"
    try:
        out.meta = {**meta, "artifact": write_tensors(tmp_tensors)}
        os.replace(tmp_tensors, directory / ADAPTED_FILE)
        atomic_write_text(directory / PLAN_FILE, json.dumps(out.to_json(), indent=2) + "\n")
    finally:
        if tmp_tensors.exists():
            tmp_tensors.unlink()
    return directory


def _read_factors(tensors: dict, plan: Plan, path: Path) -> dict:
    def get(key):
        if key not in tensors:
            raise C2IError(f"{path} has no tensor {key!r} required by {PLAN_FILE}")
        return tensors[key]

    out = {}
    for e in plan.edits:
        p = e.matrix + "."
        if e.n_clusters == 1:
            out[e.matrix] = LowRankFactors(get(p + "u"), get(p + "v"))
        else:
            out[e.matrix] = ClusteredFactors(get(p + "v_cat"), get(p + "u_packed"), get(p + "row_index"),
                                             get(p + "row_offsets"), get(p + "rank_offsets"))
    return out


def load_adapted(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply a saved adaptation to ``base_model`` in place (and return it), using the stored factors.

    Raises :class:`C2IError` when the base model's fingerprint differs from the saved one (naming both), when
    a file is missing or corrupt (naming it), or when a tensor is missing. Modules of ``base_model`` that are
    already factored are restored first, so the result is exactly the saved adapted model.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    plan_path, tensor_path = directory / PLAN_FILE, directory / ADAPTED_FILE
    plan = Plan.load(plan_path)
    if plan.fingerprint is not None:
        fp = fingerprint(base_model)
        if fp != plan.fingerprint:
            raise C2IError(f"base model fingerprint {fp} differs from {plan.fingerprint} recorded in {plan_path}: "
                           "the adaptation was saved against a different base model")
    if not plan.edits:        # the run kept the base model (nothing beat it, or its gain was not confirmed)
        return restore_(base_model) if factored_modules(base_model) else base_model
    if not tensor_path.is_file():
        raise C2IError(f"adapted tensors file {tensor_path} is missing")
    expected = (plan.meta.get("artifact") or {}).get("sha256")
    if expected is not None and _file_sha256(tensor_path) != expected:
        raise C2IError(f"adapted tensors file {tensor_path} is corrupt or does not belong to {plan_path} "
                       "(sha256 mismatch)")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError and OSError
        raise C2IError(f"cannot read adapted tensors file {tensor_path}: {e}") from e
    factors = _read_factors(tensors, plan, tensor_path)
    restore_(base_model)
    return factorize_(base_model, plan, factors=factors)


# ---------------------------------------------------------------------------------------------------------
# Dense export
# ---------------------------------------------------------------------------------------------------------
def _dense_copy(mod: nn.Module) -> nn.Module:
    """A module of the original type whose weight is the factored module's dense Ŵ (and bias)."""
    orig = original_of(mod)
    w = mod.dense_weight().detach()                    # (out, in), module dtype
    if orig is None:
        dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        conv = False
    else:
        # deepcopy for the original's type and attributes, but not its (large) weight: memo maps it to None.
        skip = {id(orig.weight): None}
        if getattr(orig, "bias", None) is not None:
            skip[id(orig.bias)] = None
        dense = copy.deepcopy(orig, memo=skip)
        conv = is_conv1d(orig)
    dense.weight = nn.Parameter((w.T if conv else w).contiguous().clone(), requires_grad=False)
    dense.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
    return dense


def export_dense(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write a plain Hugging Face checkpoint of ``model`` with every factored module rebuilt dense.

    The caller's model is left as it was: dense copies (of the original module type, e.g. GPT-2 Conv1D) are
    swapped in only for the duration of ``save_pretrained`` and the factored modules put back in ``finally``;
    the GGUF quantizer flags (which make transformers refuse to save) and config fields that
    ``save_pretrained`` writes are restored too. A factored matrix whose original weight was tied (e.g.
    ``lm_head`` with the embeddings) is saved untied (``tie_word_embeddings=False`` in the written config).
    """
    if not hasattr(model, "save_pretrained"):
        raise C2IError(f"export_dense needs a transformers PreTrainedModel, got {type(model).__name__}")
    fm = factored_modules(model)
    # Which factored originals share their weight with another parameter (tied embeddings)?
    all_params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    untie = False
    for mod in fm.values():
        orig = original_of(mod)
        if orig is not None and any(p is orig.weight for p in all_params):
            untie = True
    swaps = []
    config = model.config
    missing = object()
    # Saved from __dict__ (not getattr) so that restoring puts back exactly what was there, absence included.
    saved_attrs = {k: model.__dict__.get(k, missing) for k in ("hf_quantizer", "is_quantized")}
    saved_cfg = {k: config.__dict__.get(k, missing)
                 for k in ("quantization_config", "tie_word_embeddings", "dtype", "architectures")}
    directory = Path(directory)
    # a new directory appears complete or not at all; an existing one is written into
    target = atomic_directory(directory) if not directory.exists() else contextlib.nullcontext(directory)
    try:
        with target as work:
            for name, mod in fm.items():
                parent, attr, _ = locate(model, name)
                swaps.append((parent, attr, mod))
                setattr(parent, attr, _dense_copy(mod))
            # Dequantized GGUF models still carry the quantizer, which makes save_pretrained refuse. Their
            # weights are plain floats by now, so saving them unquantized is what we want.
            if saved_attrs["hf_quantizer"] is not missing:
                model.__dict__["hf_quantizer"] = None
            if saved_attrs["is_quantized"] is not missing:
                model.__dict__["is_quantized"] = False
            if saved_cfg["quantization_config"] is not missing:
                config.__dict__.pop("quantization_config")
            if untie:
                config.tie_word_embeddings = False
            model.save_pretrained(work)
            if tokenizer is not None:
                tokenizer.save_pretrained(work)
    finally:
        for parent, attr, mod in swaps:
            setattr(parent, attr, mod)
        for k, v in saved_attrs.items():
            if v is missing:
                model.__dict__.pop(k, None)
            else:
                model.__dict__[k] = v
        for k, v in saved_cfg.items():
            if v is missing:
                config.__dict__.pop(k, None)
            else:
                config.__dict__[k] = v
    return directory


# ---------------------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------------------
def _planned_sizes(w: torch.Tensor, e) -> tuple[list[int], list[int]]:
    """(cluster sizes, ranks) an edit would produce on weight w (m, n), without any SVD."""
    m, n = w.shape
    if e.n_clusters == 1:
        return [m], [rank_for(e.rank_fraction, m, n)]
    labels = cluster_labels(w, e)
    sizes = torch.bincount(labels, minlength=e.n_clusters).tolist()
    return sizes, [rank_for(e.rank_fraction, s, n) for s in sizes]


def accounting(model: nn.Module, plan: Plan | None = None) -> dict:
    """Parameters and bytes before/after for every edited matrix and in total.

    Uses the factored modules of ``model``; with ``plan``, edits whose module is not factored yet are
    accounted for as planned (cluster sizes from the clustering, no SVD). Per matrix (bias excluded: it is
    unchanged): ``dense_params``/``dense_bytes`` (m·n in the original dtype), ``factored_params`` (float
    values stored, u_packed padding included), ``index_bytes`` (int64 routing metadata of clustered
    factors), ``factored_bytes`` (values + index), ``param_ratio``, ``byte_ratio``, ``ranks``,
    ``kept_rank_fraction`` (Σ r_c / Σ min(|c|, n): the fraction of available rank kept) and
    ``break_even_rank`` (mn/(m+n) plain, mn/(kn+m) clustered). ``total`` sums the matrices and gives the
    whole model's parameter and byte counts before and after.
    """
    fm = factored_modules(model)
    edits = {}
    for name, mod in fm.items():
        edits[name] = edit_of(mod)
    if plan is not None:
        for e in plan.edits:
            edits.setdefault(e.matrix, e)
    rows = []
    for name, e in edits.items():
        _, _, mod = locate(model, name)
        if is_factored(mod):
            orig = original_of(mod)
            m, n = mod.out_features, mod.in_features
            dense_dtype = orig.weight.dtype if orig is not None else next(mod.parameters()).dtype
            if isinstance(mod, LowRankLinear):
                sizes, ranks, k = [m], [mod.rank], 1
                params, index_bytes = mod.u.numel() + mod.v.numel(), 0
                vbytes = mod.u.numel() * mod.u.element_size() + mod.v.numel() * mod.v.element_size()
            else:
                sizes, ranks, k = mod.cluster_sizes, mod.ranks, mod.n_clusters
                f = mod.factors()
                params, index_bytes = f.num_params(), f.index_nbytes()
                vbytes = f.nbytes() - index_bytes
        else:
            w = linear_weight(mod, name=name)
            m, n = w.shape
            dense_dtype = w.dtype
            sizes, ranks = _planned_sizes(w.detach(), e)
            k = e.n_clusters
            esz = w.element_size()
            if k == 1:
                params, index_bytes = (m + n) * ranks[0], 0
            else:
                params = n * sum(ranks) + m * max(1, max(ranks))
                index_bytes = 8 * (m + 2 * (k + 1))
            vbytes = params * esz
        esz_dense = torch.empty(0, dtype=dense_dtype).element_size()
        dense_params = m * n
        avail = sum(min(s, n) for s in sizes)
        rows.append({
            "matrix": name, "shape": [m, n], "dtype": str(dense_dtype).replace("torch.", ""),
            "rank_fraction": e.rank_fraction if e is not None else None,
            "n_clusters": k, "method": e.method if e is not None else None,
            "cluster_sizes": sizes, "ranks": ranks,
            "kept_rank_fraction": sum(ranks) / max(1, avail),
            "break_even_rank": m * n / (m + n) if k == 1 else m * n / (k * n + m),
            "dense_params": dense_params, "dense_bytes": dense_params * esz_dense,
            "factored_params": params, "index_bytes": index_bytes, "factored_bytes": vbytes + index_bytes,
            "param_ratio": params / dense_params, "byte_ratio": (vbytes + index_bytes) / (dense_params * esz_dense),
            "factored": is_factored(mod),
        })
    d_p = sum(r["dense_params"] for r in rows)
    f_p = sum(r["factored_params"] for r in rows)
    d_b = sum(r["dense_bytes"] for r in rows)
    f_b = sum(r["factored_bytes"] for r in rows)
    base = list(base_named_parameters(model))
    before_p = sum(p.numel() for _, p in base)
    before_b = sum(p.numel() * p.element_size() for _, p in base)
    total = {
        "matrices": len(rows), "dense_params": d_p, "factored_params": f_p, "dense_bytes": d_b,
        "factored_bytes": f_b, "param_ratio": f_p / d_p if d_p else 1.0, "byte_ratio": f_b / d_b if d_b else 1.0,
        "model_params_before": before_p, "model_params_after": before_p - d_p + f_p,
        "model_bytes_before": before_b, "model_bytes_after": before_b - d_b + f_b,
    }
    return {"matrices": rows, "total": total}
