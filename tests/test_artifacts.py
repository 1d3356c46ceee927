"""factorize_/restore_, plans, saving, loading, dense export and accounting.

Tiny randomly initialised Llama and GPT-2 (Conv1D) models cover the mechanics quickly; a few tests use the real
SmolLM2-135M (the session fixture ``smollm2``) and always restore it.
"""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import tiny_llama
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from c2i_fast.artifacts import (ADAPTED_FILE, PLAN_FILE, accounting, export_dense, fingerprint, load_adapted,
                                save_adapted)
from c2i_fast.decompose import ClusteredSVD, assign_clusters, full_svd
from c2i_fast.errors import C2IError
from c2i_fast.nn import ClusteredLowRankLinear, LowRankLinear
from c2i_fast.transform import Edit, Plan, current_plan, factored_modules, factorize_, restore_

IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def llama():
    return tiny_llama(tie_word_embeddings=True)


@pytest.fixture
def gpt2():
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    m = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():           # non-zero biases so that bias handling is exercised
        for mod in m.modules():
            if isinstance(mod, Conv1D):
                mod.bias.normal_(0, 0.1)
    return m


LLAMA_PLAN = Plan([Edit("model.layers.1.mlp.up_proj", 0.25),
                   Edit("model.layers.1.mlp.down_proj", 0.5, 4, "kmeans", seed=3),
                   Edit("model.layers.0.self_attn.q_proj", 0.1, 2, "projective")], base_model="tiny-llama")
GPT2_PLAN = Plan([Edit("transformer.h.1.mlp.c_fc", 0.25), Edit("transformer.h.1.mlp.c_proj", 0.5, 4, "block"),
                  Edit("transformer.h.0.attn.c_attn", 0.3, 3, "kmeans")], base_model="tiny-gpt2")


# ------------------------------------------------------------------------------------------------ plans
def test_plan_json_round_trip_and_atomic_save(tmp_path):
    p = Plan(LLAMA_PLAN.edits, base_model="x", fingerprint="sha256:ab", meta={"task": "fever"})
    d = p.to_json()
    assert json.loads(json.dumps(d)) == d
    assert Plan.from_json(d) == p and Plan.from_json(json.dumps(d)) == p
    path = tmp_path / "sub" / "plan.json"
    p.save(path)
    assert Plan.load(path) == p
    assert os.listdir(path.parent) == ["plan.json"]          # no temp file left behind
    path.write_text("{not json")
    with pytest.raises(C2IError, match="plan.json"):
        Plan.load(path)
    with pytest.raises(C2IError, match="missing.json"):
        Plan.load(tmp_path / "missing.json")


def test_edit_validation():
    with pytest.raises(C2IError, match="must be in"):
        Edit("a.b", 1.5)
    with pytest.raises(C2IError, match="n_clusters"):
        Edit("a.b", 0.5, 0)
    with pytest.raises(C2IError, match="method"):
        Edit("a.b", 0.5, 2, "spectral")
    with pytest.raises(C2IError, match="twice"):
        Plan([Edit("a.b", 0.5), Edit("a.b", 0.1)])
    with pytest.raises(C2IError, match="unknown edit field"):
        Edit.from_dict({"matrix": "a", "rank_fraction": 0.5, "rho": 1})


# ------------------------------------------------------------------------------------------------ factorize_
def test_factorize_and_restore(llama):
    base = _logits(llama)
    originals = {e.matrix: llama.get_submodule(e.matrix) for e in LLAMA_PLAN.edits}
    factorize_(llama, LLAMA_PLAN)
    fm = factored_modules(llama)
    assert list(fm) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                        "model.layers.1.mlp.down_proj"]
    assert isinstance(fm["model.layers.1.mlp.up_proj"], LowRankLinear)
    assert isinstance(fm["model.layers.1.mlp.down_proj"], ClusteredLowRankLinear)
    assert current_plan(llama).edits == [LLAMA_PLAN.edits[2], LLAMA_PLAN.edits[0], LLAMA_PLAN.edits[1]]
    # the factored model computes the dense reconstruction's function
    adapted = _logits(llama)
    assert not torch.allclose(adapted, base)
    # the original modules are not parameters of the adapted model
    assert all(p is not originals["model.layers.1.mlp.up_proj"].weight for p in llama.parameters())
    # restoring one name, then all, gives back the very same module objects and exact outputs
    restore_(llama, "model.layers.1.mlp.up_proj")
    assert llama.get_submodule("model.layers.1.mlp.up_proj") is originals["model.layers.1.mlp.up_proj"]
    restore_(llama)
    assert not factored_modules(llama)
    for name, mod in originals.items():
        assert llama.get_submodule(name) is mod
    assert torch.equal(_logits(llama), base)
    with pytest.raises(C2IError, match="not factored"):
        restore_(llama, "model.layers.1.mlp.up_proj")


def test_factorize_is_idempotent_and_uses_the_original_weight(llama):
    factorize_(llama, LLAMA_PLAN)
    once = _logits(llama)
    factorize_(llama, LLAMA_PLAN)            # re-applied on factored modules: restored first, same result
    assert torch.equal(_logits(llama), once)
    factorize_(llama, [Edit("model.layers.1.mlp.up_proj", 1.0)])   # full rank of the ORIGINAL, not of Ŵ
    restore_(llama, ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"])
    mod = llama.get_submodule("model.layers.1.mlp.up_proj")
    orig = mod.__dict__["_c2i_original"].weight
    assert torch.allclose(mod.dense_weight(), orig, atol=1e-5)


def test_factorize_errors_name_the_module(llama):
    with pytest.raises(C2IError, match="model.layers.7.mlp.up_proj"):
        factorize_(llama, [Edit("model.layers.1.mlp.up_proj", 0.5), Edit("model.layers.7.mlp.up_proj", 0.5)])
    assert not factored_modules(llama)       # nothing swapped when any name is bad
    with pytest.raises(C2IError, match="model.embed_tokens"):
        factorize_(llama, [Edit("model.embed_tokens", 0.5)])
    with pytest.raises(C2IError, match="n_clusters"):
        factorize_(llama, [Edit("model.layers.0.self_attn.k_proj", 0.5, 17)])    # k_proj has 16 rows


def test_factorize_reuses_precomputed_svds_and_factors(llama):
    up, down = "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"
    w_up, w_down = llama.get_submodule(up).weight, llama.get_submodule(down).weight
    svd = full_svd(w_up)
    cs = ClusteredSVD.fit(w_down, assign_clusters(w_down, 4, "kmeans", seed=3), 4)
    plan = [Edit(up, 0.25), Edit(down, 0.5, 4, "kmeans", seed=3)]
    factorize_(llama, plan, svds={up: svd, down: cs})
    a = {n: m.dense_weight().clone() for n, m in factored_modules(llama).items()}
    restore_(llama)
    factorize_(llama, plan)
    b = {n: m.dense_weight() for n, m in factored_modules(llama).items()}
    assert all(torch.equal(a[n], b[n]) for n in a)
    restore_(llama)
    f = cs.factors(0.5)
    factorize_(llama, [Edit(down, 0.5, 4, "kmeans", seed=3)], factors={down: f})
    assert torch.equal(llama.get_submodule(down).v_cat, f.v_cat)
    restore_(llama)
    with pytest.raises(C2IError, match="do not match"):
        factorize_(llama, [Edit(down, 0.5, 2)], factors={down: f})


def test_factors_follow_model_dtype(llama):
    llama.to(torch.bfloat16)
    factorize_(llama, LLAMA_PLAN)
    for mod in factored_modules(llama).values():
        assert all(p.dtype == torch.bfloat16 for p in mod.parameters())
    assert _logits(llama).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ save/load
def test_save_load_round_trip_conv1d(gpt2, tmp_path):
    base_copy = copy.deepcopy(gpt2)
    fp = fingerprint(gpt2)
    factorize_(gpt2, GPT2_PLAN)
    assert fingerprint(gpt2) == fp              # the fingerprint is the base model's
    adapted = _logits(gpt2)
    out = save_adapted(gpt2, GPT2_PLAN, tmp_path / "art")
    assert sorted(os.listdir(out)) == [ADAPTED_FILE, PLAN_FILE]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]      # temp dir renamed away
    saved = Plan.load(out / PLAN_FILE)
    assert saved.fingerprint == fp and saved.edits == GPT2_PLAN.edits and saved.base_model == "tiny-gpt2"
    from safetensors.torch import load_file
    keys = set(load_file(str(out / ADAPTED_FILE)))
    assert keys == {"transformer.h.1.mlp.c_fc." + k for k in ("u", "v", "bias")} | {
        f"{n}.{k}" for n in ("transformer.h.1.mlp.c_proj", "transformer.h.0.attn.c_attn")
        for k in ("v_cat", "u_packed", "bias", "row_index", "row_offsets", "rank_offsets")}
    loaded = load_adapted(base_copy, out)
    assert torch.equal(_logits(loaded), adapted)
    # saving again into the existing directory replaces the files in place
    save_adapted(gpt2, None, out)
    assert sorted(os.listdir(out)) == [ADAPTED_FILE, PLAN_FILE]


def test_load_refuses_a_different_base(gpt2, tmp_path):
    other = copy.deepcopy(gpt2)
    factorize_(gpt2, GPT2_PLAN)
    save_adapted(gpt2, GPT2_PLAN, tmp_path / "art")
    with torch.no_grad():
        other.transformer.h[0].ln_1.weight[0] += 1e-3
    with pytest.raises(C2IError) as e:
        load_adapted(other, tmp_path / "art")
    assert fingerprint(other) in str(e.value) and fingerprint(gpt2) in str(e.value)
    assert not factored_modules(other)
    assert fingerprint(other.half()) != fingerprint(other.float())        # dtype-aware


def test_load_detects_corrupt_files(gpt2, tmp_path):
    base = copy.deepcopy(gpt2)
    factorize_(gpt2, GPT2_PLAN)
    art = save_adapted(gpt2, GPT2_PLAN, tmp_path / "art")
    st = art / ADAPTED_FILE
    data = bytearray(st.read_bytes())
    data[len(data) // 2] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(C2IError, match=ADAPTED_FILE):
        load_adapted(base, art)
    # without the checksum the safetensors parser itself must fail cleanly, still naming the file
    plan = json.loads((art / PLAN_FILE).read_text())
    del plan["meta"]["artifact"]
    (art / PLAN_FILE).write_text(json.dumps(plan))
    st.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(C2IError, match=ADAPTED_FILE):
        load_adapted(base, art)
    st.unlink()
    with pytest.raises(C2IError, match="missing"):
        load_adapted(base, art)
    assert not factored_modules(base)


def test_save_requires_plan_to_match(llama, tmp_path):
    factorize_(llama, LLAMA_PLAN)
    with pytest.raises(C2IError, match="plan does not describe"):
        save_adapted(llama, Plan(LLAMA_PLAN.edits[:1]), tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------------ dense export
def test_export_dense_conv1d_loads_without_c2i_fast(gpt2, tmp_path):
    factorize_(gpt2, GPT2_PLAN)
    adapted = _logits(gpt2)
    # pretend it came from a GGUF file: transformers refuses save_pretrained while these are set
    gpt2.hf_quantizer = "fake-quantizer"
    gpt2.config.quantization_config = {"quant_method": "gguf"}
    out = export_dense(gpt2, tmp_path / "dense")
    # the caller's model is untouched
    assert gpt2.hf_quantizer == "fake-quantizer" and gpt2.config.quantization_config == {"quant_method": "gguf"}
    assert isinstance(gpt2.transformer.h[1].mlp.c_fc, LowRankLinear)
    assert torch.equal(_logits(gpt2), adapted)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    # a fresh interpreter where importing c2i_fast is impossible loads it with plain transformers
    script = textwrap.dedent(f"""
        import sys; sys.modules["c2i_fast"] = None
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32).eval()
        assert type(m.transformer.h[1].mlp.c_fc).__name__ == "Conv1D"
        with torch.no_grad():
            torch.save(m(torch.tensor({IDS.tolist()})).logits, {str(tmp_path / 'logits.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    reloaded = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(reloaded, adapted, rtol=1e-5, atol=1e-5)


def test_export_dense_unties_a_factored_tied_head(llama, tmp_path):
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    factorize_(llama, [Edit("lm_head", 0.25)])
    adapted = _logits(llama)
    out = export_dense(llama, tmp_path / "dense")
    assert llama.config.tie_word_embeddings is True
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert torch.allclose(_logits(m), adapted, rtol=1e-5, atol=1e-5)
    restore_(llama)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight


# ------------------------------------------------------------------------------------------------ accounting
def test_accounting(llama):
    plan = Plan([Edit("model.layers.1.mlp.up_proj", 0.25), Edit("model.layers.1.mlp.down_proj", 0.5, 4)])
    planned = accounting(llama, plan)                 # before factorizing: from the plan alone
    factorize_(llama, plan)
    acc = accounting(llama)
    up, down = acc["matrices"]
    assert up["shape"] == [48, 32] and up["ranks"] == [8]                       # int(32 * 0.25)
    assert up["factored_params"] == (48 + 32) * 8 and up["index_bytes"] == 0
    assert up["dense_bytes"] == 4 * 48 * 32 and up["factored_bytes"] == 4 * (48 + 32) * 8
    assert up["kept_rank_fraction"] == 8 / 32
    assert down["shape"] == [32, 48] and down["ranks"] == [4, 4, 4, 4] and down["cluster_sizes"] == [8] * 4
    assert down["factored_params"] == 48 * 16 + 32 * 4
    assert down["index_bytes"] == 8 * (32 + 5 + 5)
    assert down["factored_bytes"] == 4 * down["factored_params"] + down["index_bytes"]
    assert down["break_even_rank"] == 32 * 48 / (4 * 48 + 32)
    for a, b in zip(planned["matrices"], acc["matrices"]):
        assert {k: v for k, v in a.items() if k != "factored"} == {k: v for k, v in b.items() if k != "factored"}
    t = acc["total"]
    n_model = sum(p.numel() for p in llama.parameters())
    assert t["model_params_after"] == n_model
    assert t["model_params_before"] - t["model_params_after"] == t["dense_params"] - t["factored_params"]


# ------------------------------------------------------------------------------------------------ real model
@pytest.fixture(scope="module")
def real(request):
    """The shared session fixture when conftest provides it; otherwise load SmolLM2 once for this module."""
    try:
        return request.getfixturevalue("smollm2")
    except pytest.FixtureLookupError:
        from c2i_fast.models import load_model
        return load_model("smollm2")


REAL_PLAN = Plan([Edit("model.layers.27.mlp.up_proj", 0.1), Edit("model.layers.29.mlp.down_proj", 0.1, 4, "block"),
                  Edit("model.layers.28.mlp.gate_proj", 0.05, 4, "kmeans")], base_model="smollm2")


def test_real_model_save_load_restore(real, tmp_path):
    model = real.model
    ids = real.tokenizer("The capital of France is", return_tensors="pt").input_ids
    base = _logits(model, ids)
    fp = fingerprint(model)
    w = model.model.layers[0].mlp.up_proj.weight
    try:
        factorize_(model, REAL_PLAN)
        adapted = _logits(model, ids)
        assert not torch.allclose(adapted, base)
        art = save_adapted(model, REAL_PLAN, tmp_path / "art")
        assert (art / ADAPTED_FILE).stat().st_size < 0.01 * sum(p.numel() * 4 for p in model.parameters())
        restore_(model)
        assert torch.equal(_logits(model, ids), base)           # restore_ gives back the exact original
        assert fingerprint(model) == fp
        load_adapted(model, art)
        assert torch.equal(_logits(model, ids), adapted)        # stored factors, no SVD: bit-exact
        # a base with one weight perturbed is refused, naming both fingerprints
        restore_(model)
        old = w[3, 5].item()
        with torch.no_grad():
            w[3, 5] += 0.5
        try:
            with pytest.raises(C2IError, match=fp):
                load_adapted(model, art)
        finally:
            with torch.no_grad():
                w[3, 5] = old
        assert fingerprint(model) == fp
    finally:
        restore_(model)
    assert torch.equal(_logits(model, ids), base)


def test_real_model_export_dense(real, tmp_path):
    model = real.model
    ids = real.tokenizer("Paris is the capital of", return_tensors="pt").input_ids
    try:
        factorize_(model, REAL_PLAN)
        adapted = _logits(model, ids)
        out = export_dense(model, tmp_path / "dense", tokenizer=real.tokenizer)
        assert torch.equal(_logits(model, ids), adapted)       # caller's model unchanged
        assert set(factored_modules(model)) == {e.matrix for e in REAL_PLAN.edits}
    finally:
        restore_(model)
    dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(dense.model.layers[29].mlp.down_proj) is torch.nn.Linear
    got = _logits(dense, ids)
    # the dense product and the two-stage factored product differ only by fp32 summation order
    assert torch.allclose(got, adapted, rtol=0, atol=1e-5 * float(adapted.abs().max()) + 1e-5)
    acc = accounting(dense)
    assert acc["total"]["matrices"] == 0


def test_an_adapted_directory_that_kept_the_base_loads_as_the_base(smollm2, tmp_path):
    """A run whose rule kept the base model writes plan.json with no edits and no tensors file."""
    from c2i_fast.artifacts import fingerprint, load_adapted
    plan = Plan([], base_model="smollm2", fingerprint=fingerprint(smollm2.model))
    plan.save(tmp_path / "plan.json")
    before = fingerprint(smollm2.model)
    assert load_adapted(smollm2.model, tmp_path) is smollm2.model
    assert fingerprint(smollm2.model) == before and not factored_modules(smollm2.model)
