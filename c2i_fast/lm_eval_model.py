"""lm-evaluation-harness bridge: the ``c2i`` model type, and lm-eval tasks as our JSONL.

Model — :class:`C2ILM` is lm-eval's ``HFLM`` handed an already-built model: the base loaded by
:func:`~c2i_fast.models.load_model` (aliases such as ``smollm2``, GGUF, a directory or a hub id), then, with
``adapted=DIR``, the saved factored modules swapped in by :func:`~c2i_fast.artifacts.load_adapted`. The harness
runs the factored model itself; no dense checkpoint is written::

    python -m c2i_fast.lm_eval_model --model c2i --model_args pretrained=smollm2,adapted=out \\
        --tasks my_task --include_path my_tasks/ --device cpu

lm-eval 0.4.13 finds models only in its own registry (``lm_eval.models.MODEL_MAPPING`` plus whatever
``@register_model`` ran in the process; it reads no plugin entry points, and ``--include_path`` indexes task
YAML only), so ``c2i`` exists once this module is imported: ``python -m c2i_fast.lm_eval_model`` imports it and
runs lm-eval's own command line (:func:`main`); from Python, import the module before
``lm_eval.simple_evaluate(model="c2i", ...)`` or pass a :class:`C2ILM` instance.

Tasks — :func:`task_to_jsonl` writes an lm-eval task's evaluation docs as records of our schema
(:mod:`c2i_fast.tasks`), so a user's lm-eval task (a YAML over local files) can be our ``--task``::

    python -c "from c2i_fast.lm_eval_model import task_to_jsonl as t; t('my_task.yaml', 'my_task.jsonl')"

A multiple-choice doc becomes ``{"prompt": context, "choices": [...], "answer": gold choice}``; our loader scores
``prompt.strip() + " " + choice.strip()``, which is the text lm-eval scores (context + target_delimiter + choice)
when the delimiter is one space and neither side has extra spaces: the converter checks that for every choice
and refuses a task where it does not hold, rather than write a task that scores different text.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .errors import C2IError

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("c2i_fast.lm_eval_model needs lm-evaluation-harness: pip install 'c2i_fast[lmeval]'") from e

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FEWSHOT_SEED = 1234      # lm-eval's default fewshot_random_seed (simple_evaluate), for converted few-shot prompts


def resolve_device(device: str | None) -> str:
    """The device to load on. lm-eval's command line passes ``cuda:0`` unless told otherwise; like HFLM, a CUDA
    device on a machine without one falls back to the CPU (and None means cuda when available)."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


@register_model("c2i")
class C2ILM(HFLM):
    """HFLM over a c2i_fast model: ``pretrained`` is a :func:`~c2i_fast.models.load_model` spec (or an
    already-loaded ``PreTrainedModel``, then ``tokenizer`` is required), ``adapted`` a directory written by
    ``c2i adapt`` / ``c2i apply`` / :func:`~c2i_fast.artifacts.save_adapted`, applied in place (to a pre-built
    model too: ``restore_`` it afterwards to get the base back).

    ``dtype`` (float32 | bfloat16 | float16) and ``device`` (:func:`resolve_device`) are how the model is
    loaded; every other keyword (``batch_size``, ``max_length``, ``add_bos_token``, ...) goes to ``HFLM``.
    """

    def __init__(self, pretrained="smollm2", adapted: str | None = None, dtype: str | torch.dtype = "float32",
                 device: str | None = None, tokenizer=None, **kwargs):
        if isinstance(pretrained, str):
            from .models import load_model
            if isinstance(dtype, str):
                if dtype not in DTYPES:
                    raise C2IError(f"dtype={dtype!r}: choose {', '.join(DTYPES)}")
                dtype = DTYPES[dtype]
            device = resolve_device(device)
            lm = load_model(pretrained, dtype=dtype, device=device)
            model, tokenizer = lm.model, tokenizer if tokenizer is not None else lm.tokenizer
        else:
            if tokenizer is None:
                raise C2IError("C2ILM: a pre-built model needs its tokenizer (tokenizer=...)")
            model = pretrained
        if getattr(model.config, "is_encoder_decoder", False) or any(
                a.endswith("ForMaskedLM") for a in (getattr(model.config, "architectures", None) or [])):
            raise C2IError(f"C2ILM scores causal LMs only; {pretrained!r} is not one")
        if adapted:
            from .artifacts import load_adapted
            load_adapted(model, adapted)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **kwargs)
        self.c2i_spec = pretrained if isinstance(pretrained, str) else type(model).__name__
        self.c2i_adapted = str(adapted) if adapted else None

    def get_model_info(self) -> dict:
        """What the results JSON records about the model: our spec and adapted directory (HFLM's own lookup
        of hub revisions/hashes needs a hub id, which an alias or a pre-built model is not)."""
        n_params = sum(p.numel() for p in self.model.parameters())
        return {"model_num_parameters": n_params, "model_dtype": str(next(self.model.parameters()).dtype),
                "c2i_model": self.c2i_spec, "c2i_adapted": self.c2i_adapted}


# ---------------------------------------------------------------------------------------------------------
# lm-eval task → our JSONL
# ---------------------------------------------------------------------------------------------------------
def load_lm_eval_task(task_name_or_yaml: str, include_path: str | list[str] | None = None,
                      include_defaults: bool = True):
    """The one lm-eval ``Task`` named by a registered name or a YAML path (its folder is searched too, for
    ``include:``-d base configs)."""
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    spec = task_name_or_yaml
    if Path(spec).suffix in (".yaml", ".yml") and Path(spec).is_file():
        spec = str(Path(spec).resolve())
        paths.append(str(Path(spec).parent))
    manager = TaskManager(include_path=paths or None, include_defaults=include_defaults)
    try:
        if hasattr(manager, "load"):            # lm-eval 0.4.13: flat {name: Task}
            tasks = manager.load(spec)["tasks"]
        else:                                   # older 0.4.x: nested {group: {name: Task}}
            from lm_eval.tasks import get_task_dict
            tasks = dict(_leaf_tasks(get_task_dict([spec], manager)))
    except (KeyError, ValueError) as e:
        raise C2IError(f"lm-eval task {task_name_or_yaml!r}: {e}") from e
    if len(tasks) != 1:
        raise C2IError(f"lm-eval {task_name_or_yaml!r} is a group of {len(tasks)} tasks ({', '.join(sorted(tasks))}):"
                       " convert one task at a time")
    return next(iter(tasks.values()))


def _leaf_tasks(tree: dict):
    """(name, Task) of every leaf of lm-eval's nested task dict (older ``get_task_dict``)."""
    for name, v in tree.items():
        if isinstance(v, dict):
            yield from _leaf_tasks(v)
        else:
            yield str(name), v


def _mc_record(task, doc: dict, ctx: str, rid: str) -> dict:
    choices = [str(c) for c in task.doc_to_choice(doc)]
    gold = task.doc_to_target(doc)
    if isinstance(gold, str):       # a target given as the choice text
        gold = choices.index(gold) if gold in choices else int(gold)
    if isinstance(gold, list):
        raise C2IError(f"lm-eval task {task.task_name}: doc {rid} has several gold choices {gold}; our records"
                       " take one")
    delim = task.config.target_delimiter
    prompt = ctx.strip()
    for c in choices:               # lm-eval scores ctx + delim + c; our loader prompt.strip() + " " + c.strip()
        if ctx + delim + c != prompt + " " + c.strip():
            raise C2IError(
                f"lm-eval task {task.task_name}: doc {rid} scores {(ctx + delim + c)[-60:]!r} (context + "
                f"target_delimiter {delim!r} + choice {c!r}); our format scores prompt.strip() + ' ' + "
                "choice.strip(), which differs: give the task target_delimiter ' ' and no spaces around the "
                "context end / choices")
    return {"id": rid, "prompt": prompt, "answer": choices[gold], "choices": choices}


def task_to_jsonl(task_name_or_yaml: str, out: str | Path, include_path: str | list[str] | None = None,
                  num_fewshot: int | None = None, include_defaults: bool = True) -> Path:
    """Write an lm-eval task's evaluation docs (its test split, else validation) as our JSONL records.

    ``prompt`` is the full context lm-eval would build at ``num_fewshot`` (default: the task's own; few-shot
    examples drawn with lm-eval's default seed 1234), so ``c2i adapt --task out.jsonl`` selects on the same
    text ``lm_eval`` evaluates. Multiple-choice tasks give ``choices`` and the gold ``answer`` (checked to score
    the same continuation text, see the module docstring); generation / loglikelihood tasks give the target as
    ``answer`` (``answers`` when several) and ``choices: null``, for ``--metric generation`` or ``recall``.
    Returns ``out``.
    """
    task = load_lm_eval_task(task_name_or_yaml, include_path, include_defaults)
    if task.multiple_input:
        raise C2IError(f"lm-eval task {task.task_name}: choices placed in the context (multiple inputs, e.g."
                       " winogrande) have no equivalent in our records")
    shots = (task.config.num_fewshot or 0) if num_fewshot is None else num_fewshot
    task.set_fewshot_seed(FEWSHOT_SEED)
    records = []
    for i, doc in enumerate(task.eval_docs):
        rid = f"{task.task_name}_{i}"
        ctx = task.fewshot_context(doc, shots)
        if task.OUTPUT_TYPE == "multiple_choice":
            rec = _mc_record(task, doc, ctx, rid)
        else:
            target = task.doc_to_target(doc)
            answers = [str(t) for t in target] if isinstance(target, list) else [str(target)]
            rec = {"id": rid, "prompt": ctx.strip(), "answer": answers[0].strip(), "choices": None}
            if len(answers) > 1:
                rec["answers"] = answers
        rec["source"] = f"lm_eval:{task.task_name}"
        records.append(rec)
    if not records:
        raise C2IError(f"lm-eval task {task.task_name} has no evaluation docs")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m c2i_fast.lm_eval_model ARGS``: lm-eval's command line (``lm_eval ARGS``) with ``c2i``
    registered."""
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
