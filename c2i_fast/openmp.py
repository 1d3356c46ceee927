"""OpenMP's idle-thread policy, chosen before torch loads (libgomp reads ``OMP_WAIT_POLICY`` once, at load).

Between two parallel regions libgomp's threads spin for a while (its default) or sleep (``PASSIVE``). On free
cores spinning is faster: the many small LAPACK calls of the scan and the candidate factorizations (eigh, SVD
of a 576-row matrix) each wake every thread. On cores another job is using, spinning threads take the cores
from the threads with work, and those same calls become many times slower. Measured on the 2-core CPU here
(a reduced CounterFact ``c2i adapt`` of SmolLM2, bench/bench_wait_policy.py, docs/results.md "OpenMP's wait
policy"): 47.3 s spinning vs 64.1 s PASSIVE on idle cores; 236.9 s spinning vs 73.0 s PASSIVE beside another
2-thread job. So: spin when the cores our threads need are idle, PASSIVE when they are not. No torch import.
"""
from __future__ import annotations

import argparse
import os
import time

BUSY_MARGIN = 0.5      # spin while idle cores (CPUs − busy_cpus) ≥ our threads − this
SAMPLE_SECONDS = 0.3   # how long busy_cpus watches the CPUs: a few of a busy neighbour's parallel regions


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_jiffies(cpu_ids: set[int] | None) -> tuple[int, int] | None:
    """(busy, total) clock ticks since boot summed over ``cpu_ids`` (every CPU when None), from /proc/stat's
    per-CPU lines (Linux); None where it cannot be read. Idle and iowait count as idle; user, nice, system, irq,
    softirq and steal (a core the hypervisor gave away is not ours either) as busy."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0
    seen = False
    for line in lines:
        name, *fields = line.split() or [""]
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        if cpu_ids is not None and int(name[3:]) not in cpu_ids:
            continue
        ticks = [int(x) for x in fields[:8]] + [0] * (8 - len(fields[:8]))
        user, nice, system, idle, iowait, irq, softirq, steal = ticks
        busy += user + nice + system + irq + softirq + steal
        total += user + nice + system + idle + iowait + irq + softirq + steal
        seen = True
    return (busy, total) if seen else None


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def busy_cpus(cpus: int) -> float:
    """How many of our ``cpus`` other work keeps busy. Measured over SAMPLE_SECONDS from the per-CPU times of the
    CPUs we may run on, while this process sleeps: it sees a job that started a moment ago and forgets one that
    just ended (the 1-minute load average lags both ways: a run started within a minute or two of another job's
    end chose PASSIVE on idle cores, which bench_wait_policy measured 1.36× slower). Where /proc/stat cannot be read: the larger of the 1-minute
    load average and the tasks runnable now besides this one (/proc/loadavg); ``cpus`` (all busy) where neither
    can be read: the cautious answer."""
    ids = _affinity()
    before = _cpu_jiffies(ids)
    if before is not None:
        time.sleep(SAMPLE_SECONDS)
        after = _cpu_jiffies(ids)
        if after is not None and after[1] > before[1]:
            n = len(ids) if ids else cpus
            return n * (after[0] - before[0]) / (after[1] - before[1])
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return float(cpus)
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        load = max(load, running - 1)
    except (OSError, ValueError, IndexError):
        pass
    return load


def choose_wait_policy(threads: int | None = None) -> str:
    """Set ``OMP_WAIT_POLICY`` unless the user did, and return the policy in force ("default": libgomp's own,
    which spins a while). PASSIVE when the idle cores (CPUs minus :func:`busy_cpus`, watched for SAMPLE_SECONDS)
    are fewer than ``threads``
    (default: every usable CPU) minus BUSY_MARGIN. Two runs started in the same instant on idle cores can both
    choose to spin: set ``OMP_WAIT_POLICY=PASSIVE`` for runs meant to share cores. Call before torch loads."""
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"]
    cpus = usable_cpus()
    load = busy_cpus(cpus)
    if cpus - load < (threads or cpus) - BUSY_MARGIN:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return "PASSIVE"
    return "default"


def threads_in(argv: list[str]) -> int | None:
    """The ``--threads N`` of a command line, parsed without the full parser (whose defaults import torch);
    None when absent or not a positive integer (the full parser reports a bad value)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads")
    value = pre.parse_known_args(argv)[0].threads
    return int(value) if value and value.isdigit() and int(value) > 0 else None
