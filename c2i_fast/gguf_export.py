"""GGUF export: the source GGUF file with each factored matrix replaced by its dense Ŵ, everything else as it was.

``export_gguf(model, source, out)`` writes a file llama.cpp (and transformers) loads like the source:

- every KV pair (architecture, hyper-parameters, tokenizer, chat template …) copied as read, in file order;
- every tensor the adaptation did not touch copied byte for byte, in its original type (Q4_1, Q8_0, F32 …);
- each factored module's weight written as Ŵ = ``dense_weight()`` (out, in) in F32, F16 or BF16 (or Q8_0, the
  reference quantizer llama.cpp's own converter uses), under its GGUF name (``model.layers.9.mlp.down_proj``
  → ``blk.9.ffn_down.weight``, from gguf's tensor-name map for the file's architecture).

llama.cpp's converter stores the Q and K projections of ``llama``-architecture models with the rows of each
head permuted (rotary pairs interleaved); transformers undoes that on load (``LlamaTensorProcessor``). An
edited q/k matrix therefore gets the same permutation here. Before writing, every edited matrix's ORIGINAL
weight is mapped the same way and compared with the source tensor dequantized (what transformers loaded):
they must be equal, which checks the name map, the permutation and that ``source`` is the model's file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import C2IError
from .io import umask
from .transform import factored_modules, original_of

# Types the edited matrices can be written in: f32 is exact; f16/bf16 round Ŵ; q8_0 is gguf's reference quantizer
# (the one llama.cpp's convert_hf_to_gguf.py --outtype q8_0 uses).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# GGUF architectures whose Q/K weights llama.cpp's converter permutes (transformers' TENSOR_PROCESSORS maps
# exactly "llama" to the processor that reverses it; Mistral files use "llama" too).
_PERMUTED_QK = {"llama"}


def gguf_tensor_name(reader, module_name: str) -> str:
    """GGUF tensor name of a module's weight in ``reader``'s architecture, e.g. ``blk.9.attn_q.weight``.

    Uses gguf's own HF→GGUF tensor-name map (llama, qwen2, mistral, gemma, phi3 … every architecture gguf
    knows). Raises :class:`C2IError` when the module has no GGUF name or the file holds no such tensor.
    """
    import gguf

    arch = _field(reader, "general.architecture")
    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise C2IError(f"GGUF architecture {arch!r} is unknown to the installed gguf package (upgrade gguf)")
    n_blocks = int(_field(reader, f"{arch}.block_count") or 0)
    base = gguf.get_tensor_name_map(archs[arch], n_blocks).get_name(module_name)
    if base is None:
        raise C2IError(f"module {module_name!r} has no GGUF tensor name in architecture {arch!r}")
    name = base + ".weight"
    if name not in {t.name for t in reader.tensors}:
        raise C2IError(f"module {module_name!r} maps to GGUF tensor {name!r}, which the source file does not hold "
                       "(a tied lm_head, for instance, has no tensor of its own)")
    return name


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row permutation (convert_hf_to_gguf.py ``LlamaModel.permute``) of w (out, in), out =
    n_head·head_dim: within each head, rows [first half; second half] → interleaved pairs. Inverse of
    transformers' ``_reverse_permute_weights``."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field(reader, key: str):
    field = reader.get_field(key)
    return field.contents() if field is not None else None


def _to_gguf_layout(w: torch.Tensor, tensor_name: str, reader) -> torch.Tensor:
    """HF weight (out, in) → the row order the GGUF file stores it in (Q/K permuted for llama)."""
    arch = _field(reader, "general.architecture")
    if arch not in _PERMUTED_QK:
        return w
    if ".attn_q." in tensor_name:
        return llama_permute(w, int(_field(reader, f"{arch}.attention.head_count")))
    if ".attn_k." in tensor_name:
        heads = _field(reader, f"{arch}.attention.head_count_kv") or _field(reader, f"{arch}.attention.head_count")
        return llama_permute(w, int(heads))
    return w


def _source_weight(tensor) -> torch.Tensor:
    """A GGUF tensor dequantized to fp32 in numpy order (out, in) — what transformers reads."""
    from gguf.quants import dequantize

    return torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))


def _check_against_source(name: str, mod: nn.Module, tensor, reader) -> None:
    """The original weight of ``mod``, in GGUF layout, must equal the source tensor as transformers loaded it."""
    orig = original_of(mod)
    src = _source_weight(tensor)
    want = tuple(src.shape)
    if (mod.out_features, mod.in_features) != want:
        raise C2IError(f"module {name!r} is {mod.out_features}x{mod.in_features} but GGUF tensor "
                       f"{tensor.name!r} is {want[0]}x{want[1]}: the source file is not this model's")
    if orig is None:            # a hand-built factored module: nothing to compare with but the shape
        return
    w = orig.weight.detach().cpu()
    mapped = _to_gguf_layout(w, tensor.name, reader)
    if not torch.equal(mapped, src.to(w.dtype)):
        diff = (mapped.float() - src).abs().max().item()
        raise C2IError(f"the original weight of {name!r} differs from GGUF tensor {tensor.name!r} of the source "
                       f"file (max |diff| {diff:.3g}): wrong source file, or a tensor layout this export does "
                       "not know for this architecture")


def _edited_array(mod: nn.Module, name: str, tensor_name: str, reader, dtype: str) -> tuple[np.ndarray, object]:
    """(array to write, GGML type or None) for a factored module: Ŵ (out, in) in GGUF row order and ``dtype``."""
    import gguf

    w = _to_gguf_layout(mod.dense_weight().detach().float().cpu(), tensor_name, reader).contiguous()
    a = w.numpy()
    if dtype == "f32":
        return a, None
    if dtype == "f16":
        return a.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if a.shape[-1] % block:
        raise C2IError(f"{name!r}: {dtype} needs rows of a multiple of {block} values; its rows hold {a.shape[-1]}")
    return gguf.quants.quantize(a, qtype), qtype


def source_gguf(spec: str) -> Path:
    """The GGUF file a model spec (alias, ``.gguf`` path …) loads from; :class:`C2IError` for any other source."""
    from .models import resolve_source

    directory, fname = resolve_source(spec)
    if fname is None:
        raise C2IError(f"GGUF export needs a model loaded from a GGUF file; {spec!r} is a Hugging Face directory "
                       "or hub id (export it with --format hf, then run llama.cpp's convert_hf_to_gguf.py)")
    return Path(directory) / fname


def export_gguf(model: nn.Module, source: str | os.PathLike, out: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write ``source`` (the GGUF file ``model`` was loaded from) to ``out`` with each factored module dense.

    model: a model with factored modules (``factorize_`` / ``load_adapted``), loaded from ``source``.
    dtype: GGUF type of the edited matrices, one of :data:`GGUF_TYPES`; every other tensor keeps its own.
    The file is written to a temp name in ``out``'s directory and renamed into place; ``model`` is not changed.
    Raises :class:`C2IError` for a source that is not a GGUF file, an unknown architecture or module, or a
    source tensor that is not the model's original weight (see the module docstring).
    """
    import gguf

    if dtype not in GGUF_TYPES:
        raise C2IError(f"GGUF export type {dtype!r} is not supported; choose one of {', '.join(GGUF_TYPES)}")
    source, out = Path(source), Path(out)
    if not _is_gguf(source):
        raise C2IError(f"GGUF export needs the model's source GGUF file; {source} is not one (a model loaded "
                       "from a Hugging Face directory or hub id can be exported with the default format)")
    try:
        reader = gguf.GGUFReader(str(source), "r")
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError/OSError/struct errors
        raise C2IError(f"cannot read GGUF file {source}: {e}") from e
    by_name = {t.name: t for t in reader.tensors}

    edited = {}        # GGUF tensor name → (array, GGML type or None)
    for name, mod in factored_modules(model).items():
        tname = gguf_tensor_name(reader, name)
        _check_against_source(name, mod, by_name[tname], reader)
        edited[tname] = _edited_array(mod, name, tname, reader, dtype)
    if not edited:
        raise C2IError("the model has no factored modules: nothing to export (load an adaptation first)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        _write(reader, edited, tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _is_gguf(path: Path) -> bool:
    """A file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _write(reader, edited: dict, path: Path) -> None:
    """Copy ``reader``'s KV pairs and tensors to ``path``, the tensors of ``edited`` replaced (same order)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=_field(reader, "general.architecture"), endianess=reader.endianess)
    try:
        alignment = _field(reader, "general.alignment")
        if alignment is not None:
            writer.data_alignment = int(alignment)
        for field in reader.fields.values():
            # GGUF.* are the reader's virtual fields; the writer wrote general.architecture itself.
            if field.name == "general.architecture" or field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        for t in reader.tensors:
            if t.name in edited:
                a, qtype = edited[t.name]
                writer.add_tensor_info(t.name, a.shape, a.dtype, a.nbytes, raw_dtype=qtype)
            else:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            if t.name in edited:       # computed here, native byte order
                writer.write_tensor_data(edited[t.name][0])
            else:
                writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    finally:
        writer.close()
