"""CPU train step, side by side in one run: GEMM floor, numpy backend, numba backend, PyTorch.

One train step is forward, softmax + cross-entropy, backward and a plain SGD update; ReLU hidden
layers, float32, integer labels. For each shape the variants run interleaved (A, B, C, A, B,
C, ...) and the median time per step is reported with its ratio to the floor:

- ``floor``: only the GEMMs of the step (forward ``a @ W.T``, backward ``delta @ W`` for every
  layer but the first, gradient ``delta.T @ a``) with NumPy's ``matmul`` into preallocated
  outputs: the same BLAS, the same shapes, nothing else;
- ``numpy`` / ``numba``: ``backend.train_step`` on arrays already of the right dtype;
- ``torch``: the same model in PyTorch on the CPU (its default threads, ``SGD(foreach=True)``),
  if PyTorch is installed. It runs in a worker process that takes its turn in the same rounds:
  PyTorch's OpenMP threads spin-wait after each op, and in the same process they take the
  cores from the next variant's OpenBLAS threads (measured: the floor 5-40x slower right after
  a PyTorch step).

Every round of every variant is followed by a pause of :data:`SETTLE` seconds, so that each
variant starts with the previous one's threads asleep: OpenBLAS's pool threads spin for 2^28
TSC cycles (about 0.1 s here) after a multi-threaded call, and PyTorch's OpenMP threads spin
too. Without it, the numba backend's split step (its own two threads, BLAS at one thread; see
``gpubp.backends.numba_backend``) measured 1.9x instead of 0.9x the floor at narrow-deep,
because it started while the floor's idle BLAS thread still spun on the second core. (A
program that calls multi-threaded BLAS between steps pays that too; setting
``OPENBLAS_THREAD_TIMEOUT=4`` before NumPy is imported makes the pool sleep at once.)

Before timing, each variant's first-step loss is checked against the float64 reference.

Run (others share the machine, so take the lock that serialises benchmarks)::

    flock /tmp/gpubp-bench.lock python benchmarks/train_step_cpu.py [--rounds 15] [--jit]

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
import time
from collections.abc import Callable

import numpy as np

if __package__ in (None, ""):  # run as a script: import this checkout's gpubp
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpubp
from gpubp import optim
from gpubp import reference as ref

SHAPES: dict[str, tuple[list[int], int]] = {
    "mnist-small": ([784, 128, 10], 64),
    "mnist-mlp": ([784, 1024, 1024, 10], 256),
    "narrow-deep": ([64, 64, 64, 64, 64, 64, 16], 16384),
}
LR = 1e-3
#: Seconds of pause after each timed round (see the module docstring).
SETTLE = 0.15


class _Owner:
    """Stands in for the model that owns the optimizer state."""


def problem(sizes: list[int], batch: int, seed: int = 0):
    model = gpubp.MLP(sizes, "relu", "softmax", "cross_entropy", backend="numpy", seed=seed)
    W, b = model.get_parameters()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch).astype(np.int64)
    return [w.astype(np.float32) for w in W], [v.astype(np.float32) for v in b], x, y


def reference_loss(sizes: list[int], batch: int) -> float:
    W, b, x, y = problem(sizes, batch)
    f64 = [w.astype(np.float64) for w in W], [v.astype(np.float64) for v in b]
    value, _, _ = ref.gradients(*f64, x.astype(np.float64), y, "relu", "softmax", "cross_entropy")
    return float(value)


def floor_step(sizes: list[int], batch: int) -> Callable[[], object]:
    W, _, x, _ = problem(sizes, batch)
    L = len(W)
    rng = np.random.default_rng(1)
    a = [x] + [np.empty((batch, n), np.float32) for n in sizes[1:]]
    d = [None] + [rng.standard_normal((batch, n)).astype(np.float32) for n in sizes[1:]]
    dW = [np.empty_like(w) for w in W]

    def step() -> None:
        for i in range(L):
            np.matmul(a[i], W[i].T, out=a[i + 1])
        for i in range(L - 1, -1, -1):
            np.matmul(d[i + 1].T, a[i], out=dW[i])
            if i > 0:
                np.matmul(d[i + 1], W[i], out=d[i])

    return step


def gpubp_step(name: str, sizes: list[int], batch: int) -> tuple[Callable[[], object], float]:
    be = gpubp.get_backend(name)
    W, b, x, y = problem(sizes, batch)
    W, b = [be.asarray(w) for w in W], [be.asarray(v) for v in b]
    x, y = be.asarray(x), be.asarray(y)
    opt = optim.SGD(lr=LR)
    state = opt.bind(_Owner(), be, [w.shape for w in W + b], np.float32)

    def step() -> float:
        value, _, _, _ = be.train_step(W, b, x, y, "relu", "softmax", "cross_entropy", opt, state)
        return float(value)

    return step, step()


def torch_step(sizes: list[int], batch: int) -> tuple[Callable[[], object], float] | None:
    try:
        import torch
    except ImportError:
        return None
    W, b, x, y = problem(sizes, batch)
    layers: list[torch.nn.Module] = []
    for i, (w, v) in enumerate(zip(W, b)):
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(v))
        layers.append(lin)
        if i < len(W) - 1:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(net.parameters(), lr=LR, foreach=True)
    lossf = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = lossf(net(xt), yt)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, step()


class TorchWorker:
    """A PyTorch train step in a child process; ``worker(n)`` runs ``n`` steps there and
    returns the seconds they took (measured in the child)."""

    def __init__(self, key: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--torch-worker", key],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        self.first_loss = float(self.proc.stdout.readline())

    def __call__(self, n: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def torch_worker(key: str) -> None:
    """The child side of :class:`TorchWorker`."""
    sizes, batch = SHAPES[key]
    made = torch_step(sizes, batch)
    if made is None:
        raise SystemExit("PyTorch is not installed")
    step, first = made
    print(first, flush=True)
    for line in sys.stdin:
        n = int(line)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        print(time.perf_counter() - t0, flush=True)


def check(name: str, got: float, expected: float) -> None:
    rel = abs(got - expected) / max(abs(expected), 1e-30)
    if not rel <= 1e-4:
        raise SystemExit(f"{name}: first-step loss {got} differs from the reference {expected}")


def timed(fn: Callable[[], object]) -> Callable[[int], float]:
    """``run(n)``: seconds for ``n`` calls of ``fn``."""

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0

    return run


def measure(variants: dict[str, Callable[[int], float]], rounds: int) -> dict[str, float]:
    reps: dict[str, int] = {}
    for name, run in variants.items():  # warm up: workspaces, caches, BLAS/PyTorch threads
        run(3)
        reps[name] = max(1, min(500, int(0.05 / max(run(1), 1e-7))))
        time.sleep(SETTLE)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            times[name].append(run(reps[name]) / reps[name])
            time.sleep(SETTLE)  # every variant starts with the others' threads asleep
    return {name: float(np.median(t)) for name, t in times.items()}


def flops(sizes: list[int], batch: int) -> float:
    L = len(sizes) - 1
    per = [2.0 * batch * sizes[i] * sizes[i + 1] for i in range(L)]
    return sum(3 * f for f in per) - per[0]  # no backward GEMM for the first layer


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median)")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--jit", action="store_true", help="also measure the first-call cost")
    parser.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker:
        torch_worker(args.torch_worker)
        return

    # PyTorch is only imported in its worker process; here we only ask whether it is there
    has_torch = importlib.util.find_spec("torch") is not None
    torch_info = "torch not installed"
    if has_torch:
        torch_info = subprocess.run(
            [
                sys.executable,
                "-c",
                "import torch; print(f'torch {torch.__version__} "
                "({torch.get_num_threads()} threads)')",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy "
        f"{np.__version__}, {torch_info}; float32, ReLU, softmax + CE, SGD; median of "
        f"{args.rounds} interleaved rounds"
    )
    names = ["floor", "numpy", "numba", "torch"]
    print(f"| shape | batch | floor (GFLOP/s) | {' | '.join(names[1:])} |")
    print("|---|---|---|" + "---|" * (len(names) - 1))
    for key in args.shapes:
        sizes, batch = SHAPES[key]
        expected = reference_loss(sizes, batch)
        variants: dict[str, Callable[[int], float]] = {"floor": timed(floor_step(sizes, batch))}
        for name in ("numpy", "numba"):
            if name in gpubp.available_backends():
                fn, first = gpubp_step(name, sizes, batch)
                check(name, first, expected)
                variants[name] = timed(fn)
        worker = TorchWorker(key) if has_torch else None
        if worker is not None:
            check("torch", worker.first_loss, expected)
            variants["torch"] = worker
        try:
            med = measure(variants, args.rounds)
        finally:
            if worker is not None:
                worker.close()
        floor = med["floor"]
        cells = []
        for name in names[1:]:
            if name in med:
                cells.append(f"{med[name] * 1e3:.3f} ms ({med[name] / floor:.2f}x)")
            else:
                cells.append("n/a")
        gflops = flops(sizes, batch) / floor / 1e9
        print(
            f"| {key} {sizes} | {batch} | {floor * 1e3:.3f} ms ({gflops:.0f}) | "
            + " | ".join(cells)
            + " |"
        )
    if args.jit:
        jit_cost()


if __name__ == "__main__":
    main()
