"""Work the scorer skips must not change a single score, on the real SmolLM2:

* logits only at the columns that are read (not a row's or a choice's last token, which predicts nothing scored);
* that last token left out of the batch altogether (trimmed rows);
* the last layer's query / attention-output / MLP matrices at those columns only (``tail_only``);
* the gradient scan's forward doubling as the base model's selection evaluation and prefix-cache capture.
"""
import dataclasses

import pytest
import torch

from c2i_fast.evaluate import Scorer
from c2i_fast.models import decoder_layers, find_matrix, last_layer_positionwise, target_matrices
from c2i_fast.replay import PrefixCache
from c2i_fast.scan import gradients, scan
from c2i_fast.search import build_candidates, evaluate_candidate
from c2i_fast.tasks import check_tokenization, load_task, split

TASKS = ["bigbench_epistemic_reasoning", "counterfact", "fever"]


def _rows(smollm2, data_dir, name, n):
    task = check_tokenization(load_task(name, data_dir), smollm2.tokenizer)
    return task, split(task, n, 4, seed=0)["select"]


def _assert_same(ra, rb, rel=1e-6):
    assert ra["correct"] == rb["correct"]
    assert ra["accuracy"] == rb["accuracy"]
    assert rb["log_loss"] == pytest.approx(ra["log_loss"], rel=rel)
    if "choice_loss" in ra:
        assert rb["choice_loss"] == pytest.approx(ra["choice_loss"], rel=rel, abs=1e-7)


def test_read_columns_skip_each_last_token(smollm2, data_dir):
    """Packed choices: the last prompt token + every choice token but its last; recall: the answer's
    predictors; a one-token-choice task reads the last column only. Untrimmed rows still hold each last token
    (never read); trimmed rows (the default) leave it out, so every kept column is read."""
    for name, n_read in [("bigbench_epistemic_reasoning", None), ("counterfact", None), ("fever", 1)]:
        task, rows = _rows(smollm2, data_dir, name, 12)
        for trim in (False, True):
            sc = Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind, batch_tokens=300, trim=trim)
            for b in sc.batches:
                if n_read is not None:
                    assert b.read == [b.keep - 1]
                    continue
                if trim:
                    assert b.read == list(range(b.keep))
                else:
                    assert b.keep - 1 not in b.read and len(b.read) < b.keep
                if any(r.spans for r in b.rows):
                    r = b.rows[0]
                    assert len(b.read) == 1 + sum(n - 1 for _, n in r.spans)
                else:
                    n = max(len(r.cont) for r in b.rows)
                    assert b.read == list(range(b.keep - 1 - n + trim, b.keep - 1 + trim))


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("pack", [True, False])
def test_trimmed_rows_score_as_whole_rows(smollm2, data_dir, name, pack):
    """Leaving out each continuation's / choice's last token changes no score (same logits up to float
    round-off: the GEMMs see other shapes) and removes one column per continuation or choice."""
    task, rows = _rows(smollm2, data_dir, name, 12)
    whole, trimmed = (Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind, batch_tokens=300, trim=t,
                             pack_choices=pack) for t in (False, True))
    dropped = sum(len(r.spans) if r.spans else 1 for r in whole.rows if r.cont)
    assert sum(len(r.ids) for r in trimmed.rows) == sum(len(r.ids) for r in whole.rows) - dropped
    assert (dropped > 0) == (name != "fever")          # FEVER's labels are one token: nothing to trim
    with torch.no_grad():
        _assert_same(whole.evaluate(generate=False), trimmed.evaluate(generate=False), rel=1e-5)


@pytest.mark.parametrize("name", TASKS)
def test_tail_only_scores_equal_the_full_last_layer(smollm2, data_dir, name):
    task, rows = _rows(smollm2, data_dir, name, 12)
    full, tail = (Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind, batch_tokens=300, tail_only=t)
                  for t in (False, True))
    assert not full.tail_names
    assert sorted(n.rsplit(".", 1)[1] for n in tail.tail_names) == [
        "down_proj", "gate_proj", "o_proj", "q_proj", "up_proj"]            # never k_proj / v_proj
    seen = []
    down = decoder_layers(smollm2.model)[-1].mlp.down_proj
    h = down.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[1]))
    try:
        with torch.no_grad():
            ra = full.evaluate()
            n_full = list(seen)
            seen.clear()
            rb = tail.evaluate()
    finally:
        h.remove()
    _assert_same(ra, rb)
    # the last layer's MLP saw the read columns only (a column count per batch), not whole rows; a shared
    # prompt prefix runs whole first (its last layer's keys/values are needed)
    prefix = [len(tail.prefix_ids)] if tail.prefix_ids else []
    assert seen == prefix + [len(b.read) for b in tail.batches]
    assert n_full == prefix + [b.input_ids.shape[1] for b in full.batches] and sum(seen) < sum(n_full)


def test_tail_only_with_a_candidate_in_the_last_layer(smollm2, data_dir):
    """A factored candidate in the last layer runs at every column, its dense neighbours at the read columns:
    it scores as the same edit with the full last layer."""
    task, rows = _rows(smollm2, data_dir, "counterfact", 10)
    model = smollm2.model
    last = len(decoder_layers(model)) - 1
    refs = {r.name: r for r in target_matrices(model)}
    from c2i_fast.scan import MatrixScan
    from c2i_fast.decompose import full_svd
    name = f"model.layers.{last}.mlp.up_proj"
    svd = full_svd(refs[name].weight())
    m, n = svd.shape
    ms = MatrixScan(name, last, "mlp_up", (m, n), torch.zeros(min(m, n)), {0.1: 0.0}, 0.0, svd, torch.zeros(m, n))
    cands = build_candidates([ms], refs, (0.1,), (1, 4), ("block",), progress=False)
    res = []
    for t in (False, True):
        sc = Scorer(model, smollm2.tokenizer, rows, task.kind, batch_tokens=300, tail_only=t)
        cache = PrefixCache()
        with torch.no_grad():
            base = sc.evaluate(cache, capture={last})
            res.append([base] + [evaluate_candidate(sc, c, cache) for c in cands])
    for ra, rb in zip(*res):
        _assert_same(ra, rb, rel=1e-5)
    assert res[1][1]["log_loss"] != pytest.approx(res[1][0]["log_loss"], rel=1e-4), "the edit must matter"


def test_tail_only_gradients(smollm2, data_dir):
    task, rows = _rows(smollm2, data_dir, "bigbench_epistemic_reasoning", 8)
    model = smollm2.model
    names = ["model.layers.29.mlp.down_proj", "model.layers.29.self_attn.q_proj", "model.layers.29.self_attn.k_proj",
             "model.layers.3.self_attn.v_proj"]
    refs = [find_matrix(model, n) for n in names]
    got = [gradients(Scorer(model, smollm2.tokenizer, rows, task.kind, tail_only=t), refs, progress=False)
           for t in (False, True)]
    assert got[0][1] == pytest.approx(got[1][1], rel=1e-6)
    for n in names:
        a, b = got[0][0][n].double(), got[1][0][n].double()
        assert float((a - b).norm() / a.norm()) < 1e-5, n


def test_not_for_non_causal_lms():
    assert last_layer_positionwise(torch.nn.Linear(2, 2)) == []


@pytest.mark.parametrize("name", ["bigbench_epistemic_reasoning", "counterfact"])
def test_scan_pass_is_the_base_evaluation(smollm2, data_dir, name):
    """scan(cache=…) returns the base model's selection metrics from its own forward and leaves in the cache
    exactly the top-K layers a separate base evaluation would capture; candidates replayed from it score as
    with a separately captured cache."""
    task, rows = _rows(smollm2, data_dir, name, 12)
    model = smollm2.model
    refs = [r for r in target_matrices(model) if r.layer in (2, 11, 20, 29)]
    sc = Scorer(model, smollm2.tokenizer, rows, task.kind, batch_tokens=300)
    cache = PrefixCache()
    res = scan(sc, refs, [0.1, 0.5], top_k=3, progress=False, cache=cache)
    assert res.base is not None
    top = res.top(3)
    layers = {m.layer for m in top}
    ref_cache = PrefixCache()
    with torch.no_grad():
        ref = sc.evaluate(ref_cache, capture=layers)
    _assert_same(ref, res.base)
    assert res.base["predictions_mean" if task.kind == "classification" else "correct"] == \
        ref["predictions_mean" if task.kind == "classification" else "correct"]
    assert {k[1] for k in cache.store} == {k[1] for k in ref_cache.store} == layers - {0}
    assert cache.store.keys() == ref_cache.store.keys()
    by_name = {r.name: r for r in refs}
    cands = build_candidates(top, by_name, (0.1,), (1,), ("block",), progress=False)
    with torch.no_grad():
        for c in cands:
            _assert_same(evaluate_candidate(sc, c, ref_cache), evaluate_candidate(sc, c, cache), rel=1e-5)


def test_scan_without_cache_or_with_checkpointing_has_no_base(smollm2, data_dir):
    task, rows = _rows(smollm2, data_dir, "counterfact", 6)
    refs = [find_matrix(smollm2.model, "model.layers.5.mlp.down_proj")]
    sc = Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind)
    assert scan(sc, refs, [0.1], top_k=1, progress=False).base is None
    cache = PrefixCache()
    assert scan(sc, refs, [0.1], top_k=1, progress=False, cache=cache, checkpointing=True).base is None
    assert not cache.store


def test_scan_base_with_shared_prefix(smollm2, data_dir):
    """Rows under a shared instruction: the prefix's own cache entries come from the scan too."""
    task, rows = _rows(smollm2, data_dir, "fever", 8)
    rows = [dataclasses.replace(ex, prompt="Decide whether the claim below is true or false.\n\n" + ex.prompt)
            for ex in rows]
    model = smollm2.model
    refs = [r for r in target_matrices(model) if r.layer == 9]
    sc = Scorer(model, smollm2.tokenizer, rows, task.kind, batch_tokens=300)
    assert sc.prefix_ids
    cache = PrefixCache()
    res = scan(sc, refs, [0.1], top_k=1, progress=False, cache=cache)
    assert ("prefix", 9) in cache.store and ("prefix_kv", 9) in cache.store
    with torch.no_grad():
        ref = sc.evaluate()
        _assert_same(ref, res.base)
        w = model.model.layers[9].mlp.up_proj.weight
        orig = w.detach().clone()
        try:
            w.mul_(0.5)
            whole = sc.evaluate()
            replay = sc.evaluate(cache, start_layer=9)
        finally:
            w.copy_(orig)
    _assert_same(whole, replay, rel=1e-5)


def _candidates(model, layer, types, ks=(1, 2)):
    from c2i_fast.decompose import full_svd
    from c2i_fast.scan import MatrixScan
    refs = {r.name: r for r in target_matrices(model)}
    scans = []
    for t in types:
        name = f"model.layers.{layer}.{t}"
        svd = full_svd(refs[name].weight())
        m, n = svd.shape
        scans.append(MatrixScan(name, layer, refs[name].type, (m, n), torch.zeros(min(m, n)), {0.1: 0.0}, 0.0,
                                svd, torch.zeros(m, n)))
    return build_candidates(scans, refs, (0.1,), ks, ("block",), progress=False)


@pytest.mark.parametrize("name", ["bigbench_epistemic_reasoning", "counterfact"])
def test_within_layer_replay_scores_as_recomputing(smollm2, data_dir, name):
    """A lone candidate's own layer replays what runs before its matrix (captured on the first candidate at
    that matrix): the same scores as running the layer whole, and the replayed modules do not run."""
    task, rows = _rows(smollm2, data_dir, name, 12)
    model, layer = smollm2.model, 20
    types = ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    cands = _candidates(model, layer, types)
    sc = Scorer(model, smollm2.tokenizer, rows, task.kind, batch_tokens=300)
    assert len(sc.batches) > 1
    cache = PrefixCache()
    block = decoder_layers(model)[layer]
    calls = {"self_attn": 0, "gate_proj": 0, "up_proj": 0}
    hooks = [block.self_attn.register_forward_hook(lambda *_: calls.__setitem__("self_attn", calls["self_attn"] + 1)),
             block.mlp.gate_proj.register_forward_hook(lambda *_: calls.__setitem__("gate_proj", calls["gate_proj"] + 1)),
             block.mlp.up_proj.register_forward_hook(lambda *_: calls.__setitem__("up_proj", calls["up_proj"] + 1))]
    try:
        with torch.no_grad():
            sc.evaluate(cache, capture={layer})
            for c in cands:                       # k=1 then k=2 of each matrix: capture, then replay
                plain = evaluate_candidate(sc, c, cache, within=False)
                for k in calls:
                    calls[k] = 0
                got = evaluate_candidate(sc, c, cache)
                _assert_same(plain, got)
                assert got["log_loss"] == pytest.approx(plain["log_loss"], rel=1e-7, abs=0)
                if c.edit.matrix.endswith("down_proj") and c.edit.n_clusters == 2:
                    # the second candidate at down_proj: attention and gate/up came from the cache
                    once = 1 if sc.prefix_ids else 0         # a shared prompt prefix runs its layer whole
                    assert calls == {"self_attn": once, "gate_proj": once, "up_proj": once}
    finally:
        for h in hooks:
            h.remove()
    p = f"model.layers.{layer}."
    plans = {t: cache.store[("within", p + t)] for t in types}
    assert plans == {"self_attn.q_proj": [], "self_attn.v_proj": [p + "self_attn.q_proj", p + "self_attn.k_proj"],
                     "self_attn.o_proj": [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
                     "mlp.gate_proj": [p + "self_attn"],
                     "mlp.down_proj": [p + "self_attn", p + "mlp.gate_proj", p + "mlp.up_proj"]}
    assert 0 < cache.within_bytes == sum(v.numel() * v.element_size() if torch.is_tensor(v) else
                                         sum(t.numel() * t.element_size() for t in v if torch.is_tensor(t))
                                         for k, v in cache.store.items() if isinstance(k[1], str) and k[0] != "within")


def test_within_layer_replay_not_in_the_last_layer_nor_with_other_edits(smollm2, data_dir):
    task, rows = _rows(smollm2, data_dir, "counterfact", 8)
    model = smollm2.model
    last = len(decoder_layers(model)) - 1
    sc = Scorer(model, smollm2.tokenizer, rows, task.kind)
    cache = PrefixCache()
    down = _candidates(model, last, ["mlp.down_proj"], ks=(1,))[0]
    first, second = _candidates(model, 12, ["mlp.gate_proj", "mlp.down_proj"], ks=(1,))
    with torch.no_grad():
        sc.evaluate(cache, capture={last, 12})
        evaluate_candidate(sc, down, cache)                        # tail-only hooks in the last layer
        evaluate_candidate(sc, second, cache, applied=[first])     # gate_proj's edit changes what runs before
    assert not any(k[0] == "within" for k in cache.store) and cache.within_bytes == 0
