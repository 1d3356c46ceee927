"""Tasks: the LASER benchmarks (+ BigBench causal judgment) and user JSONL files, with the project's templates.

Data files follow one schema (shared/data/README.md)::

    {"id": str, "prompt": str, "answer": str, "choices": [str, ...] | null, "source": str, ...extras}

``prompt`` is the raw input; the templates below turn it into the text the model sees (LASER's prompts,
shared/METHOD.md §2.4). Three kinds of task:

* ``classification`` — score each choice (with a leading space) after the prompt by its log-probability,
  summed and length-normalised; the prediction is the argmax.
* ``recall`` — greedy exact match under teacher forcing: correct when every gold answer token is the top-1
  prediction given the gold prefix, i.e. greedy decoding begins with the answer. For single-token answers this
  is LASER's top-1 next-token match (its GPT-J CounterFact metric); it needs one forward pass, no generation.
* ``generation`` — greedy generation of ``max_new_tokens``; correct when a gold answer is a substring of the
  *generated continuation only* (lower-cased, stripped). LASER decoded prompt+continuation, which can count an
  answer that appears in the question; we do not (METHOD.md §2.4, "Bug to be aware of").

Every task also reports the mean answer log-loss −(Σ log p(answer tokens))/len and the majority baseline.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import C2IError

REQUIRED_FIELDS = ("id", "prompt", "answer")


@dataclass
class Example:
    id: str
    prompt: str                      # templated prompt, exactly what the model sees
    target: str                      # gold continuation as scored, with its leading space
    choices: list[str] | None = None  # scored continuations (leading space) for classification
    label: int | None = None         # index of the gold choice
    answers: list[str] = field(default_factory=list)  # acceptable strings for generation substring match
    group: str = ""                  # examples of one group never straddle splits (e.g. one CounterFact fact)


@dataclass
class TaskSpec:
    name: str
    kind: str                                  # classification | recall | generation
    template: Callable[[dict], str]
    max_new_tokens: int = 10
    group_key: str | None = None               # record field that groups examples (no leakage across splits)
    keep: Callable[[dict], bool] | None = None  # record filter (e.g. LASER's single-target WikidataQA)
    max_answer_tokens: int | None = None       # LASER's HotpotQA filter (≤ 15 tokens)
    file: str | None = None


def _period(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."


def _hotpot(r: dict) -> str:
    q = r["prompt"].strip()
    return f"{q} The answer is" if q.endswith(("?", ".")) else f"{q}? The answer is"


_EPISTEMIC_PREFIX = ("Identify the relation between the following premises and hypotheses, choosing from the "
                     "options 'entailment' or 'non-entailment'.\n\n")
_CAUSAL_PREFIX = "How would a typical person answer each of the following questions about causation?\n\n"

TASKS: dict[str, TaskSpec] = {s.name: s for s in [
    TaskSpec("fever", "classification",
             lambda r: f"Consider the following claim: {_period(r['prompt'])} Is this claim true or false. "
                       f"The claim is"),
    TaskSpec("bias_in_bios_gender", "classification",
             lambda r: f"Consider the following text: {_period(r['prompt'])} Is the person in this text a male "
                       f"or female? The gender of this person is"),
    TaskSpec("bias_in_bios_profession", "classification",
             lambda r: f"Consider the following text: {_period(r['prompt'])} What is the profession of the "
                       f"person in this text? The profession of this person is"),
    # LASER's code glues "Is" to the statement with no space; we keep the space (one token boundary cleaner).
    TaskSpec("truthfulqa", "classification",
             lambda r: f"{_period(r['prompt'])} Is this statement true or false? This statement is",
             group_key="question_index"),
    TaskSpec("bigbench_epistemic_reasoning", "classification",
             lambda r: f"{_EPISTEMIC_PREFIX}{r['prompt'].strip()}\nRelation:"),
    TaskSpec("bigbench_causal_judgment", "classification",
             lambda r: f"{_CAUSAL_PREFIX}{r['prompt'].strip()}\nA:"),
    TaskSpec("counterfact", "recall", lambda r: r["prompt"].strip(), group_key="case_id"),
    TaskSpec("counterfact_rewrite_all", "recall", lambda r: r["prompt"].strip(), group_key="case_id"),
    TaskSpec("hotpotqa", "generation", _hotpot, max_new_tokens=15, max_answer_tokens=15),
    TaskSpec("bigbench_qa_wikidata", "generation", lambda r: r["prompt"].strip(), max_new_tokens=10,
             keep=lambda r: r.get("single_target", True)),
]}
for _name in TASKS:
    TASKS[_name].file = f"{_name}.jsonl"


@dataclass
class Task:
    spec: TaskSpec
    examples: list[Example]
    source: str                      # the file the records came from

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def data_dir(explicit: str | None = None) -> Path:
    """--data-dir, else $C2I_DATA, else a ``shared/data`` beside or above the working directory / package."""
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_dir():
            raise C2IError(f"--data-dir {explicit}: not a directory")
        return p
    if os.environ.get("C2I_DATA"):
        p = Path(os.environ["C2I_DATA"]).expanduser()
        if not p.is_dir():
            raise C2IError(f"C2I_DATA={p}: not a directory")
        return p
    here = Path(__file__).resolve().parent
    for base in [Path.cwd(), *Path.cwd().parents, here, *here.parents]:
        for cand in (base / "shared" / "data", base / "data"):
            if (cand / "manifest.json").is_file():
                return cand
    raise C2IError("no data directory: pass --data-dir or set C2I_DATA to the folder holding manifest.json")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read and validate a schema JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise C2IError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise C2IError(f"data file {path} is unreadable: {e}") from e
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise C2IError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        records.append((lineno, rec))
    return validate_records(records, str(path))


def validate_records(records: list[tuple[int, object]], source: str) -> list[dict]:
    """Check (line number, record) pairs against the schema; errors name ``source`` and the line."""
    out, seen = [], set()
    for lineno, rec in records:
        if not isinstance(rec, dict):
            raise C2IError(f"{source}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in REQUIRED_FIELDS if k not in rec]
        if missing:
            raise C2IError(f"{source}:{lineno}: record is missing field(s) {missing}")
        for k in ("prompt", "answer"):
            if not isinstance(rec[k], str):
                raise C2IError(f"{source}:{lineno}: field {k!r} must be a string")
        ch = rec.get("choices")
        if ch is not None:
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
                raise C2IError(f"{source}:{lineno}: 'choices' must be null or a list of ≥ 2 non-empty strings")
            if rec["answer"] not in ch:
                raise C2IError(f"{source}:{lineno}: answer {rec['answer']!r} is not among choices {ch}")
        rid = str(rec["id"])
        if rid in seen:
            raise C2IError(f"{source}:{lineno}: duplicate id {rid!r}")
        seen.add(rid)
        rec["_line"] = lineno
        out.append(rec)
    if not out:
        raise C2IError(f"data file {source} holds no records (empty task)")
    return out


def _user_spec(path: Path, records: list[dict], kind: str | None, name: str | None = None) -> TaskSpec:
    has_choices = records[0].get("choices") is not None
    if any((r.get("choices") is not None) != has_choices for r in records):
        raise C2IError(f"{path}: mix of records with and without 'choices'")
    kind = kind or ("classification" if has_choices else "recall")
    return TaskSpec(name or path.stem, kind, lambda r: r["prompt"].strip())


def from_records(records, name: str = "user", kind: str | None = None) -> Task:
    """A task from records already in memory: a list of dicts or a ``datasets.Dataset`` with the JSONL fields
    (``id``, ``prompt``, ``answer``, optional ``choices`` / ``answers``; see README "Getting the tasks").
    Errors name ``name`` and the record's 1-based position."""
    if kind is not None and kind not in ("classification", "recall", "generation"):
        raise C2IError(f"kind {kind!r}: choose classification, recall or generation")
    rows = [dict(r) for r in records]
    if not rows:
        raise C2IError(f"{name}: no records")
    source = f"<{name}>"
    checked = validate_records(list(enumerate(rows, start=1)), source)
    return _build(_user_spec(Path(source), checked, kind, name), checked, source)


def load_task(name_or_path: str, data_dir_: str | None = None, kind: str | None = None) -> Task:
    """A task by manifest name (``fever``, ``counterfact``, …) or a path to a user JSONL file.

    ``kind`` overrides the task kind of a user file (classification | recall | generation).
    """
    if kind is not None and kind not in ("classification", "recall", "generation"):
        raise C2IError(f"--metric {kind!r}: choose classification, recall or generation")
    p = Path(name_or_path).expanduser()
    if name_or_path.startswith("hf:"):
        from .hub import hub_records
        name = name_or_path[3:]
        if name not in TASKS:
            raise C2IError(f"unknown task {name_or_path!r}: use hf:<name> with one of {', '.join(sorted(TASKS))}")
        spec = TASKS[name]
        path = f"hub:{name}"
        records = validate_records(list(enumerate(hub_records(name), start=1)), path)
    elif name_or_path in TASKS:
        spec = TASKS[name_or_path]
        path = data_dir(data_dir_) / spec.file
        records = read_jsonl(path)
    elif p.suffix == ".jsonl" or p.exists():
        path = p
        records = read_jsonl(path)
        spec = _user_spec(path, records, kind)
    else:
        raise C2IError(f"unknown task {name_or_path!r}: use one of {', '.join(sorted(TASKS))} or a .jsonl path")
    return _build(spec, records, str(path))


def _build(spec: TaskSpec, records: list[dict], source: str) -> Task:
    """Examples from checked records: the spec's template, answers with their leading space, groups."""
    path = source
    if spec.keep is not None:
        records = [r for r in records if spec.keep(r)]
    examples = []
    for r in records:
        choices = r.get("choices")
        if spec.kind == "classification" and choices is None:
            raise C2IError(f"{path}:{r['_line']}: classification task needs 'choices'")
        ex = Example(
            id=str(r["id"]),
            prompt=spec.template(r),
            target=" " + r["answer"].strip(),
            choices=[" " + c.strip() for c in choices] if choices else None,
            label=choices.index(r["answer"]) if choices else None,
            answers=[a for a in (r.get("answers") or [r["answer"]]) if isinstance(a, str) and a.strip()],
            group=str(r.get(spec.group_key, r["id"])) if spec.group_key else str(r["id"]),
        )
        if not ex.answers:
            raise C2IError(f"{path}:{r['_line']}: empty answer")
        examples.append(ex)
    return Task(spec, examples, str(path))


def check_tokenization(task: Task, tokenizer) -> Task:
    """Apply the task's answer-length filter and refuse answers that tokenize to zero tokens."""
    keep = []
    limit = task.spec.max_answer_tokens
    for ex in task.examples:
        conts = ex.choices if ex.choices else [ex.target]
        for c in conts:
            if len(tokenizer(c, add_special_tokens=False).input_ids) == 0:
                raise C2IError(f"{task.source}: example {ex.id!r}: answer {c!r} tokenizes to zero tokens")
        if limit is not None and len(tokenizer(ex.target, add_special_tokens=False).input_ids) > limit:
            continue
        keep.append(ex)
    if not keep:
        raise C2IError(f"{task.source}: no example left after the answer-length filter")
    return Task(task.spec, keep, task.source)


# ---------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------
def split(task: Task, n_select: int = 100, n_test: int | None = 500, seed: int = 0, n_val: int = 0,
          draw: int = 0, n_draws: int = 1, n_confirm: int = 0) -> dict[str, list[Example]]:
    """Deterministic, non-overlapping splits from a seed: ``select`` (n_select), ``val`` (n_val), ``test``,
    ``confirm`` (up to n_confirm: fewer, or none, where the task runs out).

    Groups (one CounterFact fact, one TruthfulQA question) are shuffled as units; a group cut by a split
    boundary has its remaining members dropped, so no group straddles two splits. ``draw`` takes the
    draw-th of ``n_draws`` disjoint selection samples of the same shuffle (for --draws): all draws come first,
    then val, then test, so every draw is judged on the same held-out set. The confirmation rows come last, so
    asking for them leaves the selection and held-out rows of a seed exactly as they were.
    """
    if not 0 <= draw < max(1, n_draws):
        raise C2IError(f"draw {draw} is outside [0, {n_draws})")
    if n_select < 1:
        raise C2IError(f"--samples must be ≥ 1, got {n_select}")
    groups: dict[str, list[Example]] = {}
    for ex in task.examples:
        groups.setdefault(ex.group, []).append(ex)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    pos = 0

    def take(n: int | None) -> list[Example]:
        nonlocal pos
        out: list[Example] = []
        while pos < len(keys) and (n is None or len(out) < n):
            out.extend(groups[keys[pos]])
            pos += 1
        return out[:n] if n is not None else out

    samples = [take(n_select) for _ in range(max(1, n_draws))]
    select = samples[draw]
    val = take(n_val) if n_val else []
    test = take(n_test)
    if len(select) < n_select:
        raise C2IError(f"task {task.name} has {len(task.examples)} examples: too few for --samples {n_select}"
                       + (f" (draw {draw})" if draw else ""))
    if not test:
        raise C2IError(f"task {task.name}: no examples left for the held-out test set")
    confirm = take(n_confirm) if n_confirm else []
    return {"select": select, "val": val, "test": test, "confirm": confirm}


def split_with_test(task: Task, test: list[Example], n_select: int = 100, seed: int = 0, draw: int = 0,
                    n_draws: int = 1, n_confirm: int = 0) -> dict[str, list[Example]]:
    """:func:`split` of ``task`` into selection draws and confirmation rows, with the held-out rows given
    (``test``, e.g. a user's own test set). Rows of ``task`` whose id or prompt is also in ``test`` are left out,
    so nothing is selected on a held-out row."""
    if not test:
        raise C2IError("the held-out test set is empty")
    held = {e.id for e in test} | {e.prompt for e in test}
    train = Task(task.spec, [e for e in task.examples if e.id not in held and e.prompt not in held], task.source)
    if not train.examples:
        raise C2IError(f"task {task.name}: every training row is also a test row")
    parts = split(train, n_select, None, seed, draw=draw, n_draws=n_draws)
    rest = parts["test"]            # what the selection draws left, in the seed's order
    return {"select": parts["select"], "val": [], "test": list(test), "confirm": rest[:n_confirm]}


def majority_baseline(examples: list[Example]) -> dict:
    """Rate of the most frequent gold label (classification) or answer string (others) in ``examples``.

    With choices, the gold label is a position in the row's choice list. When every row has the same choices
    the label is that choice's text ("true"); when choices differ per row (a multiple-choice task) the
    baseline is "always answer position i", labelled "position i". ``chance`` is the mean of 1/#choices
    (classification only)."""
    if not examples:
        return {"label": None, "accuracy": float("nan")}
    counts = Counter(ex.label if ex.label is not None else ex.target.strip().lower() for ex in examples)
    label, n = counts.most_common(1)[0]
    out = {"label": label, "accuracy": n / len(examples)}
    if examples[0].choices is not None:
        same = all(ex.choices == examples[0].choices for ex in examples)
        out["label"] = examples[0].choices[label].strip() if same else f"position {label}"
        out["chance"] = sum(1 / len(ex.choices) for ex in examples) / len(examples)
    return out
