"""How many cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

``os.cpu_count()`` counts the machine's cores, not the ones a container or ``taskset`` leaves
to this process; a thread pool sized by it oversubscribes the cores it may really use.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup CPU quota in cores (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None if none."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def usable_cores(root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may run on: its affinity, capped by the cgroup quota (rounded
    up: a quota of 1.5 cores still lets two threads run), at least 1."""
    n = _affinity()
    quota = _quota(root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def cpu_times(stat: Path = Path("/proc/stat")) -> tuple[float, float, float] | None:
    """``(wall, busy, own)`` seconds now: a monotonic clock, the time the cores this process
    may run on have spent busy (everything but idle and I/O wait, from ``/proc/stat``), and
    this process's own CPU time. Two readings give how many of those cores other processes
    kept busy in between (:func:`free_cores`). None where ``/proc/stat`` cannot be read."""
    try:
        allowed = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        lines = stat.read_text().splitlines()
        tick = float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, OSError, ValueError):
        return None
    busy = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in allowed:
            numbers = [
                int(x) for x in fields[1:9]
            ]  # user nice system idle iowait irq softirq steal
            busy += sum(numbers) - numbers[3] - numbers[4]
    own = os.times()
    return time.monotonic(), busy / tick, own.user + own.system


def free_cores(
    before: tuple[float, float, float], after: tuple[float, float, float], cores: int
) -> float | None:
    """How many of ``cores`` other processes left free between two :func:`cpu_times`
    readings, on average; None over an interval too short to tell (under 0.1 s)."""
    wall = after[0] - before[0]
    if wall < 0.1:
        return None
    others = max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / wall
    return max(0.0, cores - others)
