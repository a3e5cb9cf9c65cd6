"""Every kernel instantiation under ThreadSanitizer or AddressSanitizer + UBSan, in a C++ program.

ThreadSanitizer cannot run inside the Python interpreter (preloading it crashes the process), so
the sanitizer stand-in for compute-sanitizer's racecheck is a small program: ``cuda_emu.h`` with
one OS thread per CUDA thread, every kernel family's source in a namespace of its own, the
argument set-up of ``include/sanitize_driver.h``, and a ``main`` that exercises every name
of the catalogue. The same program built with AddressSanitizer + UndefinedBehaviorSanitizer
(``-fno-sanitize-recover``) checks the threaded runtime as well; the emulated kernel tests run
under AddressSanitizer inside Python too (fibers, ``GPUBP_EMU_VARIANT=asan``).

``python -m cudaemu.sanitize tsan`` (from the repository root) builds and runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from gpubp.backends.cuda import catalogue as ck

from .kernels import BASE_FLAGS, INCLUDE, VARIANTS, EmulatorError, compiler, compiler_missing

#: The driver's builds: the libraries' sanitizer variants, with one OS thread per CUDA thread.
SANITIZERS: dict[str, tuple[str, ...]] = {
    "tsan": VARIANTS["tsan"],
    "asan": (*VARIANTS["asan"], "-DEMU_THREADS=1"),
}
#: Environment of a driver run: any report fails the run.
RUN_ENV: dict[str, str] = {
    "TSAN_OPTIONS": "halt_on_error=1 exitcode=66 second_deadlock_stack=1",
    "ASAN_OPTIONS": "halt_on_error=1 detect_leaks=1 exitcode=67",
    "UBSAN_OPTIONS": "halt_on_error=1 print_stacktrace=1 exitcode=68",
}


def driver_source(sources: Mapping[str, str] | None = None) -> str:
    """The C++ text of the driver: kernels and a ``main`` exercising every catalogue name.

    ``sources`` maps a family to its code (default: every family, from the catalogue); the
    tests pass a copy with a defect injected to show the sanitizer reports it.
    """
    if sources is None:
        sources = {f: ck.source(f) for f in ck.FAMILIES}
    parts = ['#include "cuda_emu.h"']
    calls = []
    for f, code in sources.items():
        parts.append(f"namespace fam_{f} {{\n{code}\n}}  // namespace fam_{f}")
        for n in ck.name_expressions(f):
            # the element type, given explicitly: the table kernels' parameters do not name it
            t = next((f"<{c}>" for c in ck.CUDA_TYPES.values() if f"<{c}" in n), "")
            calls.append(f'    drv::exercise{t}(&fam_{f}::{n}, "{n}");')
    parts.append('#include "sanitize_driver.h"')
    parts.append("int main() {\n" + "\n".join(calls) + "\n    return drv::finish();\n}\n")
    return "\n".join(parts)


def build_driver(sanitizer: str, folder: Path, sources: Mapping[str, str] | None = None) -> Path:
    """Compile the driver with ``sanitizer`` (``tsan`` or ``asan``) into ``folder``."""
    if sanitizer not in SANITIZERS:
        raise ValueError(f"sanitizer={sanitizer!r}; expected one of {list(SANITIZERS)}")
    why = compiler_missing()
    if why is not None:
        raise EmulatorError(why)
    for name in ("cuda_emu.h", "sanitize_driver.h"):
        (folder / name).write_text((INCLUDE / name).read_text(encoding="utf-8"), encoding="utf-8")
    src = folder / "driver.cpp"
    src.write_text(driver_source(sources), encoding="utf-8")
    exe = folder / f"driver-{sanitizer}"
    flags = [f for f in BASE_FLAGS if f not in ("-shared", "-fPIC")]
    cmd = [compiler(), *flags, *SANITIZERS[sanitizer], "-I", str(folder), "-o", str(exe), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise EmulatorError(f"building the {sanitizer} driver failed:\n{res.stderr[-6000:]}")
    return exe


def run_driver(
    sanitizer: str, sources: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Build and run the driver; the result's ``returncode`` is 0 when nothing was reported."""
    with tempfile.TemporaryDirectory(prefix="gpubp-sanitize-") as tmp:
        exe = build_driver(sanitizer, Path(tmp), sources)
        env = {**os.environ, **RUN_ENV}
        return subprocess.run([str(exe)], capture_output=True, text=True, env=env, check=False)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    status = 0
    for sanitizer in args or list(SANITIZERS):
        res = run_driver(sanitizer)
        print(f"== {sanitizer}: exit {res.returncode}")
        print(res.stdout[-2000:], res.stderr[-8000:], sep="\n")
        status = status or res.returncode
    return status


if __name__ == "__main__":
    raise SystemExit(main())
