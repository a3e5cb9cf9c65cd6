"""The first thing to run on a machine with a GPU: everything gpubp checks there, within a budget.

Usage: python benchmarks/device_run.py [--budget SECONDS] [--out DIR] [--emulated]
                                       [--no-require-graphs] [--compile]

Phases, in order of value; each runs in a child process with a time limit, and a phase that
cannot start with the time left (its minimum) is skipped and named:

1. ``environment``: versions and loaded paths of CuPy, the CUDA runtime, NVRTC, libcublas and
   NCCL (``benchmarks/device_probe.py environment``);
2. ``smoke``: three train steps as a CUDA graph and three eagerly, every warning an error, both
   against the float64 reference; ``"captured": true`` only when the steps really replayed a
   graph (``benchmarks/device_probe.py smoke``);
3. ``check``: ``gpubp check --backends cupy``;
4. ``tests``: the GPU tests (``pytest -x``), without the nvcc register-spill compiles;
5. ``sanitizer``: ``compute-sanitizer --tool memcheck`` on one small step, where installed and
   where the device supports it (skipped with the reason otherwise);
6. ``benchmark``: ``benchmarks/gpu_step.py --quick``, without ``torch.compile`` unless
   ``--compile`` is given.

Every phase runs with ``GPUBP_CUDA_GRAPHS=require`` (a train step that cannot be captured is an
error naming the call that broke the capture) unless ``--no-require-graphs``. After every phase,
``summary.json`` (``phases``: one entry per phase with ``status`` -- passed, failed, timeout,
skipped or pending --, ``seconds`` and ``reason`` where not passed) and ``summary.txt`` (the same
as a table) are written under ``--out`` (default ``$OUT``, else ``./device-run``), beside each
phase's log. Needs only Python, NumPy and CuPy (and pytest for the tests phase); a missing one
is named with the ``pip install`` that brings it.

``--emulated`` rehearses the run on the emulated GPU (``cudaemu/``, no GPU needed), as CI does:
the phases with no meaning there are skipped and named (the sanitizer: the emulator's own
sanitizer runs are in the test suite), and the benchmark runs one small shape once. Exit status:
0 when no phase failed or timed out, 1 otherwise, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

#: The GPU tests: the backend-vs-reference matrix for cupy and the CUDA-specific files.
TEST_FILES = (
    "tests/test_cupy_backend.py",
    "tests/test_cuda_kernels.py",
    "tests/test_cublas_binding.py",
    "tests/test_backends.py",
    "tests/test_model.py",
)
TEST_SELECTION = "(cupy or cuda or kernel or cublas) and not spills_registers"
#: On the emulated GPU the test suite itself runs the GPU tests; the rehearsal runs one file.
EMULATED_TEST_FILES = ("tests/test_cupy_backend.py",)
#: What compute-sanitizer says where it cannot run on the device (some virtualised hosts).
UNSUPPORTED = r"Device not supported|not supported on this (?:device|platform)"
#: Seconds kept back for writing the summary after the last phase.
RESERVE_S = 3.0


@dataclass
class Phase:
    """One phase: its name, the seconds it needs to be worth starting, and at most may take."""

    name: str
    min_s: float
    max_s: float
    result: dict[str, Any] = field(default_factory=lambda: {"status": "pending"})


def phases() -> list[Phase]:
    """The phases in order of value (a later one runs only with the time the earlier left)."""
    return [
        Phase("environment", 5, 60),
        Phase("smoke", 10, 90),
        Phase("check", 20, 120),
        Phase("tests", 30, 240),
        Phase("sanitizer", 30, 120),
        Phase("benchmark", 30, 300),
    ]


def git_commit() -> str:
    """The checkout's commit (``+dirty`` with local changes), or why it is not known."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({'git not found' if isinstance(exc, OSError) else 'git timed out'})"


def missing_module(log: str) -> str | None:
    """``pip install X`` for the first ``No module named 'X'`` in a log, else ``None``."""
    m = re.search(r"No module named '([\w.]+)'", log)
    if m is None:
        return None
    top = m.group(1).split(".")[0]
    names = {"cupy": "cupy-cuda12x (or cupy-cuda13x)", "cupy_backends": "cupy-cuda12x"}
    return f"pip install {names.get(top, top)}"


class Runner:
    """Runs the phases within the budget and writes the summary after each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.start = time.monotonic()
        self.phases = phases()
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env.setdefault("CUPY_TF32", "0")
        self.env["PYTHONUNBUFFERED"] = "1"
        if not args.no_require_graphs:
            self.env["GPUBP_CUDA_GRAPHS"] = "require"
        # the real CuPy only on a device run: the tests must not fall back to the emulator
        self.env["GPUBP_CUPY_MODULE"] = "cudaemu.cupy" if args.emulated else "cupy"
        # and a cupy test that cannot run fails (-x stops there) instead of skipping
        self.env["GPUBP_REQUIRE_EMULATOR"] = "1"
        self.meta: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "mode": "emulated" if args.emulated else "device",
            "budget_s": args.budget,
            "graphs": self.env.get("GPUBP_CUDA_GRAPHS", "1"),
            "commit": git_commit(),
            "python": sys.executable,
            "command": " ".join([sys.executable, *sys.argv]),
        }

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def write_summary(self) -> None:
        summary = {
            **self.meta,
            "elapsed_s": round(time.monotonic() - self.start, 1),
            "phases": {p.name: p.result for p in self.phases},
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (self.out / "summary.txt").write_text(table(summary))

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.write_summary()
        for phase in self.phases:
            left = self.left() - RESERVE_S
            why = self.cannot_run(phase)
            if why is None and left < phase.min_s:
                why = f"needs at least {phase.min_s:.0f} s, {max(left, 0):.0f} s of the budget left"
            if why is not None:
                phase.result = {"status": "skipped", "seconds": 0.0, "reason": why}
            else:
                began = time.monotonic()
                phase.result = getattr(self, f"phase_{phase.name}")(min(left, phase.max_s))
                phase.result["seconds"] = round(time.monotonic() - began, 1)
            line = f"== {phase.name}: {phase.result['status']} ({phase.result['seconds']} s)"
            print(line + (f": {phase.result['reason']}" if "reason" in phase.result else ""))
            self.write_summary()
        bad = [p.name for p in self.phases if p.result["status"] in ("failed", "timeout")]
        print(f"device_run: summary in {self.out / 'summary.json'}; " + (
            f"FAILED: {', '.join(bad)}" if bad else "no phase failed"))  # fmt: skip
        return 1 if bad else 0

    def cannot_run(self, phase: Phase) -> str | None:
        """Why ``phase`` cannot run here at all (a missing tool or package), else ``None``."""
        if phase.name == "tests" and importlib.util.find_spec("pytest") is None:
            return "pytest is not installed: pip install pytest"
        if phase.name == "sanitizer":
            if self.args.emulated:
                return (
                    "no meaning on the emulated GPU (its sanitizer runs are "
                    "tests/test_emulator_sanitizers.py)"
                )
            if shutil.which("compute-sanitizer") is None:
                return "compute-sanitizer not found (it ships with the CUDA toolkit)"
        return None

    def child(self, name: str, cmd: list[str], limit: float) -> tuple[str, str]:
        """Run ``cmd`` with its output in ``NAME.log``: ``(status, log text)``; the child and its
        own children are killed at ``limit`` seconds."""
        log_path = self.out / f"{name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                status = "passed" if proc.wait(timeout=limit) == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status = "timeout"
        text = log_path.read_text(errors="replace")
        return status, text

    def _result(self, name: str, status: str, log: str, limit: float) -> dict[str, Any]:
        result: dict[str, Any] = {"status": status, "log": f"{name}.log"}
        if status == "timeout":
            result["reason"] = f"stopped at its time limit of {limit:.0f} s"
        elif status == "failed":
            lines = [line for line in log.strip().splitlines() if line.strip()] or ["no output"]
            errors = [line[1:].strip() for line in lines if line.startswith("E ")]  # pytest's
            result["reason"] = missing_module(log) or (errors or lines[-1:])[0][:300]
        return result

    def probe(self, name: str, limit: float) -> dict[str, Any]:
        target = self.out / f"{name}.json"
        target.unlink(missing_ok=True)
        cmd = [sys.executable, str(HERE / "device_probe.py"), name, str(target)]
        status, log = self.child(name, cmd, limit)
        result = self._result(name, status, log, limit)
        if target.exists():
            found = json.loads(target.read_text())
            result.update({k: v for k, v in found.items() if k != "reason" or status != "passed"})
        hint = missing_module(log)
        if status != "passed" and hint is not None:
            result["reason"] = hint
        return result

    def phase_environment(self, limit: float) -> dict[str, Any]:
        return self.probe("environment", limit)

    def phase_smoke(self, limit: float) -> dict[str, Any]:
        return self.probe("smoke", limit)

    def phase_check(self, limit: float) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "gpubp", "check", "--backends", "cupy"]
        if not self.args.no_require_graphs:
            cmd.append("--require-graphs")
        status, log = self.child("check", cmd, limit)
        result = self._result("check", status, log, limit)
        m = re.search(r"all (\d+) configurations within tolerance", log)
        if m:
            result["configurations"] = int(m.group(1))
        return result

    def phase_tests(self, limit: float) -> dict[str, Any]:
        files = EMULATED_TEST_FILES if self.args.emulated else TEST_FILES
        xml = self.out / "tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *files, "-k", TEST_SELECTION]  # fmt: skip
        status, log = self.child("tests", cmd, limit)
        result = self._result("tests", status, log, limit)
        m = re.findall(r"^(?:=+ )?(\d+ (?:passed|failed|error).*?) in [\d.]+s", log, re.M)
        if m:
            result["outcome"] = m[-1]
        return result

    def phase_sanitizer(self, limit: float) -> dict[str, Any]:
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "99",
               sys.executable, str(HERE / "sanitize_step.py"), "--small"]  # fmt: skip
        status, log = self.child("sanitizer", cmd, limit)
        result = self._result("sanitizer", status, log, limit)
        errors = re.findall(r"ERROR SUMMARY: (\d+) error", log)
        if errors:
            result["errors"] = sum(map(int, errors))
        unsupported = re.search(UNSUPPORTED, log)
        if status == "failed" and unsupported:
            why = f"compute-sanitizer: {unsupported.group(0)} (a virtualised GPU?)"
            result = {"status": "skipped", "log": "sanitizer.log", "reason": why}
        return result

    def phase_benchmark(self, limit: float) -> dict[str, Any]:
        cmd = [sys.executable, str(HERE / "gpu_step.py"), str(self.out), "--quick"]
        if self.args.emulated:
            cmd += ["--tiny"]
        if not self.args.compile:
            cmd += ["--no-compile"]
        status, log = self.child("benchmark", cmd, limit)
        result = self._result("benchmark", status, log, limit)
        if (self.out / "gpu_step.txt").exists():
            result["table"] = "gpu_step.txt"
        return result


def table(summary: dict[str, Any]) -> str:
    """``summary.json`` as text: the run's facts, then one line per phase."""
    lines = [
        f"gpubp device run  {summary['date']}  ({summary['mode']}, budget {summary['budget_s']} s, "
        f"{summary['elapsed_s']} s used)",
        f"commit {summary['commit']}  graphs={summary['graphs']}",
        "",
        f"{'phase':<12} {'status':<8} {'seconds':>8}  details",
    ]
    for name, r in summary["phases"].items():
        details = r.get("reason", "")
        if name == "smoke" and "captured" in r:
            details = f"captured={r['captured']} graph_vs_reference={r.get('graph_vs_reference')}"
            details += f"  {r.get('reason', '')}"
        elif name == "tests" and "outcome" in r:
            details = f"{r['outcome']}  {details}"
        elif name == "environment" and "cupy" in r:
            details = f"cupy {r['cupy']}, {r.get('device')}  {details}"
        seconds = r.get("seconds", "")
        lines.append(f"{name:<12} {r['status']:<8} {seconds!s:>8}  {details}".rstrip())
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480.0, help="seconds in all (480)")
    out = os.environ.get("OUT") or "device-run"
    parser.add_argument("--out", default=out, help="the results' folder ($OUT, else ./device-run)")
    parser.add_argument("--emulated", action="store_true", help="on the emulated GPU (CI)")
    parser.add_argument("--no-require-graphs", action="store_true",
                        help="let a train step that cannot be captured run eagerly")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="benchmark torch.compile too")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget: expected a positive number of seconds, got {args.budget:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("numpy") is None:
        print("device_run: NumPy is missing: pip install numpy", file=sys.stderr)
        return 1
    if not args.emulated and importlib.util.find_spec("cupy") is None:
        print("device_run: CuPy is missing: pip install 'cupy-cuda12x[ctk]' "
              "(or 'cupy-cuda13x[ctk]' for CUDA 13)", file=sys.stderr)  # fmt: skip
    return Runner(args).run()


if __name__ == "__main__":
    sys.exit(main())
