"""CPU train step, side by side in one run: GEMM floor, numpy backend, numba backend, PyTorch.

One train step is forward, softmax + cross-entropy, backward and the optimizer's update (plain
SGD; with ``--optimizers`` also SGD with momentum 0.9 and Adam); ReLU hidden layers, float32,
integer labels. Besides the standard shapes, ``default`` is ``gpubp train``'s default model
``[784, 512, 256, 10]`` at batch 128. For each shape the variants run interleaved (A, B, C, A, B,
C, ...) and the median time per step is reported with its ratio to the floor:

- ``floor``: only the GEMMs of the step, the same for every optimizer (forward ``a @ W.T``,
  backward ``delta @ W`` for every layer but the first, gradient ``delta.T @ a``) into
  preallocated outputs, through the fastest GEMM found: the Numba backend's provider (MKL where
  the ``mkl`` wheel is installed) or NumPy's ``matmul``, whichever measured faster; NumPy's
  floor is printed beside it. Every ratio is to the fastest floor;
- ``numpy`` / ``numba``: ``backend.train_step`` on arrays already of the right dtype;
- ``torch``: the same model in PyTorch on the CPU (its default threads, ``fused=True``
  optimizers: its fastest update), if PyTorch is installed. It runs in a worker process that
  takes its turn in the same rounds:
  PyTorch's OpenMP threads spin-wait after each op, and in the same process they take the
  cores from the next variant's OpenBLAS threads (measured: the floor 5-40x slower right after
  a PyTorch step).

Every sample of every variant is preceded by a pause of ``--settle`` seconds (``gpubp.bench``'s
default), so that each variant starts with the previous one's threads asleep: OpenBLAS's pool
threads spin for 2^28 TSC cycles (about 0.1 s here) after a multi-threaded call, and PyTorch's
OpenMP threads spin too. Without it, the numba backend's split step (its own two threads, BLAS
at one thread; see ``gpubp.backends.numba_backend``) measured 1.9x instead of 0.9x the floor at
narrow-deep, because it started while the floor's idle BLAS thread still spun on the second
core. (A program that calls multi-threaded BLAS between steps pays that too; setting
``OPENBLAS_THREAD_TIMEOUT=4`` before NumPy is imported makes the pool sleep at once.)

Before timing, each variant's first step (loss and parameter changes) is checked against the
float64 reference. The shapes, the problem, the check, the floor, the flop count and the timing
loop (round robin with the settle pause) are ``gpubp.bench``'s; this script adds PyTorch in a
worker process, the ``--jit`` first-call cost and its Markdown table.

Run (others share the machine, so take the lock that serialises benchmarks)::

    flock /tmp/gpubp-bench.lock python benchmarks/train_step_cpu.py [--rounds 15] [--jit]
    flock /tmp/gpubp-bench.lock python benchmarks/train_step_cpu.py --shapes default \
        --optimizers sgd momentum adam

``--jit`` also measures the numba backend's first-call cost in fresh processes (the first with
an empty on-disk cache, then one that finds it).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np

if __package__ in (None, ""):  # run as a script: import this checkout's gpubp
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpubp import available_backends
from gpubp.bench import (
    CPU,
    DEFAULT_MIN_TIME,
    DEFAULT_SETTLE,
    STANDARD_SHAPES,
    BackendCandidate,
    BenchShape,
    Candidate,
    FloorCandidate,
    Problem,
    TorchCandidate,
    make_problem,
    step_flops,
    time_round_robin,
)
from gpubp.bench.floors import ProviderFloorCandidate, provider_floor
from gpubp.bench.problem import STEP_OPTIMIZERS
from gpubp.check import TOLERANCE
from gpubp.machine import gemm_provider, torch_status

#: The standard shapes that have a CPU batch size, and ``gpubp train``'s default model.
CPU_SHAPES: dict[str, BenchShape] = {
    **{k: s for k, s in STANDARD_SHAPES.items() if s.cpu_batch is not None},
    "default": BenchShape("default", (784, 512, 256, 10), 128, None),
}
SHAPES = list(CPU_SHAPES)
DTYPE = "float32"


def cpu_problem(key: str) -> Problem:
    shape = CPU_SHAPES[key]
    assert shape.cpu_batch is not None
    return make_problem(shape.sizes, shape.cpu_batch, DTYPE)


class TorchWorker(Candidate):
    """PyTorch's step (``gpubp.bench.TorchCandidate``) in a child process, which times itself:
    PyTorch's OpenMP threads spin-wait after each op and, in this process, would take the cores
    from the next variant's OpenBLAS threads."""

    label = kind = "torch"

    def __init__(self, key: str, optimizer: str = "sgd") -> None:
        if optimizer != "sgd":
            self.label = self.kind = f"torch {optimizer}"
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--torch-worker", key, optimizer],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.error = float(self._ask(None))

    def _ask(self, command: str | None) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(f"{command}\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def validate(self, problem: Problem) -> float:
        return self.error  # checked in the child on the same problem

    def timed(self, n: int) -> float:
        return float(self._ask(str(n)))

    def reset(self) -> None:
        self._ask("reset")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def torch_worker(key: str, optimizer: str) -> None:
    """The child side of :class:`TorchWorker`: the check's error, then one answer a command."""
    torch, why = torch_status()
    if torch is None:
        raise SystemExit(why)
    problem = cpu_problem(key)
    c = TorchCandidate(torch, CPU, optimizer=optimizer)
    c.setup(problem)
    print(c.validate(problem), flush=True)
    for line in sys.stdin:
        if line.strip() == "reset":
            c.reset()
            print("ok", flush=True)
        else:
            print(c.timed(int(line)), flush=True)


def variants(key: str, problem: Problem, torch: bool, optimizers: list[str]) -> list[Candidate]:
    """The floor, then per optimizer the CPU backends and (in its worker) PyTorch, each checked
    on ``problem``."""
    cands: list[Candidate] = [FloorCandidate(np, CPU)]
    if provider_floor() is not None:
        cands.append(ProviderFloorCandidate())
    for opt in optimizers:
        cands += [
            BackendCandidate(n, optimizer=opt)
            for n in ("numpy", "numba")
            if n in available_backends()
        ]
        if torch:
            cands.append(TorchWorker(key, opt))
    for c in cands:
        if not isinstance(c, TorchWorker):
            c.setup(problem)
        err = c.validate(problem)
        if not err <= TOLERANCE[DTYPE]:
            raise SystemExit(f"{c.label}: first step differs from the reference ({err:.2e})")
    return cands


def jit_cost() -> None:
    """First-call cost of the numba backend in fresh processes: empty cache, then warm cache."""
    code = (
        "import time; t0 = time.perf_counter(); import numpy as np, gpubp; "
        "m = gpubp.MLP([784, 128, 10], backend='numba', dtype='float32', seed=0); "
        "x = np.zeros((64, 784), np.float32); y = np.zeros(64, np.int64); "
        "t1 = time.perf_counter(); m.train_step(x, y, gpubp.optim.SGD(lr=0.01)); "
        "t2 = time.perf_counter(); m.train_step(x, y, gpubp.optim.SGD(lr=0.01)); "
        "t3 = time.perf_counter(); "
        "print(f'{t1 - t0:.2f} {t2 - t1:.2f} {(t3 - t2) * 1e3:.2f}')"
    )
    cache = tempfile.mkdtemp(prefix="gpubp-numba-cache-")
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    try:
        for label in ("empty cache", "warm cache"):
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout.split()
            print(
                f"numba first call, {label}: import + model {out[0]} s, first train_step "
                f"{out[1]} s, second {out[2]} ms"
            )
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median)")
    parser.add_argument("--shapes", nargs="*", default=SHAPES, choices=SHAPES)
    parser.add_argument("--settle", type=float, default=DEFAULT_SETTLE, help="pause per sample")
    parser.add_argument("--jit", action="store_true", help="also measure the first-call cost")
    parser.add_argument(
        "--optimizers",
        nargs="*",
        default=["sgd"],
        choices=STEP_OPTIMIZERS,
        help="the steps' optimizers (sgd: plain SGD; momentum: 0.9; adam: lr 1e-3)",
    )
    parser.add_argument("--torch-worker", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def torch_info() -> str:
    """PyTorch's version and threads, asked in a child (PyTorch is only imported there)."""
    if importlib.util.find_spec("torch") is None:
        return "torch not installed"
    code = "import torch; print(f'torch {torch.__version__} ({torch.get_num_threads()} threads)')"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.torch_worker:
        torch_worker(*args.torch_worker)
        return
    info = torch_info()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy "
        f"{np.__version__}, GEMM provider {gemm_provider()}, {info}; float32, ReLU, softmax + "
        f"CE; median of {args.rounds} interleaved rounds"
    )
    names = ["numpy", "numba", "torch"]
    print(
        f"| shape | batch | optimizer | fastest floor (GFLOP/s, GEMM) | NumPy floor | "
        f"{' | '.join(names)} |"
    )
    print("|---|---|---|---|---|" + "---|" * len(names))
    for key in args.shapes:
        problem = cpu_problem(key)
        cands = variants(key, problem, info != "torch not installed", args.optimizers)
        try:
            stats = time_round_robin(cands, args.rounds, DEFAULT_MIN_TIME, settle=args.settle)
        finally:
            for c in cands:
                if isinstance(c, TorchWorker):
                    c.close()
        med = {c.label if c.kind != "torch" else c.kind: stats[c.label].median for c in cands}
        floors = {c.label: med[c.label] for c in cands if c.kind == "floor"}
        fastest = min(floors, key=floors.__getitem__)
        floor = floors[fastest]
        numpy_floor = floors["floor: NumPy BLAS GEMM"]
        gflops = step_flops(problem.sizes, problem.batch) / floor / 1e9
        for opt in args.optimizers:
            keys = {n: n if opt == "sgd" else f"{n} {opt}" for n in names}
            cells = [
                f"{med[k] * 1e3:.3f} ms ({med[k] / floor:.2f}x)" if k in med else "n/a"
                for k in keys.values()
            ]
            print(
                f"| {key} {list(problem.sizes)} | {problem.batch} | {opt} | "
                f"{floor * 1e3:.3f} ms ({gflops:.0f}, {fastest[7:-5]}) | "
                f"{numpy_floor * 1e3:.3f} ms ({numpy_floor / floor:.2f}x) | "
                + " | ".join(cells)
                + " |"
            )
    if args.jit:
        jit_cost()


if __name__ == "__main__":
    main()
