"""GGUF export (c2i_fast.gguf_export): SmolLM2 (a Q4_1 GGUF) adapted, written back to GGUF, read back.

The written file must be the source file with the edited matrices dense: same metadata, same untouched tensors
(byte for byte, same quantization), the edited ones equal to Ŵ; transformers must load it into the same model
(logits, held-out accuracy, tokenizer) as the adapted one in memory. Q and K of a llama-architecture file are
stored permuted by llama.cpp's converter; q_proj and k_proj are edited here to exercise that.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from c2i_fast import Edit, Plan, factorize_
from c2i_fast.errors import C2IError
from c2i_fast.gguf_export import export_gguf, gguf_tensor_name, llama_permute, source_gguf
from c2i_fast.models import resolve_source
from c2i_fast.transform import factored_modules, restore_

EDITS = [
    Edit("model.layers.9.mlp.down_proj", rank_fraction=0.1, n_clusters=2, method="block"),
    Edit("model.layers.5.self_attn.q_proj", rank_fraction=0.2),                             # permuted, 9 heads
    Edit("model.layers.5.self_attn.k_proj", rank_fraction=0.3, n_clusters=2, method="block"),  # permuted, 3 heads
]
EDITED = {"blk.9.ffn_down.weight", "blk.5.attn_q.weight", "blk.5.attn_k.weight"}
HEADS = {"attn_q": 9, "attn_k": 3}      # SmolLM2: head_count, head_count_kv
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Claim: the Moon orbits Mars. True or false?"]


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' own inverse (LlamaTensorProcessor._reverse_permute_weights): an independent oracle."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    return LlamaTensorProcessor()._reverse_permute_weights(w, n_head, n_head)


# ---------------------------------------------------------------------------------------------------------
# Unit tests (no model)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_head,head_dim,n_in", [(9, 64, 576), (3, 64, 576), (4, 8, 5), (1, 2, 1)])
def test_llama_permute_is_the_inverse_of_transformers_reverse_permute(n_head, head_dim, n_in):
    w = torch.randn(n_head * head_dim, n_in)
    p = llama_permute(w, n_head)
    if head_dim > 2:                     # (a head of 2 rows is one rotary pair: nothing moves)
        assert not torch.equal(p, w)
    assert np.array_equal(_reverse_permute(p.numpy(), n_head), w.numpy())


def test_bad_type_and_non_gguf_source_are_clear_errors(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"")
    with pytest.raises(C2IError, match="not supported"):
        export_gguf(torch.nn.Linear(2, 2), src, tmp_path / "o.gguf", dtype="q4_k")
    with pytest.raises(C2IError, match="needs the model's source GGUF file"):
        export_gguf(torch.nn.Linear(2, 2), src, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


@pytest.fixture(scope="module")
def source():
    d, f = resolve_source("smollm2")
    return f"{d}/{f}"


def test_a_model_with_nothing_factored_is_refused(source, tmp_path):
    with pytest.raises(C2IError, match="no factored modules"):
        export_gguf(torch.nn.Linear(2, 2), source, tmp_path / "o.gguf")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------
# SmolLM2 round trip
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapted(smollm2):
    """The session SmolLM2 with EDITS factored; restored afterwards."""
    torch.manual_seed(0)
    factorize_(smollm2.model, Plan(EDITS))
    try:
        yield smollm2
    finally:
        restore_(smollm2.model)


@pytest.fixture(scope="module")
def exported(adapted, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "adapted.gguf"
    assert export_gguf(adapted.model, source, out) == out
    return out


@pytest.fixture(scope="module")
def reloaded(exported, tmp_path_factory):
    """load_model on the written file (its conversion cache in a temp C2I_CACHE)."""
    from c2i_fast.models import load_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("C2I_CACHE", str(tmp_path_factory.mktemp("c2i_cache")))
        return load_model(str(exported))


def test_metadata_and_untouched_tensors_are_copied_byte_for_byte(adapted, source, exported):
    src, out = gguf.GGUFReader(source), gguf.GGUFReader(exported)
    assert list(src.fields) == list(out.fields)               # same keys, same order (tokenizer included)
    for key, field in src.fields.items():
        assert out.fields[key].types == field.types, key
        assert out.fields[key].contents() == field.contents(), key
    assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
    for s, o in zip(src.tensors, out.tensors):
        if s.name in EDITED:
            assert o.tensor_type == gguf.GGMLQuantizationType.F32 and s.tensor_type != o.tensor_type
            assert list(o.shape) == list(s.shape)             # ne order (in, out), as the source
        else:
            assert o.tensor_type == s.tensor_type and list(o.shape) == list(s.shape), s.name
            assert np.array_equal(o.data, s.data), s.name


def test_edited_tensors_are_the_dense_weights_in_gguf_row_order(adapted, exported):
    r = gguf.GGUFReader(exported)
    by_name = {t.name: t for t in r.tensors}
    for name, mod in factored_modules(adapted.model).items():
        t = by_name[gguf_tensor_name(r, name)]
        stored = np.array(t.data, dtype=np.float32)           # (out, in)
        kind = t.name.split(".")[2]
        if kind in HEADS:                                      # undone with transformers' own code
            stored = _reverse_permute(stored, HEADS[kind])
        assert np.array_equal(stored, mod.dense_weight().detach().numpy()), name


def test_reloaded_model_has_the_adapted_weights_and_logits(adapted, reloaded):
    base = dict(adapted.model.named_parameters())
    for name, p in reloaded.model.named_parameters():
        mod_name = name.rsplit(".", 1)[0]
        mods = factored_modules(adapted.model)
        want = mods[mod_name].dense_weight() if mod_name in mods and name.endswith("weight") else base[name]
        assert torch.equal(p, want), name                      # exact: same dequantization, Ŵ stored in f32
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = adapted.tokenizer(prompt, return_tensors="pt").input_ids
            a = adapted.model(ids).logits
            b = reloaded.model(ids).logits
            rel = ((a - b).abs().max() / a.abs().max()).item()
            assert rel <= 1e-5, (prompt, rel)


def test_tokenizer_is_the_same(adapted, reloaded):
    text = "Hello world! Ünïcödé, code `x = 1`, <|im_start|>user\n42 + 7?<|im_end|>"
    assert reloaded.tokenizer(text).input_ids == adapted.tokenizer(text).input_ids
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(reloaded.tokenizer, attr) == getattr(adapted.tokenizer, attr), attr


def test_held_out_accuracy_is_the_same(adapted, reloaded):
    from c2i_fast.evaluate import Scorer
    from c2i_fast.tasks import load_task, split

    task = load_task("fever")
    rows = split(task, 10, 40)["test"]
    acc = [Scorer(lm.model, lm.tokenizer, rows, task.kind).evaluate()["accuracy"] for lm in (adapted, reloaded)]
    assert len(rows) == 40 and acc[0] == acc[1]


@pytest.mark.parametrize("dtype,gtype,rtol", [("f16", "F16", 1e-3), ("bf16", "BF16", 8e-3), ("q8_0", "Q8_0", 1e-2)])
def test_smaller_types_for_the_edited_tensors(adapted, source, tmp_path, dtype, gtype, rtol):
    out = export_gguf(adapted.model, source, tmp_path / "m.gguf", dtype=dtype)
    reader = gguf.GGUFReader(out)
    by_name = {t.name: t for t in reader.tensors}
    for name, mod in factored_modules(adapted.model).items():
        t = by_name[gguf_tensor_name(reader, name)]
        assert t.tensor_type.name == gtype
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        want = mod.dense_weight().detach()
        kind = t.name.split(".")[2]
        if kind in HEADS:
            want = llama_permute(want, HEADS[kind])
        err = np.abs(w - want.numpy()).max() / np.abs(want.numpy()).max()
        assert err <= rtol, (name, err)


def test_a_source_that_is_not_the_models_file_is_refused(adapted, exported, tmp_path):
    """The exported file holds Ŵ where the model's original weights are W: as a source it must be refused."""
    with pytest.raises(C2IError, match="differs from GGUF tensor"):
        export_gguf(adapted.model, exported, tmp_path / "again.gguf")
    assert not list(tmp_path.iterdir())


def test_source_gguf_names_the_file_or_refuses_a_directory(source, tmp_path):
    assert str(source_gguf("smollm2")) == source
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(C2IError, match="needs a model loaded from a GGUF file"):
        source_gguf(str(tmp_path))


def test_cli_export_format_gguf(adapted, tmp_path):
    """`c2i export --format gguf` writes the same file as export_gguf (skipped until cli.py has the option)."""
    from c2i_fast.artifacts import save_adapted
    from c2i_fast.cli import build_parser, main

    try:
        build_parser().parse_args(["export", "--model", "m", "--adapted", "a", "--out", "o", "--format", "gguf"])
    except SystemExit:
        pytest.skip("c2i export has no --format option yet")
    save_adapted(adapted.model, None, tmp_path / "run")
    out = tmp_path / "cli.gguf"
    assert main(["export", "--model", "smollm2", "--adapted", str(tmp_path / "run"), "--format", "gguf",
                 "--out", str(out), "--quiet"]) == 0
    ref = export_gguf(adapted.model, source_gguf("smollm2"), tmp_path / "api.gguf")
    assert out.read_bytes() == ref.read_bytes()
