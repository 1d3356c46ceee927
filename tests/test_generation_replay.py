"""Greedy generation with the prefix cache (c2i_fast.replay.replay_prefill): a candidate at layer ℓ replays the
prompt's prefill below ℓ (its layer-ℓ input and the keys/values of the layers below) and must generate exactly
what a whole generate() does — the same tokens and the same logits, bit for bit — on a seeded random Llama
(mechanics) and on the real SmolLM2 with HotpotQA prompts."""
import pytest
import torch
from helpers import tiny_llama
from test_metrics import CharTok

from c2i_fast.evaluate import Scorer, StopForward, stop_after
from c2i_fast.models import decoder_layers
from c2i_fast.replay import PrefixCache, has_prefill, replay_prefill
from c2i_fast.tasks import Example

N_LAYERS = 4


def _generate(model, ids, mask, steps=6):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def _prompts(seed=0, rows=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (rows, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                     # left padding in two rows
    mask[3, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


@torch.no_grad()
def _edited(model, layer: int):
    """Scale layer ``layer``'s MLP up-projection in place; returns an undo."""
    w = decoder_layers(model)[layer].mlp.up_proj.weight.data
    saved = w.clone()
    w.mul_(-1.7)
    return lambda: w.copy_(saved)


@pytest.mark.parametrize("start", [1, 2, 3])
def test_replayed_prefill_generates_what_a_whole_one_does(start):
    model = tiny_llama(num_hidden_layers=N_LAYERS)
    ids, mask = _prompts()
    cache = PrefixCache()
    with replay_prefill(model, cache, "b", 0, {1, 2, 3}):       # the base model's prefill fills the cache
        base_seq, _ = _generate(model, ids, mask)
    assert all(has_prefill(cache, "b", l) for l in (1, 2, 3)) and not has_prefill(cache, "other", 1)
    undo = _edited(model, start)
    calls = []
    hook = decoder_layers(model)[0].register_forward_hook(lambda _m, _a, _o: calls.append(1))
    try:
        whole_seq, whole_logits = _generate(model, ids, mask)
        n_whole = len(calls)
        with replay_prefill(model, cache, "b", start, set()):
            seq, logits = _generate(model, ids, mask)
    finally:
        undo()
        hook.remove()
    assert n_whole == 6 and len(calls) - n_whole == 5            # replayed: layer 0 ran on the decode steps only
    assert not torch.equal(whole_seq, base_seq)                 # the edit matters, so equality below means something
    assert torch.equal(seq, whole_seq)
    assert torch.equal(logits, whole_logits)
    assert all(type(b).__name__ != "_PrefillReplay" for b in decoder_layers(model))    # the swap is undone


def test_a_stopped_one_token_prefill_captures_what_generate_does():
    """Scorer.capture's path for generation (a one-token generate() ended below the top layer) stores the same
    tensors as a whole generate()'s prefill."""
    model = tiny_llama(num_hidden_layers=N_LAYERS)
    ids, mask = _prompts(1)
    full, part = PrefixCache(), PrefixCache()
    with replay_prefill(model, full, "b", 0, {2}):
        _generate(model, ids, mask)
    with replay_prefill(model, part, "b", 0, {2}), stop_after(model, 2):
        with pytest.raises(StopForward):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert set(full.store) == set(part.store) == {("b", 2), (("b", "kv"), 0), (("b", "kv"), 1)}
    for k in full.store:
        a, b = full.store[k], part.store[k]
        pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
        assert all(torch.equal(x, y) for x, y in pairs)


def test_scorer_generation_with_a_cache_matches_without():
    """Scorer.evaluate on a generation task: a candidate scored from its layer with the cache (the first pass
    at a layer captures it, the next replays) gives the same texts, correctness and log-loss as a whole pass;
    the cache filled by Scorer.capture (the metrics-cache hit path) serves as well."""
    model = tiny_llama(num_hidden_layers=N_LAYERS)
    words = ["abc", "ba", "cab", "a", "bb", "cc", "abcab", "ca"]
    examples = [Example(id=str(i), prompt=w + " is", target=" " + words[(i + 1) % len(words)],
                        answers=[words[(i + 1) % len(words)]]) for i, w in enumerate(words)]
    sc = Scorer(model, CharTok(), examples, "generation", max_new_tokens=5)
    cache = PrefixCache()
    base = sc.evaluate(cache, capture={1})
    assert base == sc.evaluate()
    captured = PrefixCache()
    sc.capture(captured, {1, 2})
    assert all(has_prefill(captured, ("gen", 0), l) for l in (1, 2))
    for layer in (1, 2):
        undo = _edited(model, layer)
        calls = []
        hook = decoder_layers(model)[0].register_forward_hook(lambda _m, _a, _o: calls.append(1))
        try:
            whole = sc.evaluate()
            n_whole = len(calls)
            first = sc.evaluate(cache, start_layer=layer)        # layer 2: not captured yet, captured now
            n_first = len(calls) - n_whole
            again = sc.evaluate(cache, start_layer=layer)
            n_again = len(calls) - n_whole - n_first
            other = sc.evaluate(captured, start_layer=layer)
        finally:
            undo()
            hook.remove()
        assert n_again < n_whole and n_again == len(calls) - n_whole - n_first - n_again     # replayed both times
        assert n_first == (n_again if layer == 1 else n_whole)
        assert whole["generations"] != base["generations"]
        for r in (first, again, other):
            assert r["generations"] == whole["generations"] and r["correct"] == whole["correct"]
            assert r["log_loss"] == whole["log_loss"]
    assert has_prefill(cache, ("gen", 0), 2)


def test_real_model_hotpotqa_generations_equal_with_replay(smollm2, data_dir):
    """SmolLM2 on HotpotQA prompts: an edit at layer 12 generates the same continuations whether the prefill
    below it is replayed or run."""
    from c2i_fast.tasks import check_tokenization, load_task, split
    task = check_tokenization(load_task("hotpotqa", data_dir), smollm2.tokenizer)
    rows = split(task, 40, 4, seed=0)["select"]
    sc = Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind, max_new_tokens=8)
    cache = PrefixCache()
    with torch.no_grad():
        base = sc.evaluate(cache, capture={12})
        undo = _edited(smollm2.model, 12)
        try:
            whole = sc.evaluate()
            replayed = sc.evaluate(cache, start_layer=12)
        finally:
            undo()
    assert whole["generations"] != base["generations"]
    assert replayed["generations"] == whole["generations"] and replayed["log_loss"] == whole["log_loss"]


def test_laser_on_a_generation_task_scores_alike_with_and_without_the_cache(tmp_path, smollm2, data_dir,
                                                                             monkeypatch):
    """The whole LASER sweep on HotpotQA (a generation task, now run with the prefix cache): every candidate's
    selection accuracy and log-loss, the pick and the held-out result equal those of the sweep run whole."""
    from c2i_fast import pipeline
    from c2i_fast.pipeline import LaserConfig, laser
    common = dict(model="smollm2", task="hotpotqa", data_dir=str(data_dir), val_size=12, test_size=6,
                  layers=(8, 20), rank_fractions=(0.2, 0.01), progress=False, metrics_cache=False)
    cached = laser(LaserConfig(out=str(tmp_path / "cached"), **common), lm=smollm2)
    monkeypatch.setattr(pipeline, "PrefixCache", lambda: None)
    whole = laser(LaserConfig(out=str(tmp_path / "whole"), **common), lm=smollm2)
    key = ("matrix", "rank_fraction", "accuracy", "log_loss")
    assert len(cached["search"]["candidates"]) == 8 and all(
        c.get("log_loss") is not None for c in cached["search"]["candidates"])
    assert [tuple(c.get(k) for k in key) for c in cached["search"]["candidates"]] == \
        [tuple(c.get(k) for k in key) for c in whole["search"]["candidates"]]
    assert cached["plan"] == whole["plan"] and cached["selection"] == whole["selection"]
    assert cached["test"] == whole["test"]
    assert cached["forward_passes"]["search_layer_passes"] < whole["forward_passes"]["search_layer_passes"]
