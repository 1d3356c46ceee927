"""A prompt prefix common to every row (the task instruction) runs once per pass and reaches every batch as
keys/values: scores, metrics, gradients and prefix-cache replay of a candidate must equal running every row
whole — on the real SmolLM2 with BigBench epistemic reasoning (33 shared instruction tokens, packed
multi-token choices), FEVER and CounterFact rows under a shared instruction, and on other decoder families."""
import dataclasses

import pytest
import torch

from c2i_fast.batching import Row, shared_prefix_length
from c2i_fast.evaluate import Scorer
from c2i_fast.models import supports_shared_prefix
from c2i_fast.replay import PrefixCache
from c2i_fast.tasks import check_tokenization, load_task, split

INSTRUCTION = "Answer the question below with a single short phrase, as a careful and factual assistant would.\n\n"


def _rows(smollm2, data_dir, name, n, instruction=""):
    task = check_tokenization(load_task(name, data_dir), smollm2.tokenizer)
    rows = split(task, n, 4, seed=0)["select"]
    return task, [dataclasses.replace(ex, prompt=instruction + ex.prompt) for ex in rows]


def _pair(model, tok, task, rows, batch_tokens=200):
    """(rows whole, shared prefix); batch_tokens small enough for several left-padded batches."""
    return [Scorer(model, tok, rows, task.kind, batch_tokens=batch_tokens, share_prefix=s) for s in (False, True)]


def _assert_same(ra, rb):
    assert ra["correct"] == rb["correct"]
    assert ra["accuracy"] == rb["accuracy"]
    assert rb["log_loss"] == pytest.approx(ra["log_loss"], rel=1e-5)
    if "choice_loss" in ra:
        assert rb["choice_loss"] == pytest.approx(ra["choice_loss"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name,instruction", [("bigbench_epistemic_reasoning", ""), ("fever", INSTRUCTION),
                                              ("counterfact", INSTRUCTION), ("fever", "")])
def test_shared_prefix_scores_equal_whole_rows(smollm2, data_dir, name, instruction):
    task, rows = _rows(smollm2, data_dir, name, 12, instruction)
    whole, shared = _pair(smollm2.model, smollm2.tokenizer, task, rows)
    assert not whole.prefix_ids and shared.prefix_ids
    assert len(shared.batches) > 1
    tokens = [sum(len(r.ids) for r in s.rows) for s in (whole, shared)]
    assert tokens[1] == tokens[0] - len(rows) * len(shared.prefix_ids)     # the prefix left every row
    with torch.no_grad():
        _assert_same(whole.evaluate(), shared.evaluate())


def test_no_prefix_when_rows_share_too_little(smollm2, data_dir):
    task, rows = _rows(smollm2, data_dir, "counterfact", 12)
    sc = Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind)
    assert sc.prefix_ids == []


def test_a_short_prefix_is_shared_only_where_a_forward_call_is_cheap(smollm2, data_dir):
    """FEVER's template starts with 5 shared tokens ("Consider the following claim:"): 5 × 11 = 55 tokens saved
    on 12 rows beats a CPU's 32-token call overhead, not a GPU-like 2048 (the overhead a CUDA model defaults to)."""
    task, rows = _rows(smollm2, data_dir, "fever", 12)
    cpu = Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind)
    assert len(cpu.prefix_ids) == 5
    assert smollm2.tokenizer.decode(cpu.prefix_ids) == "Consider the following claim:"
    gpu_like = Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind, batch_overhead=2048)
    assert gpu_like.prefix_ids == []
    few = Scorer(smollm2.model, smollm2.tokenizer, rows[:7], task.kind)     # 5 × 6 = 30 ≤ 32: left whole
    assert few.prefix_ids == []


def test_shared_prefix_stops_before_scored_positions():
    rows = [Row(0, -1, [1, 2, 3, 4, 5, 6], [5, 6]), Row(1, -1, [1, 2, 3, 4, 9], [9])]
    # row 0's first scored logit is read at index 3 (token 4), row 1's at index 3: the prefix is 3 tokens
    assert shared_prefix_length(rows) == 3
    assert shared_prefix_length([Row(0, -1, [1, 2, 3], []), Row(1, -1, [1, 2, 3], [])]) == 2
    assert shared_prefix_length([Row(0, -1, [1, 2], []), Row(1, -1, [7, 2], [])]) == 0
    # trimmed rows hold no last continuation token: the same first read positions, the same prefix
    trimmed = [Row(0, -1, [1, 2, 3, 4, 5], [5, 6], trimmed=True), Row(1, -1, [1, 2, 3, 4], [9], trimmed=True)]
    assert [r.first_read for r in trimmed] == [3, 3] and shared_prefix_length(trimmed) == 3


def test_candidate_replay_with_shared_prefix(smollm2, data_dir):
    """Base pass captures layer ℓ (batches and prefix); a candidate at ℓ then runs layers ≥ ℓ only, the
    prefix included, and must score as the edited model run whole from layer 0."""
    task, rows = _rows(smollm2, data_dir, "bigbench_epistemic_reasoning", 10)
    whole, shared = _pair(smollm2.model, smollm2.tokenizer, task, rows)
    layer = 7
    cache = PrefixCache()
    with torch.no_grad():
        base = shared.evaluate(cache, capture={layer})
        _assert_same(whole.evaluate(), base)
        w = smollm2.model.model.layers[layer].self_attn.v_proj.weight
        orig = w.detach().clone()
        try:
            w.mul_(0.25)
            ref = whole.evaluate()
            got = shared.evaluate(cache, start_layer=layer)
        finally:
            w.copy_(orig)
    assert got["log_loss"] != pytest.approx(base["log_loss"], rel=1e-4), "the edit must change the scores"
    _assert_same(ref, got)


def test_gradients_equal_with_shared_prefix(smollm2, data_dir):
    task, rows = _rows(smollm2, data_dir, "bigbench_epistemic_reasoning", 8)
    grads = []
    for sc in _pair(smollm2.model, smollm2.tokenizer, task, rows):
        smollm2.model.zero_grad(set_to_none=True)
        for loss in sc.loss_batches("answer"):
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in smollm2.model.named_parameters()
                      if p.grad is not None and ("layers.0." in n or "layers.29." in n)})
    smollm2.model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        a, b = grads[0][n].double(), grads[1][n].double()
        assert ((a - b).norm() / a.norm()).item() < 1e-4, n


def _tiny(kind: str):
    """A small random decoder of another family (the claim tested is exactness, not accuracy)."""
    import transformers as tf
    common = dict(vocab_size=49152, num_hidden_layers=3)
    cfg = {"gptj": lambda: tf.GPTJConfig(n_embd=64, n_head=4, rotary_dim=8, n_positions=512, **{
                "vocab_size": 49152, "n_layer": 3}),
           "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                                **common),
           "qwen2": lambda: tf.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                           intermediate_size=128, **common)}[kind]()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["gptj", "gpt_neox", "qwen2"])
def test_other_decoder_families(smollm2, data_dir, kind):
    model = _tiny(kind)
    assert supports_shared_prefix(model)
    task, rows = _rows(smollm2, data_dir, "bigbench_epistemic_reasoning", 8)
    whole, shared = _pair(model, smollm2.tokenizer, task, rows)
    assert shared.prefix_ids
    with torch.no_grad():
        _assert_same(whole.evaluate(), shared.evaluate())


def test_not_used_where_unsupported(smollm2):
    assert supports_shared_prefix(smollm2.model)
    assert not supports_shared_prefix(torch.nn.Linear(2, 2))


def test_start_layer_without_a_cache_runs_whole(smollm2, data_dir):
    """No prefix cache (generation tasks, the dense bench path): a start layer cannot be replayed, so the pass
    runs from layer 0, the shared prefix included."""
    task, rows = _rows(smollm2, data_dir, "bigbench_epistemic_reasoning", 6)
    whole, shared = _pair(smollm2.model, smollm2.tokenizer, task, rows)
    with torch.no_grad():
        _assert_same(whole.evaluate(), shared.evaluate(None, start_layer=5))
