"""Base-model metrics cache (c2i_fast.cache): a hit gives the bits a fresh pass gives, the key follows what the
numbers depend on, and Scorer.capture leaves the prefix cache exactly as the full base pass does."""
import json

import pytest
import torch

from c2i_fast.cache import MetricsCache, base_metrics, describe
from c2i_fast.evaluate import Scorer
from c2i_fast.replay import PrefixCache
from c2i_fast.tasks import check_tokenization, load_task, split


def _scorer(smollm2, data_dir, name, n=24, **kw):
    task = check_tokenization(load_task(name, data_dir), smollm2.tokenizer)
    rows = split(task, 16, n, seed=0)["test"]
    return Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind, **kw)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", ["fever", "bigbench_epistemic_reasoning", "counterfact"])
def test_a_hit_is_the_fresh_result_bit_for_bit(smollm2, data_dir, tmp_path, name):
    sc = _scorer(smollm2, data_dir, name, batch_tokens=700)
    mc = MetricsCache(smollm2.model, root=tmp_path)
    fresh, hit = base_metrics(sc, mc)
    assert not hit and mc.misses == 1 and len(list(tmp_path.iterdir())) == 1
    again, hit = base_metrics(sc, MetricsCache(smollm2.model, root=tmp_path))
    assert hit
    assert json.dumps(again, sort_keys=True) == json.dumps(fresh, sort_keys=True)
    for k, v in fresh.items():              # floats bit-equal, lists equal (JSON keeps them as lists)
        assert again[k] == (list(v) if isinstance(v, tuple) else v), k


def test_the_key_follows_rows_layout_and_model(smollm2, data_dir, tmp_path):
    mc = MetricsCache(smollm2.model, root=tmp_path)
    a = _scorer(smollm2, data_dir, "fever", batch_tokens=700)
    assert mc.path(a) == mc.path(_scorer(smollm2, data_dir, "fever", batch_tokens=700))
    assert mc.path(a) != mc.path(_scorer(smollm2, data_dir, "fever", batch_tokens=300))    # other padding
    assert mc.path(a) != mc.path(_scorer(smollm2, data_dir, "fever", n=20, batch_tokens=700))
    assert mc.path(a) != mc.path(a, generate=False)
    other = MetricsCache(smollm2.model, root=tmp_path)
    other.fingerprint = "sha256:another-model"
    assert other.path(a) != mc.path(a)
    d = describe(a, mc.model_fingerprint())
    assert d["threads"] == torch.get_num_threads() and d["device"] == "cpu"


def test_disabled_reads_and_writes_nothing(smollm2, data_dir, tmp_path):
    sc = _scorer(smollm2, data_dir, "fever", n=8)
    mc = MetricsCache(smollm2.model, enabled=False, root=tmp_path)
    base_metrics(sc, mc)
    base_metrics(sc, mc)
    assert not list(tmp_path.iterdir()) and mc.hits == 0


@pytest.mark.parametrize("name", ["truthfulqa", "bigbench_epistemic_reasoning"])   # no shared prefix; one
def test_capture_only_pass_stores_what_the_full_pass_stores(smollm2, data_dir, tmp_path, name):
    sc = _scorer(smollm2, data_dir, name, batch_tokens=700)
    full, part = PrefixCache(), PrefixCache()
    sc.evaluate(full, capture={12, 27})
    sc.capture(part, {12, 27})
    assert set(map(str, full.store)) == set(map(str, part.store))
    assert all(_same(full.store[k], part.store[k]) for k in full.store)
    # and a hit in base_metrics fills the prefix cache the same way, so the adapted pass replays it
    mc = MetricsCache(smollm2.model, root=tmp_path)
    base_metrics(sc, mc, PrefixCache(), {27})
    via_hit = PrefixCache()
    _, hit = base_metrics(sc, mc, via_hit, {27})
    assert hit and sc.evaluate(via_hit, start_layer=27) == sc.evaluate(full, start_layer=27)
