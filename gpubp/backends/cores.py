"""How many cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

``os.cpu_count()`` counts the machine's cores, not the ones a container or ``taskset`` leaves
to this process; a thread pool sized by it oversubscribes the cores it may really use.
"""

from __future__ import annotations

import math
import os
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
