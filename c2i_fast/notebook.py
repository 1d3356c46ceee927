"""Adapt a model you already have loaded (a notebook, a script): ``c2i_fast.adapt(model, tokenizer, train)``.

    import c2i_fast
    res = c2i_fast.adapt(model, tokenizer, "fever", test_size=300)     # or a list of dicts, a Dataset, a .jsonl
    res                                 # in Jupyter: the summary table; res.report is report.json's dict
    res.apply()                         # the plan's factored modules swapped into `model` (res.restore() undoes)
    res.save("runs/fever")              # plan.json + adapted.safetensors + report.json, only when asked

The same run as ``c2i adapt`` (same scan, search, shipping rule and numbers for the same rows and options), on
the model object you pass: CPU, one GPU or an accelerate device map, left as it was found unless ``apply()`` is
called. Nothing is written unless ``save`` / ``to_html(path)`` is asked for. Progress bars are tqdm.auto's,
which render in Jupyter.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .errors import C2IError
from .io import atomic_write_text
from .plan import Plan


@dataclass
class AdaptResult:
    """What :func:`adapt_loaded` found. ``report`` is the dict ``c2i adapt`` writes as report.json; ``plan`` the
    shipped plan (no edits: the base model was kept — ``report["decision"]["reason"]`` says why)."""
    model: nn.Module
    tokenizer: object
    report: dict
    plan: Plan
    applied: bool = field(default=False, init=False)

    @property
    def selection(self) -> dict:
        return self.report["selection"]

    @property
    def held_out(self) -> dict:
        """Base and adapted metrics on the held-out rows, their paired difference and the answers changed."""
        return self.report["test"]

    def apply(self) -> nn.Module:
        """Swap the plan's factored modules into the model (the same factors the search scored: the plan is a
        complete recipe) and return it. No edits: the model is left as it is."""
        from .transform import factorize_
        if self.plan.edits and not self.applied:
            factorize_(self.model, self.plan)
            self.applied = True
        return self.model

    def restore(self) -> nn.Module:
        """Put the original modules back."""
        from .transform import restore_
        if self.applied:
            restore_(self.model, [e.matrix for e in self.plan.edits])
            self.applied = False
        return self.model

    def save(self, directory: str | os.PathLike) -> Path:
        """plan.json, adapted.safetensors (the factored matrices only; none when nothing shipped) and
        report.json in ``directory``; ``c2i eval --adapted`` / ``c2i_fast.load_adapted`` read it."""
        from .artifacts import fingerprint, save_adapted
        directory = Path(directory)
        if self.plan.edits:
            was = self.applied
            self.apply()
            try:
                save_adapted(self.model, self.plan, directory)
            finally:
                if not was:
                    self.restore()
        else:
            self.plan.fingerprint = fingerprint(self.model)
            self.plan.save(directory / "plan.json")
        atomic_write_text(directory / "report.json", json.dumps(self.report, indent=2, default=str) + "\n")
        return directory

    def summary(self) -> str:
        from .report import summary_table
        return summary_table(self.report)

    def to_html(self, path: str | os.PathLike | None = None) -> str:
        """The report page (HTML with its figures embedded); written to ``path`` when given."""
        from .report import render_report
        with tempfile.TemporaryDirectory() as d:
            atomic_write_text(Path(d) / "report.json", json.dumps(self.report, default=str))
            page = render_report(d).read_text()            # the index.html it wrote
        if path is not None:
            atomic_write_text(Path(path), page)
        return page

    def _repr_html_(self) -> str:           # Jupyter shows the summary table
        import html
        return f"<pre>{html.escape(self.summary())}</pre>"

    def __repr__(self) -> str:
        edits = ", ".join(f"{e.matrix} ρ={e.rank_fraction} k={e.n_clusters}" for e in self.plan.edits)
        return f"AdaptResult(plan=[{edits or 'base model kept'}], shipped={bool(self.plan.edits)})"


def as_task(data, name: str = "user", kind: str | None = None, data_dir: str | None = None):
    """A :class:`~c2i_fast.tasks.Task` from a task name, ``hf:NAME``, a .jsonl path, a list of dicts or a
    ``datasets.Dataset`` (records with the JSONL fields)."""
    from .tasks import Task, from_records, load_task
    if isinstance(data, Task):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_task(str(data), data_dir, kind)
    if hasattr(data, "__iter__") and not isinstance(data, dict):
        return from_records(data, name=name, kind=kind)
    raise C2IError(f"cannot read a task from {type(data).__name__}: give a task name, a .jsonl path, a list of "
                   "dicts or a datasets.Dataset")


def adapt_loaded(model: nn.Module, tokenizer, train, *, test=None, out: str | os.PathLike | None = None,
                 name: str | None = None, kind: str | None = None, **options) -> AdaptResult:
    """Run ``c2i adapt`` on a loaded ``transformers`` model. ``train``: where selection (and confirmation) rows
    come from; ``test``: the held-out rows (default: split from ``train``, as ``c2i adapt`` does). ``options``
    are :class:`~c2i_fast.config.AdaptConfig` fields (``samples``, ``test_size``, ``top_k``, ``rule``, …).
    ``out``: also keep the run's files there (journal, so ``--resume`` works); default: nothing written."""
    from .config import AdaptConfig
    from .models import LoadedModel
    from .pipeline import adapt as run
    for bad in ("model", "task", "out"):
        if bad in options:
            raise C2IError(f"adapt(model, tokenizer, train, …): {bad!r} is given by the arguments, not an option")
    options.setdefault("metrics_cache", out is not None)     # nothing written unless asked
    options.setdefault("scan_cache", "on" if out is not None else "off")
    task = as_task(train, name or "user", kind, options.get("data_dir"))
    held = None if test is None else as_task(test, (name or "user") + "-test", kind or task.kind).examples
    model_id = name or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
    lm = LoadedModel(model, tokenizer, str(model_id), is_masked_lm=type(model).__name__.endswith("ForMaskedLM"))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AdaptConfig(model=str(model_id), task=task.name, out=str(out) if out is not None else str(Path(tmp) / "run"),
                          **options)
        report = run(cfg, lm=lm, task=task, test=held)
    return AdaptResult(model, tokenizer, report, Plan.from_json({"edits": report["plan"],
                                                                 "base_model": str(model_id)}))


def adapt(model_or_config, tokenizer=None, train=None, **options):
    """``c2i_fast.adapt``: ``adapt(model, tokenizer, train, test=…, **options)`` → :class:`AdaptResult` on a
    loaded model (:func:`adapt_loaded`), or ``adapt(AdaptConfig(…))`` → the report dict, as ``c2i adapt``."""
    from .config import AdaptConfig
    if isinstance(model_or_config, AdaptConfig):
        from .pipeline import adapt as run
        return run(model_or_config, **options)
    if tokenizer is None or train is None:
        raise C2IError("adapt(model, tokenizer, train, …) needs the tokenizer and the training examples")
    return adapt_loaded(model_or_config, tokenizer, train, **options)
