"""A plan is a complete recipe: the factors the search scored, the factors `c2i apply` rebuilds from plan.json and
the factors `factorize_` makes for the same plan are equal bit for bit, for every clustering method and k."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from c2i_fast.artifacts import save_adapted
from c2i_fast.cli import main as cli_main
from c2i_fast.decompose import fit, rank_for
from c2i_fast.evaluate import Scorer
from c2i_fast.models import target_matrices
from c2i_fast.plan import Edit, Plan
from c2i_fast.scan import scan
from c2i_fast.search import build_candidates, candidate_factors
from c2i_fast.tasks import load_task, split
from c2i_fast.transform import factored_modules, factorize_, restore_

METHODS = ("block", "kmeans", "projective")


@pytest.fixture(scope="module")
def scanned(smollm2, data_dir):
    """The search's candidates for the scan's top matrix on 8 real FEVER rows (one gradient pass)."""
    task = load_task("fever", data_dir)
    rows = split(task, 8, 8, seed=0)["select"]
    scorer = Scorer(smollm2.model, smollm2.tokenizer, rows, task.kind)
    refs = target_matrices(smollm2.model, ("mlp_out",))
    sc = scan(scorer, refs, [0.1, 0.01], top_k=1, progress=False)
    top = sc.top(1)
    cands = build_candidates(top, {r.name: r for r in refs}, (0.1, 0.01), (1, 2, 4), METHODS, seed=0,
                             progress=False)
    return cands


def _state(model, name):
    return {k: v.clone() for k, v in model.get_submodule(name).state_dict().items()}


def _assert_bitwise(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", (1, 2, 4))
def test_adapt_apply_and_factorize_give_the_same_bits(smollm2, scanned, tmp_path, method, k):
    model = smollm2.model
    want_method = "block" if k == 1 else method          # k = 1 is one plain SVD, recorded as "block"
    cand = next(c for c in scanned if c.edit.n_clusters == k and c.edit.method == want_method
                and c.edit.rank_fraction == 0.1)
    name = cand.edit.matrix
    plan = Plan([cand.edit], base_model="smollm2", meta={"task": "fever"})
    # 1. what adapt saves: the scored candidate's own factors (pipeline: candidate_factors → save_adapted)
    factorize_(model, plan.edits, factors={name: candidate_factors(cand)})
    try:
        scored = _state(model, name)
        save_adapted(model, plan, tmp_path / "adapt")
    finally:
        restore_(model)
    saved = {k_[len(name) + 1:]: v for k_, v in load_file(str(tmp_path / "adapt" / "adapted.safetensors")).items()}
    _assert_bitwise(saved, scored, "saved artifact vs scored factors")
    # 2. `c2i apply` on the saved plan.json (a fresh load of the model, the recipe read back from JSON)
    assert cli_main(["apply", "--model", "smollm2", "--plan", str(tmp_path / "adapt" / "plan.json"),
                     "--out", str(tmp_path / "apply"), "--quiet"]) in (0, None)
    applied = {k_[len(name) + 1:]: v for k_, v in load_file(str(tmp_path / "apply" / "adapted.safetensors")).items()}
    _assert_bitwise(applied, scored, "c2i apply vs scored factors")
    # 3. factorize_ with the plan read back from disk
    factorize_(model, Plan.load(tmp_path / "adapt" / "plan.json"))
    try:
        assert list(factored_modules(model)) == [name]
        _assert_bitwise(_state(model, name), scored, "factorize_ vs scored factors")
    finally:
        restore_(model)


def test_projective_edits_record_the_searchs_recipe(scanned):
    proj = [c for c in scanned if c.edit.method == "projective"]
    assert proj
    for c in proj:
        d = c.edit.to_dict()
        assert d["iters"] == 5 and d["restarts"] == 0 and d["subspace_rank"] >= 1
        assert Edit.from_dict(json.loads(json.dumps(d))) == c.edit
    # block / k-means / plain edits keep the short form older plan files have
    for c in scanned:
        if c.edit.method != "projective":
            assert set(c.edit.to_dict()) == {"matrix", "rank_fraction", "n_clusters", "method", "seed"}


def test_old_projective_plan_without_recipe_means_the_defaults():
    """A plan file written before the recipe fields: projective at the edit's own ρ with the default iterations
    and restarts, which is what `c2i apply` and `factorize_` built from it then."""
    from c2i_fast.decompose import assign_clusters, ClusteredSVD
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 20, generator=g)
    old = Edit.from_dict({"matrix": "m", "rank_fraction": 0.3, "n_clusters": 3, "method": "projective", "seed": 1})
    labels = assign_clusters(w, 3, "projective", rank=rank_for(0.3, 16, 20), seed=1)    # the old decompose()
    ref = ClusteredSVD.fit(w, labels, 3).factors(0.3)
    got = fit(w, old)
    assert torch.equal(got.u_packed, ref.u_packed) and torch.equal(got.v_cat, ref.v_cat)
    assert torch.equal(got.row_index, ref.row_index)


@pytest.mark.parametrize("bad, match", [
    ({"method": "kmeans", "subspace_rank": 4}, "subspace_rank applies to projective"),
    ({"method": "block", "iters": 3}, "iters applies to"),
    ({"n_clusters": 1, "method": "projective", "restarts": 1}, "restarts applies to"),
    ({"subspace_rank": 0}, "subspace_rank=0 must be an integer >= 1"),
    ({"iters": -1}, "iters=-1"),
    ({"restarts": True}, "restarts=True"),
])
def test_recipe_fields_are_checked(bad, match):
    from c2i_fast.errors import C2IError
    d = {"matrix": "m", "rank_fraction": 0.1, "n_clusters": 2, "method": "projective", "seed": 0, **bad}
    with pytest.raises(C2IError, match=match):
        Edit.from_dict(d)
