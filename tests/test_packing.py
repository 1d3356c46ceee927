"""Packed choices (the prompt run once, every choice after it under a 4D mask) score exactly like one row per
choice: same choice log-probs, metrics, loss gradients and prefix-cache replay — on the real SmolLM2 with
BigBench epistemic reasoning (multi-token choices "entailment" / "non-entailment")."""
import pytest
import torch

from c2i_fast.evaluate import Scorer
from c2i_fast.replay import PrefixCache
from c2i_fast.tasks import check_tokenization, load_task, split


@pytest.fixture(scope="module")
def epistemic(smollm2, data_dir):
    task = check_tokenization(load_task("bigbench_epistemic_reasoning", data_dir), smollm2.tokenizer)
    return task, split(task, 6, 4, seed=0)["select"]


def _scorers(smollm2, task, rows):
    # batch_tokens small enough for several batches with left padding of different lengths
    return [Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind, batch_tokens=400, pack_choices=p)
            for p in (False, True)]


def test_packed_rows_halve_the_work(smollm2, epistemic):
    task, rows = epistemic
    unpacked, packed = _scorers(smollm2, task, rows)
    assert len(unpacked.rows) == 2 * len(rows) and len(packed.rows) == len(rows)
    assert sum(len(r.ids) for r in packed.rows) < 0.6 * sum(len(r.ids) for r in unpacked.rows)
    assert any(b.input_ids.shape[0] > 1 and (b.attention_mask == 0).any() for b in packed.batches), \
        "the case must include a left-padded packed batch"


def test_packed_choice_scores_equal_unpacked(smollm2, epistemic):
    task, rows = epistemic
    unpacked, packed = _scorers(smollm2, task, rows)
    with torch.no_grad():
        a, b = unpacked._per_example(unpacked.run()), packed._per_example(packed.run())
    for i in range(len(rows)):
        torch.testing.assert_close(b[i]["sum"], a[i]["sum"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(b[i]["len"], a[i]["len"])
    ra, rb = unpacked.evaluate(), packed.evaluate()
    assert ra["predictions_sum"] == rb["predictions_sum"] and ra["predictions_mean"] == rb["predictions_mean"]
    assert abs(ra["log_loss"] - rb["log_loss"]) < 1e-5 and abs(ra["choice_loss"] - rb["choice_loss"]) < 1e-5


@pytest.mark.parametrize("kind", ["answer", "choice"])
def test_packed_gradients_equal_unpacked(smollm2, epistemic, kind):
    task, rows = epistemic
    w = smollm2.model.model.layers[27].mlp.down_proj.weight
    grads = []
    for sc in _scorers(smollm2, task, rows):
        w.grad = None
        for loss in sc.loss_batches(kind):
            loss.backward()
        grads.append(w.grad.clone())
        w.grad = None
    smollm2.model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6 * grads[0].abs().max().item())


def test_packed_prefix_cache_replay_is_exact(smollm2, epistemic):
    task, rows = epistemic
    packed = _scorers(smollm2, task, rows)[1]
    cache = PrefixCache()
    full = packed.evaluate(cache, capture={25})
    replay = packed.evaluate(cache, start_layer=25)
    assert replay["log_loss"] == full["log_loss"] and replay["predictions_mean"] == full["predictions_mean"]
