"""The same tasks from their Hugging Face hub sources (needs the ``datasets`` extra and a network).

``c2i adapt --task hf:fever`` builds the records LASER's loaders build (METHOD.md §2.3) and converts them to the
project's JSONL schema, so the templates, metrics and splits are exactly those of the local files.
"""
from __future__ import annotations

from collections import defaultdict

from .errors import C2IError

PROFESSIONS = ["journalist", "poet", "composer", "model", "teacher", "architect", "painter", "professor"]
# LabHC/bias_in_bios profession ids follow the 28-class list of the Bias-in-Bios paper.
BIOS_28 = ["accountant", "architect", "attorney", "chiropractor", "comedian", "composer", "dentist", "dietitian",
           "dj", "filmmaker", "interior_designer", "journalist", "model", "nurse", "painter", "paralegal",
           "pastor", "personal_trainer", "photographer", "physician", "poet", "professor", "psychologist",
           "rapper", "software_engineer", "surgeon", "teacher", "yoga_teacher"]


def _load(*args, **kwargs):
    try:
        import datasets
    except ImportError:
        raise C2IError("hub tasks need the datasets extra: pip install 'c2i_fast[datasets]'") from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - network, missing config, …
        raise C2IError(f"cannot load hub dataset {args}: {e}") from e


def _fever() -> list[dict]:
    out = []
    for split in ("paper_dev", "paper_test"):
        labels: dict[str, set] = defaultdict(set)
        first: dict[str, int] = {}
        for r in _load("EleutherAI/fever", "v1.0", split=split):
            if r["label"] in ("SUPPORTS", "REFUTES"):
                labels[r["claim"]].add(r["label"])
                first.setdefault(r["claim"], r["id"])
        for claim, ls in labels.items():
            if len(ls) == 1:           # LASER drops claims that appear with conflicting labels
                out.append({"id": f"fever_{split}_{first[claim]}", "prompt": claim,
                            "answer": "true" if ls == {"SUPPORTS"} else "false", "choices": ["false", "true"]})
    return out


def _bios(task: str) -> list[dict]:
    out = []
    for i, r in enumerate(_load("LabHC/bias_in_bios", split="dev")):
        if task == "gender":
            out.append({"id": f"bios_g_{i}", "prompt": r["hard_text"], "answer": ["male", "female"][r["gender"]],
                        "choices": ["male", "female"]})
        else:
            prof = BIOS_28[r["profession"]]
            if prof in PROFESSIONS:
                out.append({"id": f"bios_p_{i}", "prompt": r["hard_text"], "answer": prof, "choices": PROFESSIONS})
    return out


def _truthfulqa() -> list[dict]:
    out = []
    for q, r in enumerate(_load("truthful_qa", "multiple_choice", split="validation")):
        t = r["mc2_targets"]
        for c, (cand, lab) in enumerate(zip(t["choices"], t["labels"])):
            out.append({"id": f"tqa_{q:03d}_{c:02d}", "prompt": f"{r['question']} {cand}",
                        "answer": "true" if lab else "false", "choices": ["false", "true"], "question_index": q})
    return out


def _bigbench(config: str) -> list[dict]:
    out = []
    for split in ("validation", "train"):
        for i, r in enumerate(_load("tasksource/bigbench", config, split=split)):
            targets = r["targets"]
            rec = {"id": f"bb_{config}_{split}_{i}", "prompt": r["inputs"].removesuffix("Relation:").strip()
                   if config == "epistemic_reasoning" else r["inputs"].strip(), "answer": targets[0]}
            if config == "qa_wikidata":
                rec.update(choices=None, answers=targets, single_target=len(targets) == 1)
            else:
                rec["choices"] = ["entailment", "non-entailment"] if config == "epistemic_reasoning" else ["Yes", "No"]
            out.append(rec)
    return out


def _hotpot() -> list[dict]:
    return [{"id": f"hotpot_val_{i:04d}", "prompt": r["question"].strip(), "answer": r["answer"].strip(),
             "choices": None} for i, r in enumerate(_load("hotpot_qa", "fullwiki", split="validation"))]


def _counterfact() -> list[dict]:
    out = []
    for split in ("train", "test"):
        for r in _load("azhx/counterfact", split=split):
            rw = r["requested_rewrite"]
            prompts = [rw["prompt"].format(rw["subject"])] + list(r.get("paraphrase_prompts") or [])
            for j, p in enumerate(prompts):
                out.append({"id": f"cf_{r['case_id']}_{j}", "prompt": p.strip(), "answer": rw["target_true"]["str"],
                            "choices": None, "case_id": r["case_id"]})
    return out


HUB_TASKS = {
    "fever": _fever,
    "bias_in_bios_gender": lambda: _bios("gender"),
    "bias_in_bios_profession": lambda: _bios("profession"),
    "truthfulqa": _truthfulqa,
    "bigbench_epistemic_reasoning": lambda: _bigbench("epistemic_reasoning"),
    "bigbench_qa_wikidata": lambda: _bigbench("qa_wikidata"),
    "bigbench_causal_judgment": lambda: _bigbench("causal_judgment"),
    "hotpotqa": _hotpot,
    "counterfact": _counterfact,
}


def hub_records(name: str) -> list[dict]:
    """Schema records of task ``name`` built from its hub source."""
    if name not in HUB_TASKS:
        raise C2IError(f"unknown hub task {name!r}: use one of {', '.join(sorted(HUB_TASKS))}")
    return HUB_TASKS[name]()
