"""c2i_fast.openmp.choose_wait_policy: spin (libgomp's default) on idle cores, PASSIVE when others use them,
the user's OMP_WAIT_POLICY always kept; chosen before torch loads (the CLI parses --threads without torch)."""
import subprocess
import sys

import pytest

from c2i_fast import openmp


@pytest.mark.parametrize("cpus, load, threads, expected", [
    (2, 0.1, None, "default"),        # an idle 2-core machine, every core ours
    (2, 0.6, None, "PASSIVE"),        # another job holds half a core
    (2, 2.0, 2, "PASSIVE"),           # a 2-thread neighbour
    (16, 3.0, 4, "default"),          # plenty of idle cores for 4 threads
    (16, 14.0, 4, "PASSIVE"),
    (2, 1.0, 1, "default"),           # one idle core, one thread
])
def test_policy_follows_the_idle_cores(monkeypatch, cpus, load, threads, expected):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(openmp, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(openmp, "busy_cpus", lambda n: load)
    assert openmp.choose_wait_policy(threads) == expected
    assert openmp.os.environ.get("OMP_WAIT_POLICY") == (None if expected == "default" else "PASSIVE")


def test_the_users_setting_wins(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(openmp.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert openmp.choose_wait_policy(2) == "ACTIVE"


def test_no_load_average_is_the_cautious_choice(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)

    def missing():
        raise OSError("no load average")
    monkeypatch.setattr(openmp.os, "getloadavg", missing)
    assert openmp.busy_cpus(8) == 8.0 and openmp.choose_wait_policy(1) == "PASSIVE"


def test_a_job_that_just_started_counts_before_the_average_sees_it(monkeypatch, tmp_path):
    """The 1-minute average lags; the tasks runnable now (besides ours) do not."""
    monkeypatch.setattr(openmp.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    real_open = open

    def fake_open(path, *a, **k):
        if path == "/proc/loadavg":
            f = tmp_path / "loadavg"
            f.write_text("0.10 0.20 0.30 3/120 4242\n")     # ours + 2 runnable threads of another job
            return real_open(f, *a, **k)
        return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", fake_open)
    assert openmp.busy_cpus(2) == 2


def test_the_cli_chooses_before_torch_loads():
    code = ("import sys, c2i_fast.cli as c\n"
            "try:\n    c.main(['adapt', '--threads', '1', '--bogus'])\nexcept SystemExit:\n    pass\n"
            "import c2i_fast.openmp\n")
    # main() must set the policy before build_parser imports torch: record the order with an import hook
    probe = ("import builtins, os, sys\nseen = []\nreal = builtins.__import__\n"
             "def hook(name, *a, **k):\n"
             "    if name == 'torch' and 'torch' not in sys.modules:\n"
             "        seen.append(os.environ.get('OMP_WAIT_POLICY', 'default') + '|' + str('c2i_fast.openmp' in sys.modules))\n"
             "    return real(name, *a, **k)\nbuiltins.__import__ = hook\n" + code + "print(seen[0])\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"})
    assert out.stdout.strip().endswith("|True"), out.stdout + out.stderr
