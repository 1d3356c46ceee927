"""Σ-gradients on the real SmolLM2 and real FEVER rows: gᵢ = uᵢᵀ G vᵢ must equal the finite-difference
derivative of the loss w.r.t. σᵢ, and the first-order ΔL̂ must predict a small truncation's real change."""
import pytest
import torch

from c2i_fast.decompose import full_svd, rank_for
from c2i_fast.evaluate import Scorer
from c2i_fast.models import find_matrix
from c2i_fast.scan import gradients, scan
from c2i_fast.tasks import load_task, split

MATRIX = "model.layers.25.mlp.up_proj"


@pytest.fixture
def fever_rows(data_dir):
    task = load_task("fever", str(data_dir))
    return task, split(task, 6, 10, seed=1)["select"]


def _loss(scorer, kind):
    with torch.no_grad():
        return float(sum(l for l in scorer.loss_batches(kind)))


@pytest.mark.parametrize("loss_kind", ["answer", "choice"])
def test_sigma_gradient_matches_finite_difference(smollm2, fever_rows, loss_kind):
    task, rows = fever_rows
    model = smollm2.model
    model.double()                    # float64 so a central difference resolves the derivative cleanly
    try:
        scorer = Scorer(model, smollm2.tokenizer, rows, task.kind)
        ref = find_matrix(model, MATRIX)
        grads, _ = gradients(scorer, [ref], loss_kind, progress=False)
        w0 = ref.weight().detach().clone()
        svd = torch.linalg.svd(w0, full_matrices=False)
        u, s, vh = svd
        g_sigma = ((u.T @ grads[MATRIX].double()) * vh).sum(1)
        checked = 0
        for i in torch.argsort(g_sigma.abs(), descending=True)[:3].tolist():
            eps = 1e-3 * float(s[i])
            vals = []
            for sign in (+1, -1):
                with torch.no_grad():
                    ref.param.copy_(w0 + sign * eps * torch.outer(u[:, i], vh[i]))
                vals.append(_loss(scorer, loss_kind))
            fd = (vals[0] - vals[1]) / (2 * eps)
            assert abs(fd - float(g_sigma[i])) <= 1e-4 * max(1.0, abs(fd)) + 1e-3 * abs(fd), (i, fd, g_sigma[i])
            checked += 1
        assert checked == 3 and float(g_sigma.abs().max()) > 0
    finally:
        with torch.no_grad():
            ref.param.copy_(w0)
        model.float()


def test_scan_ranks_all_matrices_and_first_order_predicts_truncation(smollm2, fever_rows):
    task, rows = fever_rows
    model = smollm2.model
    scorer = Scorer(model, smollm2.tokenizer, rows, task.kind)
    ref = find_matrix(model, MATRIX)
    res = scan(scorer, [ref, find_matrix(model, "model.layers.29.mlp.down_proj")], [0.9, 0.5], top_k=1,
               progress=False)
    assert len(res.matrices) == 2 and res.matrices[0].score <= res.matrices[1].score
    assert res.matrices[0].svd is not None and res.matrices[1].svd is None      # SVD kept for the top-K only
    ms = next(m for m in res.matrices if m.name == MATRIX)
    # Predicted vs measured loss change of a mild truncation (ρ = 0.9): same sign, same magnitude.
    w0 = ref.weight().detach().clone()
    svd = full_svd(w0)
    f = svd.truncate(rank_for(0.9, *w0.shape))
    base = _loss(scorer, "answer")
    try:
        with torch.no_grad():
            ref.param.copy_(f.u @ f.v.T)
        measured = _loss(scorer, "answer") - base
    finally:
        with torch.no_grad():
            ref.param.copy_(w0)
    predicted = ms.delta[0.9]
    assert abs(predicted - measured) <= 0.5 * abs(measured) + 1e-3, (predicted, measured)


def test_gradient_checkpointing_gives_the_same_gradients(smollm2, fever_rows):
    task, rows = fever_rows
    scorer = Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind)
    refs = [find_matrix(smollm2.model, MATRIX), find_matrix(smollm2.model, "model.layers.2.self_attn.q_proj")]
    plain, l1 = gradients(scorer, refs, progress=False)
    ckpt, l2 = gradients(scorer, refs, progress=False, checkpointing=True)
    assert not smollm2.model.training and not getattr(smollm2.model, "is_activation_checkpointing", False)
    assert abs(l1 - l2) < 1e-6
    for r in refs:   # the plain pass runs the last layer's MLP at the scored columns only: sums differ in order
        a, b = plain[r.name], ckpt[r.name]
        assert float((a - b).norm() / b.norm()) < 1e-5
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_bf16_model_scans_with_fp32_svd_and_gradients(smollm2, fever_rows):
    import copy
    task, rows = fever_rows
    model = copy.deepcopy(smollm2.model).to(torch.bfloat16)
    scorer = Scorer(model, smollm2.tokenizer, rows, task.kind)
    refs = [find_matrix(model, MATRIX)]
    res = scan(scorer, refs, [0.5, 0.1], top_k=1, progress=False)
    ms = res.matrices[0]
    assert ms.svd.u.dtype == torch.float32 and ms.grad.dtype == torch.float32 and ms.g_sigma.dtype == torch.float32
    assert torch.isfinite(ms.g_sigma).all() and float(ms.g_sigma.abs().max()) > 0
    from c2i_fast.search import build_candidates, evaluate_candidate
    c = build_candidates([ms], {MATRIX: refs[0]}, [0.1], [1, 2], ["block"], progress=False)
    res_c = evaluate_candidate(scorer, c[-1], None)
    assert 0 <= res_c["accuracy"] <= 1 and res_c["log_loss"] == res_c["log_loss"]
    assert type(find_matrix(model, MATRIX).module).__name__ == "Linear"        # restored after evaluation
