"""``gpubp bench``: every backend side by side with PyTorch and with the hardware floor.

One run times, on the same problem and interleaved round-robin (so drift from other work on
the machine hits every candidate alike), one full training step of

- every gpubp backend that can run here (``numpy``, ``numba``, ``cupy`` as they appear);
- PyTorch where it is installed: eager on the CPU; on a GPU eager, the same step captured in a
  CUDA graph, and ``torch.compile``;
- the floor: the GEMMs of the same step alone (forward ``a @ W.T`` per layer, the backward
  delta ``delta @ W`` per layer except the first, the weight gradient ``delta.T @ a`` per
  layer) through the same BLAS / cuBLAS into preallocated outputs; on a GPU also the same
  GEMMs plus a device-to-device copy that moves as many bytes as the step's elementwise work
  must (see :func:`elementwise_bytes`).

The step: hidden ReLU, softmax output, cross-entropy on integer labels, plain SGD. Before
anything is timed, every candidate's first step is compared with the float64 reference
(:mod:`gpubp.reference`): the loss and the change of every parameter; the floor's GEMMs are
compared with float64 products. A candidate that disagrees is reported and not timed.

Each timed sample runs a candidate for at least ``min_time`` seconds (``n`` steps, the device
synchronised inside the timed region) after a pause of ``settle`` seconds and one untimed step
that re-warms its caches. The pause matters on a small machine: after a call, OpenBLAS keeps a
worker thread spinning for about 0.1 s, which would take a core from whichever candidate runs
next (PyTorch's OpenMP threads, measured here, barely spin). The
table gives the median, min and max over the samples, and the spread
``(q75 - q25) / median``. Peak memory is measured in a separate, untimed pass.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import numpy as np

from . import __version__
from . import reference as ref
from .backends import BACKEND_NAMES, backend_status, get_backend, to_numpy
from .check import TOLERANCE, rel_error
from .optim import SGD

#: The training step every candidate runs.
ACTIVATION, OUTPUT, LOSS = "relu", "softmax", "cross_entropy"
#: Plain SGD; small enough that hundreds of timed steps on random labels stay finite.
LR = 0.01

DEFAULT_REPEATS, QUICK_REPEATS = 21, 7
DEFAULT_MIN_TIME, QUICK_MIN_TIME = 0.05, 0.01
#: Seconds to wait before each sample, for the previous candidate's spinning threads to sleep.
DEFAULT_SETTLE = 0.15
#: A spread ``(q75 - q25) / median`` above this is flagged as too wide to trust.
SPREAD_WARN = 0.10

CPU, GPU = "cpu", "gpu"


@dataclass(frozen=True)
class BenchShape:
    """A network and its batch size on each device (``None``: not run on that device)."""

    name: str
    sizes: tuple[int, ...]
    cpu_batch: int | None
    gpu_batch: int | None

    def batch(self, device: str) -> int | None:
        return self.cpu_batch if device == CPU else self.gpu_batch


#: The standard shapes of the issue: small and large MNIST networks, a narrow deep network on a
#: huge batch (elementwise-bound), and a wide one (GEMM-bound, GPU only).
STANDARD_SHAPES: dict[str, BenchShape] = {
    s.name: s
    for s in (
        BenchShape("mnist-small", (784, 128, 10), 64, 64),
        BenchShape("mnist-mlp", (784, 1024, 1024, 10), 256, 1024),
        BenchShape("narrow-deep", (64,) * 6 + (16,), 16384, 262144),
        BenchShape("wide", (4096,) * 4, None, 8192),
    )
}

SWEEP_BATCHES: dict[str, tuple[int, ...]] = {
    CPU: (1, 4, 16, 64, 256, 1024, 4096),
    GPU: (1, 16, 256, 4096, 65536),
}
QUICK_SWEEP_BATCHES: dict[str, tuple[int, ...]] = {CPU: (1, 16, 256), GPU: (1, 256, 65536)}


def parse_shape(spec: str) -> BenchShape:
    """A standard shape by name, or ``SIZES@BATCH`` such as ``784-128-10@64`` (both devices)."""
    if spec in STANDARD_SHAPES:
        return STANDARD_SHAPES[spec]
    expected = (
        f"expected one of {', '.join(STANDARD_SHAPES)}, or layer sizes and a batch size written "
        "like 784-128-10@64"
    )
    try:
        sizes_text, batch_text = spec.split("@")
        sizes = tuple(int(n) for n in sizes_text.split("-"))
        batch = int(batch_text)
    except ValueError:
        raise ValueError(f"--shapes: {spec!r} is not a shape; {expected}") from None
    if len(sizes) < 2 or min(sizes) < 1 or batch < 1:
        raise ValueError(
            f"--shapes: {spec!r} needs at least two positive layer sizes and a positive batch; "
            f"{expected}"
        )
    if sizes[-1] < 2:
        raise ValueError(
            f"--shapes: {spec!r} has {sizes[-1]} output; the benchmark's softmax + "
            "cross-entropy needs at least 2"
        )
    return BenchShape(spec, sizes, batch, batch)


def step_flops(sizes: Sequence[int], batch: int) -> int:
    """Floating-point operations of the GEMMs in one train step.

    Per layer ``l`` (``n_in = n_{l-1}``, ``n_out = n_l``): forward ``(B, n_in) @ (n_out, n_in).T``
    and weight gradient ``(n_out, B) @ (B, n_in)``, each ``2 B n_in n_out``; the backward delta
    ``(B, n_out) @ (n_out, n_in)`` for every layer but the first (the input needs no delta).
    """
    total = 0
    for i in range(len(sizes) - 1):
        per_gemm = 2 * batch * sizes[i] * sizes[i + 1]
        total += per_gemm * (3 if i > 0 else 2)
    return total


def elementwise_bytes(sizes: Sequence[int], batch: int, itemsize: int) -> int:
    """Bytes the non-GEMM work of one train step must move at the least, if nothing is fused.

    Forward bias + activation: read and write ``z^l`` ``(B, n_l)`` for every layer; output
    softmax + cross-entropy: read ``z^L``, write ``delta^L``, read ``B`` int64 labels; backward
    Hadamard ``g * f'(a)`` for each hidden layer: read ``g`` and ``a``, write ``delta``; bias
    gradients: read every ``delta^l``; SGD: read ``p`` and ``g``, write ``p`` for every
    parameter.
    """
    B, L = batch, len(sizes) - 1
    elems = sum(2 * B * n for n in sizes[1:])  # bias + activation (the output's logits too)
    elems += 2 * B * sizes[-1]  # softmax + delta^L
    elems += sum(3 * B * n for n in sizes[1:-1])  # hidden Hadamard
    elems += sum(B * n for n in sizes[1:])  # db
    elems += sum(3 * (sizes[i] * sizes[i + 1] + sizes[i + 1]) for i in range(L))  # SGD
    return elems * itemsize + 8 * B


# --- the problem and the reference ------------------------------------------------------------


@dataclass
class Problem:
    """One train step's data, rounded to ``dtype``, and the float64 reference's answer."""

    sizes: tuple[int, ...]
    batch: int
    dtype: str
    W: list[np.ndarray]  # (n_l, n_{l-1}) in dtype
    b: list[np.ndarray]  # (n_l,) in dtype
    x: np.ndarray  # (B, n_0) in dtype
    y: np.ndarray  # (B,) int64 labels
    ref_loss: float
    ref_params: list[np.ndarray]  # W^1..W^L, b^1..b^L after one SGD step, float64


def make_problem(
    sizes: Sequence[int], batch: int, dtype: str, seed: int = 0, with_reference: bool = True
) -> Problem:
    """Random He-initialised parameters, inputs and labels, and the reference's first step.

    The reference sees exactly the values rounded to ``dtype``, so only arithmetic differs.
    With the reference, input rows that put a hidden pre-activation within rounding distance of
    the ReLU kink are redrawn (see :func:`rows_clear_of_kinks`). With ``with_reference=False``
    the reference is not run (``ref_loss`` is NaN) and every row is kept.
    """
    sizes = tuple(int(n) for n in sizes)
    rng = np.random.default_rng(seed)
    W = [
        rng.normal(0, math.sqrt(2 / sizes[i]), (sizes[i + 1], sizes[i])).astype(dtype)
        for i in range(len(sizes) - 1)
    ]
    b = [rng.normal(0, 0.1, sizes[i + 1]).astype(dtype) for i in range(len(sizes) - 1)]
    y = rng.integers(0, sizes[-1], batch).astype(np.int64)
    if not with_reference:
        x = rng.normal(0, 1, (batch, sizes[0])).astype(dtype)
        return Problem(sizes, batch, dtype, W, b, x, y, math.nan, [])
    kept: list[np.ndarray] = []
    for _ in range(100):
        more = rng.normal(0, 1, (2 * batch, sizes[0])).astype(dtype)
        kept.append(more[rows_clear_of_kinks(W, b, more)])
        if sum(len(k) for k in kept) >= batch:
            break
    else:  # pragma: no cover - needs thousands of hidden units per row
        raise RuntimeError(f"cannot draw {batch} inputs clear of the ReLU kinks for {sizes}")
    x = np.concatenate(kept)[:batch]
    f64 = [p.astype(np.float64) for p in (*W, *b)]
    L = len(W)
    loss, Wn, bn, _ = ref.train_step(
        f64[:L], f64[L:], x.astype(np.float64), y, ACTIVATION, OUTPUT, LOSS, SGD(lr=LR), {"step": 0}
    )
    return Problem(sizes, batch, dtype, W, b, x, y, float(loss), [*Wn, *bn])


def rows_clear_of_kinks(W: list[np.ndarray], b: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """``(B,)`` mask of the rows of ``x`` whose hidden pre-activations all stay off the kink.

    Where ``|z|`` is within rounding distance of 0, ``relu'(z)`` is 1 in one precision and 0 in
    another, and the delta of that unit (and every delta below it in that row) differs by its
    whole size: a true difference of precisions, not an error of either, so such rows are not
    used for checking. The distance is ``16 eps sqrt(n_in) rms(z)``, above the worst rounding of
    a length-``n_in`` dot product seen in practice.
    """
    eps = float(np.finfo(x.dtype).eps)
    a = x.astype(np.float64)
    keep = np.ones(x.shape[0], dtype=bool)
    for w, v in zip(W[:-1], b[:-1]):
        z = a @ w.astype(np.float64).T + v
        margin = 16 * eps * math.sqrt(w.shape[1]) * math.sqrt(float(np.mean(z * z)))
        keep &= (np.abs(z) > margin).all(axis=1)
        a = np.maximum(z, 0.0)
    return keep


def validation_error(problem: Problem, loss: float, params: Sequence[Any]) -> float:
    """Worst relative error of one step's loss and parameter changes against the reference.

    Changes, not parameters, are compared (a wrong gradient cannot hide behind the size of the
    parameters); as in :func:`gpubp.check._check_steps`, the scale of a change is floored so that
    rounding the largest parameter to ``dtype`` by one unit counts as exactly the tolerance.
    """
    rounding = float(np.finfo(problem.dtype).eps) / TOLERANCE[problem.dtype]
    worst = abs(loss - problem.ref_loss) / max(abs(problem.ref_loss), 1e-30)
    for p, p0, r in zip(params, [*problem.W, *problem.b], problem.ref_params):
        p0 = p0.astype(np.float64)
        floor = rounding * float(np.max(np.abs(p0)))
        worst = max(worst, rel_error(to_numpy(p).astype(np.float64) - p0, r - p0, floor))
    return worst


# --- candidates -------------------------------------------------------------------------------


class Candidate:
    """One thing to time: :meth:`setup` once, then :meth:`step` many times.

    ``kind`` is ``backend``, ``torch`` or ``floor``; ``device`` is ``cpu`` or ``gpu``.
    """

    label: str = ""
    kind: str = ""
    device: str = CPU

    def setup(self, problem: Problem) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        """Wait for queued device work (no-op on the CPU)."""

    def reset(self) -> None:
        """Put the parameters back to the problem's initial values, in place.

        Done (untimed) before every sample: hundreds of steps on one batch would otherwise
        memorise it, and ever larger logits end in float underflow, which is slow on CPUs and
        would make later samples measure something else than earlier ones.
        """

    def validate(self, problem: Problem) -> float:
        """Worst relative error of one step from the problem's initial state (see subclasses)."""
        raise NotImplementedError

    def peak_bytes(self, problem: Problem) -> tuple[int | None, str]:
        """``(bytes, how)``: the memory one fresh setup and two steps hold at their peak."""
        return None, "not measured"


def emulated() -> bool:
    from .backends.cuda.backend import emulated as switch

    return switch()


def _cupy() -> Any:
    from .backends.cuda.backend import import_cupy

    return import_cupy()


class BackendCandidate(Candidate):
    """A gpubp backend's ``train_step`` on its own fresh backend instance (own workspaces)."""

    kind = "backend"

    def __init__(self, name: str) -> None:
        self.name = self.label = name
        proto = get_backend(name)
        self._cls = type(proto)
        self.device = CPU if proto.xp is np else GPU

    def setup(self, problem: Problem) -> None:
        be = self.be = self._cls()
        self.W = [be.asarray(w).copy() for w in problem.W]
        self.b = [be.asarray(v).copy() for v in problem.b]
        self._initial = [*problem.W, *problem.b]  # on the host: no second copy on a device
        self.x = be.asarray(problem.x)
        self.y = be.asarray(problem.y)
        self.opt = SGD(lr=LR)
        shapes = [tuple(p.shape) for p in (*self.W, *self.b)]
        self.state = self.opt.bind(self, be, shapes, np.dtype(problem.dtype))
        self.value: Any = None

    def step(self) -> None:
        self.value, *_ = self.be.train_step(
            self.W, self.b, self.x, self.y, ACTIVATION, OUTPUT, LOSS, self.opt, self.state
        )

    def sync(self) -> None:
        self.be.synchronize()

    def reset(self) -> None:
        for p, p0 in zip([*self.W, *self.b], self._initial):
            p[...] = self.be.asarray(p0)

    def validate(self, problem: Problem) -> float:
        self.reset()
        self.step()
        self.sync()
        return validation_error(problem, float(self.value), [*self.W, *self.b])

    def peak_bytes(self, problem: Problem) -> tuple[int | None, str]:
        if self.device == CPU:
            peak, self.step_bytes = _traced_peak(self, problem)
            return peak, "tracemalloc"
        cp = _cupy()
        pool = cp.get_default_memory_pool()
        cp.cuda.Device().synchronize()
        pool.free_all_blocks()
        base = pool.total_bytes()
        self.setup(problem)
        for _ in range(2):
            self.step()
        self.sync()
        # the pool keeps every block it ever needed, so what it holds is its high-water mark
        return int(pool.total_bytes() - base), "CuPy memory pool"


def _traced_peak(c: Candidate, problem: Problem) -> tuple[int, int]:
    """Bytes traced by tracemalloc: the peak over a fresh setup and two steps of ``c``, and the
    peak of a third step above what was held before it (what a steady-state step allocates)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        c.setup(problem)
        for _ in range(2):
            c.step()
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        held = tracemalloc.get_traced_memory()[0]
        c.step()
        return int(peak), int(tracemalloc.get_traced_memory()[1] - held)
    finally:
        tracemalloc.stop()


def torch_status() -> tuple[Any, str | None]:
    """``(torch, None)`` if PyTorch imports, else ``(None, reason)``."""
    if importlib.util.find_spec("torch") is None:
        return None, "PyTorch is not installed (pip install torch)"
    try:
        import torch
    except Exception as exc:  # a broken install: say so, never crash the benchmark
        return None, f"PyTorch does not import: {type(exc).__name__}: {exc}"
    return torch, None


class TorchCandidate(Candidate):
    """The same network and step in PyTorch: ``nn.Linear``/``ReLU``, ``cross_entropy``, SGD.

    ``mode``: ``eager``; ``graph`` (the whole step captured once in a CUDA graph and replayed,
    as in PyTorch's "whole-network capture" recipe); ``compile`` (``torch.compile`` of the model
    and loss; backward and the optimizer as PyTorch runs them).
    """

    kind = "torch"

    def __init__(self, torch: Any, device: str, mode: str = "eager") -> None:
        self.torch, self.device, self.mode = torch, device, mode
        self.label = "torch" if device == CPU else f"torch {mode}"

    def setup(self, problem: Problem) -> None:
        t = self.torch
        dev = "cuda" if self.device == GPU else "cpu"
        dt = getattr(t, problem.dtype)
        layers: list[Any] = []
        self.linears: list[Any] = []
        L = len(problem.W)
        for i in range(L):
            n_out, n_in = problem.W[i].shape
            lin = t.nn.Linear(n_in, n_out, dtype=dt, device=dev)
            self.linears.append(lin)
            layers.append(lin)
            if i < L - 1:
                layers.append(t.nn.ReLU())
        model = t.nn.Sequential(*layers)
        self.problem = problem
        self._load(problem)
        self.x = t.as_tensor(problem.x, device=dev)
        self.y = t.as_tensor(problem.y, device=dev)
        self.opt = t.optim.SGD(model.parameters(), lr=LR)
        if self.mode == "compile":
            # forget earlier compilations: after a different batch size, torch.compile would
            # otherwise recompile for dynamic shapes, which is not what a fixed-shape loop gets
            t.compiler.reset()
        fn = t.compile(model) if self.mode == "compile" else model
        F = t.nn.functional

        def eager_step() -> None:
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fn(self.x), self.y)
            loss.backward()
            self.opt.step()
            self.loss = loss

        self._step: Callable[[], None] = eager_step
        if self.mode == "graph":
            side = t.cuda.Stream()
            side.wait_stream(t.cuda.current_stream())
            with t.cuda.stream(side):  # warm up on a side stream before capture
                for _ in range(3):
                    eager_step()
            t.cuda.current_stream().wait_stream(side)
            graph = t.cuda.CUDAGraph()
            self.opt.zero_grad(set_to_none=True)
            with t.cuda.graph(graph, stream=side):  # the stream the warm-up ran on
                static_loss = F.cross_entropy(model(self.x), self.y)
                static_loss.backward()
                self.opt.step()
            self.loss = static_loss
            self._step = graph.replay

    def _load(self, problem: Problem) -> None:
        t = self.torch
        with t.no_grad():
            for lin, w, v in zip(self.linears, problem.W, problem.b):
                lin.weight.copy_(t.as_tensor(w))
                lin.bias.copy_(t.as_tensor(v))

    def step(self) -> None:
        self._step()

    def reset(self) -> None:
        self._load(self.problem)

    def sync(self) -> None:
        if self.device == GPU:
            self.torch.cuda.synchronize()

    def validate(self, problem: Problem) -> float:
        self._load(problem)  # in place: a captured graph keeps its addresses
        self.step()
        self.sync()
        params = [lin.weight for lin in self.linears] + [lin.bias for lin in self.linears]
        return validation_error(
            problem, float(self.loss.detach()), [p.detach().cpu().numpy() for p in params]
        )

    def peak_bytes(self, problem: Problem) -> tuple[int | None, str]:
        if self.device == CPU:
            return None, "tracemalloc does not see PyTorch's CPU allocator"
        t = self.torch
        t.cuda.synchronize()
        t.cuda.empty_cache()
        t.cuda.reset_peak_memory_stats()
        base = t.cuda.memory_allocated()
        self.setup(problem)
        for _ in range(2):
            self.step()
        self.sync()
        return int(t.cuda.max_memory_allocated() - base), "torch.cuda.max_memory_allocated"


class FloorCandidate(Candidate):
    """The step's GEMMs alone, through ``xp.matmul(..., out=)`` into preallocated outputs.

    With ``copy=True`` each step also copies :func:`elementwise_bytes` bytes device to device
    (half read, half written), the time the elementwise work needs at the copy bandwidth.
    """

    kind = "floor"

    def __init__(self, xp: Any, device: str, copy: bool = False) -> None:
        self.xp, self.device, self.copy = xp, device, copy
        blas = "BLAS" if device == CPU else "cuBLAS"
        self.label = "floor: GEMM+copy" if copy else f"floor: {blas} GEMM"

    def setup(self, problem: Problem) -> None:
        xp, dt, B, s = self.xp, problem.dtype, problem.batch, problem.sizes
        rng = np.random.default_rng(1)
        L = len(s) - 1

        def rand(*shape: int) -> Any:
            return xp.asarray(rng.normal(0, 1, shape).astype(dt))

        self.A = [rand(B, s[i]) for i in range(L)]  # a^0..a^{L-1}
        self.W = [rand(s[i + 1], s[i]) for i in range(L)]
        self.D = [rand(B, s[i + 1]) for i in range(L)]  # delta^1..delta^L
        self.Z = [xp.empty((B, s[i + 1]), dtype=dt) for i in range(L)]
        self.G = [xp.empty((B, s[i]), dtype=dt) for i in range(L)]
        self.dW = [xp.empty((s[i + 1], s[i]), dtype=dt) for i in range(L)]
        if self.copy:
            n = max(1, elementwise_bytes(s, B, np.dtype(dt).itemsize) // 2)
            self.src = xp.ones(n, dtype=np.uint8)
            self.dst = xp.empty(n, dtype=np.uint8)

    def step(self) -> None:
        mm = self.xp.matmul
        L = len(self.W)
        for i in range(L):
            mm(self.A[i], self.W[i].T, out=self.Z[i])
        for i in range(L - 1, -1, -1):
            mm(self.D[i].T, self.A[i], out=self.dW[i])
            if i > 0:
                mm(self.D[i], self.W[i], out=self.G[i])
        if self.copy:
            self.xp.copyto(self.dst, self.src)

    def sync(self) -> None:
        if self.device == GPU:
            _cupy().cuda.Device().synchronize()

    def validate(self, problem: Problem) -> float:
        self.step()
        self.sync()

        def f(a: Any) -> np.ndarray:
            return to_numpy(a).astype(np.float64)

        worst = 0.0
        for i in range(len(self.W)):
            A, W, D = f(self.A[i]), f(self.W[i]), f(self.D[i])
            worst = max(worst, rel_error(self.Z[i], A @ W.T), rel_error(self.dW[i], D.T @ A))
            if i > 0:
                worst = max(worst, rel_error(self.G[i], D @ W))
        if self.copy and not bool((self.dst == 1).all()):
            worst = math.inf
        return worst


# --- timing -----------------------------------------------------------------------------------


@dataclass
class Stats:
    """Seconds per step over the samples, and their relative interquartile spread."""

    median: float
    min: float
    max: float
    spread: float
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        s = np.asarray(samples, dtype=np.float64)
        q25, med, q75 = np.percentile(s, [25, 50, 75])
        return cls(float(med), float(s.min()), float(s.max()), float((q75 - q25) / med), list(s))


class Progress:
    """A one-line progress report on ``stream``: redrawn in place on a terminal, else one line
    per group of candidates."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.tty = bool(stream is not None and stream.isatty())
        self.t0 = time.perf_counter()
        self.last = 0.0

    def group(self, text: str) -> None:
        self.prefix = text
        if self.stream is not None and not self.tty:
            self.stream.write(f"gpubp bench: {text}\n")
            self.stream.flush()
        self.update("")

    def update(self, text: str) -> None:
        now = time.perf_counter()
        if not self.tty or self.stream is None or now - self.last < 0.1:
            return
        self.last = now
        line = f"gpubp bench [{now - self.t0:5.0f}s] {self.prefix} {text}"
        self.stream.write("\r\033[K" + line[:150])
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.stream is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _run(c: Candidate, n: int) -> float:
    """Seconds for ``n`` steps of ``c``, the device synchronised inside the timed region."""
    c.sync()
    t0 = time.perf_counter()
    for _ in range(n):
        c.step()
    c.sync()
    return time.perf_counter() - t0


def time_round_robin(
    cands: Sequence[Candidate],
    repeats: int,
    min_time: float,
    progress: Progress | None = None,
    settle: float = 0.0,
) -> dict[str, Stats]:
    """Per candidate, :class:`Stats` of seconds per step over ``repeats`` samples.

    Each candidate is warmed up and calibrated to ``n`` steps per sample (at least ``min_time``
    seconds); then sample ``r`` of every candidate is taken before sample ``r + 1`` of any, the
    order reversed every other round, each sample after a reset of the parameters
    (:meth:`Candidate.reset`), a pause of ``settle`` seconds and one untimed re-warming step.
    """
    steps: dict[str, int] = {}
    for c in cands:
        _run(c, 2)  # warm-up: first-call costs (allocation, compilation, capture)
        once = sorted(_run(c, 1) for _ in range(3))[1]  # the median: robust to a stall
        steps[c.label] = max(1, math.ceil(min_time / max(once, 1e-9)))
    samples: dict[str, list[float]] = {c.label: [] for c in cands}
    for r in range(repeats):
        order = list(cands) if r % 2 == 0 else list(reversed(cands))
        for c in order:
            if progress is not None:
                progress.update(f"{c.label}: sample {r + 1}/{repeats}")
            c.reset()
            if settle:
                time.sleep(settle)
            _run(c, 1)
            n = steps[c.label]
            samples[c.label].append(_run(c, n) / n)
    return {label: Stats.of(s) for label, s in samples.items()}


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Row:
    """One candidate on one (shape, dtype, device) in the table."""

    shape: str
    sizes: tuple[int, ...]
    batch: int
    dtype: str
    device: str
    candidate: str
    kind: str
    validation_error: float | None = None
    stats: Stats | None = None
    gflops: float | None = None
    samples_per_s: float | None = None
    x_floor: float | None = None
    x_torch: float | None = None
    peak_bytes: int | None = None
    peak_how: str = ""
    step_alloc_bytes: int | None = None  # CPU: what one steady-state step allocates at its peak
    error: str | None = None


@dataclass
class BenchConfig:
    """What ``gpubp bench`` runs (the command-line options)."""

    shapes: list[BenchShape] = field(default_factory=lambda: [s for s in STANDARD_SHAPES.values()])
    backends: list[str] | None = None  # None: every available one
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    repeats: int = DEFAULT_REPEATS
    min_time: float = DEFAULT_MIN_TIME
    settle: float = DEFAULT_SETTLE
    torch: bool = True
    memory: bool = True
    sweep_shape: BenchShape | None = None
    sweep_batches: dict[str, tuple[int, ...]] = field(default_factory=lambda: SWEEP_BATCHES)
    seed: int = 0


@dataclass
class BenchReport:
    """Everything one run measured, what was left out and why, and its warnings."""

    meta: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    sweep: list[dict[str, Any]] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "rows": [asdict(r) for r in self.rows],
            "sweep": self.sweep,
            "absent": self.absent,
            "warnings": self.warnings,
            "failures": self.failures,
        }


def gpu_status() -> str | None:
    """``None`` if CuPy sees a CUDA GPU, else why not."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    try:
        import cupy

        if not cupy.cuda.is_available():
            return "CuPy sees no CUDA GPU"
    except Exception as exc:
        return f"CuPy cannot reach a GPU ({type(exc).__name__}: {exc})"
    return None


def _blas_name() -> str:
    try:
        cfg: Any = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # numpy < 1.25: no dict mode
        return "unknown"


def environment() -> dict[str, Any]:
    """The machine and library versions a table was measured with."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    torch, _ = torch_status()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "gpubp": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "numpy": np.__version__,
        "blas": _blas_name(),
        "torch": None if torch is None else torch.__version__,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "workload": f"{ACTIVATION} hidden, {OUTPUT} + {LOSS}, SGD lr={LR}",
    }


@dataclass
class Maker:
    """Builds fresh instances of one candidate (timing and the memory pass each get their own)."""

    label: str
    kind: str
    make: Callable[[], Candidate]
    in_sweep: bool = True  # also timed in the --plot batch-size sweep


def _makers(
    config: BenchConfig, report: BenchReport, gpu_why: str | None
) -> dict[str, list[Maker]]:
    """Per device, the candidates to run; what cannot run goes to ``report.absent``, with why."""
    status = backend_status()
    names = config.backends if config.backends is not None else list(BACKEND_NAMES)
    out: dict[str, list[Maker]] = {CPU: [], GPU: []}

    def add(device: str, make: Callable[[], Candidate], in_sweep: bool = True) -> None:
        proto = make()
        out[device].append(Maker(proto.label, proto.kind, make, in_sweep))

    for name in names:
        why = status[name]
        if why is None and name == "cupy" and emulated():
            why = "GPUBP_CUDA_EMULATOR=1: the emulated GPU (kernels run on the CPU) is not timed"
        if why is not None:
            report.absent.append(f"backend {name}: {why}")
            continue
        add(BackendCandidate(name).device, functools.partial(BackendCandidate, name))
    torch, torch_why = torch_status() if config.torch else (None, "left out by --no-torch")
    if torch is None:
        report.absent.append(f"PyTorch rows and the 'x torch' column: {torch_why}")
    else:
        add(CPU, functools.partial(TorchCandidate, torch, CPU))
        if torch.cuda.is_available():
            for mode in ("eager", "graph", "compile"):
                add(GPU, functools.partial(TorchCandidate, torch, GPU, mode), mode == "eager")
        else:
            report.absent.append(
                "PyTorch on a GPU (eager, CUDA graph, torch.compile): "
                "torch.cuda.is_available() is False"
            )
    add(CPU, functools.partial(FloorCandidate, np, CPU))
    if gpu_why is None:
        cp = _cupy()
        add(GPU, functools.partial(FloorCandidate, cp, GPU))
        add(GPU, functools.partial(FloorCandidate, cp, GPU, copy=True), False)
    else:
        report.absent.append(
            "GPU floors (cuBLAS GEMM, copy bandwidth), GPU batch sizes and the GPU-only "
            f"'wide' shape: {gpu_why}"
        )
    if all(m.kind == "floor" for m in out[GPU]):
        out[GPU] = []  # a floor alone compares nothing
    return out


#: Most GEMM flops the float64 reference may spend checking one candidate (a few seconds), and
#: most rows (float32 sums over more rows than this drift towards the tolerance by rounding
#: alone): a larger step is checked on a smaller batch of its own first.
VALIDATION_FLOPS, VALIDATION_ROWS = 2e10, 16384


def validation_batch(sizes: Sequence[int], batch: int) -> int:
    """The batch size a candidate is checked at: ``batch``, capped as said above."""
    per_row = step_flops(sizes, 1)
    return max(1, min(batch, VALIDATION_ROWS, int(VALIDATION_FLOPS // per_row)))


def _group(
    shape: BenchShape,
    batch: int,
    dtype: str,
    device: str,
    makers: list[Maker],
    report: BenchReport,
    progress: Progress,
    *,
    repeats: int,
    min_time: float,
    settle: float,
    memory: bool,
    seed: int,
) -> list[Row]:
    """Check, time and measure every candidate on one (shape, batch, dtype, device)."""
    vbatch = validation_batch(shape.sizes, batch)
    vproblem = make_problem(shape.sizes, vbatch, dtype, seed=seed)
    problem = vproblem if vbatch == batch else make_problem(shape.sizes, batch, dtype, seed, False)
    tol = TOLERANCE[dtype]
    rows, cands = [], []
    for m in makers:
        c = m.make()
        row = Row(shape.name, shape.sizes, batch, dtype, device, m.label, m.kind)
        rows.append(row)
        progress.update(f"{m.label}: set up, check against the reference")
        try:
            c.setup(vproblem)
            row.validation_error = err = c.validate(vproblem)
            if not err <= tol:
                row.error = (
                    f"disagrees with the float64 reference (batch {vbatch}): relative error "
                    f"{err:.2e} > {tol:g}"
                )
            elif problem is not vproblem:
                c.setup(problem)
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"
        if row.error is None:
            cands.append(c)
        else:
            where = f"{m.label} on {shape.name} batch {batch} {dtype} ({device})"
            (report.absent if m.kind == "torch" else report.failures).append(
                f"{where}: {row.error}; not timed"
            )
    stats = time_round_robin(cands, repeats, min_time, progress, settle)
    cands.clear()  # free their buffers before the memory pass
    gc.collect()
    flops = step_flops(shape.sizes, batch)
    floors = {r.candidate: r for r in rows if r.kind == "floor" and r.error is None}
    floor_label = next((k for k in floors if "copy" in k), next(iter(floors), None))
    torches = [stats[r.candidate].median for r in rows if r.kind == "torch" and r.error is None]
    for row in rows:
        if row.error is not None:
            continue
        st = row.stats = stats[row.candidate]
        row.gflops = flops / st.median / 1e9
        row.samples_per_s = batch / st.median
        if floor_label is not None:
            row.x_floor = st.median / stats[floor_label].median
        if torches:
            row.x_torch = st.median / min(torches)
        if st.spread > SPREAD_WARN:
            report.warnings.append(
                f"{row.candidate} on {shape.name} batch {batch} {dtype} ({device}): spread "
                f"{100 * st.spread:.0f}% (interquartile range / median) is too wide to trust; "
                "rerun on a quieter machine or with more --repeats"
            )
    if memory:
        for row, m in zip(rows, makers):
            if row.error is not None or m.kind == "floor":
                continue
            progress.update(f"{m.label}: peak memory")
            try:
                fresh = m.make()
                row.peak_bytes, row.peak_how = fresh.peak_bytes(problem)
                row.step_alloc_bytes = getattr(fresh, "step_bytes", None)
                del fresh
            except Exception as exc:
                row.peak_how = f"failed: {type(exc).__name__}: {exc}"
            gc.collect()
    return rows


def run_bench(config: BenchConfig, progress_stream: TextIO | None = sys.stderr) -> BenchReport:
    """Run the benchmark described by ``config``; see the module docstring."""
    report = BenchReport(meta=environment())
    report.meta.update(
        repeats=config.repeats,
        min_time_s=config.min_time,
        settle_s=config.settle,
        command=command_line(config),
    )
    makers = _makers(config, report, gpu_status())
    progress = Progress(progress_stream)
    devices = [d for d in (CPU, GPU) if makers[d]]
    if GPU in devices:
        report.meta["gpu"] = _gpu_name()
    groups: list[tuple[BenchShape, int, str, str]] = []
    for shape in config.shapes:
        if GPU not in devices and shape.cpu_batch is None:
            report.absent.append(f"shape {shape.name}: runs on a GPU only, and none is here")
        for device in devices:
            batch = shape.batch(device)
            if batch is not None:
                groups.extend((shape, batch, dt, device) for dt in config.dtypes)
    try:
        for k, (shape, batch, dt, device) in enumerate(groups):
            progress.group(f"({k + 1}/{len(groups)}) {shape.name} batch {batch} {dt} {device}:")
            report.rows.extend(
                _group(
                    shape,
                    batch,
                    dt,
                    device,
                    makers[device],
                    report,
                    progress,
                    repeats=config.repeats,
                    min_time=config.min_time,
                    settle=config.settle,
                    memory=config.memory,
                    seed=config.seed,
                )
            )
        if config.sweep_shape is not None:
            report.sweep = _sweep(config, makers, devices, report, progress)
    finally:
        progress.close()
    return report


def _gpu_name() -> str:
    try:
        cp = _cupy()
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        return str(props["name"].decode())
    except Exception:
        torch, _ = torch_status()
        return str(torch.cuda.get_device_name()) if torch is not None else "unknown"


def _sweep(
    config: BenchConfig,
    makers: dict[str, list[Maker]],
    devices: list[str],
    report: BenchReport,
    progress: Progress,
) -> list[dict[str, Any]]:
    """Time per sample against batch size on ``config.sweep_shape`` (for ``--plot``).

    Fewer samples per point than the table (a third of ``repeats``, at least 3); on a GPU,
    PyTorch runs eager only (a capture and a compilation per batch size would dominate the run)
    and the floor is the GEMMs alone.
    """
    shape = config.sweep_shape
    assert shape is not None
    points = []
    dtype = config.dtypes[0]
    for device in devices:
        chosen = [m for m in makers[device] if m.in_sweep]
        for batch in config.sweep_batches[device]:
            progress.group(f"sweep {shape.name} batch {batch} {dtype} {device}:")
            rows = _group(
                BenchShape(shape.name, shape.sizes, batch, batch),
                batch,
                dtype,
                device,
                chosen,
                report,
                progress,
                repeats=max(3, config.repeats // 3),
                min_time=config.min_time,
                settle=config.settle,
                memory=False,
                seed=config.seed,
            )
            for r in rows:
                if r.stats is not None:
                    points.append(
                        {
                            "shape": shape.name,
                            "sizes": list(shape.sizes),
                            "device": device,
                            "candidate": r.candidate,
                            "kind": r.kind,
                            "dtype": dtype,
                            "batch": batch,
                            "seconds_per_step": r.stats.median,
                            "seconds_per_sample": r.stats.median / batch,
                        }
                    )
    return points


# --- output -----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None or not math.isfinite(value) else format(value, spec)


def format_table(report: BenchReport) -> str:
    """The report as a plain-text table with its notes, absences and warnings."""
    has_torch = any(r.kind == "torch" and r.stats is not None for r in report.rows)
    cols = [
        ("shape", 12, "<"),
        ("batch", 6, ">"),
        ("dtype", 7, "<"),
        ("dev", 3, "<"),
        ("candidate", 18, "<"),
        ("median ms", 9, ">"),
        ("min ms", 8, ">"),
        ("max ms", 8, ">"),
        ("spread", 6, ">"),
        ("samples/s", 10, ">"),
        ("GFLOP/s", 7, ">"),
        ("x floor", 7, ">"),
    ]
    if has_torch:
        cols.append(("x torch", 7, ">"))
    cols.append(("peak MiB", 8, ">"))
    header = " ".join(f"{name:{al}{w}}" for name, w, al in cols)
    lines = [header, "-" * len(header)]
    previous = None
    for r in report.rows:
        key = (r.shape, r.dtype, r.device)
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        if r.stats is None:
            cells = [r.shape, str(r.batch), r.dtype, r.device, r.candidate, "FAILED"]
            lines.append(" ".join(cells) + f": {r.error}")
            continue
        st = r.stats
        vals = [
            r.shape,
            str(r.batch),
            r.dtype,
            r.device,
            r.candidate,
            _fmt(1e3 * st.median, ".3f"),
            _fmt(1e3 * st.min, ".3f"),
            _fmt(1e3 * st.max, ".3f"),
            _fmt(100 * st.spread, ".0f") + "%",
            _fmt(r.samples_per_s, ".0f"),
            _fmt(r.gflops, ".1f"),
            _fmt(r.x_floor, ".2f"),
        ]
        if has_torch:
            vals.append(_fmt(r.x_torch, ".2f"))
        vals.append(_fmt(None if r.peak_bytes is None else r.peak_bytes / 2**20, ".2f"))
        lines.append(" ".join(f"{v:{al}{w}}" for v, (_, w, al) in zip(vals, cols)))
    m = report.meta
    lines += [
        "",
        f"measured {m['date']} on {m['cpu']} ({m['cores']} logical cores"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"), Python {m['python']}, NumPy {m['numpy']} ({m['blas']})"
        + (f", PyTorch {m['torch']} ({m['torch_threads']} threads)" if m["torch"] else ""),
        f"step: {m['workload']}; {m['repeats']} interleaved samples of >= {m['min_time_s']:g} s "
        "each; ms per step; spread = (q75 - q25) / median",
        "GFLOP/s counts the step's GEMM flops only; x floor = median / the floor's median "
        "(GEMM+copy on a GPU, GEMM alone on the CPU); "
        + ("x torch = median / the fastest PyTorch row of the same device; " if has_torch else "")
        + "peak MiB = memory of a fresh setup and two steps (tracemalloc on the CPU, the memory "
        "pool on a GPU; '-' where not measurable)",
        f"command: {m.get('command', '')}",
    ]
    if report.absent:
        lines += ["", "absent here:"] + [f"  - {a}" for a in report.absent]
    if report.failures:
        lines += ["", "FAILED:"] + [f"  - {f}" for f in report.failures]
    if report.warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in report.warnings]
    return "\n".join(lines)


def plot_sweep(report: BenchReport, path: str) -> None:
    """Time per sample against batch size, log-log, one line per candidate and device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    kinds = {}
    for p in report.sweep:
        key = (p["candidate"], p["device"])
        lines.setdefault(key, []).append((p["batch"], p["seconds_per_sample"]))
        kinds[key] = p["kind"]
    for (cand, dev), pts in lines.items():
        pts.sort()
        style = {"floor": "--", "torch": ":"}.get(kinds[(cand, dev)], "-")
        ax.plot(
            [b for b, _ in pts],
            [1e6 * s for _, s in pts],
            style,
            marker="o",
            label=f"{cand} ({dev})",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("microseconds per sample (one train step / batch)")
    shape = report.sweep[0]["shape"] if report.sweep else ""
    ax.set_title(f"gpubp bench: {shape} train step, {report.meta['date'][:10]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gpubp bench``."""
    parser.add_argument(
        "--shapes",
        default="all",
        help=f"comma-separated: {', '.join(STANDARD_SHAPES)}, or SIZES@BATCH such as "
        "784-128-10@64; 'all' (default) runs every standard shape this machine can",
    )
    parser.add_argument(
        "--backends",
        default="all",
        help=f"comma-separated from {', '.join(BACKEND_NAMES)}; 'all' (default): every one "
        "that can run here",
    )
    parser.add_argument("--dtypes", default="float32", help="default float32; float32,float64")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_REPEATS} samples of >= {QUICK_MIN_TIME:g} s (default {DEFAULT_REPEATS} of "
        f">= {DEFAULT_MIN_TIME:g} s): a rough look in a few seconds",
    )
    parser.add_argument("--repeats", type=int, help="samples per candidate (overrides --quick)")
    parser.add_argument(
        "--min-time", type=float, help="seconds each sample runs at least (overrides --quick)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=DEFAULT_SETTLE,
        help=f"seconds to pause before each sample so the previous candidate's spinning BLAS "
        f"threads go to sleep (default {DEFAULT_SETTLE:g})",
    )
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="also sweep the batch size and plot time per sample against it (log-log, one "
        "line per backend; needs matplotlib)",
    )
    parser.add_argument(
        "--plot-shape",
        default="mnist-mlp",
        help="the network of the --plot sweep (a --shapes name)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random problem")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress line on standard error"
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A :class:`BenchConfig` from parsed options; :class:`ValueError` names a bad option."""
    status = backend_status()
    backends = None
    if args.backends != "all":
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        for name in backends:
            if name not in status:
                raise ValueError(
                    f"--backends: unknown backend {name!r}; expected names from "
                    f"{', '.join(BACKEND_NAMES)} or 'all'"
                )
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for dt in dtypes:
        if dt not in TOLERANCE:
            raise ValueError(f"--dtypes: {dt!r} is not supported; expected float32,float64")
    if not dtypes:
        raise ValueError("--dtypes: give at least one of float32,float64")
    if args.shapes == "all":
        shapes = list(STANDARD_SHAPES.values())
    else:
        shapes = [parse_shape(s.strip()) for s in args.shapes.split(",") if s.strip()]
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    if repeats < 3:
        raise ValueError(f"--repeats: {repeats} is too few for a median and a spread; use >= 3")
    min_time = (
        args.min_time
        if args.min_time is not None
        else (QUICK_MIN_TIME if args.quick else DEFAULT_MIN_TIME)
    )
    if not min_time >= 0:
        raise ValueError(f"--min-time: {min_time} must be a number of seconds >= 0")
    if not args.settle >= 0:
        raise ValueError(f"--settle: {args.settle} must be a number of seconds >= 0")
    sweep = None
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError(
                "--plot needs matplotlib, which is not installed; pip install 'gpubp[plot]' "
                "(or leave --plot out)"
            )
        sweep = parse_shape(args.plot_shape)
    return BenchConfig(
        shapes=shapes,
        backends=backends,
        dtypes=dtypes,
        repeats=repeats,
        min_time=min_time,
        settle=args.settle,
        torch=not args.no_torch,
        memory=not args.no_memory,
        sweep_shape=sweep,
        sweep_batches=QUICK_SWEEP_BATCHES if args.quick else SWEEP_BATCHES,
        seed=args.seed,
    )


def command_line(config: BenchConfig) -> str:
    """A ``gpubp bench`` command that reruns ``config`` (without ``--json``/``--plot``)."""
    parts = ["gpubp bench", "--shapes", ",".join(s.name for s in config.shapes)]
    if config.backends is not None:
        parts += ["--backends", ",".join(config.backends)]
    parts += ["--dtypes", ",".join(config.dtypes)]
    parts += ["--repeats", str(config.repeats), "--min-time", f"{config.min_time:g}"]
    parts += ["--settle", f"{config.settle:g}"]
    parts += [] if config.torch else ["--no-torch"]
    parts += [] if config.memory else ["--no-memory"]
    parts += [] if config.seed == 0 else ["--seed", str(config.seed)]
    return " ".join(parts)


def main(args: argparse.Namespace) -> int:
    """``gpubp bench``: run, print the table, write ``--json`` and ``--plot``; 1 on failures."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"gpubp bench: {exc}", file=sys.stderr)
        return 2
    report = run_bench(config, None if args.no_progress else sys.stderr)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report.to_json(), fh, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot_sweep(report, args.plot)
        print(f"wrote {args.plot} ({config.sweep_shape.name if config.sweep_shape else ''})")
    return 1 if report.failures else 0
