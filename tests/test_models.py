"""Matrix enumeration per architecture family. Structure only: the models are built from small configs with
random weights (no claim about accuracy is made here); the real-weights checks use SmolLM2 elsewhere."""
import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from c2i_fast.errors import C2IError
from c2i_fast.models import (LASER_TYPES, decoder_layers, last_layer_positionwise, layer_root, supports_shared_prefix,
                             target_matrices)


def _build(family):
    import transformers as tf
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=64)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**small, num_key_value_heads=2))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**small, num_key_value_heads=2))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**small, num_key_value_heads=2))
    if family == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**small, num_key_value_heads=2, head_dim=8))
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
    if family == "gptj":
        return tf.GPTJForCausalLM(tf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=64, rotary_dim=4))
    if family == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**small))
    if family == "roberta":
        return tf.RobertaForMaskedLM(tf.RobertaConfig(**small))
    raise ValueError(family)


EXPECTED = {   # family → (types per layer, name of layer-1 mlp_in, is it Conv1D)
    "llama": ({"q", "k", "v", "o", "mlp_in", "mlp_up", "mlp_out"}, "model.layers.1.mlp.gate_proj", False),
    "qwen2": ({"q", "k", "v", "o", "mlp_in", "mlp_up", "mlp_out"}, "model.layers.1.mlp.gate_proj", False),
    "mistral": ({"q", "k", "v", "o", "mlp_in", "mlp_up", "mlp_out"}, "model.layers.1.mlp.gate_proj", False),
    "gemma3": ({"q", "k", "v", "o", "mlp_in", "mlp_up", "mlp_out"}, "model.layers.1.mlp.gate_proj", False),
    "gpt2": ({"qkv", "o", "mlp_in", "mlp_out"}, "transformer.h.1.mlp.c_fc", True),
    "gptj": ({"q", "k", "v", "o", "mlp_in", "mlp_out"}, "transformer.h.1.mlp.fc_in", False),
    "gpt_neox": ({"qkv", "o", "mlp_in", "mlp_out"}, "gpt_neox.layers.1.mlp.dense_h_to_4h", False),
    "roberta": ({"q", "k", "v", "o", "mlp_in", "mlp_out"}, "roberta.encoder.layer.1.intermediate.dense", False),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_each_family_enumerates_its_matrices(family):
    model = _build(family)
    refs = target_matrices(model)
    types, mlp_in, conv = EXPECTED[family]
    assert {r.layer for r in refs} == {0, 1}
    for layer in (0, 1):
        assert {r.type for r in refs if r.layer == layer} == types
    ref = next(r for r in refs if r.name == mlp_in)
    assert ref.type == "mlp_in" and ref.transposed == conv
    assert ref.shape == (64 if family not in ("gpt2", "gptj") else 128, 32)      # W in (out, in) layout
    x = torch.randn(3, 32)
    y = ref.module(x)
    assert torch.allclose(y - (ref.module.bias if ref.module.bias is not None else 0), x @ ref.weight().T,
                          atol=1e-5)
    assert {r.type for r in target_matrices(model, LASER_TYPES)} == {"mlp_in", "mlp_out"}
    blocks = decoder_layers(model)
    assert len(blocks) == 2 and blocks[1] is model.get_submodule(layer_root(mlp_in))


def test_layer_structure_for_the_scorer():
    """The last layer's position-wise matrices (run at the read columns only) and the shared-prefix check:
    decoder-only ``*ForCausalLM`` with full attention only."""
    llama = _build("llama")
    assert layer_root("model.layers.1.mlp.down_proj") == "model.layers.1"
    assert last_layer_positionwise(llama) == [f"model.layers.1.{n}" for n in (
        "self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert supports_shared_prefix(llama)
    assert not supports_shared_prefix(_build("gemma3"))          # sliding-window layers
    for family in ("roberta", "gpt2"):                          # a masked LM; GPT2LMHeadModel is no *ForCausalLM
        model = _build(family)
        assert last_layer_positionwise(model) == [] and not supports_shared_prefix(model)


def test_unknown_architecture_is_named():
    with pytest.raises(C2IError, match="unknown architecture Sequential.*found e.g. \\['0'"):
        target_matrices(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(C2IError, match="unknown matrix type"):
        target_matrices(_build("llama"), ["ffn"])


def test_random_weights_of_a_real_architecture(smollm2, tmp_path):
    """`random:<spec>` (the GPU benches' model: SmolLM2's weights cannot travel there): SmolLM2's shapes and
    tokenizer from a directory of config + tokenizer files only, seeded weights, the global RNG left alone."""
    from c2i_fast.models import load_model, save_architecture

    arch = save_architecture("smollm2", tmp_path / "arch")
    assert (arch / "config.json").is_file() and (arch / "tokenizer.json").is_file()
    assert not list(arch.glob("*.safetensors")) and not list(arch.glob("*.bin"))   # no weights travel
    assert json.loads((arch / "c2i_source.json").read_text()) == {"architecture_of": "smollm2", "weights": None}
    (arch / "stale.txt").write_text("from an older save")
    assert save_architecture("smollm2", arch) == arch and not (arch / "stale.txt").exists()   # replaced whole
    assert [p.name for p in tmp_path.iterdir()] == ["arch"]                         # no temp directory left
    rng = torch.random.get_rng_state()
    a, b = load_model(f"random:{arch}"), load_model(f"random:{arch}")
    assert torch.equal(torch.random.get_rng_state(), rng)
    real = {n: p.shape for n, p in smollm2.model.named_parameters()}
    assert {n: p.shape for n, p in a.model.named_parameters()} == real
    text = "Consider the following claim: water is wet."
    assert a.tokenizer(text).input_ids == smollm2.tokenizer(text).input_ids
    name = "model.layers.3.mlp.down_proj.weight"
    wa, wb = a.model.get_parameter(name), b.model.get_parameter(name)
    assert torch.equal(wa, wb)                                            # seeded: the same bench model each run
    assert not torch.allclose(wa, smollm2.model.get_parameter(name))      # and not the real weights
    assert {r.name for r in target_matrices(a.model)} == {r.name for r in target_matrices(smollm2.model)}
    with pytest.raises(C2IError, match="name the architecture"):
        load_model("random:")
    with pytest.raises(C2IError, match="drop device_map"):
        load_model(f"random:{arch}", device_map="auto")
    with pytest.raises(C2IError, match="does not exist"):
        load_model(f"random:{tmp_path / 'nowhere'}")


def test_gguf_special_tokens_are_the_files(smollm2):
    """The converted tokenizer's bos/eos/unk/pad are those the GGUF file declares (transformers 5.17 read
    SmolLM2's eos as <|im_start|> and gave it no pad token; the loader now sets them from the file)."""
    from c2i_fast.models import _gguf_special_token_ids, _set_special_tokens, resolve_source

    directory, fname = resolve_source("smollm2")
    ids = _gguf_special_token_ids(Path(directory) / fname)
    assert ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    tok = smollm2.tokenizer
    assert {name: getattr(tok, f"{name}_token_id") for name in ids} == ids
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    # what 5.17 produced, repaired: a copy of the tokenizer with the wrong eos and no pad
    bad = copy.deepcopy(tok)
    bad.eos_token, bad.pad_token = "<|im_start|>", None
    assert bad.pad_token_id is None and bad.eos_token_id == 1
    _set_special_tokens(bad, ids)
    assert (bad.eos_token_id, bad.pad_token_id, bad.bos_token_id) == (2, 2, 1)
    assert bad(["a b c", "a"], padding=True).input_ids[1][-1] == 2          # padded batches work again
    _set_special_tokens(bad, {"pad": 10 ** 9})                             # an id outside the vocabulary: ignored
    assert bad.pad_token_id == 2


class _Part:
    """A save_pretrained that, halfway, lets "another process" finish the same conversion first."""

    def __init__(self, out: Path, race: bool):
        self.out, self.race = out, race

    def save_pretrained(self, d):
        (Path(d) / "weights").write_text("mine")
        (Path(d) / "config.json").write_text("{}")
        if self.race:
            self.out.mkdir(parents=True)
            (self.out / "config.json").write_text("{}")
            (self.out / "weights").write_text("theirs")


def test_a_conversion_another_process_finished_first_is_kept(tmp_path):
    """Two processes converting the same GGUF at once (test workers, torchrun ranks): the second to finish must
    not delete the first's copy, which the first may already be loading from; no temp directory is left."""
    from c2i_fast.models import _save_dir
    out = tmp_path / "converted" / "m"
    _save_dir(out, [_Part(out, race=True)], {"gguf": "x"}, replace=False)
    assert (out / "weights").read_text() == "theirs"
    assert [p.name for p in out.parent.iterdir()] == ["m"]
    # with replace (a refreshed copy) the new one wins
    _save_dir(out, [_Part(out, race=False)], {"gguf": "x"}, replace=True)
    assert (out / "weights").read_text() == "mine"


def test_an_incomplete_directory_in_the_way_is_an_error(tmp_path):
    from c2i_fast.models import _save_dir
    out = tmp_path / "m"
    (out / "junk").parent.mkdir(parents=True)
    (out / "junk").write_text("x")              # no config.json: not a finished conversion
    with pytest.raises(OSError):
        _save_dir(out, [_Part(out / "elsewhere", race=False)], {"gguf": "x"}, replace=False)
    assert not any(p.name.startswith(".m.tmp-") for p in tmp_path.iterdir())
