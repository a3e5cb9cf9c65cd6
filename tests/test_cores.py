"""How many cores the process may use: affinity capped by a cgroup quota."""

from __future__ import annotations

import os

from gpubp.backends import cores


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_no_quota_means_the_affinity(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cores.usable_cores(tmp_path) == _affinity()
    assert cores.usable_cores(tmp_path / "missing") == _affinity()


def test_a_v2_quota_caps_the_affinity_rounded_up(tmp_path):
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a core still runs one thread
    assert cores.usable_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cores.usable_cores(tmp_path) == min(2, _affinity())


def test_a_v1_quota_caps_the_affinity(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cores.usable_cores(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert cores.usable_cores(tmp_path) == _affinity()


def test_a_malformed_quota_file_is_no_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert cores.usable_cores(tmp_path) == _affinity()
