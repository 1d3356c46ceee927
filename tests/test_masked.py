"""Masked-LM scoring (c2i_fast.masked) on a real RoBERTa architecture with seeded random weights.

No masked-LM weights or RoBERTa tokenizer files are reachable offline, so the fixture trains a tiny byte-level
BPE on the task words (the `tokenizers` package), wraps it in transformers' own RobertaTokenizer (<s> <pad>
</s> <unk> <mask>, the mask stripping the space before it as roberta-base's does), writes it with a 2-layer
RobertaConfig and loads that directory as ``random:<dir>`` (c2i_fast.models.load_model). These tests check
mechanics (the numbers equal a direct computation; scan, search and the shipping rule run on it), not accuracy.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from c2i_fast.cache import MetricsCache, base_metrics
from c2i_fast.confirm import decide
from c2i_fast.errors import C2IError
from c2i_fast.masked import MaskedScorer
from c2i_fast.models import load_model, target_matrices
from c2i_fast.replay import PrefixCache
from c2i_fast.scan import gradients, scan
from c2i_fast.search import build_candidates, evaluate_candidate, rank
from c2i_fast.tasks import Example

SUBJECTS = ["Paris", "the sun", "water", "ice", "a cat", "the moon", "London", "snow", "fire", "the sea"]
ADJECTIVES = ["wet", "cold", "hot", "a city", "bright", "large", "blue", "white"]
CHOICES = [" true", " false"]


def _claim(subject: str, adjective: str) -> str:
    return (f"Consider the following claim: {subject} is {adjective}. Is this claim true or false. "
            f"The claim is")


def _corpus() -> list[str]:
    lines = [_claim(s, a) + c for s in SUBJECTS for a in ADJECTIVES for c in CHOICES]
    return lines + [" yes no maybe"] * 20


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A RobertaForMaskedLM (hidden 64, 2 layers, 2 heads) with seeded random weights and a tiny BPE tokenizer."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=400, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe_model = json.loads(bpe._tokenizer.to_str())["model"]
    tok = RobertaTokenizer(vocab=bpe_model["vocab"], merges=[tuple(m) for m in bpe_model["merges"]],
                           mask_token=AddedToken("<mask>", lstrip=True, rstrip=False))
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=130, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        architectures=["RobertaForMaskedLM"])
    d = tmp_path_factory.mktemp("tiny_roberta")
    cfg.save_pretrained(d)
    tok.save_pretrained(d)
    loaded = load_model(f"random:{d}")
    assert loaded.is_masked_lm
    return loaded


def _examples(n: int, seed: int, prefix: str = "ex") -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.randrange(2)
        prompt = _claim(rng.choice(SUBJECTS), rng.choice(ADJECTIVES))
        out.append(Example(f"{prefix}{i}", prompt, CHOICES[label], list(CHOICES), label))
    return out


def _reference(lm, examples: list[Example]) -> dict:
    """Each example alone through the whole model (its own position ids, no padding): log-softmax at the mask."""
    model, tok = lm.model, lm.tokenizer
    gold, choice, preds = [], [], []
    with torch.no_grad():
        for ex in examples:
            ids = tok(ex.prompt + " <mask>").input_ids
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, ids.index(tok.mask_token_id)], -1)
            lp = logp[[tok(c, add_special_tokens=False).input_ids[0] for c in ex.choices]].double()
            gold.append(-float(lp[ex.label]))
            choice.append(-float(torch.log_softmax(lp, 0)[ex.label]))
            preds.append(int(lp.argmax()))
    return {"log_loss": sum(gold) / len(gold), "choice_loss": sum(choice) / len(choice), "predictions": preds,
            "accuracy": sum(p == ex.label for p, ex in zip(preds, examples)) / len(examples)}


def test_scores_equal_a_direct_computation(lm):
    examples = _examples(7, seed=1)
    # another choice set and a prompt far shorter than the rest: per-example choices and left padding
    examples.append(Example("yn", "Is it? The answer is", " no", [" yes", " no", " maybe"], 1))
    sc = MaskedScorer(lm.model, lm.tokenizer, examples, "classification", batch_tokens=96)
    assert len(sc.batches) > 1 and sc.single_token_choices is None
    res, ref = sc.evaluate(), _reference(lm, examples)
    assert res["predictions_mean"] == res["predictions_sum"] == ref["predictions"]
    assert res["accuracy"] == res["accuracy_sum"] == res["accuracy_mean"] == ref["accuracy"]
    assert res["log_loss"] == pytest.approx(ref["log_loss"], abs=1e-6)
    assert res["choice_loss"] == pytest.approx(ref["choice_loss"], abs=1e-6)
    assert res["correct"] == [p == ex.label for p, ex in zip(ref["predictions"], examples)]
    assert res["n"] == len(examples) and res["scoring"] == "mean" and "majority" in res


def test_refuses_what_a_masked_lm_cannot_score(lm):
    ex = Example("e1", "Relation:", " entailment", [" entailment", " non-entailment"], 0)
    with pytest.raises(C2IError, match=r"epistemic: example 'e1': choice ' entailment' is \d+ tokens"):
        MaskedScorer(lm.model, lm.tokenizer, [ex], "classification", task="epistemic")
    with pytest.raises(C2IError, match="counterfact is a recall task"):
        MaskedScorer(lm.model, lm.tokenizer, [Example("r", "The capital of France is", " Paris")], "recall",
                     task="counterfact")


def test_long_prompt_keeps_its_end_and_the_mask(lm):
    ex = Example("long", " ".join(["water is wet."] * 100) + " The claim is", " true", list(CHOICES), 0)
    sc = MaskedScorer(lm.model, lm.tokenizer, [ex], "classification")
    ids = sc.rows[0].ids
    assert len(ids) == lm.model.config.max_position_embeddings - (lm.model.config.pad_token_id + 1)
    assert ids[0] == lm.tokenizer.cls_token_id and ids[-2:] == [lm.tokenizer.mask_token_id, lm.tokenizer.sep_token_id]
    assert sc.evaluate()["n"] == 1


@pytest.fixture(scope="module")
def scanned(lm):
    """The selection scorer, its scan (every matrix kept as a top one) and the cache the gradient pass filled."""
    sc = MaskedScorer(lm.model, lm.tokenizer, _examples(12, seed=2), "classification", batch_tokens=160)
    refs = target_matrices(lm.model)
    cache = PrefixCache()
    res = scan(sc, refs, [0.5, 0.25], top_k=len(refs), progress=False, cache=cache)
    return sc, refs, res, cache


def test_gradient_pass_and_scan(lm, scanned):
    sc, refs, res, _ = scanned
    assert {r.layer for r in refs} == {0, 1} and len(refs) == 12
    grads, loss = gradients(sc, refs, progress=False)
    assert all(float(grads[r.name].norm()) > 0 for r in refs)
    assert loss == pytest.approx(res.loss)
    assert len(res.top(3)) == 3 and res.top(3)[0].score <= res.top(3)[-1].score
    # the gradient pass doubled as the base evaluation: the same bits as a plain evaluation
    base = sc.evaluate()
    assert res.base == base
    assert sc.loss_batches("choice") is not None


def test_factored_candidate_equals_dense_rebuild(lm, scanned):
    sc, refs, res, cache = scanned
    cands = build_candidates(res.top(len(refs)), {r.name: r for r in refs}, [0.5], [1, 2], ["block"], progress=False)
    picks = [next(c for c in cands if c.layer == 0), next(c for c in cands if c.layer == 1),
             next(c for c in cands if c.edit.n_clusters == 2 and c.layer == 1)]
    base = sc.evaluate()
    for c in picks:
        factored = evaluate_candidate(sc, c, cache)                 # replays layers below from the scan's cache
        again = evaluate_candidate(sc, c, cache)                    # and the modules before it in its layer
        whole = evaluate_candidate(sc, c, None)                     # a full factored pass
        dense = evaluate_candidate(sc, c, None, dense=True)
        assert factored == again == whole
        assert factored["predictions_mean"] == dense["predictions_mean"]
        assert factored["accuracy"] == dense["accuracy"]
        assert factored["log_loss"] == pytest.approx(dense["log_loss"], abs=1e-6)
        assert factored["choice_loss"] == pytest.approx(dense["choice_loss"], abs=1e-6)
        assert factored["log_loss"] != base["log_loss"]
    assert sc.evaluate() == base                                     # every edit undone
    stopped = sc.evaluate(stop=lambda correct, remaining, outcomes: True)      # the search's pruning hook
    assert stopped["pruned"] and stopped["batches_scored"] == 1 < stopped["batches"]


def test_metrics_cache_hit_still_captures(lm, scanned, tmp_path):
    sc, refs, res, _ = scanned
    mc = MetricsCache(lm.model, root=tmp_path)
    first, hit = base_metrics(sc, mc, PrefixCache(), {1})
    cache = PrefixCache()
    second, hit2 = base_metrics(sc, mc, cache, {1})                 # a hit: capture() fills the layer-1 inputs
    assert not hit and hit2 and first == second == sc.evaluate()
    assert all((bi, 1) in cache.store for bi in range(len(sc.batches)))
    c = next(c for c in build_candidates(res.top(len(refs)), {r.name: r for r in refs}, [0.5], [1], ["block"],
                                         progress=False) if c.layer == 1)
    assert evaluate_candidate(sc, c, cache) == evaluate_candidate(sc, c, None)


def test_shipping_rule_runs(lm, scanned):
    sc, refs, res, cache = scanned
    cands = build_candidates(res.top(2), {r.name: r for r in refs}, [0.5, 0.25], [1], ["block"], progress=False)
    for c in cands:
        c.result = evaluate_candidate(sc, c, cache)
    base_sel = {**sc.evaluate(), "accuracy": -1.0}                  # every candidate "beats" it: all confirmable
    conf = MaskedScorer(lm.model, lm.tokenizer, _examples(60, seed=3, prefix="conf"), "classification")
    d = decide("confirm", rank(cands), base_sel, [], conf, top=2)
    assert not d.fallback and d.n_confirm == 60 and len(d.confirmed) == 2
    assert d.base["accuracy"] == conf.evaluate()["accuracy"]
    ranked = rank(cands)
    for c, r in zip(ranked, d.results):
        dense = evaluate_candidate(conf, c, None, dense=True)
        assert r["predictions_mean"] == dense["predictions_mean"]
        assert r["log_loss"] == pytest.approx(dense["log_loss"], abs=1e-6)
    assert isinstance(d.reason, str) and d.summary()["n_confirm"] == 60
