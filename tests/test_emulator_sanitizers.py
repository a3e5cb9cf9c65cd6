"""Sanitizers in place of compute-sanitizer: every kernel under ThreadSanitizer (a C++ driver) and
the emulated kernel tests under AddressSanitizer + UndefinedBehaviorSanitizer (inside Python).

ThreadSanitizer reports a data race between the threads of a block (a missing ``__syncthreads``)
that the fiber emulator, which switches threads only at barriers and shuffles, may not turn into
a wrong number; AddressSanitizer reports out-of-bounds accesses and UBSan misaligned 16-byte
vector loads, which a plain x86 run does not notice. The runs are slow-ish (a TSan launch is one
OS thread per CUDA thread), so each is one test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cudaemu import kernels as emu
from cudaemu import sanitize
from gpubp.backends.cuda import catalogue as ck

ROOT = Path(__file__).resolve().parent.parent


def _need(runtime: str | None = None, variant: str | None = None) -> None:
    """Skip (or fail, where CI requires the emulator) when the compiler or runtime is missing."""
    why = emu.compiler_missing()
    if why is None and variant is not None and emu.sanitizer_runtime(variant) is None:
        why = f"the {variant} runtime of {emu.compiler()} is not installed"
    if why is not None:
        if os.environ.get("GPUBP_REQUIRE_EMULATOR") == "1":
            pytest.fail(f"GPUBP_REQUIRE_EMULATOR=1 but {why}")
        pytest.skip(why)


def test_every_kernel_is_race_free_under_thread_sanitizer():
    _need()
    res = sanitize.run_driver("tsan")
    assert res.returncode == 0, res.stderr[-6000:]
    assert "ThreadSanitizer" not in res.stderr
    launches = int(res.stdout.split(" launches")[0].split()[-1])
    assert ", 0 failed" in res.stdout
    # every instantiation of the catalogue was launched at least once
    names = sum(len(ck.name_expressions(f)) for f in ck.FAMILIES)
    assert launches >= names


def test_thread_sanitizer_reports_a_missing_barrier():
    """The defect the TSan run exists for: fixed_sum's first barrier removed (finalize_loss)."""
    _need()
    code = ck.source("output_layer")
    barrier = "        shared[k] = s;\n    }\n    __syncthreads();\n"
    assert barrier in code
    broken = code.replace(barrier, "        shared[k] = s;\n    }\n")
    res = sanitize.run_driver("tsan", {"output_layer": broken})
    assert res.returncode == 66, res.stdout + res.stderr[-3000:]
    assert "ThreadSanitizer: data race" in res.stderr
    assert "fixed_sum" in res.stderr


def test_emulated_kernel_tests_pass_under_address_and_ub_sanitizers():
    """tests/test_emulated_kernels.py again, every kernel built with -fsanitize=address,undefined
    -fno-sanitize-recover (fibers, so AddressSanitizer is told each stack switch)."""
    _need(variant="asan")
    env = {
        **os.environ,
        "GPUBP_EMU_VARIANT": "asan",
        "LD_PRELOAD": str(emu.sanitizer_runtime("asan")),
        # Python's own allocations are not ours to judge; everything else stops the run
        "ASAN_OPTIONS": "detect_leaks=0 halt_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1 print_stacktrace=1",
        "PYTHONPATH": os.pathsep.join(sys.path),  # the gpubp under test
    }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "test_emulated_kernels.py"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    tail = (res.stdout[-4000:] + res.stderr[-4000:]).strip()
    assert res.returncode == 0, tail
    assert "passed" in res.stdout and "runtime error" not in res.stderr, tail
