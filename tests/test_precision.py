"""--search-dtype: the candidates scored with bf16 matmuls, every other pass at the model's own precision, and
the model handed back with the very tensors it had."""
from __future__ import annotations

import pytest
import torch

from c2i_fast.errors import C2IError
from helpers import tiny_llama
from c2i_fast.precision import lowers_precision, search_dtype, search_precision


def test_matmuls_run_in_bf16_inside_the_head_in_fp32_and_nothing_changes():
    model = tiny_llama()
    before = {n: (p.data_ptr(), p._version, p.clone()) for n, p in model.named_parameters()}
    x = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        ref = model(x).logits
    assert lowers_precision(model, "bfloat16") and not lowers_precision(model, "model")
    seen = {}
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, i, o: seen.update(mlp=o.dtype))      # returns None: the output stays
    with search_precision(model, "bfloat16"), torch.no_grad():
        low = model(x).logits
    hook.remove()
    assert seen["mlp"] == torch.bfloat16 and low.dtype == torch.float32     # bf16 matmuls, fp32 head
    assert 0 < ((low - ref).norm() / ref.norm()) < 0.05                      # bf16 really ran, and stayed close
    assert "forward" not in model.lm_head.__dict__                           # the head's own forward again
    for n, p in model.named_parameters():          # no weight copied, cast or written
        ptr, version, value = before[n]
        assert p.dtype == torch.float32 and p.data_ptr() == ptr and p._version == version and torch.equal(p, value)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


def test_put_back_when_the_block_raises_and_model_means_no_autocast():
    model = tiny_llama()
    wrapper = model.lm_head.forward                  # an instance forward (as accelerate's hooks set) survives
    model.lm_head.forward = wrapper
    with pytest.raises(RuntimeError, match="boom"):
        with search_precision(model, "bfloat16"):
            assert torch.is_autocast_enabled("cpu")
            raise RuntimeError("boom")
    assert not torch.is_autocast_enabled("cpu") and model.lm_head.__dict__["forward"] is wrapper
    with search_precision(model, "model"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(C2IError, match="--search-dtype 'fp8'"):
        search_dtype("fp8")


def test_adapt_scores_in_bf16_and_confirms_and_reports_at_fp32(smollm2, data_dir, tmp_path, monkeypatch):
    """On the real SmolLM2: the selection passes ran in bf16 (the report says so), while the held-out base and
    every confirmed candidate's confirmation numbers are what an fp32 pass on those rows gives, and the model
    comes back with its fp32 tensors."""
    from c2i_fast.pipeline import AdaptConfig, _scorer, adapt
    from c2i_fast.tasks import load_task, split
    from c2i_fast.transform import Edit, factorize_, restore_
    monkeypatch.setenv("C2I_CACHE", str(tmp_path / "cache"))          # no base metrics from earlier runs
    small = dict(model="smollm2", task="fever", samples=24, test_size=16, confirm_size=50, confirm_top=1, top_k=1,
                 clusters=(1, 2), methods=("block",), rank_fractions=(0.1, 0.01), max_evals=3, threads=2,
                 progress=False, data_dir=str(data_dir))
    params = [p.data_ptr() for p in smollm2.model.parameters()]
    cfg = AdaptConfig(out=str(tmp_path / "bf16"), search_dtype="bfloat16", **small)
    rep = adapt(cfg, lm=smollm2)
    assert rep["search"]["dtype"] == "bfloat16"
    assert [p.data_ptr() for p in smollm2.model.parameters()] == params
    assert all(p.dtype == torch.float32 for p in smollm2.model.parameters())
    task = load_task("fever", str(data_dir))
    rows = split(task, 24, 16, 0, n_confirm=50)

    def fp32(examples, edit=None):
        sc = _scorer(smollm2, task, examples, cfg)      # the run's own batching
        if edit is None:
            return sc.evaluate()
        factorize_(smollm2.model, [edit])
        try:
            return sc.evaluate()
        finally:
            restore_(smollm2.model, [edit.matrix])
    held = fp32(rows["test"])
    assert rep["test"]["base"]["accuracy"] == held["accuracy"]
    assert rep["test"]["base"]["log_loss"] == pytest.approx(held["log_loss"], rel=1e-6)
    confirmed = rep["decision"]["confirmed"]
    assert confirmed                                   # the rule re-scored candidates …
    for c in confirmed:                                # … at fp32
        r = fp32(rows["confirm"], Edit(c["matrix"], c["rank_fraction"], c["n_clusters"], c["method"]))
        assert c["accuracy"] == r["accuracy"] and c["log_loss"] == pytest.approx(r["log_loss"], rel=1e-6)
