"""The Triton kernels inside the real model and the real search, not only on synthetic operands: on a GPU the
factored layers of every candidate and of the adapted model run through them (C2I_KERNELS unset = Triton on
CUDA). Here they run in the interpreter (TRITON_INTERPRET=1, C2I_KERNELS=triton) on SmolLM2's CPU weights and
must give what the pure-torch reference gives — the same logits, the same search, the same plan.
On the GPU machine (bench/gpu_session.sh) C2I_TEST_MODEL=random:.gpu/models/smollm2 runs the logits test on
CUDA with compiled Triton kernels (SmolLM2's weights cannot travel there; its shapes and tokenizer do)."""
import os

import pytest
import torch

import c2i_fast.kernels as K
from c2i_fast.kernels import clustered, lowrank, naive
from c2i_fast.transform import Edit, factored_modules, factorize_, restore_

pytestmark = pytest.mark.skipif(not K.HAS_TRITON, reason="triton not installed")

PLAN = [Edit("model.layers.28.mlp.down_proj", 0.1, 1),                    # plain low rank (576×1536)
        Edit("model.layers.28.mlp.up_proj", 0.1, 4, "kmeans"),           # clustered, uneven clusters (1536×576)
        Edit("model.layers.29.self_attn.o_proj", 0.05, 2, "block"),      # square, rank 28
        Edit("model.layers.27.mlp.gate_proj", 0.2, 8, "projective")]     # 8 clusters


@pytest.fixture(scope="module")
def lm(request):
    """SmolLM2 (CPU, real weights), or C2I_TEST_MODEL on CUDA when there is one."""
    spec = os.environ.get("C2I_TEST_MODEL")
    if not spec:
        return request.getfixturevalue("smollm2")
    from c2i_fast.models import load_model
    return load_model(spec, device="cuda" if torch.cuda.is_available() else "cpu")


def _triton(monkeypatch, device="cpu"):
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")      # on CUDA tensors the kernels are compiled for real
    monkeypatch.setenv("C2I_KERNELS", "triton")
    monkeypatch.setenv("C2I_KERNELS_POISON", "1")      # outputs start as NaN: an unwritten row shows


def _count_triton_launches(monkeypatch) -> dict:
    """Count the Triton launchers' calls, and make the torch references raise if the op falls back to them."""
    calls = {"lowrank": 0, "clustered": 0}

    def counted(key, fn):
        def wrapper(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(lowrank, "lowrank_matmul_triton", counted("lowrank", lowrank.lowrank_matmul_triton))
    monkeypatch.setattr(clustered, "clustered_lowrank_matmul_triton",
                        counted("clustered", clustered.clustered_lowrank_matmul_triton))

    def no_reference(*a, **k):
        raise AssertionError("the torch reference ran where Triton was asked for")

    monkeypatch.setattr(naive, "lowrank_matmul", no_reference)
    monkeypatch.setattr(naive, "clustered_lowrank_matmul", no_reference)
    return calls


def test_factored_smollm2_logits_through_triton(lm, monkeypatch):
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device.type
    batch = tok(["The capital of France is", "Apple was founded by Steve Jobs in the year"], return_tensors="pt",
                padding=True).to(device)
    factorize_(model, PLAN)
    try:
        assert len(factored_modules(model)) == 4
        monkeypatch.setenv("C2I_KERNELS", "torch")
        with torch.inference_mode():
            ref = model(**batch).logits.double()
        _triton(monkeypatch, device)
        calls = _count_triton_launches(monkeypatch)
        with torch.inference_mode():
            got = model(**batch).logits.double()
    finally:
        restore_(model)
    assert calls == {"lowrank": 1, "clustered": 3}                   # every factored layer, once each
    assert torch.isfinite(got).all()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4 * ref.abs().max()    # random weights have near-ties: skip them
    assert clear.any() and torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


@pytest.mark.slow   # two real `adapt` runs on the session's SmolLM2
def test_search_through_triton_matches_reference(tmp_path, data_dir, monkeypatch, smollm2):
    """A small real `adapt` (FEVER, 16 selection rows, the MLP matrices, 6 candidates) with the kernels and with
    the reference:
    every evaluated candidate's accuracy and log-loss, the plan and the held-out numbers agree."""
    from c2i_fast.pipeline import AdaptConfig, adapt

    def run(name):
        return adapt(AdaptConfig(out=str(tmp_path / name), model="smollm2", task="fever", samples=16, test_size=16,
                                 top_k=2, max_evals=6, types=("mlp_in", "mlp_out"), progress=False,
                                 rule="paper",    # the search and the plan's held-out pass are what is compared
                                 data_dir=str(data_dir)), lm=smollm2)

    monkeypatch.setenv("C2I_KERNELS", "torch")
    ref = run("torch")
    _triton(monkeypatch)
    calls = _count_triton_launches(monkeypatch)
    got = run("triton")
    assert got["plan"] == ref["plan"]
    evaluated = [(a, b) for a, b in zip(ref["search"]["candidates"], got["search"]["candidates"])
                 if a.get("accuracy") is not None]
    assert len(evaluated) == ref["search"]["n_evaluated"] == 6
    kinds = {"clustered" if a["n_clusters"] > 1 else "lowrank" for a, _ in evaluated}
    assert kinds and all(calls[k] > 0 for k in kinds), (kinds, calls)   # each kind of candidate ran in Triton
    for a, b in evaluated:
        assert (a["matrix"], a["rank_fraction"], a["n_clusters"], a["method"]) == \
            (b["matrix"], b["rank_fraction"], b["n_clusters"], b["method"])
        assert b["accuracy"] == a["accuracy"]
        assert b["log_loss"] == pytest.approx(a["log_loss"], rel=1e-4)
    for split in ("base", "adapted"):
        assert got["test"][split]["accuracy"] == ref["test"][split]["accuracy"]
        assert got["test"][split]["log_loss"] == pytest.approx(ref["test"][split]["log_loss"], rel=1e-4)


def test_checkout_kernels_folder_is_not_a_second_copy():
    """From the checkout's root (`python -m pytest` puts it on sys.path) transformers imports `kernels` (Hugging
    Face's package of that name, a dependency of transformers ≥ 5.25) and would find our kernels/ folder first.
    Where Hugging Face's package is installed, that import must give it (loading a model needs it); otherwise it
    must not run a second copy of our ops under that name: the second registration of torch.ops.c2i.* would take
    over from c2i_fast.kernels'."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import importlib.metadata, sys
from pathlib import Path
from transformers.utils.import_utils import is_kernels_available
import kernels
import c2i_fast.kernels
try:
    importlib.metadata.version("kernels")
    hf = True
except importlib.metadata.PackageNotFoundError:
    hf = False
assert is_kernels_available() == hf
if hf:                                              # Hugging Face's, from site-packages, not our folder
    assert Path(kernels.__file__).resolve() != Path(c2i_fast.kernels.__file__).resolve()
    assert hasattr(kernels, "kernelize") and not hasattr(kernels, "lowrank_matmul")
    from transformers.integrations import hub_kernels          # what failed when our folder stood in for it
else:
    assert sys.modules["kernels"] is sys.modules["c2i_fast.kernels"]   # one copy, whichever name imported it
    assert not [m for m in sys.modules if m.startswith("kernels.")]
print("ok", hf)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
