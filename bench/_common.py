"""What the bench scripts share. A script imports it as ``_common`` (``python bench/<script>.py`` puts bench/ first
on sys.path; the tests' import_bench does the same)."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
KERNELS = "c2i_fast.kernels"


def load_kernels():
    """c2i_fast.kernels: the installed package, or (an uninstalled checkout) ./kernels under that name. Once per
    process; an import that failed inside the package itself is re-raised, not hidden by the fallback."""
    if KERNELS in sys.modules:
        return sys.modules[KERNELS]
    try:
        return importlib.import_module(KERNELS)
    except Exception:
        if KERNELS in sys.modules:
            raise
    root = REPO / "kernels"
    spec = importlib.util.spec_from_file_location(KERNELS, root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[KERNELS] = mod
    spec.loader.exec_module(mod)
    return mod


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """Call ``fn`` once to warm up (caches, allocator, thread pool), then ``repeats`` timed times: the warm-up's
    return value and the fastest call's seconds (the least disturbed by the rest of the machine)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: at least one timed call")
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return result, best


@functools.lru_cache(maxsize=None)
def git_commit() -> str | None:
    """The checkout's short commit when this process first asked — when it imported this module (below), so a
    unit written hours later still names the code the process loaded, not a commit made meanwhile — "+dirty"
    when tracked files other than results and docs (bench/results/, docs/, *.md) differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results", ":(exclude)docs", ":(exclude)*.md"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_layers(spec: str | None) -> tuple | None:
    """'17-27' or '17,18,27' → a tuple of layer indices; None/'' → None (every layer)."""
    if not spec:
        return None
    if "-" in spec:
        lo, hi = (int(x) for x in spec.split("-"))
        return tuple(range(lo, hi + 1))
    return tuple(int(x) for x in spec.split(","))


def scanned_selection(model: str, lm, task_name: str, samples: int):
    """What ``c2i adapt`` at its defaults has before its candidates, on draw 0 of ``task_name``: (config, the
    selection Scorer, every target matrix, the scan's top-K). Imports c2i_fast (and torch) when called."""
    from c2i_fast.models import target_matrices
    from c2i_fast.pipeline import AdaptConfig, _scorer
    from c2i_fast.scan import scan
    from c2i_fast.tasks import check_tokenization, load_task, split
    cfg = AdaptConfig(model=model, task=task_name, out="-", samples=samples)
    task = check_tokenization(load_task(task_name), lm.tokenizer)
    rows = split(task, cfg.samples, cfg.test_size, cfg.seed, n_confirm=cfg.confirm_size)["select"]
    sel = _scorer(lm, task, rows, cfg)
    refs = target_matrices(lm.model)
    top = scan(sel, refs, list(cfg.rank_fractions), cfg.top_k, progress=False, svd=cfg.scan_svd).top(cfg.top_k)
    return cfg, sel, refs, top


git_commit()        # asked at import: every bench imports this module as it starts
