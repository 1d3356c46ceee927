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


def _stat(*cpus: tuple[int, int]) -> str:
    """A /proc/stat with one line per CPU from (busy, idle) ticks (busy as user time, idle as idle)."""
    total = [sum(c[0] for c in cpus), sum(c[1] for c in cpus)]
    lines = [f"cpu  {total[0]} 0 0 {total[1]} 0 0 0 0 0 0"]
    lines += [f"cpu{i} {b} 0 0 {i_} 0 0 0 0 0 0" for i, (b, i_) in enumerate(cpus)]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 99", ""])


@pytest.fixture
def proc(monkeypatch, tmp_path):
    """Serve /proc/stat snapshots in turn (and /proc/loadavg) from files; no real sleeping."""
    snaps, real_open = [], open
    monkeypatch.setattr(openmp.time, "sleep", lambda s: None)

    def fake_open(path, *a, **k):
        if path in ("/proc/stat", "/proc/loadavg"):
            f = tmp_path / path.rsplit("/", 1)[1]
            if path == "/proc/stat":
                if not snaps:
                    raise OSError("no /proc/stat")
                f.write_text(snaps.pop(0))
            elif not f.exists():
                raise OSError("no /proc/loadavg")
            return real_open(f, *a, **k)
        return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", fake_open)
    return snaps


def test_busy_cores_are_watched_on_our_cpus_only(monkeypatch, proc):
    """Over the sample CPU 0 ran 30 of 30 ticks, CPU 1 15 of 30, CPU 2 (not ours) 30 of 30: 1.5 busy of ours."""
    monkeypatch.setattr(openmp, "_affinity", lambda: {0, 1})
    monkeypatch.setattr(openmp.os, "getloadavg", lambda: (9.0, 9.0, 9.0))   # the lagging average is not read
    proc += [_stat((100, 100), (100, 100), (5, 5)), _stat((130, 100), (115, 115), (35, 5))]
    assert openmp.busy_cpus(2) == pytest.approx(1.5)


def test_a_job_that_just_ended_no_longer_counts(monkeypatch, proc):
    """The 1-minute average still says 2 busy cores after a job ended; the cores themselves are idle now."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(openmp, "_affinity", lambda: {0, 1})
    monkeypatch.setattr(openmp.os, "getloadavg", lambda: (2.0, 1.9, 1.8))
    proc += [_stat((500, 100), (500, 100)), _stat((501, 129), (500, 130))]
    assert openmp.busy_cpus(2) == pytest.approx(2 * 1 / 60)
    proc += [_stat((500, 100), (500, 100)), _stat((501, 129), (500, 130))]
    assert openmp.choose_wait_policy(2) == "default"


def test_no_proc_stat_and_no_load_average_is_the_cautious_choice(monkeypatch, proc):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)

    def missing():
        raise OSError("no load average")
    monkeypatch.setattr(openmp.os, "getloadavg", missing)
    assert openmp.busy_cpus(8) == 8.0 and openmp.choose_wait_policy(1) == "PASSIVE"


def test_without_proc_stat_a_job_that_just_started_counts_before_the_average_sees_it(monkeypatch, proc, tmp_path):
    """The fallback: the 1-minute average lags; the tasks runnable now (besides ours) do not."""
    monkeypatch.setattr(openmp.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    (tmp_path / "loadavg").write_text("0.10 0.20 0.30 3/120 4242\n")     # ours + 2 runnable threads of another job
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
