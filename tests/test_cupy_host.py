"""The cupy backend's host code, run without a GPU against a NumPy fake of CuPy (see
tests/cupy_dryrun.py): kernel arguments match the C++ signatures, GEMM shapes match, every
train-step variant (plain / folded SGD, momentum, Adam) records, captures and replays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_host_code_dry_run():
    script = Path(__file__).with_name("cupy_dryrun.py")
    out = subprocess.run(
        [sys.executable, str(script), str(ROOT)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "smoke ok" in out.stdout
